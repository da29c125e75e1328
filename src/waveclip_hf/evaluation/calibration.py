"""Gate calibration: the accuracy / GFLOPs trade-off of the margin threshold, and choosing a threshold.

Because attention is block-causal, one full forward gives every stage's answer exactly as the cached refinement
loop would (tested to 1e-4), so a sweep needs one pass over the images: collect every stage's image embedding,
score them against the labels, and replay the gate for each threshold offline. `WaveCLIPModel.refine` is the
online version of the same rule (`exit_stages` below is checked against it in the tests).
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.waveclip.flops import FLOPS_CONVENTION, answer_gflops
from ..models.waveclip.gate_calibration import choose_operating_point
from ..models.waveclip.gating import (
    GateOperatingPoints,
    effective_threshold,
    exit_stages,
    margin_signal,
    representative_thresholds,
)
from ..models.waveclip.scoring import label_embeddings, zero_shot_logits
from .metrics import early_exit_accuracy


DEFAULT_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)


@dataclass
class OperatingPoint:
    """One threshold of the sweep: accuracy, mean image-encoder GFLOPs and the share of images per exit stage."""

    threshold: float
    accuracy: float
    mean_gflops: float
    stage_share: list[float]


@torch.no_grad()
def collect_stage_embeddings(model, batches: Iterable[torch.Tensor], progress: bool = True, total: int | None = None):
    """Normalised image embeddings after every stage, from one block-causal forward per batch.

    Args:
        model: a `WaveCLIPModel`.
        batches: iterable of (batch, 3, S, S) `pixel_values`.

    Returns:
        (num_images, num_stages, projection_dim) float32 tensor on the CPU.
    """
    device = model.logit_scale.device
    dtype = model.logit_scale.dtype
    embeddings = []
    for pixel_values in tqdm(batches, desc="stage embeddings", unit="batch", total=total, disable=not progress):
        stages = model.get_image_features(pixel_values.to(device, dtype)).stage_pooler_outputs
        embeddings.append(torch.nn.functional.normalize(stages.float(), dim=-1).cpu())
    return torch.cat(embeddings)


def stage_probabilities(stage_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(N, stages, P) image and (C, P) label embeddings -> (N, stages, C) zero-shot probabilities."""
    return zero_shot_logits(stage_embeds, text_embeds.float().cpu(), logit_scale).softmax(-1)


def margin_exit_stages(stage_probs: torch.Tensor, threshold: float, margin_scaling: str = "none") -> torch.Tensor:
    """The stage at which the margin gate answers each image (`gating.exit_stages` on the margins, with the
    threshold in `margin_scaling`'s units). (N, stages, C) -> (N,) long."""
    num_images, num_stages, num_labels = stage_probs.shape
    if num_labels == 1:
        return torch.zeros(num_images, dtype=torch.long)
    return exit_stages(margin_signal(stage_probs), effective_threshold(threshold, num_labels, margin_scaling))


def sweep_thresholds(
    stage_probs: torch.Tensor,
    labels: torch.Tensor,
    cumulative_gflops: Sequence[float],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    margin_scaling: str = "none",
) -> list[OperatingPoint]:
    """Replay the gate for every threshold.

    Args:
        stage_probs: (N, stages, C) probabilities from `stage_probabilities`.
        labels: (N,) true label indices.
        cumulative_gflops: GFLOPs to have an answer after each stage with the cache.
    """
    num_stages = stage_probs.shape[1]
    predictions = stage_probs.argmax(-1)  # (N, stages)
    gflops = torch.tensor(cumulative_gflops, dtype=torch.float64)
    points = []
    for threshold in thresholds:
        stages = margin_exit_stages(stage_probs, threshold, margin_scaling)
        answered = predictions.gather(1, stages[:, None]).squeeze(1)
        share = torch.bincount(stages, minlength=num_stages).double() / len(stages)
        measured = early_exit_accuracy(answered, labels, gflops[stages])
        points.append(
            OperatingPoint(
                threshold=float(threshold),
                accuracy=measured["accuracy"],
                mean_gflops=measured["mean_gflops"],
                stage_share=[float(s) for s in share],
            )
        )
    return points


def oracle_exit_point(
    stage_probs: torch.Tensor, labels: torch.Tensor, cumulative_gflops: Sequence[float]
) -> OperatingPoint:
    """The exit an all-knowing gate would take: each image answers at the earliest stage whose prediction already
    equals the last stage's. Accuracy equals the full model's; the mean GFLOPs is the least any gate can spend
    without changing a single answer of the full model (the bound the margin gate is compared with).

    Args:
        stage_probs: (N, stages, C) probabilities from `stage_probabilities`.
        labels: (N,) true label indices.
        cumulative_gflops: GFLOPs to have an answer after each stage with the cache.
    """
    predictions = stage_probs.argmax(-1)  # (N, stages)
    agrees = predictions == predictions[:, -1:]  # the last stage always agrees with itself
    stages = agrees.int().argmax(dim=1)  # first True
    num_stages = stage_probs.shape[1]
    gflops = torch.tensor(cumulative_gflops, dtype=torch.float64)
    share = torch.bincount(stages, minlength=num_stages).double() / len(stages)
    return OperatingPoint(
        threshold=float("nan"),
        accuracy=float((predictions[:, -1] == labels).double().mean()),
        mean_gflops=float(gflops[stages].mean()),
        stage_share=[float(v) for v in share],
    )


def fixed_stage_points(stage_probs: torch.Tensor, labels: torch.Tensor, cumulative_gflops: Sequence[float]):
    """Accuracy and GFLOPs of answering every image after stage s, for each s."""
    predictions = stage_probs.argmax(-1)
    return [
        {"stage": s, "accuracy": float((predictions[:, s] == labels).double().mean()), "gflops": float(g)}
        for s, g in enumerate(cumulative_gflops)
    ]


def choose_threshold(
    points: Sequence[OperatingPoint],
    full_accuracy: float,
    max_accuracy_drop: float | None = None,
    gflops_budget: float | None = None,
) -> OperatingPoint | None:
    """The cheapest point within `max_accuracy_drop` of `full_accuracy` (fractions, e.g. 0.01 = 1 point), or the
    most accurate point within `gflops_budget` mean GFLOPs (`gate_calibration.choose_operating_point` on the
    sweep's points, cheapest first). Exactly one target must be given; `None` if no point meets it."""
    if (max_accuracy_drop is None) == (gflops_budget is None):
        raise ValueError("Give exactly one target: `max_accuracy_drop` or `gflops_budget`.")
    ordered = sorted(points, key=lambda p: (p.mean_gflops, -p.accuracy))
    accuracy, mean_gflops = [p.accuracy for p in ordered], [p.mean_gflops for p in ordered]
    if max_accuracy_drop is not None:
        index = choose_operating_point(accuracy, mean_gflops, min_score=full_accuracy - max_accuracy_drop)
    else:
        index = choose_operating_point(accuracy, mean_gflops, max_gflops=gflops_budget)
    return None if index is None else ordered[index]


def calibration_report(points, fixed_points, chosen, extra: dict | None = None) -> dict:
    """The JSON-ready report of a labelled sweep: every operating point, the fixed stages, the chosen point and the
    FLOPs convention."""
    return {
        "flops_convention": FLOPS_CONVENTION,
        "fixed_stages": fixed_points,
        "sweep": [asdict(p) for p in points],
        "chosen": asdict(chosen) if chosen is not None else None,
        **(extra or {}),
    }


def default_thresholds(steps: int = 41) -> list[float]:
    """A sweep dense near 0 and 1, where the trade-off bends, plus one value above 1 (= the full model)."""
    return sorted({round(0.5 - 0.5 * math.cos(math.pi * i / (steps - 1)), 4) for i in range(steps)} | {1.01})


def load_labelled_images(
    data: str, split: str = "validation", image_column: str = "image", label_column: str = "label"
):
    """A labelled image set as `(dataset, class_names)`.

    `data` is a folder in the `datasets` image-folder layout (`<data>/<split>/<class>/*.jpg`, or `<data>/<class>/*`
    for a single split) or a `datasets` dataset id / path; the label column must be a `ClassLabel`.
    """
    import datasets

    path = Path(data)
    if path.is_dir() and not any(path.glob("*.py")) and not (path / "dataset_info.json").exists():
        dataset = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        dataset = datasets.load_dataset(data)
    if split not in dataset:
        if len(dataset) == 1:
            split = next(iter(dataset))
        else:
            raise ValueError(f"{data} has no split {split!r}; it has {sorted(dataset)}. Pass --split.")
    dataset = dataset[split]
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"{data} ({split}) has no column {column!r}; its columns are {dataset.column_names}.")
    feature = dataset.features[label_column]
    if not hasattr(feature, "names"):
        raise ValueError(f"Column {label_column!r} of {data} is not a ClassLabel, so its class names are unknown.")
    return dataset, list(feature.names)


def _pixel_batches(dataset, processor, image_column: str, batch_size: int):
    """Packed `pixel_values` (B, 3, S, S) of consecutive batches of `dataset`."""
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        yield processor(images=rows[image_column], return_tensors="pt")["pixel_values"]


def _target_description(max_accuracy_drop: float | None, gflops_budget: float | None) -> str:
    if max_accuracy_drop is not None:
        return f"accuracy within {100 * max_accuracy_drop:g} points of the full model"
    return f"at most {gflops_budget:g} mean GFLOPs"


def labelled_sweep(
    model_path: str,
    data: str,
    split: str = "validation",
    image_column: str = "image",
    label_column: str = "label",
    hypothesis_template: str = "This is a photo of {}.",
    thresholds: Sequence[float] | None = None,
    margin_scaling: str = "none",
    max_accuracy_drop: float | None = 0.01,
    gflops_budget: float | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Sweep the gate threshold of a saved WaveCLIP model on labelled images and choose one.

    Returns:
        {"points": [OperatingPoint], "fixed": per-stage accuracy and GFLOPs, "chosen": OperatingPoint or None,
        "report": the JSON-ready `calibration_report`} (the command line writes the report and draws the plot).
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset, class_names = load_labelled_images(data, split, image_column, label_column)
    if max_images is not None:
        dataset = dataset.select(range(min(max_images, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{data} ({split}) has no images.")
    with torch.no_grad():
        text_embeds = label_embeddings(model, tokenizer, class_names, hypothesis_template).float().cpu()
    batches = _pixel_batches(dataset, processor, image_column, batch_size)
    stage_embeds = collect_stage_embeddings(model, batches, progress, total=math.ceil(len(dataset) / batch_size))
    labels = torch.tensor(dataset[label_column])
    probs = stage_probabilities(stage_embeds, text_embeds, model.logit_scale.exp().item())
    gflops = answer_gflops(model.config)
    points = sweep_thresholds(probs, labels, gflops, thresholds or default_thresholds(), margin_scaling)
    fixed = fixed_stage_points(probs, labels, gflops)
    chosen = choose_threshold(points, fixed[-1]["accuracy"], max_accuracy_drop, gflops_budget)
    meta = {
        "model": str(model_path),
        "data": str(data),
        "split": split,
        "num_images": len(dataset),
        "hypothesis_template": hypothesis_template,
        "margin_scaling": margin_scaling,
        "target": _target_description(max_accuracy_drop, gflops_budget),
    }
    return {
        "points": points,
        "fixed": fixed,
        "chosen": chosen,
        "report": calibration_report(points, fixed, chosen, meta),
    }


# ----------------------------------------------------------------------------------------------------------------
# Label-free calibration: the full model's answers are the reference, so no labels are needed
# ----------------------------------------------------------------------------------------------------------------


def label_free_calibration(
    model_path: str,
    images: str,
    candidate_labels: Sequence[str],
    hypothesis_template: str | Sequence[str] = "This is a photo of {}.",
    target_agreement: float | None = None,
    gflops_budget: float | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    device: str | None = None,
):
    """Choose the gate threshold of a saved WaveCLIP model for one label set on a folder of unlabelled images.

    The pipeline's `calibrate` does the work (the cheapest threshold whose answers agree with the full model's on
    at least `target_agreement` of the images, default 0.99, or the most faithful within `gflops_budget` mean
    GFLOPs); this reads the folder (recursively).

    Returns:
        (the pipeline, whose model's config now holds the calibration; the JSON-ready report: the
        `GateCalibration.to_dict()` fields, the labels in the given order, the model, the image folder and the
        FLOPs convention).
    """
    from transformers import pipeline

    from ..data.image_folders import list_image_files
    from ..models.waveclip.pipeline_waveclip import WaveCLIPZeroShotImageClassificationPipeline

    paths = [str(path) for path in list_image_files(images)][:max_images]
    if not paths:
        raise ValueError(f"No image files under {images!r}: pass a folder of unlabelled images of your domain.")
    classifier = pipeline(
        "zero-shot-image-classification",
        model=model_path,
        trust_remote_code=True,
        pipeline_class=WaveCLIPZeroShotImageClassificationPipeline,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    calibration = classifier.calibrate(
        paths,
        candidate_labels=list(candidate_labels),
        hypothesis_template=hypothesis_template,
        target_agreement=target_agreement,
        gflops_budget=gflops_budget,
        batch_size=batch_size,
    )
    # The calibration's own format (what `config.gate_calibrations` holds), plus where it was made.
    report = {
        **calibration.to_dict(),
        "candidate_labels": list(candidate_labels),
        "model": str(model_path),
        "images": str(images),
        "flops_convention": FLOPS_CONVENTION,
    }
    return classifier, report


def stage_flip_rates(stage_probs: torch.Tensor) -> list[float]:
    """Per stage: the share of images whose top-1 after that stage differs from the last stage's (the full
    model's answer). (N, stages, C) probabilities -> `stages` fractions, the last 0."""
    predictions = stage_probs.argmax(-1)
    return [
        float((predictions[:, stage] != predictions[:, -1]).double().mean()) for stage in range(predictions.shape[1])
    ]


def cheapest_point_within(points: GateOperatingPoints, min_agreement: float) -> int:
    """Index of the cheapest operating point whose agreement (the accuracy, for points against labels) is at
    least `min_agreement`; the last point (no early exit) when only it qualifies."""
    return choose_operating_point(points.agreement, points.mean_gflops, min_score=min_agreement)


def best_shared_threshold(points_per_set: Mapping[str, GateOperatingPoints], min_mean_agreement: float):
    """The cheapest single threshold for several label sets at once, exactly: over every distinct behaviour of a
    shared threshold (the sets' merged crossings), the one with the least mean GFLOPs whose mean agreement over
    the sets is at least `min_mean_agreement`.

    Returns:
        (threshold or None for no early exit, {set name: index of its operating point})
    """
    crossings = torch.cat([points.crossings for points in points_per_set.values()]).unique(sorted=True)
    thresholds = representative_thresholds(crossings)
    indices = {name: points.index_at(thresholds) for name, points in points_per_set.items()}
    mean_agreement = torch.stack([points.agreement[indices[name]] for name, points in points_per_set.items()]).mean(0)
    mean_gflops = torch.stack([points.mean_gflops[indices[name]] for name, points in points_per_set.items()]).mean(0)
    meeting = (mean_agreement >= min_mean_agreement - 1e-12).nonzero().squeeze(1)
    best = int(meeting[mean_gflops[meeting].argmin()])  # argmin takes the first: the smallest such threshold
    threshold = float(thresholds[best])
    return (None if math.isinf(threshold) else threshold), {name: int(index[best]) for name, index in indices.items()}
