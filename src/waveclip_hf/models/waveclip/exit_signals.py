"""What the gate reads after a stage to decide whether an image answers now: the exit signal.

Every signal is a score per image after stage s, higher = surer; the gate stops an image at the first stage whose
score reaches the threshold (the last stage always answers). The same class computes it online, in `refine`, and
offline, over every stage of a set of images (`exit_scores`), so calibration replays exactly what the model does.

- `margin` (the paper's, the default): top-1 minus top-2 probability over the candidate labels.
- `stability` (PABEE's patience): the number of consecutive earlier stages whose top-1 equals this stage's, plus
  the margin (in [0, 1)) to rank images of equal count. A threshold of 1.2 reads "the answer did not change since
  the previous stage, and its margin is at least 0.2". At stage 0 it is the margin.
- `saturation` (CALM's state saturation): the cosine between this stage's image embedding and the previous one's;
  it does not depend on the labels. Stage 0 has no previous stage, so this signal never exits there.
- `learned`: a small logistic exit head, shipped in the checkpoint's config (`config.exit_head`), that predicts
  "this stage's top-1 already equals the full model's" from the margin, the top-1 probability, the entropy, the
  number of labels, the cosine between the top-2 labels' text embeddings, the saturation and the stability. A
  checkpoint without a head falls back to the margin.

This file is shipped as remote code with saved checkpoints.
"""

import math

import torch
from torch import nn

from .gating import probability_margin


EXIT_SIGNALS = ("margin", "stability", "saturation", "learned")
EXIT_HEAD_FORMAT = 1
# The learned head's inputs, in the order its weights read them.
EXIT_HEAD_FEATURES = (
    "margin",
    "top1",
    "entropy",
    "log_num_labels",
    "top2_text_cosine",
    "saturation",
    "stable",
    "has_previous",
)


def check_exit_signal(signal, exit_head=None) -> str:
    """The signal the gate will read: `signal` checked, and `learned` falling back to `margin` without a head."""
    if signal not in EXIT_SIGNALS:
        raise ValueError(f"`exit_signal` must be one of {EXIT_SIGNALS}, got {signal!r}.")
    return "margin" if signal == "learned" and not exit_head else signal


class ExitSignal:
    """The exit scores of a batch, stage after stage, keeping what the next stage's score needs (the previous
    stage's top-1, image embedding and agreement count) for the images still running.

    Args:
        signal: one of `EXIT_SIGNALS`.
        text_embeds: (num_labels, projection_dim) label embeddings (the learned head reads the top-2 labels' cosine).
        exit_head: the learned head (`config.exit_head`), for `signal="learned"`.
    """

    def __init__(self, signal: str, text_embeds: torch.Tensor | None = None, exit_head: dict | None = None):
        self.signal = check_exit_signal(signal, exit_head)
        self.text = None if text_embeds is None else nn.functional.normalize(text_embeds.float(), dim=-1)
        self.head = exit_head
        self.previous_top1 = self.previous_embeds = self.agreeing = None

    def scores(self, probs: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(active, labels) probabilities and (active, projection_dim) image embeddings after a stage -> (active,)
        float32 scores; remembers this stage for the next call."""
        step = self._step(probs, image_embeds)
        if self.signal == "margin":
            return step["margin"]
        if self.signal == "stability":
            # Below 1 the margin; the count can only add whole units, so it ranks first.
            return self.agreeing.float() + step["margin"].clamp(max=1 - 1e-6)
        if self.signal == "saturation":
            saturation = step["saturation"]
            return saturation if saturation is not None else torch.full_like(step["margin"], -math.inf)
        return apply_exit_head(self.head, exit_features(probs, self.text, **step))

    def features(self, probs: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The learned head's (active, len(EXIT_HEAD_FEATURES)) inputs after a stage (what it is fitted on);
        remembers this stage for the next call, as `scores` does."""
        return exit_features(probs, self.text, **self._step(probs, image_embeds))

    def _step(self, probs: torch.Tensor, image_embeds: torch.Tensor | None) -> dict:
        """This stage's margin, saturation and stability against the remembered previous stage; then remember it."""
        probs = probs.float()
        margin, top1 = probability_margin(probs), probs.argmax(-1)
        embeds = None if image_embeds is None else nn.functional.normalize(image_embeds.float(), dim=-1)
        has_previous = self.previous_top1 is not None
        stable = (top1 == self.previous_top1) if has_previous else torch.zeros_like(top1, dtype=torch.bool)
        self.agreeing = (self.agreeing + 1) * stable if has_previous else torch.zeros_like(top1)
        saturation = (embeds * self.previous_embeds).sum(-1) if has_previous and embeds is not None else None
        self.previous_top1, self.previous_embeds = top1, embeds
        return {"margin": margin, "saturation": saturation, "stable": stable, "has_previous": has_previous}

    def keep(self, continuing: torch.Tensor) -> None:
        """Keep the state of the images at positions `continuing` (the ones that go on to the next stage)."""
        self.previous_top1 = self.previous_top1[continuing]
        self.agreeing = self.agreeing[continuing]
        if self.previous_embeds is not None:
            self.previous_embeds = self.previous_embeds[continuing]


def exit_features(probs, text, margin, saturation, stable, has_previous: bool) -> torch.Tensor:
    """(active, len(EXIT_HEAD_FEATURES)) float32 inputs of the learned exit head."""
    probs = probs.float()
    num_labels = probs.shape[-1]
    top2 = probs.topk(min(2, num_labels), dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / max(math.log(num_labels), 1e-12)
    if text is not None and num_labels > 1:
        top2_cosine = (text[top2.indices[:, 0]] * text[top2.indices[:, 1]]).sum(-1)
    else:
        top2_cosine = torch.ones_like(margin)
    columns = [
        margin,
        top2.values[:, 0],
        entropy if num_labels > 1 else torch.zeros_like(margin),
        torch.full_like(margin, math.log(num_labels)),
        top2_cosine,
        saturation if saturation is not None else torch.zeros_like(margin),
        stable.float(),
        torch.full_like(margin, float(has_previous)),
    ]
    return torch.stack(columns, dim=-1)


def apply_exit_head(head: dict, features: torch.Tensor) -> torch.Tensor:
    """The learned head's probability that this stage already gives the full model's answer:
    (active, F) -> (active,)."""
    if head.get("format", 1) > EXIT_HEAD_FORMAT or list(head["features"]) != list(EXIT_HEAD_FEATURES):
        raise ValueError(
            "This checkpoint's exit head was made by newer WaveCLIP code (other features or format): load the model "
            "with the code it was saved with, or use exit_signal='margin'."
        )
    mean, std = torch.tensor(head["mean"]), torch.tensor(head["std"])
    weight, bias = torch.tensor(head["weight"]), float(head["bias"])
    standardised = (features - mean.to(features)) / std.to(features)
    return torch.sigmoid(standardised @ weight.to(features) + bias)


def stage_features(stage_probs: torch.Tensor, stage_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N, S, len(EXIT_HEAD_FEATURES)) the learned head's inputs after every stage, as `refine` computes them."""
    tracker = ExitSignal("margin", text_embeds)
    return torch.stack(
        [tracker.features(stage_probs[:, s], stage_embeds[:, s]) for s in range(stage_probs.shape[1])], 1
    )


def exit_scores(
    signal: str,
    stage_probs: torch.Tensor,
    stage_embeds: torch.Tensor | None = None,
    text_embeds: torch.Tensor | None = None,
    exit_head: dict | None = None,
) -> torch.Tensor:
    """Every stage's exit score of a set of images, as `refine` computes them online.

    Args:
        stage_probs: (N, S, C) probabilities after every stage; stage_embeds: (N, S, P) image embeddings (needed by
            `saturation` and `learned`); text_embeds: (C, P).

    Returns:
        (N, S) float32 scores (the last stage's is never read: it always answers).
    """
    tracker = ExitSignal(signal, text_embeds, exit_head)
    return torch.stack(
        [
            tracker.scores(stage_probs[:, stage], None if stage_embeds is None else stage_embeds[:, stage])
            for stage in range(stage_probs.shape[1])
        ],
        dim=1,
    )


__all__ = [
    "EXIT_HEAD_FEATURES",
    "EXIT_SIGNALS",
    "ExitSignal",
    "apply_exit_head",
    "check_exit_signal",
    "exit_features",
    "exit_scores",
    "stage_features",
]
