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
    signal: what the gate reads (`"margin"`: top-1 minus top-2 probability; `exit_signals.EXIT_SIGNALS`).
    max_disagreement, confidence, upper_bound: for a guaranteed calibration (`guaranteed_threshold`): the promised
        rate δ of answers that differ from the full model's, the confidence 1 - ε of the promise, and the
        Clopper-Pearson upper bound on that rate at the chosen threshold (<= δ). `None` for the other targets.
    images_needed: the fewest calibration images with which some early exit could be certified at all (a gate with
        no disagreement on them), when these were too few; else `None`.
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
    max_disagreement: float | None = None
    confidence: float | None = None
    upper_bound: float | None = None
    images_needed: int | None = None

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
    max_disagreement: float | None = None,
    confidence: float = 0.95,
    signal: str = "margin",
    signal_scores: torch.Tensor | None = None,
) -> GateCalibration:
    """Choose the gate's threshold on unlabelled images, for exactly one target:

    - `max_disagreement` δ (with `confidence` 1 - ε): the cheapest threshold of a fixed grid whose Clopper-Pearson
      upper bound on disagreement with the full model is <= δ, by fixed-sequence testing (`guaranteed_threshold`):
      with probability >= 1 - ε over the calibration images, its rate of answers that differ from the full model's,
      on new images of the same distribution, is <= δ;
    - `target_agreement`: the cheapest threshold whose answers agree with the full model's on at least that share of
      these images (no promise beyond them);
    - `gflops_budget`: the most faithful threshold (then the cheapest) whose mean GFLOPs stay within it.

    Args:
        stage_probs: (N, S, C) zero-shot probabilities after every stage, on unlabelled images.
        cumulative_gflops: S values, the GFLOPs to have an answer after each stage.
        signal, signal_scores: the exit signal (`exit_signals.EXIT_SIGNALS`) and its (N, S) scores (default: the
            margins of `stage_probs`).
    """
    if sum(target is not None for target in (target_agreement, gflops_budget, max_disagreement)) != 1:
        raise ValueError(
            "Give exactly one target: `max_disagreement` (e.g. 0.01, with `confidence`), `target_agreement` (e.g. "
            "0.99) or `gflops_budget`."
        )
    points = gate_operating_points(stage_probs, cumulative_gflops, signal=signal_scores)
    guarantee = {}
    if max_disagreement is not None:
        index, threshold, target, guarantee = _guaranteed(
            points, stage_probs.shape, max_disagreement, confidence, signal
        )
    elif target_agreement is not None:
        target_agreement = _as_number(target_agreement, "target_agreement", "a fraction in (0, 1], e.g. 0.99")
        if not 0 < target_agreement <= 1:
            raise ValueError(f"`target_agreement` must be a fraction in (0, 1], e.g. 0.99; got {target_agreement!r}.")
        # The last point (no early exit) always agrees, so some point meets every target.
        index = choose_operating_point(points.agreement, points.mean_gflops, min_score=target_agreement)
        threshold, target = float(points.thresholds[index]), f"agreement with the full model >= {target_agreement:g}"
    else:
        budget = check_gflops_budget(gflops_budget, float(points.mean_gflops[0]))
        index = choose_operating_point(points.agreement, points.mean_gflops, max_gflops=budget)
        threshold, target = float(points.thresholds[index]), f"mean GFLOPs per image <= {budget:g}"
    return GateCalibration(
        threshold=None if threshold is None or math.isinf(threshold) else threshold,
        agreement=float(points.agreement[index]),
        mean_gflops=float(points.mean_gflops[index]),
        full_gflops=float(torch.as_tensor(cumulative_gflops, dtype=torch.float64)[-1]),
        stage_share=[float(share) for share in points.stage_share[index]],
        num_images=stage_probs.shape[0],
        target=target,
        signal=signal,
        **guarantee,
    )


def _guaranteed(points, shape, max_disagreement, confidence, signal):
    """(index, threshold, target in words, the guarantee's fields) of `guaranteed_threshold`, after checking δ and
    the confidence."""
    max_disagreement = _as_number(max_disagreement, "max_disagreement", "a fraction in (0, 1), e.g. 0.01")
    confidence = _as_number(confidence, "confidence", "a fraction in (0, 1), e.g. 0.95")
    if not 0 < max_disagreement < 1 or not 0 < confidence < 1:
        raise ValueError(
            f"`max_disagreement` and `confidence` must be fractions in (0, 1), e.g. 0.01 and 0.95; got "
            f"{max_disagreement!r} and {confidence!r}."
        )
    num_images, num_stages = shape[0], shape[1]
    threshold, index, bound = guaranteed_threshold(
        points, num_images, max_disagreement, confidence, threshold_grid(signal, num_stages)
    )
    needed = images_needed(max_disagreement, confidence)
    target = f"disagreement with the full model <= {max_disagreement:g} at confidence {confidence:g}"
    fields = dict(
        max_disagreement=max_disagreement,
        confidence=confidence,
        upper_bound=bound,
        images_needed=needed if num_images < needed else None,
    )
    return index, threshold, target, fields


def binomial_cdf(successes: int, trials: int, rate: float) -> float:
    """P(Binomial(trials, rate) <= successes), summed in log space (float64), exact to ~1e-12."""
    if successes >= trials or rate <= 0:
        return 1.0
    if rate >= 1:
        return 0.0
    k = torch.arange(successes + 1, dtype=torch.float64)
    log_terms = (
        torch.lgamma(torch.tensor(trials + 1.0, dtype=torch.float64))
        - torch.lgamma(k + 1)
        - torch.lgamma(trials - k + 1)
        + k * math.log(rate)
        + (trials - k) * math.log1p(-rate)
    )
    return float(torch.logsumexp(log_terms, 0).exp().clamp(max=1.0))


def binomial_upper_bound(successes: int, trials: int, confidence: float) -> float:
    """Clopper-Pearson one-sided upper confidence bound on a binomial rate: the rate p with
    P(Binomial(trials, p) <= successes) = 1 - confidence, found by bisection (to 1e-12)."""
    if successes >= trials:
        return 1.0
    low, high = successes / trials, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if binomial_cdf(successes, trials, middle) > 1 - confidence else (low, middle)
    return high


def images_needed(max_disagreement: float, confidence: float) -> int:
    """The fewest images on which a gate with no disagreement at all is certified: (1 - δ)^n <= 1 - confidence."""
    return math.ceil(math.log(1 - confidence) / math.log1p(-max_disagreement))


def threshold_grid(signal: str = "margin", num_stages: int = 2) -> torch.Tensor:
    """The fixed thresholds a guaranteed calibration tests, most conservative first (set before any image is seen,
    as fixed-sequence testing needs). Margins and learned exit probabilities live in [0, 1]; stability adds the
    number of agreeing earlier stages to a margin, in [0, num_stages); saturation, a cosine, is tested on [0, 1] (the
    embeddings of consecutive stages of one image are never opposed)."""
    steps = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)
    if signal == "stability":
        return torch.cat([count + steps for count in range(num_stages - 1, -1, -1)])
    return steps


def critical_disagreements(num_images: int, max_disagreement: float, confidence: float) -> int:
    """The most disagreements among `num_images` that still certify a rate <= `max_disagreement`: the largest k with
    P(Binomial(num_images, max_disagreement) <= k) <= 1 - confidence (the Clopper-Pearson test); -1 when even none
    does (too few images)."""
    k = -1
    while k + 1 < num_images and binomial_cdf(k + 1, num_images, max_disagreement) <= 1 - confidence:
        k += 1
    return k


def guaranteed_threshold(
    points, num_images: int, max_disagreement: float, confidence: float, grid: torch.Tensor, critical=None
):
    """Learn-then-Test fixed-sequence testing over `grid`: walk from the most conservative threshold down and keep
    the last one whose Clopper-Pearson upper bound on disagreement with the full model is <= `max_disagreement`;
    stop at the first that fails. With probability >= `confidence` over the calibration images, the kept threshold's
    true disagreement rate is <= `max_disagreement` (each test is at level 1 - confidence; fixed-sequence testing
    needs no correction for testing many, and the grid is fixed before the images are seen).

    Args:
        points: `gating.GateOperatingPoints` of the calibration images against the full model.
        grid: thresholds, most conservative first (`threshold_grid`).
        critical: `critical_disagreements(num_images, max_disagreement, confidence)`, when already known.

    Returns:
        (threshold or None for no early exit, index of its operating point, upper bound at it)
    """
    if critical is None:
        critical = critical_disagreements(num_images, max_disagreement, confidence)
    indices = points.index_at(grid)
    disagreements = ((1 - points.agreement[indices]) * num_images).round().long()
    passes = disagreements <= critical
    tested = int(passes.long().cumprod(0).sum())  # the fixed sequence stops at the first failure
    if tested == 0:
        return None, len(points.agreement) - 1, 0.0
    last = tested - 1
    bound = binomial_upper_bound(int(disagreements[last]), num_images, confidence)
    return float(grid[last]), int(indices[last]), bound


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
    "binomial_cdf",
    "binomial_upper_bound",
    "critical_disagreements",
    "guaranteed_threshold",
    "images_needed",
    "threshold_grid",
    "GateCalibration",
    "calibrate_threshold",
    "choose_operating_point",
    "find_calibration",
    "label_set_key",
    "store_calibration",
    "stored_calibrations",
]
