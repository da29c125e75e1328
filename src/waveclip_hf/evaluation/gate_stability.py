"""How stable is a gate's threshold across label sets and across retrained models? (docs/ablations.md)

A gate answers an image at the first stage whose score reaches the threshold θ (the last stage always answers).
Three gates, each a score of one stage's (labels,) probabilities:

- `margin`: top-1 minus top-2 probability (`gating.probability_margin`; `margin_scaling="none"`);
- `margin_per_label`: the same margin divided by the number of labels N, i.e. the paper's class-count-scaled gate
  `margin >= θ · N` (`margin_scaling="num_labels"`) written as a score;
- `top1`: the top-1 probability, the plain confidence threshold.

A threshold is chosen on one setting (a label set, a benchmark seed) for an accuracy target and then applied to
another; the question is how far it misses that setting's own target. Two ways to choose it:

- labelled (`choose_labelled`): the cheapest θ whose accuracy is within `max_accuracy_drop` of the full model's;
- label-free (`choose_label_free`): the cheapest θ whose answers agree with the full model's on at least
  `min_agreement` of unlabelled images. Since accuracy can drop at most by the share of changed answers, agreement
  >= 1 - d implies accuracy >= full - d. For the plain margin this is the rule of `gating.calibrate_threshold`
  (the pipeline's `calibrate`), extended here to the other two gates (tested to pick the same operating point).

Everything is computed from stage probabilities, exactly: a gate's decisions change only where θ crosses a score,
so `threshold_curve` gives accuracy, agreement and GFLOPs for every distinct decision at once.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..models.waveclip.gate_calibration import choose_operating_point
from ..models.waveclip.gating import exit_stages, gate_operating_points, probability_margin
from ..models.waveclip.scoring import zero_shot_logits


def _margin_per_label(probs: torch.Tensor) -> torch.Tensor:
    return probability_margin(probs) / probs.shape[-1]


GATE_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "margin": probability_margin,
    "margin_per_label": _margin_per_label,
    "top1": lambda probs: probs.max(dim=-1).values,
}


def gate_scores(stage_probs: torch.Tensor, gate: str) -> torch.Tensor:
    """(N, stages, C) probabilities -> (N, stages) float64 scores of `gate` (one of `GATE_SCORES`)."""
    if gate not in GATE_SCORES:
        raise ValueError(f"Unknown gate {gate!r}; choose one of {sorted(GATE_SCORES)}.")
    return GATE_SCORES[gate](stage_probs.double())


@dataclass
class ThresholdCurve:
    """A gate on one setting at every threshold that changes its decisions, in increasing θ (so increasing cost).

    `thresholds[k]` is the smallest exit score (of any image and stage) that gives decision set k (an image stops
    where its score >= θ); the last entry is +inf: every image runs every stage. Any θ of the same interval gives
    the same decisions here, but not on another setting, so the choice is fixed: the smallest score, as this study
    has always used. `accuracy` is None without labels; `agreement` is the share of images whose gated answer
    equals the full model's.
    """

    thresholds: np.ndarray  # (K,)
    mean_gflops: np.ndarray  # (K,)
    agreement: np.ndarray  # (K,)
    accuracy: np.ndarray | None  # (K,)

    @property
    def full_accuracy(self) -> float:
        return float(self.accuracy[-1])


def threshold_curve(
    stage_probs: torch.Tensor, cumulative_gflops: Sequence[float], gate: str, labels: torch.Tensor | None = None
) -> ThresholdCurve:
    """Accuracy, agreement with the full model and mean GFLOPs of `gate` at every distinct threshold: the
    operating points of `gating.gate_operating_points` with this gate's scores as the exit signal.

    Args:
        stage_probs: (N, stages, C) probabilities (`evaluation.zero_shot.stage_probabilities`).
        cumulative_gflops: GFLOPs to have an answer after each stage (`flops.answer_gflops`).
        gate: one of `GATE_SCORES`.
        labels: (N,) true classes, or None (label-free: no accuracy).
    """
    signal = gate_scores(stage_probs, gate)
    points = gate_operating_points(stage_probs, cumulative_gflops, signal=signal)
    accuracy = None
    if labels is not None:
        accuracy = gate_operating_points(stage_probs, cumulative_gflops, reference=labels, signal=signal).agreement
        accuracy = accuracy.numpy()
    return ThresholdCurve(
        _smallest_scores(signal, points.crossings), points.mean_gflops.numpy(), points.agreement.numpy(), accuracy
    )


def _smallest_scores(signal: torch.Tensor, crossings: torch.Tensor) -> np.ndarray:
    """(K,) the smallest exit score inside each operating point's interval (crossings[k - 1], crossings[k]], and
    +inf for the last point (no score lies above the last crossing)."""
    scores = signal[:, :-1].reshape(-1).unique()  # sorted
    lower = torch.cat([crossings.new_full((1,), -math.inf), crossings])
    first_above = torch.searchsorted(scores, lower, side="right")
    inside = torch.where(first_above < len(scores), scores[first_above.clamp(max=len(scores) - 1)], math.inf)
    return inside.double().numpy()


def choose_labelled(curve: ThresholdCurve, max_accuracy_drop: float) -> float:
    """The cheapest threshold whose accuracy is >= the full model's minus `max_accuracy_drop` (a fraction)."""
    target = curve.full_accuracy - max_accuracy_drop
    index = choose_operating_point(curve.accuracy, curve.mean_gflops, min_score=target)
    return float(curve.thresholds[index])  # the last point (no early exit) always meets it


def choose_label_free(curve: ThresholdCurve, min_agreement: float) -> float:
    """The cheapest threshold whose answers agree with the full model's on >= `min_agreement` of the images (no
    labels needed)."""
    return float(curve.thresholds[choose_operating_point(curve.agreement, curve.mean_gflops, min_score=min_agreement)])


@dataclass
class GatedResult:
    """A gate at one threshold on one setting: what it scores and costs."""

    accuracy: float
    full_accuracy: float
    agreement: float
    mean_gflops: float


def replay(
    stage_probs: torch.Tensor, labels: torch.Tensor, cumulative_gflops: Sequence[float], gate: str, threshold: float
) -> GatedResult:
    """`gate` at `threshold` on (N, stages, C) probabilities with (N,) labels."""
    stages = exit_stages(gate_scores(stage_probs, gate), threshold)
    predictions = stage_probs.argmax(-1)
    answered = predictions.gather(1, stages[:, None]).squeeze(1)
    gflops = torch.tensor(cumulative_gflops, dtype=torch.float64)
    return GatedResult(
        accuracy=float((answered == labels).double().mean()),
        full_accuracy=float((predictions[:, -1] == labels).double().mean()),
        agreement=float((answered == predictions[:, -1]).double().mean()),
        mean_gflops=float(gflops[stages].mean()),
    )


# ----------------------------------------------------------------------------------------------------------------
# Settings: label subsets of one axis
# ----------------------------------------------------------------------------------------------------------------


def label_subsets(num_classes: int, size: int, max_subsets: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Up to `max_subsets` distinct subsets of `size` classes out of `num_classes`: all of them when there are no
    more, else a seeded random choice (sorted tuples, in a reproducible order)."""
    combinations = list(itertools.combinations(range(num_classes), size))
    if len(combinations) <= max_subsets:
        return combinations
    chosen = np.random.default_rng(seed).choice(len(combinations), size=max_subsets, replace=False)
    return [combinations[i] for i in sorted(chosen)]


def subset_setting(logits: torch.Tensor, labels: torch.Tensor, subsets: Sequence[Sequence[int]]):
    """Zero-shot classification among each subset of the classes, pooled: every image whose class is in a subset
    is classified among that subset's labels only (softmax over their logits).

    Args:
        logits: (N, stages, C) zero-shot logits (`scoring.zero_shot_logits`).
        labels: (N,) classes in 0..C-1.
        subsets: subsets of equal size n.

    Returns:
        (M, stages, n) probabilities and (M,) labels in 0..n-1, M = the images of all subsets together.
    """
    probs, subset_labels = [], []
    for subset in subsets:
        columns = torch.tensor(subset)
        keep = torch.isin(labels, columns)
        probs.append(logits[keep][..., columns].softmax(-1))
        subset_labels.append(torch.searchsorted(columns, labels[keep]))
    return torch.cat(probs), torch.cat(subset_labels)


def axis_settings(
    stage_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: float,
    labels: torch.Tensor,
    max_subsets: int,
    seed: int = 0,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One axis's settings by label-set size: n -> pooled (probabilities, labels) of `subset_setting` over
    `label_subsets(C, n, max_subsets)`, for n = 2..C (n = C is the whole label set).

    Args:
        stage_embeds: (N, stages, P) normalised image embeddings after every stage; text_embeds: (C, P).
    """
    logits = zero_shot_logits(stage_embeds, text_embeds.float(), logit_scale).double()
    num_classes = text_embeds.shape[0]
    return {
        size: subset_setting(logits, labels, label_subsets(num_classes, size, max_subsets, seed + size))
        for size in range(2, num_classes + 1)
    }


# ----------------------------------------------------------------------------------------------------------------
# Transfers: a threshold chosen on one setting, applied to another
# ----------------------------------------------------------------------------------------------------------------


CALIBRATIONS = ("labelled", "label_free")


def choose_threshold_for(curve: ThresholdCurve, calibration: str, max_accuracy_drop: float) -> float:
    """The threshold `calibration` picks on `curve` for a target of `max_accuracy_drop` (label-free: agreement
    >= 1 - max_accuracy_drop, which guarantees the accuracy target on the same images)."""
    if calibration == "labelled":
        return choose_labelled(curve, max_accuracy_drop)
    if calibration == "label_free":
        return choose_label_free(curve, 1.0 - max_accuracy_drop)
    raise ValueError(f"Unknown calibration {calibration!r}; choose one of {CALIBRATIONS}.")


def setting_threshold(
    setting: tuple, cumulative_gflops, gate: str, calibration: str, max_accuracy_drop: float
) -> float:
    """The threshold `calibration` chooses for `gate` on one setting, a (probabilities, labels) pair; the label-free
    calibration does not look at the labels."""
    probs, labels = setting
    curve = threshold_curve(probs, cumulative_gflops, gate, labels if calibration == "labelled" else None)
    return choose_threshold_for(curve, calibration, max_accuracy_drop)


def transfers(
    settings: dict, pairs: Sequence[tuple], cumulative_gflops, gate: str, calibration: str, max_accuracy_drop: float
) -> list[dict]:
    """For each (source, target) pair of keys of `settings`: choose a threshold on the source, apply it to the
    target.

    Args:
        settings: key -> (probabilities (N, stages, C), labels (N,)).
        pairs: (source key, target key) pairs; a pair (k, k) is the threshold on its own setting.

    Returns:
        one dict per pair: "source", "target", "threshold", "shortfall_points" (how far the target's accuracy lands
        below its own target, the full model's minus `max_accuracy_drop`, in points; <= 0: met), "cost_ratio" (its
        mean GFLOPs on the target over those of the threshold chosen the same way on the target itself),
        "accuracy", "full_accuracy", "agreement", "mean_gflops".
    """
    keys = {key for pair in pairs for key in pair}
    chosen = {
        key: setting_threshold(settings[key], cumulative_gflops, gate, calibration, max_accuracy_drop) for key in keys
    }
    own_gflops = {key: replay(*settings[key], cumulative_gflops, gate, chosen[key]).mean_gflops for key in keys}
    rows = []
    for source, target in pairs:
        result = replay(*settings[target], cumulative_gflops, gate, chosen[source])
        rows.append(
            {
                "source": source,
                "target": target,
                "threshold": chosen[source],
                "shortfall_points": 100 * (result.full_accuracy - max_accuracy_drop - result.accuracy),
                "cost_ratio": result.mean_gflops / own_gflops[target],
                **dataclasses.asdict(result),
            }
        )
    return rows


def summarise_transfers(transfers: Sequence[dict]) -> dict:
    """Mean (of the misses, 0 for a met target) and worst shortfall in points, the share of transfers that miss their
    target, the mean cost ratio and the mean GFLOPs on the targets."""
    shortfalls = np.array([t["shortfall_points"] for t in transfers])
    return {
        "count": len(transfers),
        "mean_shortfall_points": float(np.clip(shortfalls, 0, None).mean()),
        "worst_shortfall_points": float(shortfalls.max()),
        "share_missed": float((shortfalls > 1e-9).mean()),
        "mean_cost_ratio": float(np.mean([t["cost_ratio"] for t in transfers])),
        "mean_gflops": float(np.mean([t["mean_gflops"] for t in transfers])),
    }


__all__ = [
    "CALIBRATIONS",
    "GATE_SCORES",
    "GatedResult",
    "ThresholdCurve",
    "axis_settings",
    "choose_label_free",
    "choose_labelled",
    "choose_threshold_for",
    "gate_scores",
    "label_subsets",
    "replay",
    "setting_threshold",
    "subset_setting",
    "summarise_transfers",
    "threshold_curve",
    "transfers",
]
