"""The confidence gate: answer an image now, or feed it the next stage's detail tokens.

After stage s the zero-shot scores are `softmax(logit_scale * cos(image, label))` over the candidate labels.
The gate stops an image when its probability margin, top-1 minus top-2, reaches the threshold:

- `margin_scaling="none"` (default): stop when `p1 - p2 >= margin_threshold`; the threshold is a probability
  margin in [0, 1]. `0` answers every image at stage 0, anything above 1 never stops early.
- `margin_scaling="num_labels"` (the paper's class-count-scaled form): stop when `p1 - p2 >= margin_threshold * N`
  for N candidate labels; `margin_threshold` is then a margin *per label* (probability units divided by N), so
  one setting transfers across label-set sizes (with 1,000 labels, 3e-4 means a margin of 0.3).

A single candidate label always stops at stage 0: there is nothing to separate.

Two more ways to decide who continues, both read from the same margins:

- A budget (`continue_within_budget`): after a stage, the images with the smallest margins continue first, as
  many as the remaining GFLOPs allow.
- Every operating point at once (`gate_operating_points`, for the margin or any other exit signal): on a set of
  images, each threshold's agreement with the full model (the reference an early exit must keep, which needs no
  labels) and its mean GFLOPs, computed exactly.
  `gate_calibration.py` chooses a threshold from them and keeps it with the model.

This file is shipped as remote code with saved checkpoints.
"""

import math
import operator
from dataclasses import dataclass

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


def images_that_continue(
    scores: torch.Tensor,
    num_labels: int,
    margin_threshold: float | None,
    margin_scaling: str = "none",
    affordable: int | None = None,
) -> torch.Tensor:
    """After a stage that is not the last, which images go on: (batch,) exit scores -> (batch,) bool.

    The gate sends on every image whose score is below the threshold (every image for `None`; none for a single
    label, which has nothing to separate); when a budget pays for only `affordable` of them, the least sure go
    (`continue_within_budget`).
    """
    if margin_threshold is None:
        wants = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    elif num_labels == 1:
        wants = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    else:
        wants = scores < effective_threshold(margin_threshold, num_labels, margin_scaling)
    if affordable is None:
        return wants
    return continue_within_budget(scores, wants, affordable)


class StageGate:
    """Which images of `refine` continue after each stage: the gate on the exit scores, then a GFLOPs budget.

    Args:
        margin_threshold: the gate's threshold, in the exit signal's units (`None`: every image wants to continue).
        margin_scaling: `"none"` or `"num_labels"`.
        cumulative_gflops: S values, the GFLOPs to have an answer after each stage.
        gflops_budget: mean GFLOPs per image for the batch (`None`: no budget); stage 0 is paid for every image,
            the rest goes to the least sure images first.
        batch_size: images in the batch, who share the budget.
    """

    def __init__(self, margin_threshold, margin_scaling: str, cumulative_gflops, gflops_budget, batch_size: int):
        self.margin_threshold, self.margin_scaling = margin_threshold, margin_scaling
        self.cumulative_gflops = [float(value) for value in cumulative_gflops]
        self.budget_left = None
        if gflops_budget is not None:  # what is left after stage 0, which every image runs
            stage_zero = self.cumulative_gflops[0]
            self.budget_left = batch_size * (check_gflops_budget(gflops_budget, stage_zero) - stage_zero)

    def continues(self, scores: torch.Tensor, num_labels: int, stage: int) -> torch.Tensor:
        """(active,) exit scores after `stage` (not the last) -> (active,) bool, the images that go on; their next
        stage is charged to the budget."""
        step_cost = self.cumulative_gflops[stage + 1] - self.cumulative_gflops[stage]
        affordable = None if self.budget_left is None else int((self.budget_left + 1e-9) // step_cost)
        continues = images_that_continue(scores, num_labels, self.margin_threshold, self.margin_scaling, affordable)
        if self.budget_left is not None:
            self.budget_left -= step_cost * int(continues.sum())
        return continues


def _as_number(value, name: str, expected: str) -> float:
    """`value` as a float (Python, numpy or 0-d torch numbers), or a `ValueError` naming `name` and `expected`."""
    if not isinstance(value, (str, bytes, bool)):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"`{name}` must be {expected}, got {type(value).__name__} {value!r}.")


def check_gflops_budget(gflops_budget, minimum: float) -> float:
    """`gflops_budget` (mean image-encoder GFLOPs per image) as a float, or a `ValueError` when it is not a
    number or below `minimum`, the cost of stage 0 that every image pays."""
    value = _as_number(gflops_budget, "gflops_budget", "a number of GFLOPs per image")
    if not value >= minimum - 1e-12:  # also rejects NaN
        raise ValueError(
            f"`gflops_budget` {value:g} GFLOPs per image is below the {minimum:.6g} GFLOPs of stage 0, which every "
            f"image needs: pass at least {minimum:.6g} (that answers every image after stage 0)."
        )
    return value


def continue_within_budget(margins: torch.Tensor, wants: torch.Tensor, affordable: int) -> torch.Tensor:
    """Which images continue when only `affordable` of them can: those with the smallest margins among the ones
    that `wants` to continue (ties in batch order).

    Args:
        margins: (batch,) exit scores after the current stage (the probability margins for the paper's gate).
        wants: (batch,) bool, the images the gate would send to the next stage.
        affordable: how many images the remaining budget pays the next stage for.

    Returns:
        (batch,) bool, the images that continue.
    """
    candidates = wants.nonzero().squeeze(1)
    if len(candidates) <= affordable:
        return wants.clone()
    order = margins[candidates].argsort(stable=True)
    continues = torch.zeros_like(wants)
    continues[candidates[order[: max(affordable, 0)]]] = True
    return continues


@dataclass
class GateOperatingPoints:
    """Every distinct behaviour of a gate on a set of images, cheapest first.

    The exit stage of an image changes only where the threshold crosses one of its exit scores (its margins, for
    the margin gate), so a set of N images and S stages has at most N * (S - 1) + 1 distinct operating points; each
    is represented by one threshold inside its interval (the midpoint between neighbouring scores), the last by
    `inf`: no early exit.

    thresholds: (K,) float64, in the exit signal's units (probability units for the margin), increasing.
    agreement: (K,) float64, share of images whose gated top-1 equals the reference (the last stage's, or the
        labels when given: then it is the accuracy).
    mean_gflops: (K,) float64, mean cumulative GFLOPs per image.
    stage_share: (K, S) float64, share of images answered at each stage.
    crossings: (K - 1,) the scores where the behaviour changes, in the precision the gate compares in (float32 for
        the margin); point k holds for thresholds in (crossings[k - 1], crossings[k]].
    """

    thresholds: torch.Tensor
    agreement: torch.Tensor
    mean_gflops: torch.Tensor
    stage_share: torch.Tensor
    crossings: torch.Tensor

    def index_at(self, thresholds) -> torch.Tensor:
        """The operating point of each threshold (the signal's units; `inf` for no early exit): (T,) long."""
        thresholds = torch.as_tensor(thresholds, dtype=self.crossings.dtype).reshape(-1)
        # Scores reach a threshold when >= it: the crossings passed are those strictly below it.
        return torch.searchsorted(self.crossings, thresholds, side="left")

    @property
    def largest_thresholds(self) -> torch.Tensor:
        """(K,) float64, the largest threshold of each operating point (its crossing; `inf` for the last)."""
        return torch.cat([self.crossings.double(), torch.tensor([math.inf], dtype=torch.float64)])


def representative_thresholds(crossings: torch.Tensor) -> torch.Tensor:
    """One threshold inside each interval that sorted, distinct `crossings` (scores, e.g. float32 margins) cut
    [0, inf) into: the midpoint of (crossings[k - 1], crossings[k]] (of [0, crossings[0]] first), then `inf`.
    (K + 1,) float64."""
    lower = torch.cat([crossings.new_zeros(1), crossings[:-1]])
    midpoints = ((lower.double() + crossings.double()) / 2).to(crossings.dtype)
    # The midpoint must lie strictly above the lower score in the precision the gate compares in.
    inside = torch.where((midpoints > lower) | (crossings == 0), midpoints, crossings).double()
    return torch.cat([inside, torch.tensor([math.inf], dtype=torch.float64)])


def exit_stages(signal: torch.Tensor, threshold: float) -> torch.Tensor:
    """The stage at which a gate answers each image at `threshold`: the first whose exit score reaches it, else the
    last. (N, S) scores (the last stage's is not read) -> (N,) long. `gate_operating_points` gives the same exits
    for every threshold at once."""
    passes = signal >= torch.as_tensor(threshold, dtype=signal.dtype)
    passes[:, -1] = True
    return passes.int().argmax(dim=1)  # the first True


def margin_signal(stage_probs: torch.Tensor) -> torch.Tensor:
    """The paper's exit signal: (N, S, C) probabilities -> (N, S) float32 top-1 minus top-2 margins, the precision
    the model's gate compares in; 1 everywhere for a single label (it always answers at stage 0)."""
    return probability_margin(stage_probs.float())


def _crossed_sums(signal: torch.Tensor, agrees: torch.Tensor, gflops: torch.Tensor):
    """The distinct crossing values of the running maxima of `signal` (N, S - 1), and after crossing every value up
    to each: the change in (agreements, GFLOPs, images per stage) summed over the images, (K, 2 + S) float64."""
    num_images, num_stages = agrees.shape
    running_max = signal.cummax(dim=1).values.reshape(-1)  # (N*(S-1),)
    to_stage = torch.arange(1, num_stages).repeat(num_images)
    order = running_max.argsort(stable=True)
    crossings, to_stage = running_max[order], to_stage[order]
    one_hot = torch.nn.functional.one_hot
    deltas = torch.cat(
        [
            (agrees[:, 1:] - agrees[:, :-1]).reshape(-1)[order, None],
            (gflops[to_stage] - gflops[to_stage - 1])[:, None],
            (one_hot(to_stage, num_stages) - one_hot(to_stage - 1, num_stages)).double(),
        ],
        dim=1,
    )
    values, counts = torch.unique_consecutive(crossings, return_counts=True)
    return values, deltas.cumsum(0)[counts.cumsum(0) - 1]


def gate_operating_points(
    stage_probs: torch.Tensor,
    cumulative_gflops,
    reference: torch.Tensor | None = None,
    signal: torch.Tensor | None = None,
) -> GateOperatingPoints:
    """The agreement with a reference and the cost of every threshold of a gate, exactly, from one pass over the
    images: the one replay of the gate that calibration, evaluation, ablations and benchmarks use.

    Image i exits at the first stage s < S - 1 whose exit score reaches θ, so its exit stage is the number of running
    maxima `max(score[i, :s + 1])` below θ: crossing the value of running maximum s moves it from stage s to s + 1.
    Sorting those crossings gives every operating point with one cumulative sum.

    Args:
        stage_probs: (N, S, C) zero-shot probabilities after every stage (the last is the full model).
        cumulative_gflops: S values, the GFLOPs to have an answer after each stage.
        reference: (N,) the answer to agree with; default the last stage's (the full model). With true labels,
            `agreement` is the accuracy (for evaluation; calibration needs no labels).
        signal: (N, S) the exit score of every stage, higher = surer (the last stage's is not read), in the
            precision the gate compares in; default `margin_signal(stage_probs)`, the paper's margin.
    """
    num_images, num_stages, num_labels = stage_probs.shape
    if num_images == 0:
        raise ValueError("Calibration needs at least one image.")
    predictions = stage_probs.argmax(-1)
    reference = predictions[:, -1] if reference is None else torch.as_tensor(reference).to(predictions.device)
    agrees = (predictions == reference[:, None]).double()  # (N, S)
    gflops = torch.as_tensor(cumulative_gflops, dtype=torch.float64)
    # Sums over the images (divided by N at the end, so that shares of whole images stay exact).
    at_stage_zero = torch.cat(
        [
            agrees[:, 0].sum().reshape(1),
            gflops[:1] * num_images,
            torch.nn.functional.one_hot(torch.tensor(0), num_stages).double() * num_images,
        ]
    )
    if num_stages == 1 or num_labels == 1:  # the gate never runs: everything answers at stage 0
        thresholds, sums, values = torch.zeros(1, dtype=torch.float64), at_stage_zero[None], torch.zeros(0)
    else:
        signal = margin_signal(stage_probs[:, :-1]) if signal is None else signal[:, :-1]
        values, crossed = _crossed_sums(signal, agrees, gflops)
        sums = torch.cat([at_stage_zero[None], at_stage_zero + crossed])
        thresholds = representative_thresholds(values)
    return GateOperatingPoints(
        thresholds=thresholds,
        agreement=sums[:, 0] / num_images,
        mean_gflops=sums[:, 1] / num_images,
        stage_share=sums[:, 2:] / num_images,
        crossings=values,
    )
