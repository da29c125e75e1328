"""Calibrations of the gate: a threshold chosen without labels for one label set, kept with the model.

The full model's answer is the reference an early exit must keep, and it needs no labels: on unlabelled images of
the user's domain, `calibrate_threshold` reads every operating point of the gate (`gating.gate_operating_points`)
and picks the cheapest threshold that keeps agreement with the full model at a target, or the most faithful one
within a GFLOPs budget.

A calibration belongs to a model and a label set. It is stored in the model's config (`config.gate_calibrations`,
a list of plain dicts, so `save_pretrained` writes it into config.json and `from_pretrained` reads it back), keyed by

- the set of labels, order-insensitive (the margin, top-1 minus top-2, does not depend on the order),
- the hypothesis template(s), in order (a prompt ensemble averages them; the order does not change the mean, but
  a list is kept as given so that the key reads as the call was written),
- the tokenizer arguments (they change the token ids, hence the embeddings).

A calibration is valid for the weights it was made with: fine-tuning a model changes its margins, so calibrate
again after training (docs/robustness.md, "Sharing and saving").

This file is shipped as remote code with saved checkpoints.
"""

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from .gating import _as_number, check_gflops_budget, gate_operating_points


# Bumped when the stored fields change meaning; a config with a newer format is refused, not misread.
CALIBRATION_FORMAT = 1


def label_set_key(candidate_labels, hypothesis_template, tokenizer_kwargs=None) -> str:
    """The key a label set's calibration is stored and found under: its labels as a set, its template(s) and its
    tokenizer arguments, as one JSON string (stable across processes and Python versions)."""
    templates = [hypothesis_template] if isinstance(hypothesis_template, str) else list(hypothesis_template)
    return json.dumps(
        {"labels": sorted(candidate_labels), "templates": templates, "tokenizer_kwargs": dict(tokenizer_kwargs or {})},
        sort_keys=True,
        ensure_ascii=False,
    )


@dataclass
class GateCalibration:
    """A threshold chosen without labels, and what it does on the calibration images.

    threshold: the probability margin to pass as `margin_threshold`, or `None` when only running every stage
        meets the target (no early exit).
    agreement: share of the calibration images whose gated answer equals the full model's.
    mean_gflops: mean image-encoder GFLOPs per image at this threshold; full_gflops: the full model's.
    stage_share: share of the images answered at each stage.
    num_images: how many images it was chosen on; target: what it was chosen for, in words.
    labels, hypothesis_template, tokenizer_kwargs: the label set it belongs to (labels sorted).
    signal: what the gate reads (`"margin"`: top-1 minus top-2 probability).
    """

    threshold: float | None
    agreement: float
    mean_gflops: float
    full_gflops: float
    stage_share: list[float] = field(default_factory=list)
    num_images: int = 0
    target: str = ""
    labels: list[str] = field(default_factory=list)
    hypothesis_template: str | list[str] = ""
    tokenizer_kwargs: dict = field(default_factory=dict)
    signal: str = "margin"

    @property
    def gflops_ratio(self) -> float:
        """Mean GFLOPs at this threshold over the full model's."""
        return self.mean_gflops / self.full_gflops

    @property
    def key(self) -> str:
        return label_set_key(self.labels, self.hypothesis_template, self.tokenizer_kwargs)

    def for_label_set(self, candidate_labels, hypothesis_template, tokenizer_kwargs=None) -> "GateCalibration":
        """This calibration, recorded as belonging to a label set."""
        template = hypothesis_template if isinstance(hypothesis_template, str) else list(hypothesis_template)
        return GateCalibration(
            **{
                **asdict(self),
                "labels": sorted(candidate_labels),
                "hypothesis_template": template,
                "tokenizer_kwargs": dict(tokenizer_kwargs or {}),
            }
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (the format of `config.gate_calibrations` and of the calibration CLI's output)."""
        return {"format": CALIBRATION_FORMAT, **asdict(self), "gflops_ratio": self.gflops_ratio}

    @classmethod
    def from_dict(cls, record: dict) -> "GateCalibration":
        """Read a dict written by `to_dict` (a `ValueError` names what is missing or newer than this code)."""
        if not isinstance(record, dict):
            raise ValueError(f"A gate calibration must be a dict (from `GateCalibration.to_dict`), got {record!r}.")
        if record.get("format", 1) > CALIBRATION_FORMAT:
            raise ValueError(
                f"This gate calibration has format {record['format']}, newer than this model code reads "
                f"({CALIBRATION_FORMAT}): load the model with the code it was saved with, or calibrate again."
            )
        names = set(cls.__dataclass_fields__)
        missing = {"threshold", "agreement", "mean_gflops", "full_gflops", "labels"} - set(record)
        if missing:
            raise ValueError(f"A gate calibration lacks {sorted(missing)}: calibrate again (`classifier.calibrate`).")
        return cls(**{name: value for name, value in record.items() if name in names})


def choose_operating_point(score, mean_gflops, min_score: float | None = None, max_gflops: float | None = None) -> int:
    """The one rule that picks an operating point of the gate (`gating.GateOperatingPoints`), cheapest first.

    With `min_score`: the cheapest point whose score (agreement with the full model; against labels, the accuracy)
    is at least `min_score`. With `max_gflops`: the highest-scoring point whose mean GFLOPs stay within it, then the
    cheapest of those. Exactly one target.

    Args:
        score, mean_gflops: (K,) per operating point, in increasing cost.

    Returns:
        The index of the point; `None` when no point meets the target.
    """
    if (min_score is None) == (max_gflops is None):
        raise ValueError("Give exactly one target: `target_agreement` (e.g. 0.99) or `gflops_budget`.")
    score, mean_gflops = torch.as_tensor(score, dtype=torch.float64), torch.as_tensor(mean_gflops, dtype=torch.float64)
    if min_score is not None:
        meeting = (score >= min_score - 1e-12).nonzero()
        return int(meeting[0]) if len(meeting) else None
    affordable = (mean_gflops <= max_gflops + 1e-12).nonzero().squeeze(1)
    if not len(affordable):
        return None
    best = score[affordable].max()
    return int(affordable[score[affordable] >= best][0])


def calibrate_threshold(
    stage_probs: torch.Tensor,
    cumulative_gflops,
    target_agreement: float | None = None,
    gflops_budget: float | None = None,
) -> GateCalibration:
    """The cheapest threshold whose answers agree with the full model's on at least `target_agreement` of the
    images, or the most faithful one (then the cheapest) whose mean GFLOPs stay within `gflops_budget`.

    Args:
        stage_probs: (N, S, C) zero-shot probabilities after every stage, on unlabelled images.
        cumulative_gflops: S values, the GFLOPs to have an answer after each stage.
        target_agreement: a fraction in (0, 1], e.g. 0.99. Exactly one of the two targets is given.
        gflops_budget: mean GFLOPs per image, at least stage 0's cost.
    """
    if (target_agreement is None) == (gflops_budget is None):
        raise ValueError("Give exactly one target: `target_agreement` (e.g. 0.99) or `gflops_budget`.")
    points = gate_operating_points(stage_probs, cumulative_gflops)
    if target_agreement is not None:
        target_agreement = _as_number(target_agreement, "target_agreement", "a fraction in (0, 1], e.g. 0.99")
        if not 0 < target_agreement <= 1:
            raise ValueError(f"`target_agreement` must be a fraction in (0, 1], e.g. 0.99; got {target_agreement!r}.")
        # The last point (no early exit) always agrees, so some point meets every target.
        index = choose_operating_point(points.agreement, points.mean_gflops, min_score=target_agreement)
        target = f"agreement with the full model >= {target_agreement:g}"
    else:
        budget = check_gflops_budget(gflops_budget, float(points.mean_gflops[0]))
        index = choose_operating_point(points.agreement, points.mean_gflops, max_gflops=budget)
        target = f"mean GFLOPs per image <= {budget:g}"
    threshold = float(points.thresholds[index])
    return GateCalibration(
        threshold=None if math.isinf(threshold) else threshold,
        agreement=float(points.agreement[index]),
        mean_gflops=float(points.mean_gflops[index]),
        full_gflops=float(torch.as_tensor(cumulative_gflops, dtype=torch.float64)[-1]),
        stage_share=[float(share) for share in points.stage_share[index]],
        num_images=stage_probs.shape[0],
        target=target,
    )


def stored_calibrations(config) -> list[GateCalibration]:
    """The calibrations a WaveCLIP config holds (`config.gate_calibrations`), oldest first."""
    return [GateCalibration.from_dict(record) for record in (getattr(config, "gate_calibrations", None) or [])]


def find_calibration(config, candidate_labels, hypothesis_template, tokenizer_kwargs=None) -> GateCalibration | None:
    """The calibration stored in `config` for this label set (any order of its labels), or `None`."""
    key = label_set_key(candidate_labels, hypothesis_template, tokenizer_kwargs)
    for record in getattr(config, "gate_calibrations", None) or []:
        calibration = GateCalibration.from_dict(record)
        if calibration.key == key:
            return calibration
    return None


def store_calibration(config, calibration: GateCalibration) -> None:
    """Keep `calibration` in `config.gate_calibrations`, replacing an earlier one for the same label set.

    The list is rebuilt and assigned in one step, so a thread reading the config sees the old list or the new one.
    """
    kept = [
        record
        for record in (getattr(config, "gate_calibrations", None) or [])
        if GateCalibration.from_dict(record).key != calibration.key
    ]
    config.gate_calibrations = [*kept, calibration.to_dict()]


__all__ = [
    "CALIBRATION_FORMAT",
    "GateCalibration",
    "calibrate_threshold",
    "choose_operating_point",
    "find_calibration",
    "label_set_key",
    "store_calibration",
    "stored_calibrations",
]
