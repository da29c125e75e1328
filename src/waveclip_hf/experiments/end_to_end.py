"""The README's main job: the whole method, end to end, on the generated offline benchmark.

    python -m waveclip_hf.experiments.end_to_end            # default: sized for a 2-core CPU
    python -m waveclip_hf.experiments.end_to_end --size large   # a bigger run for a GPU

1. generate the benchmark (coarse axes: colour, shape; fine axes: 2x2-periodic texture, a digit drawn in 2x2
   checker blocks);
2. train a small CLIP teacher on its captions (`teacher_training.py`, accelerate);
3. distil a WaveCLIP student from that teacher (`distillation.py`, the same code path as for
   `openai/clip-vit-base-patch16`);
4. evaluate on the test split: the teacher, the student at each fixed stage, and the gated student over a
   threshold sweep, per axis; mean GFLOPs; exit-stage shares; JSON, plots and docs/results.md;
5. load the saved student through `pipeline("zero-shot-image-classification", trust_remote_code=True)` and
   classify a few test images.

Every step is cached under `--cache-dir` (keyed by its settings), so a second run redoes nothing but the
reports.
"""

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.synthetic import AXES, GENERATOR_VERSION, generate_benchmark, label_ids, load_benchmark_split
from ..evaluation.calibration import (
    OperatingPoint,
    cumulative_stage_gflops,
    default_thresholds,
    oracle_exit_point,
    stage_probabilities,
    sweep_thresholds,
)
from ..training.distillation import DistillationConfig, distill
from ..models.waveclip.flops import FLOPS_CONVENTION, clip_vit_flops
from ..training.teacher import TeacherTrainingConfig, train_clip_teacher
from ..evaluation.zero_shot import text_embeddings_per_axis, zero_shot_predictions

REPO_ROOT = Path(__file__).resolve().parents[3]

SIZES = {
    # Sized so that the first run stays within ~20 minutes on a 2-core CPU (measured: docs/results.md).
    # Teacher: the `TeacherTrainingConfig` defaults (width 128, batch 64, lr 7e-4) for 100k images seen.
    # Student: 800 steps of 32 at 5e-4, cosine loss only, the fresh detail projections at 10x (the library
    # default). docs/distillation_ablation.md compares this with 1x and with the zero-shot KL over the benchmark's
    # prompts added (`kl_on_benchmark_prompts`).
    "small": dict(
        num_train=20_000, num_validation=1_000, num_test=5_000,
        teacher=dict(num_epochs=5.0),
        distillation=dict(max_steps=800, batch_size=32, learning_rate=5e-4, fresh_lr_multiplier=10.0,
                          mixed_precision="bf16"),
    ),
    # For a GPU: more data, a wider teacher and a longer distillation.
    "large": dict(
        num_train=100_000, num_validation=2_000, num_test=10_000,
        teacher=dict(num_epochs=8.0, vision_hidden_size=384, vision_intermediate_size=1536, vision_num_layers=6,
                     vision_num_heads=6, batch_size=256),
        distillation=dict(max_steps=6_000, batch_size=128, learning_rate=3e-4, fresh_lr_multiplier=10.0,
                          mixed_precision="bf16"),
    ),
}
FINE_AXES = tuple(name for name, axis in AXES.items() if axis.scale == "fine")
COARSE_AXES = tuple(name for name, axis in AXES.items() if axis.scale == "coarse")


@dataclass
class EndToEndConfig:
    """One end-to-end run. `size` picks the defaults in `SIZES`; the cache makes reruns cheap."""

    size: str = "small"
    cache_dir: str = str(REPO_ROOT / ".cache" / "end_to_end")
    docs_dir: str = str(REPO_ROOT / "docs")
    seed: int = 0
    levels: int = 1
    eval_batch_size: int = 64
    num_workers: int = 2
    thresholds: tuple[float, ...] = tuple(default_thresholds())
    gflops_target: float = 0.6  # report the best gated point at <= this fraction of the full model's GFLOPs
    demo_images: int = 4
    progress: bool = True
    overrides: dict = field(default_factory=dict)  # e.g. {"distillation": {"max_steps": 50}} for quick checks

    def settings(self) -> dict:
        settings = json.loads(json.dumps(SIZES[self.size]))
        for key, value in self.overrides.items():
            if isinstance(value, dict):
                settings.setdefault(key, {}).update(value)
            else:
                settings[key] = value
        return settings


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fresh_accelerator_state() -> None:
    """Let the next step build its own `Accelerator` (teacher and student may use other mixed precision).

    accelerate keeps one `AcceleratorState` per process and refuses a second `Accelerator` with other settings;
    the process-level `PartialState` (device, process group) is kept, so multi-GPU launches still work.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def _log(message: str) -> None:
    print(f"[end_to_end {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Steps 1-3: data, teacher, student (each cached)
# ----------------------------------------------------------------------------------------------------------------


def build_benchmark(config: EndToEndConfig, settings: dict) -> Path:
    counts = dict(num_train=settings["num_train"], num_validation=settings["num_validation"],
                  num_test=settings["num_test"])
    key = _hash({"seed": config.seed, "generator_version": GENERATOR_VERSION, **counts})
    root = Path(config.cache_dir) / f"benchmark-v{GENERATOR_VERSION}-{key}"
    return generate_benchmark(root, seed=config.seed, num_workers=config.num_workers, progress=config.progress,
                              **counts)


def build_teacher(config: EndToEndConfig, settings: dict, data_root: Path):
    teacher_config = TeacherTrainingConfig(seed=config.seed, **settings.get("teacher", {}))
    _fresh_accelerator_state()
    output = Path(config.cache_dir) / f"teacher-{teacher_config.config_hash({'data': str(data_root.name)})}"
    return train_clip_teacher(data_root, output, teacher_config, num_workers=config.num_workers,
                              progress=config.progress)


def build_student(config: EndToEndConfig, settings: dict, data_root: Path, teacher_dir: Path) -> Path:
    """Distil (or reuse) the student; returns its Hub-ready `final` folder."""
    distillation = dict(settings.get("distillation", {}))
    if distillation.pop("kl_on_benchmark_prompts", False):
        # The teacher's zero-shot distribution over every axis's prompts, matched at every stage (DESIGN §5).
        distillation["label_vocabulary"] = [prompt for axis in AXES.values() for prompt in axis.prompts()]
    fields = dict(
        teacher=str(teacher_dir),
        train_data=str(data_root / "train"),
        eval_data=str(data_root / "validation"),
        levels=config.levels,
        seed=config.seed,
        num_workers=config.num_workers,
        cache_teacher_embeddings=True,
        checkpoint_every=200,
        eval_every=0,
        progress_bar=config.progress,
        resume=True,
        **distillation,
    )
    key = _hash({k: v for k, v in fields.items() if k not in ("progress_bar", "num_workers", "resume")})
    output_dir = Path(config.cache_dir) / f"student-{key}"
    final = output_dir / "final"
    if (final / "config.json").is_file() and (output_dir / "summary.json").is_file():
        _log(f"student: reusing {final}")
        return final
    _fresh_accelerator_state()
    result = distill(DistillationConfig(output_dir=str(output_dir), **fields))
    if result.interrupted or result.final_dir is None:
        raise RuntimeError(f"distillation into {output_dir} was interrupted; run the same command again to resume")
    return Path(result.final_dir)


# ----------------------------------------------------------------------------------------------------------------
# Step 4: evaluation
# ----------------------------------------------------------------------------------------------------------------


def _test_batches(data_root: Path, rows: list[dict], batch_size: int):
    for start in range(0, len(rows), batch_size):
        yield [Image.open(data_root / "test" / row["file_name"]).convert("RGB") for row in rows[start : start + batch_size]]


@torch.no_grad()
def embed_test_split(data_root: Path, rows, teacher_dir: Path, student_dir: Path, cache: Path, batch_size: int,
                     progress: bool) -> dict:
    """Teacher image embeddings (N, P), student per-stage embeddings (N, S, P) and per-axis text embeddings, cached
    in one safetensors file keyed by the teacher and student folders."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    if cache.is_file():
        return load_file(cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = CLIPModel.from_pretrained(teacher_dir).to(device).eval()
    teacher_processor = AutoImageProcessor.from_pretrained(teacher_dir)
    student = AutoModel.from_pretrained(student_dir, trust_remote_code=True).to(device).eval()
    student_processor = AutoImageProcessor.from_pretrained(student_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)

    teacher_embeds, student_embeds = [], []
    batches = _test_batches(data_root, rows, batch_size)
    for images in tqdm(batches, total=-(-len(rows) // batch_size), desc="embedding the test split", unit="batch",
                       disable=not progress):
        pixels = teacher_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        teacher_embeds.append(teacher.get_image_features(pixel_values=pixels).pooler_output.float().cpu())
        coefficients = student_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        student_embeds.append(student.get_image_features(coefficients).stage_pooler_outputs.float().cpu())
    prompts = {name: axis.prompts() for name, axis in AXES.items()}
    text = text_embeddings_per_axis(teacher, tokenizer, prompts, device)
    student_text = text_embeddings_per_axis(student, tokenizer, prompts, device)
    tensors = {
        "teacher": torch.cat(teacher_embeds),
        "student": torch.nn.functional.normalize(torch.cat(student_embeds), dim=-1),
        "logit_scale": teacher.logit_scale.exp().float().cpu().reshape(1),
        **{f"text.{name}": embeds.float().cpu().contiguous() for name, embeds in text.items()},
        **{f"student_text.{name}": embeds.float().cpu().contiguous() for name, embeds in student_text.items()},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, cache)
    return tensors


def evaluate(embeddings: dict, rows, student_config, teacher_config, thresholds, gflops_target: float) -> dict:
    """Per-axis zero-shot accuracy of teacher, fixed stages and the gate sweep; GFLOPs; exit-stage shares."""
    logit_scale = float(embeddings["logit_scale"])
    gflops = cumulative_stage_gflops(student_config)
    teacher_gflops = clip_vit_flops(teacher_config.vision_config, teacher_config.projection_dim) / 1e9
    num_stages = len(gflops)
    per_axis, sweeps, oracles = {}, {}, {}
    for name in AXES:
        labels = torch.from_numpy(label_ids(rows, name))
        text = embeddings[f"text.{name}"]
        teacher_accuracy = float((zero_shot_predictions(embeddings["teacher"], text) == labels).double().mean())
        probs = stage_probabilities(embeddings["student"], text, logit_scale)
        stage_accuracy = [float((probs[:, s].argmax(-1) == labels).double().mean()) for s in range(num_stages)]
        sweeps[name] = sweep_thresholds(probs, labels, gflops, thresholds)
        oracles[name] = oracle_exit_point(probs, labels, gflops)
        per_axis[name] = {
            "scale": AXES[name].scale,
            "num_classes": len(AXES[name].class_names),
            "chance": 1 / len(AXES[name].class_names),
            "teacher": teacher_accuracy,
            "stages": stage_accuracy,
            "student_text_equals_teacher": bool(torch.equal(embeddings[f"student_text.{name}"],
                                                            embeddings[f"text.{name}"])),
            "oracle_exit": {"mean_gflops": oracles[name].mean_gflops, "stage_share": oracles[name].stage_share},
        }
    # The gate runs per task (axis); the curve averages accuracy and GFLOPs over the four tasks.
    mean_curve = []
    for i, threshold in enumerate(thresholds):
        points = [sweeps[name][i] for name in AXES]
        mean_curve.append(OperatingPoint(
            threshold=float(threshold),
            accuracy=float(np.mean([p.accuracy for p in points])),
            mean_gflops=float(np.mean([p.mean_gflops for p in points])),
            stage_share=[float(np.mean([p.stage_share[s] for p in points])) for s in range(num_stages)],
        ))
    full_accuracy = float(np.mean([per_axis[n]["stages"][-1] for n in AXES]))
    budget = gflops_target * gflops[-1]
    affordable = [p for p in mean_curve if p.mean_gflops <= budget + 1e-9]
    best_within_budget = max(affordable, key=lambda p: (p.accuracy, -p.mean_gflops), default=None)
    within_one_point = [p for p in mean_curve if p.accuracy >= full_accuracy - 0.01]
    cheapest_within_one_point = min(within_one_point, key=lambda p: p.mean_gflops, default=None)
    summary = {
        "teacher_mean": float(np.mean([per_axis[n]["teacher"] for n in AXES])),
        "student_stage_mean": [float(np.mean([per_axis[n]["stages"][s] for n in AXES])) for s in range(num_stages)],
        "student_full_minus_teacher_points": 100 * (full_accuracy - float(np.mean([per_axis[n]["teacher"] for n in AXES]))),
        "stage0_coarse_mean": float(np.mean([per_axis[n]["stages"][0] for n in COARSE_AXES])),
        "stage0_fine_mean": float(np.mean([per_axis[n]["stages"][0] for n in FINE_AXES])),
        # The least any gate can spend without changing one of the full model's answers (`oracle_exit_point`).
        "oracle_exit_gflops": float(np.mean([oracles[n].mean_gflops for n in AXES])),
        "full_gflops": gflops[-1],
        "gflops_budget": budget,
        "best_within_budget": dataclasses.asdict(best_within_budget) if best_within_budget else None,
        "cheapest_within_one_point": dataclasses.asdict(cheapest_within_one_point) if cheapest_within_one_point else None,
    }
    return {
        "flops_convention": FLOPS_CONVENTION,
        "student_cumulative_gflops": gflops,
        "teacher_gflops": teacher_gflops,
        "teacher_patch_size": teacher_config.vision_config.patch_size,
        "per_axis": per_axis,
        "sweep_per_axis": {name: [dataclasses.asdict(p) for p in points] for name, points in sweeps.items()},
        "sweep_mean": [dataclasses.asdict(p) for p in mean_curve],
        "summary": summary,
    }


def evaluate_student(config: EndToEndConfig, data_root: Path, rows, teacher_dir: Path, teacher_config,
                     student_dir: Path):
    """Embed the test split with teacher and student (cached per teacher and student folder) and `evaluate`.

    Returns:
        (results of `evaluate`, the student's config)
    """
    from transformers import AutoConfig

    cache = Path(config.cache_dir) / f"test-embeddings-{_hash([str(teacher_dir), str(student_dir)])}.safetensors"
    embeddings = embed_test_split(data_root, rows, teacher_dir, student_dir, cache, config.eval_batch_size,
                                  config.progress)
    student_config = AutoConfig.from_pretrained(student_dir, trust_remote_code=True)
    results = evaluate(embeddings, rows, student_config, teacher_config, list(config.thresholds), config.gflops_target)
    return results, student_config


def plot_results(results: dict, figures: Path) -> dict:
    """Accuracy vs mean GFLOPs (mean over axes and per axis) and the share of images answered per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    gflops = results["student_cumulative_gflops"]
    per_axis, summary = results["per_axis"], results["summary"]
    names = list(per_axis)

    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.8), dpi=110)
    panels = [("mean over axes", results["sweep_mean"], summary["teacher_mean"], summary["student_stage_mean"],
               summary.get("oracle_exit_gflops"))]
    panels += [(name, results["sweep_per_axis"][name], per_axis[name]["teacher"], per_axis[name]["stages"],
                per_axis[name].get("oracle_exit", {}).get("mean_gflops")) for name in names]
    for ax, (title, sweep, teacher, stages, oracle) in zip(axes, panels):
        ax.plot([p["mean_gflops"] for p in sweep], [100 * p["accuracy"] for p in sweep], "-o", ms=2.5,
                label="gated student (θ sweep)")
        for s, accuracy in enumerate(stages):
            ax.scatter(gflops[s], 100 * accuracy, marker="s", s=36, zorder=3, label=f"stage {s} (fixed)")
        if oracle is not None:  # the oracle keeps every full-model answer: the full model's accuracy
            ax.scatter(oracle, 100 * stages[-1], marker="D", s=30, facecolors="none", edgecolors="red", zorder=3,
                       label="oracle gate (bound)")
        ax.scatter(results["teacher_gflops"], 100 * teacher, marker="*", s=110, c="black", zorder=3, label="teacher")
        if title != "mean over axes":
            ax.axhline(100 * per_axis[title]["chance"], color="gray", ls=":", lw=1, label="chance")
        ax.set_title(f"{title}" + (f" ({per_axis[title]['scale']})" if title in per_axis else ""), fontsize=10)
        ax.set_xlabel("mean GFLOPs per image")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("zero-shot accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    curve = figures / "e2e_accuracy_vs_gflops.png"
    fig.savefig(curve)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    sweep = results["sweep_mean"]
    thresholds = [p["threshold"] for p in sweep]
    shares = np.array([p["stage_share"] for p in sweep]).T
    ax.stackplot(thresholds, 100 * shares, labels=[f"answered at stage {s}" for s in range(len(shares))], alpha=0.8)
    ax.set_xlabel("margin threshold θ")
    ax.set_ylabel("images (%) — mean over axes")
    ax.set_xlim(min(thresholds), max(thresholds))
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Which stage answers, by threshold", fontsize=10)
    fig.tight_layout()
    shares_path = figures / "e2e_exit_stage_share.png"
    fig.savefig(shares_path)
    plt.close(fig)
    return {"curve": curve, "shares": shares_path}


# ----------------------------------------------------------------------------------------------------------------
# Step 5: the pipeline on the saved folder
# ----------------------------------------------------------------------------------------------------------------


def pipeline_demo(student_dir: Path, data_root: Path, rows, threshold: float, count: int) -> list[dict]:
    """Classify a few test images with the saved folder through the stock `pipeline(...)` entry point."""
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=str(student_dir), trust_remote_code=True)
    demo = []
    for row in rows[:count]:
        image = Image.open(data_root / "test" / row["file_name"]).convert("RGB")
        answers = {}
        for name, axis in AXES.items():
            result = classifier(image, candidate_labels=list(axis.class_names), hypothesis_template=axis.template,
                                margin_threshold=threshold)
            answers[name] = {"predicted": result[0]["label"], "score": round(result[0]["score"], 3),
                             "true": row[name], "stage": result[0]["stage"], "gflops": round(result[0]["gflops"], 4)}
        demo.append({"file_name": row["file_name"], "caption": row["caption"], "answers": answers})
    return demo


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def _machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{model}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}"


def write_results_markdown(path: Path, results: dict, context: dict) -> Path:
    per_axis, summary = results["per_axis"], results["summary"]
    gflops = results["student_cumulative_gflops"]
    teacher_patch = results["teacher_patch_size"]
    stages = len(gflops)
    lines = [
        "# Results on the generated offline benchmark",
        "",
        "Written by the README's main job (`bash scripts/run_main.sh`, i.e. "
        f"`{context['command']}`); do not edit by hand.",
        "",
        f"- Date: {context['date']}; machine: {context['machine']}; wall time of this run: {context['wall_minutes']:.1f} min"
        " (steps reused from the cache take no time)"
        + (f"; the first run with these settings (nothing cached) took {first['minutes']:.1f} min on {first['date']}"
           f" ({first['machine']})." if (first := context.get("first_run")) else "."),
        f"- Data: {context['data']}.",
        f"- Teacher: {context['teacher']}.",
        f"- Student: {context['student']}.",
        f"- GFLOPs: image encoder only, per image; {results['flops_convention']}",
        "",
        "## Zero-shot accuracy on the test split (%)",
        "",
        "| axis | scale | classes | chance | teacher | " + " | ".join(f"student stage {s}" for s in range(stages)) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * stages,
    ]
    for name, row in per_axis.items():
        lines.append(f"| {name} | {row['scale']} | {row['num_classes']} | {100 * row['chance']:.1f} | "
                     f"{100 * row['teacher']:.1f} | " + " | ".join(f"{100 * a:.1f}" for a in row["stages"]) + " |")
    lines.append("| **mean** | | | | " + f"**{100 * summary['teacher_mean']:.1f}** | "
                 + " | ".join(f"**{100 * a:.1f}**" for a in summary["student_stage_mean"]) + " |")
    lines.append("| GFLOPs | | | | " + f"{results['teacher_gflops']:.3f} | "
                 + " | ".join(f"{g:.3f}" for g in gflops) + " |")
    best = summary["best_within_budget"]
    cheapest = summary["cheapest_within_one_point"]
    full = summary["student_stage_mean"][-1]
    lines += [
        "",
        "## What the numbers say",
        "",
        f"- Student (full) minus teacher, mean over axes: {summary['student_full_minus_teacher_points']:+.1f} points.",
        f"- Stage 0 alone: {100 * summary['stage0_coarse_mean']:.1f}% on the coarse axes "
        f"({', '.join(COARSE_AXES)}) vs {100 * summary['stage0_fine_mean']:.1f}% on the fine axes "
        f"({', '.join(FINE_AXES)}).",
    ]
    for name, row in per_axis.items():
        gain = round(100 * (row["stages"][-1] - row["stages"][0]), 1) + 0.0  # + 0.0: no "-0.0"
        reading = ("the detail band carries it" if gain > 10 else
                   "the approximation band alone answers it" if abs(gain) < 1 else "the detail band helps")
        lines.append(f"- {name} ({row['scale']} by construction): stage 0 {100 * row['stages'][0]:.1f}% → full "
                     f"{100 * row['stages'][-1]:.1f}% ({gain:+.1f} points): {reading}.")
    if best:
        lines.append(f"- Best gated point at ≤ {summary['gflops_budget'] / gflops[-1]:.1f}× the full model's GFLOPs "
                     f"({summary['gflops_budget']:.3f}): θ = {best['threshold']:g}, {100 * best['accuracy']:.1f}% "
                     f"at {best['mean_gflops']:.3f} GFLOPs ({100 * (best['accuracy'] - full):+.1f} points vs the full "
                     "model).")
    if cheapest:
        lines.append(f"- Cheapest gated point within 1 point of the full model: θ = {cheapest['threshold']:g}, "
                     f"{100 * cheapest['accuracy']:.1f}% at {cheapest['mean_gflops']:.3f} GFLOPs "
                     f"({cheapest['mean_gflops'] / gflops[-1]:.2f}× the full model).")
    if "oracle_exit_gflops" in summary:
        oracle = summary["oracle_exit_gflops"]
        lines.append(
            f"- Bound: a gate that knew when an earlier stage already gives the full model's answer would spend "
            f"{oracle:.3f} GFLOPs ({oracle / gflops[-1]:.2f}× the full model; per axis "
            + ", ".join(f"{n} {row['oracle_exit']['mean_gflops'] / gflops[-1]:.2f}×" for n, row in per_axis.items())
            + "). No margin gate can keep every full-model answer for less; an axis that stage 0 cannot see "
            "costs ~1× whatever the gate does.")
    lines += [
        f"- GFLOPs: the teacher reads one token per {teacher_patch}-px cell; the student reads each cell as one "
        "approximation token (stage 0) plus three detail tokens (stage 1), the layout that at ViT-B/16 geometry "
        "gives 198 tokens against ViT-B/16's 197. So the full student costs "
        f"{gflops[-1] / results['teacher_gflops']:.1f}x this patch-{teacher_patch} teacher, and stage 0 "
        f"{gflops[0] / results['teacher_gflops']:.2f}x. The gate's saving is measured against the full student; the "
        "cost against a plain CLIP ViT of the same token count is in docs/benchmarks.md.",
        "",
        "## Accuracy vs GFLOPs",
        "",
        "![accuracy vs GFLOPs](figures/e2e_accuracy_vs_gflops.png)",
        "",
        "![share of images answered per stage](figures/e2e_exit_stage_share.png)",
        "",
        "## Gate sweep (mean over axes)",
        "",
        "| θ | accuracy (%) | mean GFLOPs | × full | " + " | ".join(f"stage {s} (%)" for s in range(stages)) + " |",
        "|---:|---:|---:|---:|" + "---:|" * stages,
    ]
    for p in results["sweep_mean"]:
        lines.append(f"| {p['threshold']:g} | {100 * p['accuracy']:.1f} | {p['mean_gflops']:.3f} | "
                     f"{p['mean_gflops'] / gflops[-1]:.2f} | " + " | ".join(f"{100 * s:.0f}" for s in p["stage_share"]) + " |")
    lines += ["", "## Pipeline on the saved folder", "",
              f"`pipeline(\"zero-shot-image-classification\", model=<student>, trust_remote_code=True)` with "
              f"`margin_threshold={context['demo_threshold']:g}`, one call per axis:", ""]
    for item in context["demo"]:
        answers = "; ".join(f"{axis}: {a['predicted']} ({'✓' if a['predicted'] == a['true'] else '✗ ' + a['true']}, "
                            f"stage {a['stage']})" for axis, a in item["answers"].items())
        lines.append(f"- `{item['file_name']}` — {answers}")
    lines.append("")
    path.write_text("\n".join(lines))
    return path


def _first_run_record(cache: Path, key: dict, minutes: float) -> dict:
    """The wall time of the first run with these settings, kept in the cache so that a rerun that reuses every
    step still reports what the whole job costs. Written once (the run that created the cached steps)."""
    path = cache / f"first-run-{_hash(key)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    record = {"minutes": round(minutes, 2), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": _machine()}
    path.write_text(json.dumps(record) + "\n")
    return record


def run(config: EndToEndConfig) -> dict:
    """Run (or reuse) every step and write docs/results.{md,json} and the figures."""
    started = time.time()
    settings = config.settings()
    cache = Path(config.cache_dir)
    _log(f"size={config.size}; cache {cache}")
    data_root = build_benchmark(config, settings)
    _log(f"benchmark: {data_root}")
    teacher = build_teacher(config, settings, data_root)
    _log(f"teacher: {teacher.output_dir} ({'reused' if teacher.skipped else 'trained'})")
    student_dir = build_student(config, settings, data_root, teacher.output_dir)
    _log(f"student: {student_dir}")

    rows = load_benchmark_split(data_root, "test")
    from transformers import CLIPConfig

    teacher_config = CLIPConfig.from_pretrained(teacher.output_dir)
    results, student_config = evaluate_student(config, data_root, rows, teacher.output_dir, teacher_config,
                                               student_dir)
    chosen = results["summary"]["best_within_budget"] or results["summary"]["cheapest_within_one_point"]
    threshold = chosen["threshold"] if chosen else 0.5
    demo = pipeline_demo(student_dir, data_root, rows, threshold, config.demo_images)
    for item in demo:
        _log(f"pipeline: {item['file_name']}: " + ", ".join(
            f"{axis}={a['predicted']} (true {a['true']}, stage {a['stage']})" for axis, a in item["answers"].items()))

    docs = Path(config.docs_dir)
    plot_results(results, docs / "figures")
    summary = json.loads((student_dir.parent / "summary.json").read_text())
    teacher_vision = teacher_config.vision_config
    context = {
        "command": "python -m waveclip_hf.experiments.end_to_end " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "wall_minutes": (time.time() - started) / 60,
        "first_run": _first_run_record(cache, {"settings": settings, "seed": config.seed, "levels": config.levels,
                                               "generator_version": GENERATOR_VERSION},
                                       (time.time() - started) / 60),
        "data": f"generated benchmark (generator version {GENERATOR_VERSION}), seed {config.seed}, "
                f"{settings['num_train']} train / "
                f"{settings['num_validation']} validation / {settings['num_test']} test images at 224 px; axes "
                + ", ".join(f"{n} ({a.scale}, {len(a.class_names)} classes)" for n, a in AXES.items()),
        "teacher": f"CLIP ViT, patch {teacher_vision.patch_size}, width {teacher_vision.hidden_size}, "
                   f"{teacher_vision.num_hidden_layers} layers, trained contrastively on the captions "
                   f"({settings['teacher']})",
        "student": f"WaveCLIP L={config.levels}, cell {student_config.vision_config.cell_size}, distilled with "
                   f"{summary.get('step')} steps ({settings['distillation']})",
        "demo_threshold": threshold,
        "demo": demo,
    }
    report = {"settings": settings, "context": context, **results}
    (docs / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_results_markdown(docs / "results.md", results, context)
    _log(f"wrote {docs / 'results.md'}, {docs / 'results.json'} and figures in {(time.time() - started) / 60:.1f} min")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Distillation ablation: the same data and teacher, several distillation settings
# ----------------------------------------------------------------------------------------------------------------

# Each variant is merged into the size's distillation settings; "main job" is the size's own recipe.
DISTILLATION_VARIANTS = {
    "main job (cosine, fresh parameters at 10x lr)": {},
    "fresh parameters at 1x lr": {"fresh_lr_multiplier": 1.0},
    "+ zero-shot KL over the benchmark prompts": {"kl_on_benchmark_prompts": True},
}


def run_distillation_ablation(config: EndToEndConfig, variants: dict | None = None) -> dict:
    """Distil one student per variant from the main job's data and teacher (both reused from the cache) and
    report per-axis accuracy of every fixed stage and the best gated point; writes
    docs/distillation_ablation.{json,md}."""
    started = time.time()
    variants = DISTILLATION_VARIANTS if variants is None else variants
    base = config.settings()
    data_root = build_benchmark(config, base)
    teacher = build_teacher(config, base, data_root)
    rows = load_benchmark_split(data_root, "test")
    from transformers import CLIPConfig

    teacher_config = CLIPConfig.from_pretrained(teacher.output_dir)
    report = {}
    for name, overrides in variants.items():
        settings = json.loads(json.dumps(base))
        settings["distillation"].update(overrides)
        _log(f"variant {name!r}: {settings['distillation']}")
        student_dir = build_student(config, settings, data_root, teacher.output_dir)
        results, _ = evaluate_student(config, data_root, rows, teacher.output_dir, teacher_config, student_dir)
        report[name] = {"distillation": settings["distillation"], "per_axis": results["per_axis"],
                        "summary": results["summary"], "student_dir": str(student_dir)}
    context = {"command": "python scripts/distillation_ablation.py " + " ".join(sys.argv[1:]),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
               "wall_minutes": (time.time() - started) / 60, "teacher": str(teacher.output_dir),
               "data": str(data_root)}
    docs = Path(config.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "distillation_ablation.json").write_text(json.dumps({"context": context, "variants": report}, indent=2,
                                                                default=str) + "\n")
    (docs / "distillation_ablation.md").write_text(_ablation_markdown(report, context))
    return report


def _ablation_markdown(report: dict, context: dict) -> str:
    axes = list(AXES)
    lines = [
        "# Distillation ablation on the generated offline benchmark",
        "",
        f"Written by `{context['command']}` on {context['date']} ({context['machine']}; {context['wall_minutes']:.1f} min"
        " including any distillation not already cached); do not edit by hand. Same data and teacher as the main job"
        " (docs/results.md); only the distillation settings differ. Zero-shot accuracy on the 5,000-image test split"
        " (%), full student = last stage. Gated: one margin threshold for all axes, GFLOPs as a fraction of the full"
        " student's; the oracle gate keeps every full-student answer at the least cost (`oracle_exit_point`).",
        "",
        "| variant | " + " | ".join(f"{a}, stage 0 / full" for a in axes) + " | mean, full | teacher mean |"
        " best gated at <= 0.6x GFLOPs | cheapest gated within 1 point | oracle gate |",
        "|---|" + "---:|" * (len(axes) + 5),
    ]
    for name, entry in report.items():
        per_axis, summary = entry["per_axis"], entry["summary"]
        cells = [f"{100 * per_axis[a]['stages'][0]:.1f} / {100 * per_axis[a]['stages'][-1]:.1f}" for a in axes]
        full = summary["full_gflops"]
        gated_cells = [f"{100 * p['accuracy']:.1f}% at {p['mean_gflops'] / full:.2f}x" if p else "none"
                       for p in (summary["best_within_budget"], summary["cheapest_within_one_point"])]
        oracle = summary.get("oracle_exit_gflops")
        gated_cells.append(f"{oracle / full:.2f}x" if oracle is not None else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * summary['student_stage_mean'][-1]:.1f} | "
                     f"{100 * summary['teacher_mean']:.1f} | " + " | ".join(gated_cells) + " |")
    lines += ["", "Settings per variant:", ""]
    lines += [f"- {name}: `{json.dumps(entry['distillation'], sort_keys=True)}`" for name, entry in report.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--cache-dir", default=EndToEndConfig.cache_dir)
    parser.add_argument("--docs-dir", default=EndToEndConfig.docs_dir)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--override", type=json.loads, default={},
                        help='JSON merged into the size settings, e.g. \'{"distillation": {"max_steps": 50}}\'')
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = EndToEndConfig(size=args.size, cache_dir=args.cache_dir, docs_dir=args.docs_dir, seed=args.seed,
                            levels=args.levels, num_workers=args.num_workers, overrides=args.override,
                            progress=not args.no_progress)
    report = run(config)
    summary = report["summary"]
    print(json.dumps({k: summary[k] for k in ("teacher_mean", "student_stage_mean", "stage0_coarse_mean",
                                               "stage0_fine_mean", "best_within_budget")}, indent=2))
    return report


if __name__ == "__main__":
    main()
