"""Adaptive resolution, end to end: one WaveCLIP at 448 px with two DWT levels (three stages) on the three-scale
benchmark (coarse, fine and micro axes), against CLIP ViTs of the same width at 224 and 448 px.

    python -m waveclip_hf.experiments.adaptive_resolution --cache-dir /some/cache     # or:
    bash scripts/run_main.sh --preset adaptive-448

At 448 px, two levels and 64-px cells, stage 0 reads the level-2 approximation (112 x 112, 7 x 7 cells): the same
50 tokens, of the same size, as stage 0 of the 224-px one-level model; stage 1 (level-2 details) matches that
model's stage 1, and stage 2 (level-1 details) holds what only the 448-px image has. The job

1. generates (or reuses) the three-scale benchmark (`data.synthetic`, layout "three-scale");
2. trains (or reuses) a CLIP teacher on it at 448 px (patch 64: the 7 x 7 grid of the main job's 224-px teacher),
   started from the main job's teacher (`training.teacher_init`: the patch kernel upsampled, the text embeddings
   copied word by word), so that it only has to add the micro axis (`--source-teacher`; default: the main job's
   teacher in `--main-cache-dir`, which `bash scripts/run_main.sh` makes);
3. distils (or reuses) the three-stage student from it (`convert_clip_to_waveclip` at 448 / L=2 / cell 64);
4. evaluates teacher, fixed stages and the margin gate per axis on the test split (`run_evaluation`);
5. writes docs/adaptive_resolution.{md,json} and two figures.

Steps 1-3 and the test embeddings are cached under `--cache-dir` exactly as the main job caches its own
(`cached_steps`), so a rerun only rewrites the reports.
"""

import argparse
import json
import time
from pathlib import Path

from transformers import CLIPConfig, CLIPVisionConfig

from ..data.synthetic import GENERATOR_VERSION, benchmark_axes, load_benchmark_split, read_benchmark_info
from ..evaluation.calibration import default_thresholds
from ..figures.accuracy_vs_gflops import plot_accuracy_vs_gflops, plot_exit_stage_share
from ..models.waveclip.configuration_waveclip import WaveCLIPVisionConfig
from ..models.waveclip.flops import FLOPS_CONVENTION, clip_vit_flops, cumulative_flops
from .adaptive_report import write_adaptive_markdown
from .cached_steps import (
    build_benchmark,
    build_teacher,
    distil_or_reuse_student,
    log,
    run_settings,
    student_distillation_fields,
)
from .report import first_run_record, machine_description, portable_paths, recorded_command, utc_now
from .run_evaluation import evaluate_student


LEVELS = 2
PRESETS = {
    # 28.8 min on an idle 2-core CPU (docs/adaptive_resolution.md says what this cuts). A first setting with half
    # the images, 8 teacher epochs at 3e-4 and 400 steps took 12.6 min and left the teacher at 65% on the grain.
    "adaptive-448": dict(
        layout="three-scale",
        num_train=6_000,
        num_validation=200,
        num_test=1_000,
        # Precision "auto", as the main job: bf16 autocast only where the hardware runs it natively. (With bf16
        # on a CPU that emulates it, the 448-px teacher's 64-px patch convolution takes seconds a step.)
        teacher=dict(image_size=448, patch_size=64, num_epochs=12.0, learning_rate=5e-4, mixed_precision="auto"),
        distillation=dict(
            cell_size=64,
            max_steps=800,
            batch_size=32,
            learning_rate=5e-4,
            fresh_lr_multiplier=10.0,
            mixed_precision="auto",
        ),
    ),
}
# The figures of docs/adaptive_resolution.md, relative to the docs folder.
FIGURES = {"curve": "figures/adaptive_accuracy_vs_gflops.png", "shares": "figures/adaptive_exit_stage_share.png"}


def preset_settings(preset: str, overrides: dict | None = None) -> dict:
    """The preset's settings with `overrides` merged in (dict values update the preset's dict of that name), and
    `mixed_precision: "auto"` resolved for this machine (`auto_mixed_precision`), as the main job resolves it: on a
    machine with native bf16 the settings (and so the cache keys) are what they were when the preset said "bf16"."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return run_settings(PRESETS[preset], overrides)


def main_job_teacher(main_cache_dir: str | Path, seed: int = 0) -> Path:
    """The folder of the main job's default ("small") teacher in `main_cache_dir`, found by the main job's own cache
    keys; nothing is trained or written.

    Raises:
        FileNotFoundError: no finished teacher there (run `bash scripts/run_main.sh` first, or pass its folder).
    """
    from ..training.teacher import read_training_info
    from .cached_steps import benchmark_folder, teacher_folder
    from .end_to_end import EndToEndConfig

    # The main job's own keys, from its settings as it resolves them (`mixed_precision: "auto"` included).
    settings = EndToEndConfig(cache_dir=str(main_cache_dir), seed=seed).settings()
    data_root = benchmark_folder(main_cache_dir, settings, seed)
    folder = teacher_folder(Path(main_cache_dir).expanduser().resolve(), settings, data_root, seed)
    if read_training_info(folder) is None:
        raise FileNotFoundError(
            f"No finished main-job teacher at {folder}: run `bash scripts/run_main.sh` first (it "
            "trains it), or pass the folder of a 224-px teacher with --source-teacher."
        )
    return folder


def plain_clip_gflops(student_config, image_size: int) -> float:
    """GFLOPs per image of a plain CLIP ViT with 16-px patches (the ViT-B/16 token layout) at `image_size`, with
    the student's width, depth and projection."""
    vision = student_config.vision_config
    clip = CLIPVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=image_size,
        patch_size=16,
    )
    return clip_vit_flops(clip, student_config.projection_dim) / 1e9


def vit_b16_reference() -> dict:
    """The same geometry at ViT-B/16 width (analytic): WaveCLIP 448 / L=2 / cell 64 per stage, and CLIP ViT-B/16
    at 224 and 448 px (GFLOPs per image, projection 512)."""
    b16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    waveclip = WaveCLIPVisionConfig(**b16, image_size=448, levels=LEVELS, cell_size=64)
    return {
        "stage_gflops": [f / 1e9 for f in cumulative_flops(waveclip, 512)],
        "stage_tokens": waveclip.stage_lengths,
        "clip_224_gflops": clip_vit_flops(CLIPVisionConfig(**b16, image_size=224, patch_size=16), 512) / 1e9,
        "clip_448_gflops": clip_vit_flops(CLIPVisionConfig(**b16, image_size=448, patch_size=16), 512) / 1e9,
    }


def gated_point(results: dict) -> dict:
    """The operating point the page reports: the cheapest threshold whose mean accuracy is within 1 point of the
    full model's (else the best within the GFLOPs budget), with what it spends and scores per axis."""
    summary = results["summary"]
    point = summary["cheapest_within_one_point"] or summary["best_within_budget"]
    index = [p["threshold"] for p in results["sweep_mean"]].index(point["threshold"])
    per_axis = {
        name: {key: sweep[index][key] for key in ("accuracy", "mean_gflops", "stage_share")}
        for name, sweep in results["sweep_per_axis"].items()
    }
    return {
        "margin_threshold": point["threshold"],
        "accuracy": point["accuracy"],
        "mean_gflops": point["mean_gflops"],
        "stage_share": point["stage_share"],
        "per_axis": per_axis,
        "rule": "cheapest" if summary["cheapest_within_one_point"] else "best_within_budget",
    }


def adaptive_report(results: dict, student_config, context: dict) -> dict:
    """docs/adaptive_resolution.json: the issue's keys (stage_gflops, clip_224_gflops, clip_448_gflops, per_axis,
    gated) first, then the full evaluation (`run_evaluation.evaluate`) and the run's context."""
    per_axis = {
        name: {
            "scale": row["scale"],
            "teacher_accuracy": row["teacher"],
            "stage_accuracy": row["stages"],
            "chance": row["chance"],
        }
        for name, row in results["per_axis"].items()
    }
    return {
        "stage_gflops": results["student_cumulative_gflops"],
        "clip_224_gflops": plain_clip_gflops(student_config, 224),
        "clip_448_gflops": plain_clip_gflops(student_config, 448),
        "per_axis": per_axis,
        "gated": gated_point(results),
        "stage_tokens": student_config.vision_config.stage_lengths,
        "vit_b16_reference": vit_b16_reference(),
        "flops_convention": FLOPS_CONVENTION,
        "context": context,
        "evaluation": results,
    }


def build_adaptive_run(cache_dir: Path, settings: dict, seed: int, num_workers: int, progress: bool, timed=None):
    """Steps 1-3, each reused from the cache when it is there: (benchmark folder, teacher result, student folder)."""
    timed = timed or (lambda name, fn: fn())
    data_root = timed("benchmark", lambda: build_benchmark(cache_dir, settings, seed, num_workers, progress))
    teacher = timed("teacher", lambda: build_teacher(cache_dir, settings, data_root, seed, num_workers, progress))
    fields = student_distillation_fields(settings, data_root, teacher.output_dir, LEVELS, seed, num_workers, progress)
    student_dir = timed("student", lambda: distil_or_reuse_student(cache_dir, fields))
    return data_root, teacher, student_dir


def evaluate_adaptive_run(cache_dir: Path, data_root, teacher, student_dir, axes, progress: bool):
    """`evaluate_student` on the run's test split with the default thresholds: (results, student config)."""
    rows = load_benchmark_split(data_root, "test")
    teacher_config = CLIPConfig.from_pretrained(teacher.output_dir)
    return evaluate_student(
        cache_dir,
        data_root,
        rows,
        teacher.output_dir,
        teacher_config,
        student_dir,
        default_thresholds(),
        0.6,
        64,
        progress,
        axes,
    )


def run(
    preset: str,
    cache_dir: str,
    docs_dir: str,
    source_teacher: str | Path,
    seed: int = 0,
    num_workers: int = 2,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Run (or reuse) every step, the teacher started from `source_teacher` (a 224-px teacher folder, or None: a
    fresh one); write docs/adaptive_resolution.{md,json} and the figures; return the report."""
    started = time.time()
    cache_dir, docs_dir = Path(cache_dir).expanduser().resolve(), Path(docs_dir).expanduser().resolve()
    settings = preset_settings(preset, overrides)
    if source_teacher is not None:
        settings["teacher"]["init_from"] = str(Path(source_teacher).expanduser().resolve())
    log(f"preset={preset}; cache {cache_dir}")
    step_seconds = {}

    def timed(name, fn):
        begin = time.time()
        value = fn()
        step_seconds[name] = round(time.time() - begin, 1)
        log(f"{name}: {step_seconds[name]:.0f} s")
        return value

    data_root, teacher, student_dir = build_adaptive_run(cache_dir, settings, seed, num_workers, progress, timed)
    axes = benchmark_axes(read_benchmark_info(data_root))
    results, student_config = timed(
        "evaluation", lambda: evaluate_adaptive_run(cache_dir, data_root, teacher, student_dir, axes, progress)
    )
    minutes = (time.time() - started) / 60
    first_run_key = {
        "preset": preset,
        "settings": settings,
        "seed": seed,
        "levels": LEVELS,
        "generator_version": GENERATOR_VERSION,
        "student": student_dir.parent.name,
    }
    # A first run generated the benchmark, trained the teacher and distilled the student itself.
    made_now = [data_root / "info.json", student_dir.parent / "summary.json"]
    built_every_step = not teacher.skipped and all(path.stat().st_mtime >= started for path in made_now)
    context = {
        "command": recorded_command("python -m waveclip_hf.experiments.adaptive_resolution"),
        "preset": preset,
        "settings": settings,
        "date": utc_now(),
        "machine": machine_description(),
        "wall_minutes": round(minutes, 2),
        "step_seconds": step_seconds,
        "first_run": first_run_record(cache_dir, first_run_key, minutes, built_every_step),
        "teacher_training": {
            k: teacher.info.get(k)
            for k in ("steps", "images_seen", "train_seconds", "images_per_second", "zero_shot_validation")
        },
        "student_summary": json.loads((student_dir.parent / "summary.json").read_text()),
        "figures": FIGURES,
    }
    source_cache = Path(settings["teacher"]["init_from"]).parent if settings["teacher"].get("init_from") else None
    roots = {"<cache>": cache_dir, **({"<main job cache>": source_cache} if source_cache else {})}
    report = adaptive_report(results, student_config, context)
    # docs/ names no folder of this machine; the returned report keeps the real paths, for code that reads them.
    write_adaptive_docs(docs_dir, portable_paths(report, roots))
    log(f"wrote {docs_dir / 'adaptive_resolution.md'} in {(time.time() - started) / 60:.1f} min")
    return report


def write_adaptive_docs(docs_dir: Path, report: dict) -> Path:
    """The two figures, adaptive_resolution.json and adaptive_resolution.md in `docs_dir`; returns the page."""
    docs_dir = Path(docs_dir)
    plot_accuracy_vs_gflops(report["evaluation"], docs_dir / FIGURES["curve"])
    plot_exit_stage_share(report["evaluation"], docs_dir / FIGURES["shares"])
    (docs_dir / "adaptive_resolution.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return write_adaptive_markdown(docs_dir / "adaptive_resolution.md", report)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m waveclip_hf.experiments.adaptive_resolution`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="adaptive-448")
    parser.add_argument(
        "--cache-dir",
        default=".cache/adaptive_resolution",
        help="cached steps (default: %(default)s under the current directory)",
    )
    parser.add_argument("--docs-dir", default="docs", help="where adaptive_resolution.{md,json} and figures/ go")
    parser.add_argument(
        "--main-cache-dir",
        default=".cache/end_to_end",
        help="the main job's cache, where the source teacher is looked up (default: %(default)s)",
    )
    parser.add_argument(
        "--source-teacher",
        default=None,
        help="a 224-px teacher folder to start the 448-px teacher from (default: the main job's)",
    )
    parser.add_argument("--fresh-teacher", action="store_true", help="train the 448-px teacher from scratch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument(
        "--override",
        type=json.loads,
        default={},
        help='JSON merged into the preset, e.g. \'{"distillation": {"max_steps": 50}}\'',
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    source = None if args.fresh_teacher else (args.source_teacher or main_job_teacher(args.main_cache_dir, args.seed))
    report = run(
        args.preset,
        args.cache_dir,
        args.docs_dir,
        source,
        args.seed,
        args.num_workers,
        not args.no_progress,
        args.override,
    )
    print(
        json.dumps(
            {k: report[k] for k in ("stage_gflops", "clip_224_gflops", "clip_448_gflops", "gated")},
            indent=2,
            default=str,
        )
    )
    return report


__all__ = [
    "LEVELS",
    "PRESETS",
    "adaptive_report",
    "build_adaptive_run",
    "build_parser",
    "gated_point",
    "main",
    "main_job_teacher",
    "plain_clip_gflops",
    "preset_settings",
    "run",
    "vit_b16_reference",
    "write_adaptive_docs",
]


if __name__ == "__main__":
    main()
