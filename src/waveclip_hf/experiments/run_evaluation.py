"""Evaluate a main-job run on the benchmark's test split: the teacher, the student at each fixed stage and the
gated student over a threshold sweep, per label axis; the label-free gate (one threshold per axis, chosen on the
unlabelled validation images) against the best single threshold and the labelled per-axis oracle; how often an
earlier stage's answer flips by the last; then the saved student through the stock pipeline.

Every number comes from embeddings computed once (`embed_test_split`, `embed_calibration_split`, cached): because
attention is block-causal, one full forward gives every stage's answer exactly as the cached refinement would, and
the gate is replayed offline for each threshold (`evaluation.calibration`). docs/offline_benchmark.md describes the
axes.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.synthetic import AXES, label_ids
from ..evaluation.calibration import (
    OperatingPoint,
    best_shared_threshold,
    cheapest_point_within,
    oracle_exit_point,
    stage_flip_rates,
    stage_probabilities,
    sweep_thresholds,
)
from ..evaluation.metrics import early_exit_accuracy
from ..evaluation.zero_shot import text_embeddings_per_axis, zero_shot_predictions
from ..models.waveclip.flops import FLOPS_CONVENTION, answer_gflops, clip_vit_flops
from ..models.waveclip.gate_calibration import calibrate_threshold
from ..models.waveclip.gating import gate_operating_points
from .cached_steps import settings_hash


FINE_AXES = tuple(name for name, axis in AXES.items() if axis.scale == "fine")
COARSE_AXES = tuple(name for name, axis in AXES.items() if axis.scale == "coarse")
# The label-free gate keeps this share of the full model's answers on the unlabelled calibration images.
LABEL_FREE_TARGET_AGREEMENT = 0.99
# What the label-free gate is compared with: the cheapest labelled choices within this accuracy loss (0.5 points).
COMPARISON_MAX_DROP = 0.005
CALIBRATION_SPLIT = "validation"


# ----------------------------------------------------------------------------------------------------------------
# Embeddings of the test split (cached)
# ----------------------------------------------------------------------------------------------------------------


def embeddings_cache_path(cache_dir: Path, teacher_dir: Path, student_dir: Path) -> Path:
    """Where `embed_test_split` caches the embeddings of this teacher and student (keyed by their folders)."""
    return Path(cache_dir) / f"test-embeddings-{settings_hash([str(teacher_dir), str(student_dir)])}.safetensors"


def _test_batches(data_root: Path, rows: list[dict], batch_size: int):
    for start in range(0, len(rows), batch_size):
        yield [
            Image.open(data_root / "test" / row["file_name"]).convert("RGB")
            for row in rows[start : start + batch_size]
        ]


def _load_encoders(teacher_dir: Path, student_dir: Path, device: str) -> dict:
    """Teacher `CLIPModel` and its processor, the saved student (remote code) and its processor, the tokenizer."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    return {
        "teacher": CLIPModel.from_pretrained(teacher_dir).to(device).eval(),
        # Pillow's backend by name, as the teacher was trained with (`training.teacher_data.build_image_processor`):
        # the default would be torchvision's where it is installed, which resizes differently.
        "teacher_processor": AutoImageProcessor.from_pretrained(teacher_dir, backend="pil"),
        "student": AutoModel.from_pretrained(student_dir, trust_remote_code=True).to(device).eval(),
        "student_processor": AutoImageProcessor.from_pretrained(student_dir, trust_remote_code=True),
        "tokenizer": AutoTokenizer.from_pretrained(student_dir),
    }


@torch.no_grad()
def _image_embeddings(encoders: dict, data_root: Path, rows, batch_size: int, device: str, progress: bool):
    """Teacher (N, P) and raw student per-stage (N, S, P) image embeddings of the test images, float32 on the CPU."""
    teacher_embeds, student_embeds = [], []
    batches = _test_batches(data_root, rows, batch_size)
    for images in tqdm(
        batches, total=-(-len(rows) // batch_size), desc="embedding the test split", unit="batch", disable=not progress
    ):
        pixels = encoders["teacher_processor"](images=images, return_tensors="pt")["pixel_values"].to(device)
        teacher_embeds.append(encoders["teacher"].get_image_features(pixel_values=pixels).pooler_output.float().cpu())
        coefficients = encoders["student_processor"](images=images, return_tensors="pt")["pixel_values"].to(device)
        student_embeds.append(encoders["student"].get_image_features(coefficients).stage_pooler_outputs.float().cpu())
    return torch.cat(teacher_embeds), torch.cat(student_embeds)


@torch.no_grad()
def embed_test_split(
    data_root: Path,
    rows,
    teacher_dir: Path,
    student_dir: Path,
    cache: Path,
    batch_size: int,
    progress: bool,
    axes: dict | None = None,
) -> dict:
    """The embeddings every metric of `evaluate` is computed from, cached in one safetensors file at `cache`.

    Returns:
        "teacher": (N, P) teacher image embeddings; "student": (N, S, P) L2-normalised student embeddings after
        every stage; "logit_scale": (1,) the teacher's exp(logit scale); "text.<axis>" and "student_text.<axis>":
        (C, P) normalised prompt embeddings of each axis (of `axes`, default `AXES`) from the teacher's and the
        student's text tower.
    """
    from safetensors.torch import load_file, save_file

    if cache.is_file():
        return load_file(cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoders = _load_encoders(teacher_dir, student_dir, device)
    teacher_embeds, student_embeds = _image_embeddings(encoders, data_root, rows, batch_size, device, progress)
    prompts = {name: axis.prompts() for name, axis in (axes or AXES).items()}
    text = text_embeddings_per_axis(encoders["teacher"], encoders["tokenizer"], prompts, device)
    student_text = text_embeddings_per_axis(encoders["student"], encoders["tokenizer"], prompts, device)
    tensors = {
        "teacher": teacher_embeds,
        "student": torch.nn.functional.normalize(student_embeds, dim=-1),
        "logit_scale": encoders["teacher"].logit_scale.exp().float().cpu().reshape(1),
        **{f"text.{name}": embeds.float().cpu().contiguous() for name, embeds in text.items()},
        **{f"student_text.{name}": embeds.float().cpu().contiguous() for name, embeds in student_text.items()},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, cache)
    return tensors


def calibration_embeddings_cache_path(cache_dir: Path, student_dir: Path) -> Path:
    """Where `embed_calibration_split` caches the student's embeddings of the calibration images."""
    return split_embeddings_cache_path(cache_dir, student_dir, CALIBRATION_SPLIT)


def split_embeddings_cache_path(cache_dir: Path, student_dir: Path, split: str, max_images: int | None = None) -> Path:
    """Where `embed_split` caches the student's embeddings of (the first `max_images` of) a split."""
    key = [str(student_dir), split] if max_images is None else [str(student_dir), split, max_images]
    return Path(cache_dir) / f"{split}-embeddings-{settings_hash(key)}.safetensors"


def embed_calibration_split(
    data_root: Path, student_dir: Path, cache: Path, batch_size: int, progress: bool
) -> torch.Tensor:
    """(N, S, P) L2-normalised student embeddings after every stage of the validation images, cached at `cache`.

    These are the label-free gate's calibration images: only the pixels are read, never a label, and none of them
    is a test image.
    """
    return embed_split(data_root, student_dir, cache, batch_size, progress, CALIBRATION_SPLIT)


@torch.no_grad()
def embed_split(
    data_root: Path, student_dir: Path, cache: Path, batch_size: int, progress: bool, split: str, max_images=None
) -> torch.Tensor:
    """(N, S, P) L2-normalised student embeddings after every stage of (the first `max_images` of) a split's images,
    cached at `cache`. Only the pixels are read."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModel

    if cache.is_file():
        return load_file(cache)["student"]
    from ..data.synthetic import load_benchmark_split

    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = AutoModel.from_pretrained(student_dir, trust_remote_code=True).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(student_dir, trust_remote_code=True)
    rows = load_benchmark_split(data_root, split)[:max_images]
    embeds = []
    for start in tqdm(
        range(0, len(rows), batch_size), desc=f"embedding the {split} split", unit="batch", disable=not progress
    ):
        images = [
            Image.open(data_root / split / row["file_name"]).convert("RGB") for row in rows[start : start + batch_size]
        ]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        embeds.append(student.get_image_features(pixel_values).stage_pooler_outputs.float().cpu())
    embeds = torch.nn.functional.normalize(torch.cat(embeds), dim=-1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"student": embeds.contiguous()}, cache)
    return embeds


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def _evaluate_axis(name: str, embeddings: dict, rows, gflops: list[float], teacher_gflops: float, thresholds, axis):
    """One axis (`axis`, its `LabelAxis`): its table row (accuracies, chance, oracle exit) and its threshold sweep.
    Accuracies come from the `early_exit_accuracy` metric (`evaluation.metrics`), with each answer's cumulative
    GFLOPs."""
    labels = torch.from_numpy(label_ids(rows, name))
    text = embeddings[f"text.{name}"]
    teacher = early_exit_accuracy(zero_shot_predictions(embeddings["teacher"], text), labels, teacher_gflops)
    probs = stage_probabilities(embeddings["student"], text, float(embeddings["logit_scale"]))
    fixed = [early_exit_accuracy(probs[:, s].argmax(-1), labels, gflops[s]) for s in range(len(gflops))]
    sweep = sweep_thresholds(probs, labels, gflops, thresholds)
    oracle = oracle_exit_point(probs, labels, gflops)
    row = {
        "scale": axis.scale,
        "num_classes": len(axis.class_names),
        "chance": 1 / len(axis.class_names),
        "teacher": teacher["accuracy"],
        "stages": [stage["accuracy"] for stage in fixed],
        "student_text_equals_teacher": bool(
            torch.equal(embeddings[f"student_text.{name}"], embeddings[f"text.{name}"])
        ),
        "oracle_exit": {"mean_gflops": oracle.mean_gflops, "stage_share": oracle.stage_share},
        # How often each stage's top-1 differs from the last stage's (the full model's).
        "stage_flip_rate": stage_flip_rates(probs),
    }
    return row, sweep


def _mean_curve(sweeps: dict[str, list[OperatingPoint]], thresholds, num_stages: int) -> list[OperatingPoint]:
    """The gate runs per task (axis); the curve averages accuracy, GFLOPs and exit shares over the tasks."""
    mean_curve = []
    for i, threshold in enumerate(thresholds):
        points = [sweeps[name][i] for name in sweeps]
        mean_curve.append(
            OperatingPoint(
                threshold=float(threshold),
                accuracy=float(np.mean([p.accuracy for p in points])),
                mean_gflops=float(np.mean([p.mean_gflops for p in points])),
                stage_share=[float(np.mean([p.stage_share[s] for p in points])) for s in range(num_stages)],
            )
        )
    return mean_curve


def _summary(per_axis: dict, mean_curve: list[OperatingPoint], gflops: list[float], gflops_target: float) -> dict:
    """Means over axes, the coarse/fine split at stage 0, the oracle bound and the two gated operating points."""
    num_stages = len(gflops)
    names = list(per_axis)
    coarse = [n for n in names if per_axis[n]["scale"] == "coarse"]
    fine = [n for n in names if per_axis[n]["scale"] == "fine"]
    full_accuracy = float(np.mean([per_axis[n]["stages"][-1] for n in names]))
    budget = gflops_target * gflops[-1]
    affordable = [p for p in mean_curve if p.mean_gflops <= budget + 1e-9]
    best_within_budget = max(affordable, key=lambda p: (p.accuracy, -p.mean_gflops), default=None)
    within_one_point = [p for p in mean_curve if p.accuracy >= full_accuracy - 0.01]
    cheapest_within_one_point = min(within_one_point, key=lambda p: p.mean_gflops, default=None)
    teacher_mean = float(np.mean([per_axis[n]["teacher"] for n in names]))
    return {
        "teacher_mean": teacher_mean,
        "student_stage_mean": [float(np.mean([per_axis[n]["stages"][s] for n in names])) for s in range(num_stages)],
        "student_full_minus_teacher_points": 100 * (full_accuracy - teacher_mean),
        "stage0_coarse_mean": float(np.mean([per_axis[n]["stages"][0] for n in coarse])),
        "stage0_fine_mean": float(np.mean([per_axis[n]["stages"][0] for n in fine])),
        # The least any gate can spend without changing one of the full model's answers (`oracle_exit_point`).
        "oracle_exit_gflops": float(np.mean([per_axis[n]["oracle_exit"]["mean_gflops"] for n in names])),
        "full_gflops": gflops[-1],
        "gflops_budget": budget,
        "best_within_budget": dataclasses.asdict(best_within_budget) if best_within_budget else None,
        "cheapest_within_one_point": dataclasses.asdict(cheapest_within_one_point)
        if cheapest_within_one_point
        else None,
    }


def _gated_figures(points, index: int, full_accuracy: float, full_gflops: float) -> dict:
    """Accuracy, its drop from the full model (points), GFLOPs and exit shares of one operating point."""
    return {
        "accuracy": float(points.agreement[index]),
        "drop_points": 100 * (full_accuracy - float(points.agreement[index])),
        "gflops": float(points.mean_gflops[index]),
        "gflops_ratio": float(points.mean_gflops[index]) / full_gflops,
        "stage_share": [float(share) for share in points.stage_share[index]],
    }


def _label_free_axis(name: str, embeddings: dict, calibration_embeds: torch.Tensor, rows, gflops: list[float]):
    """One axis: the label-free threshold (chosen on the calibration images) and the labelled per-axis oracle, on
    the test split. Returns the axis's row and its test operating points against the labels."""
    text, logit_scale = embeddings[f"text.{name}"], float(embeddings["logit_scale"])
    test_probs = stage_probabilities(embeddings["student"], text, logit_scale)
    chosen = calibrate_threshold(
        stage_probabilities(calibration_embeds, text, logit_scale),
        gflops,
        target_agreement=LABEL_FREE_TARGET_AGREEMENT,
    )
    labels = torch.from_numpy(label_ids(rows, name))
    against_labels = gate_operating_points(test_probs, gflops, reference=labels)
    against_full = gate_operating_points(test_probs, gflops)
    threshold = float("inf") if chosen.threshold is None else chosen.threshold
    index, full_accuracy = int(against_labels.index_at([threshold])), float(against_labels.agreement[-1])
    oracle = cheapest_point_within(against_labels, full_accuracy - COMPARISON_MAX_DROP)
    row = {
        "threshold": chosen.threshold,
        "calibration_agreement": chosen.agreement,
        "test_agreement": float(against_full.agreement[int(against_full.index_at([threshold]))]),
        "full_accuracy": full_accuracy,
        **_gated_figures(against_labels, index, full_accuracy, gflops[-1]),
        "labelled_oracle": {
            "threshold": _finite(against_labels.thresholds[oracle]),
            **_gated_figures(against_labels, oracle, full_accuracy, gflops[-1]),
        },
    }
    return row, against_labels


def _finite(threshold) -> float | None:
    """A threshold for JSON: `None` for no early exit (inf)."""
    return None if math.isinf(float(threshold)) else float(threshold)


def _label_free(
    embeddings: dict, calibration_embeds: torch.Tensor, rows, gflops: list[float], names: list[str]
) -> dict:
    """The label-free gate per axis, the best single threshold and the labelled oracle, with a summary of each."""
    per_axis, points = {}, {}
    for name in names:
        per_axis[name], points[name] = _label_free_axis(name, embeddings, calibration_embeds, rows, gflops)
    full_mean = float(np.mean([row["full_accuracy"] for row in per_axis.values()]))
    threshold, indices = best_shared_threshold(points, full_mean - COMPARISON_MAX_DROP)
    for name, row in per_axis.items():
        row["single_threshold"] = _gated_figures(points[name], indices[name], row["full_accuracy"], gflops[-1])

    def summarise(rows_of_method: list[dict]) -> dict:
        return {
            "mean_gflops_ratio": float(np.mean([row["gflops_ratio"] for row in rows_of_method])),
            "mean_drop_points": float(np.mean([row["drop_points"] for row in rows_of_method])),
            "max_axis_drop_points": float(max(row["drop_points"] for row in rows_of_method)),
        }

    summary = {
        "target_agreement": LABEL_FREE_TARGET_AGREEMENT,
        "calibration_split": CALIBRATION_SPLIT,
        "calibration_images": int(calibration_embeds.shape[0]),
        "comparison_max_drop_points": 100 * COMPARISON_MAX_DROP,
        **summarise(list(per_axis.values())),
        "best_single_threshold": {
            "threshold": threshold,
            **summarise([row["single_threshold"] for row in per_axis.values()]),
        },
        "labelled_oracle": summarise([row["labelled_oracle"] for row in per_axis.values()]),
    }
    return {"per_axis": per_axis, "summary": summary}


def evaluate(
    embeddings: dict,
    rows,
    student_config,
    teacher_config,
    thresholds,
    gflops_target: float,
    calibration_embeddings: torch.Tensor | None = None,
    axes: dict | None = None,
) -> dict:
    """Per-axis zero-shot accuracy of teacher, fixed stages and the gate sweep; GFLOPs; exit-stage shares.

    Args:
        embeddings: as returned by `embed_test_split`.
        rows: the test split's metadata rows (one column per axis), in embedding order.
        student_config: the student's `WaveCLIPConfig` (stage costs); teacher_config: the teacher's `CLIPConfig`.
        thresholds: margin thresholds of the sweep.
        gflops_target: the budget of `best_within_budget`, as a fraction of the full student's GFLOPs.
        calibration_embeddings: (M, S, P) student embeddings of unlabelled images that are not test images (the
            validation split); given, the label-free gate is evaluated (`label_free`, `summary.label_free`).
        axes: name -> `LabelAxis` of the benchmark (default `AXES`; `benchmark_axes` of its info.json).

    Returns:
        JSON-ready dict: FLOPs convention, cumulative GFLOPs per stage, the teacher's GFLOPs and patch size,
        `per_axis` rows, the sweep per axis and averaged over axes, `summary`, and `label_free`.
    """
    gflops = answer_gflops(student_config)
    teacher_gflops = clip_vit_flops(teacher_config.vision_config, teacher_config.projection_dim) / 1e9
    per_axis, sweeps = {}, {}
    for name, axis in (axes or AXES).items():
        per_axis[name], sweeps[name] = _evaluate_axis(name, embeddings, rows, gflops, teacher_gflops, thresholds, axis)
    mean_curve = _mean_curve(sweeps, thresholds, len(gflops))
    summary = _summary(per_axis, mean_curve, gflops, gflops_target)
    summary["stage_flip_rate_mean"] = [
        float(np.mean([per_axis[n]["stage_flip_rate"][s] for n in per_axis])) for s in range(len(gflops))
    ]
    results = {
        "flops_convention": FLOPS_CONVENTION,
        "student_cumulative_gflops": gflops,
        "teacher_gflops": teacher_gflops,
        "teacher_patch_size": teacher_config.vision_config.patch_size,
        "per_axis": per_axis,
        "sweep_per_axis": {name: [dataclasses.asdict(p) for p in points] for name, points in sweeps.items()},
        "sweep_mean": [dataclasses.asdict(p) for p in mean_curve],
        "summary": summary,
    }
    if calibration_embeddings is not None:
        results["label_free"] = _label_free(embeddings, calibration_embeddings, rows, gflops, list(per_axis))
        summary["label_free"] = results["label_free"]["summary"]
    return results


def card_results(results: dict, num_images: int, threshold: float, split: str = "test") -> list:
    """The per-axis accuracies of `evaluate` (on `num_images` test images) as the student's model card publishes
    them: one [`ZeroShotResult`] per axis, with the gated point at `threshold` (one of the sweep's thresholds)."""
    from ..evaluation.zero_shot import ZeroShotResult

    tasks = []
    for name, row in results["per_axis"].items():
        gate = next((p for p in results["sweep_per_axis"][name] if p["threshold"] == threshold), None)
        tasks.append(
            ZeroShotResult(
                task=name,
                dataset_name=f"waveclip_hf generated benchmark, {name} axis ({row['scale']} scale)",
                dataset_type="waveclip-hf-generated-benchmark",
                dataset_config=name,
                dataset_split=split,
                num_images=num_images,
                class_names=list(AXES[name].class_names),
                prompt_template=AXES[name].template,
                stage_accuracy=list(row["stages"]),
                stage_gflops=list(results["student_cumulative_gflops"]),
                measured_by="the main job of waveclip_hf (`bash scripts/run_main.sh`) on the test split",
                teacher_accuracy=row["teacher"],
                gate=gate
                and {"threshold": threshold, "accuracy": gate["accuracy"], "mean_gflops": gate["mean_gflops"]},
            )
        )
    return tasks


def evaluate_student(
    cache_dir: Path,
    data_root: Path,
    rows,
    teacher_dir: Path,
    teacher_config,
    student_dir: Path,
    thresholds,
    gflops_target: float,
    batch_size: int,
    progress: bool,
    axes: dict | None = None,
):
    """Embed the test split with teacher and student (cached per teacher and student folder), and the validation
    split with the student (the label-free gate's unlabelled calibration images, cached per student), and `evaluate`
    on `axes` (default `AXES`).

    Returns:
        (results of `evaluate`, the student's config)
    """
    from transformers import AutoConfig

    cache = embeddings_cache_path(cache_dir, teacher_dir, student_dir)
    embeddings = embed_test_split(data_root, rows, teacher_dir, student_dir, cache, batch_size, progress, axes)
    calibration = embed_calibration_split(
        data_root, student_dir, calibration_embeddings_cache_path(cache_dir, student_dir), batch_size, progress
    )
    student_config = AutoConfig.from_pretrained(student_dir, trust_remote_code=True)
    results = evaluate(
        embeddings,
        rows,
        student_config,
        teacher_config,
        list(thresholds),
        gflops_target,
        calibration_embeddings=calibration,
        axes=axes,
    )
    return results, student_config


# ----------------------------------------------------------------------------------------------------------------
# The saved folder through the stock pipeline
# ----------------------------------------------------------------------------------------------------------------


def pipeline_demo(
    student_dir: Path, data_root: Path, rows, threshold: float, count: int, axes: dict | None = None
) -> list[dict]:
    """Classify the first `count` test images on every axis with the saved folder through the stock
    `pipeline("zero-shot-image-classification", trust_remote_code=True)` entry point, gated at `threshold`."""
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=str(student_dir), trust_remote_code=True)
    return _classify_rows(classifier, data_root, rows[:count], axes or AXES, threshold)


def _classify_rows(classifier, data_root: Path, rows, axes: dict, threshold) -> list[dict]:
    """Every axis's answer for each test row (label, score, true label, stage, GFLOPs) at `threshold` (or
    "auto")."""
    demo = []
    for row in rows:
        image = Image.open(data_root / "test" / row["file_name"]).convert("RGB")
        answers = {}
        for name, axis in axes.items():
            result = classifier(
                image,
                candidate_labels=list(axis.class_names),
                hypothesis_template=axis.template,
                margin_threshold=threshold,
            )
            answers[name] = {
                "predicted": result[0]["label"],
                "score": round(result[0]["score"], 3),
                "true": row[name],
                "stage": result[0]["stage"],
                "gflops": round(result[0]["gflops"], 4),
            }
        demo.append({"file_name": row["file_name"], "caption": row["caption"], "answers": answers})
    return demo


def label_free_pipeline_demo(student_dir: Path, data_root: Path, rows, count: int, batch_size: int = 64) -> dict:
    """The label-free gate through the pipeline, as a user runs it: per axis, `classifier.calibrate` on the
    unlabelled validation images, then the first `count` test images with `margin_threshold="auto"`.

    The pipeline class is the package's (`pipeline_class=`): a cached student folder carries the remote code of the
    release that distilled it, which may predate `calibrate`.

    Returns:
        {"thresholds": {axis: θ or None}, "demo": [{"file_name", "caption", "answers": {axis: ...}}]}
    """
    from transformers import pipeline

    from ..data.synthetic import load_benchmark_split
    from ..models.waveclip.pipeline_waveclip import WaveCLIPZeroShotImageClassificationPipeline

    classifier = pipeline(
        "zero-shot-image-classification",
        model=str(student_dir),
        trust_remote_code=True,
        pipeline_class=WaveCLIPZeroShotImageClassificationPipeline,
    )
    unlabelled = [
        str(data_root / CALIBRATION_SPLIT / row["file_name"])
        for row in load_benchmark_split(data_root, CALIBRATION_SPLIT)
    ]
    # The image encoder runs once on the unlabelled images; each axis is calibrated from those embeddings.
    image_embeddings = classifier.image_stage_embeddings(unlabelled, batch_size=batch_size)
    thresholds = {}
    for name, axis in AXES.items():
        thresholds[name] = classifier.calibrate(
            image_embeddings=image_embeddings,
            candidate_labels=list(axis.class_names),
            hypothesis_template=axis.template,
            target_agreement=LABEL_FREE_TARGET_AGREEMENT,
        ).threshold
    demo = _classify_rows(classifier, data_root, rows[:count], AXES, "auto")
    return {"thresholds": thresholds, "demo": demo}


__all__ = [
    "CALIBRATION_SPLIT",
    "COARSE_AXES",
    "card_results",
    "FINE_AXES",
    "LABEL_FREE_TARGET_AGREEMENT",
    "calibration_embeddings_cache_path",
    "embed_calibration_split",
    "embed_split",
    "embed_test_split",
    "evaluate",
    "evaluate_student",
    "label_free_pipeline_demo",
    "pipeline_demo",
    "embeddings_cache_path",
    "split_embeddings_cache_path",
]
