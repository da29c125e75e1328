"""The confidence gate: answer an image now, or feed it the next stage's detail tokens.

After stage s the zero-shot scores are `softmax(logit_scale * cos(image, label))` over the candidate labels.
The gate stops an image when its probability margin, top-1 minus top-2, reaches the threshold:

- `margin_scaling="none"` (default): stop when `p1 - p2 >= margin_threshold`; the threshold is a probability
  margin in [0, 1]. `0` answers every image at stage 0, anything above 1 never stops early.
- `margin_scaling="num_labels"` (the paper's class-count-scaled form): stop when `p1 - p2 >= margin_threshold * N`
  for N candidate labels; `margin_threshold` is then a margin *per label* (probability units divided by N), so
  one setting transfers across label-set sizes (with 1,000 labels, 3e-4 means a margin of 0.3).

A single candidate label always stops at stage 0: there is nothing to separate.

This file is shipped as remote code with saved checkpoints.
"""

import operator

import torch

MARGIN_SCALINGS = ("none", "num_labels")


def probability_margin(probs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability, (batch, labels) -> (batch,); 1 for a single label."""
    if probs.shape[-1] == 1:
        return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def check_margin_threshold(margin_threshold) -> float:
    """`margin_threshold` as a float, or a `ValueError` naming what is wrong with it (not a number, NaN, < 0).

    Strings are refused rather than parsed: a threshold read from a config file or a form as text is a bug
    upstream, and "0.5" vs 0.5 should not silently mean the same thing in one place and fail in another.
    """
    if isinstance(margin_threshold, (str, bytes, bool)):
        raise ValueError(f"`margin_threshold` must be a number >= 0, got {margin_threshold!r}.")
    try:
        value = float(margin_threshold)
    except (TypeError, ValueError):
        raise ValueError(
            f"`margin_threshold` must be a number >= 0, got {type(margin_threshold).__name__} {margin_threshold!r}."
        ) from None
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"`margin_threshold` must be a number >= 0, got {value}.")
    return value


def check_margin_scaling(margin_scaling) -> str:
    """`margin_scaling` unchanged, or a `ValueError` naming the accepted values."""
    if margin_scaling not in MARGIN_SCALINGS:
        raise ValueError(f"`margin_scaling` must be one of {MARGIN_SCALINGS}, got {margin_scaling!r}.")
    return margin_scaling


def check_stage_count(value, name: str, num_stages: int, minimum: int = 1, hint: str = "") -> int:
    """`value` as a Python int in `minimum..num_stages` (ints, numpy / 0-d torch integers), or a `ValueError` that
    names `name`, the range and `hint`. The one validator for `num_stages` and `max_stages` everywhere."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or not minimum <= count <= num_stages:
        raise ValueError(f"`{name}` must be an integer in {minimum}..{num_stages}{hint}, got {value!r}.")
    return count


def effective_threshold(margin_threshold: float, num_labels: int, margin_scaling: str = "none") -> float:
    """The probability margin an image needs to stop, after optional class-count scaling."""
    check_margin_scaling(margin_scaling)
    margin_threshold = check_margin_threshold(margin_threshold)
    return margin_threshold * num_labels if margin_scaling == "num_labels" else margin_threshold


def gate_stops(probs: torch.Tensor, margin_threshold: float, margin_scaling: str = "none") -> torch.Tensor:
    """Which images stop now: (batch, labels) probabilities -> (batch,) bool."""
    num_labels = probs.shape[-1]
    if num_labels == 1:
        return torch.ones(probs.shape[:-1], dtype=torch.bool, device=probs.device)
    threshold = effective_threshold(margin_threshold, num_labels, margin_scaling)
    return probability_margin(probs) >= threshold
