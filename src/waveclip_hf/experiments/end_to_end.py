"""The README's main job: the whole method, end to end, on the generated offline benchmark.

    python -m waveclip_hf.experiments.end_to_end            # default: sized for a 2-core CPU
    python -m waveclip_hf.experiments.end_to_end --size large   # a bigger run for a GPU

1. generate the benchmark (coarse axes: colour, shape; fine axes: 2x2-periodic texture, a digit drawn in 2x2
   checker blocks);
2. train a small CLIP teacher on its captions (`training.teacher`, accelerate);
3. distil a WaveCLIP student from that teacher (`training.distillation`, the same code path as for
   `openai/clip-vit-base-patch16`);
4. evaluate on the test split: the teacher, the student at each fixed stage, and the gated student over a
   threshold sweep, per axis; mean GFLOPs; exit-stage shares (`run_evaluation`); JSON, plots and results.md
   (`report`);
5. load the saved student through `pipeline("zero-shot-image-classification", trust_remote_code=True)` and
   classify a few test images.

Steps 1-3 and the test embeddings are cached under `--cache-dir` (keyed by their settings, `cached_steps`), so a
second run redoes nothing but the reports. Both folders default to the current directory (`.cache/end_to_end`
and `docs`): `bash scripts/run_main.sh` runs from the repository root, so it writes the repository's docs/.
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from transformers import HfArgumentParser
from transformers.hf_argparser import HfArg

from ..data.synthetic import AXES, GENERATOR_VERSION, load_benchmark_split
from ..evaluation.calibration import default_thresholds
from ..training.outputs import rewrite_model_card
from .cached_steps import (
    build_benchmark,
    build_teacher,
    distil_or_reuse_student,
    log,
    run_settings,
    student_distillation_fields,
)
from .report import first_run_record, machine_description, recorded_command, utc_now, write_reports
from .run_evaluation import card_results, evaluate_student, label_free_pipeline_demo, pipeline_demo


SIZES = {
    # "small" is sized for a first run of under half an hour on a 2-core CPU (measured: docs/results.md).
    # Precision "auto": bf16 autocast where the hardware runs it natively, float32 elsewhere (`auto_mixed_precision`);
    # the settings, cache keys and reports hold the resolved value.
    # Teacher: the `TeacherTrainingConfig` defaults (width 128, batch 64, lr 7e-4) for 100k images seen.
    # Student: 800 steps of 32 at 5e-4, cosine loss only, the fresh detail projections at 10x (the library
    # default). docs/distillation_ablation.md compares this with 1x and with the zero-shot KL over the benchmark's
    # prompts added (`kl_on_benchmark_prompts`).
    "small": dict(
        num_train=20_000,
        num_validation=1_000,
        num_test=5_000,
        teacher=dict(num_epochs=5.0, mixed_precision="auto"),
        distillation=dict(
            max_steps=800, batch_size=32, learning_rate=5e-4, fresh_lr_multiplier=10.0, mixed_precision="auto"
        ),
    ),
    # For a GPU: more data, a wider teacher and a longer distillation.
    "large": dict(
        num_train=100_000,
        num_validation=2_000,
        num_test=10_000,
        teacher={
            "num_epochs": 8.0,
            "batch_size": 256,
            "mixed_precision": "auto",
            **dict(vision_hidden_size=384, vision_intermediate_size=1536, vision_num_layers=6, vision_num_heads=6),
        },
        distillation=dict(
            max_steps=6_000, batch_size=128, learning_rate=3e-4, fresh_lr_multiplier=10.0, mixed_precision="auto"
        ),
    ),
}


@dataclass
class EndToEndConfig:
    """One end-to-end run. `size` picks the defaults in `SIZES`; the cache makes reruns cheap.

    `cache_dir` and `docs_dir` are resolved to absolute paths against the current directory when the config is
    made (the cache keys hold absolute paths, so the same folder gives the same keys however it was spelled).
    """

    size: str = HfArg(default="small", metadata={"choices": sorted(SIZES)}, help="the settings of `SIZES`")
    cache_dir: str = HfArg(default=".cache/end_to_end", help="cached steps (default: under the current directory)")
    docs_dir: str = HfArg(default="docs", help="where results.{md,json} and figures/ go")
    seed: int = HfArg(default=0, help="seed of the benchmark, the teacher and the student")
    levels: int = HfArg(default=1, help="wavelet levels L of the student")
    eval_batch_size: int = HfArg(default=64, help="images per forward in the evaluation")
    num_workers: int = HfArg(default=2, help="data-loading processes")
    thresholds: list[float] = HfArg(default_factory=default_thresholds, help="the margin thresholds of the sweep")
    gflops_target: float = HfArg(
        default=0.6, help="report the best gated point at <= this fraction of the full model's GFLOPs"
    )
    demo_images: int = HfArg(default=4, help="test images the pipeline demo classifies")
    progress: bool = HfArg(default=True, help="progress bars (--no-progress: none)")
    model_dir: str = HfArg(
        default="runs/waveclip-offline",
        help="where the distilled model is copied for use (a stable path; the cache's folder name changes with the "
        "settings)",
    )
    overrides: dict | str | None = HfArg(
        default=None,
        aliases=["--override"],
        help='JSON merged into the size settings, e.g. \'{"distillation": {"max_steps": 50}}\' for a quick check',
    )

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"Unknown size {self.size!r}; choose one of {sorted(SIZES)}.")
        self.overrides = json.loads(self.overrides) if isinstance(self.overrides, str) else dict(self.overrides or {})
        self.thresholds = tuple(self.thresholds)
        self.cache_dir = str(Path(self.cache_dir).expanduser().resolve())
        self.docs_dir = str(Path(self.docs_dir).expanduser().resolve())
        self.model_dir = str(Path(self.model_dir).expanduser().resolve())

    def settings(self) -> dict:
        """The size's settings with `overrides` merged in (dict values update the size's dict of that name), and
        `mixed_precision: "auto"` resolved for this machine (`auto_mixed_precision`)."""
        return run_settings(SIZES[self.size], self.overrides)


class MainJobInputs(NamedTuple):
    """What every student of the main job is distilled from and evaluated on (steps 1-2, cached)."""

    data_root: Path  # the generated benchmark
    teacher_dir: Path  # the trained CLIP teacher's folder
    teacher_reused: bool  # found in the cache
    teacher_config: object  # its `CLIPConfig`
    rows: list  # the test split's metadata rows


def main_job_inputs(config: EndToEndConfig, settings: dict) -> MainJobInputs:
    """Steps 1-2: generate (or reuse) the benchmark and train (or reuse) the teacher."""
    from transformers import CLIPConfig

    data_root = build_benchmark(config.cache_dir, settings, config.seed, config.num_workers, config.progress)
    log(f"benchmark: {data_root}")
    teacher = build_teacher(config.cache_dir, settings, data_root, config.seed, config.num_workers, config.progress)
    log(f"teacher: {teacher.output_dir} ({'reused' if teacher.skipped else 'trained'})")
    return MainJobInputs(
        data_root,
        teacher.output_dir,
        teacher.skipped,
        CLIPConfig.from_pretrained(teacher.output_dir),
        load_benchmark_split(data_root, "test"),
    )


def main_job_student(config: EndToEndConfig, settings: dict, inputs: MainJobInputs) -> Path:
    """Step 3: distil (or reuse) the student of `settings["distillation"]`; returns its Hub-ready folder."""
    fields = student_distillation_fields(
        settings, inputs.data_root, inputs.teacher_dir, config.levels, config.seed, config.num_workers, config.progress
    )
    return distil_or_reuse_student(config.cache_dir, fields)


def _built_every_step(inputs: MainJobInputs, student_dir: Path, started: float) -> bool:
    """Whether this run generated the benchmark, trained the teacher and distilled the student itself (a first
    run), rather than reusing any of them from the cache."""
    made_now = [(inputs.data_root / "info.json"), (student_dir.parent / "summary.json")]
    return not inputs.teacher_reused and all(path.stat().st_mtime >= started for path in made_now)


def _run_context(
    config: EndToEndConfig, settings: dict, inputs: MainJobInputs, student_dir: Path, student_config, started: float
) -> dict:
    """Provenance of this run for the report: command, date, machine, wall times, data, teacher and student."""
    summary = json.loads((student_dir.parent / "summary.json").read_text())
    teacher_vision = inputs.teacher_config.vision_config
    # The student folder's name tells which run made it: a new student is a new first run.
    first_run_key = {
        "settings": settings,
        "seed": config.seed,
        "levels": config.levels,
        "generator_version": GENERATOR_VERSION,
        "student": student_dir.parent.name,
    }
    return {
        "command": recorded_command("python -m waveclip_hf.experiments.end_to_end"),
        "date": utc_now(),
        "machine": machine_description(),
        "wall_minutes": (time.time() - started) / 60,
        "first_run": first_run_record(
            config.cache_dir,
            first_run_key,
            (time.time() - started) / 60,
            _built_every_step(inputs, student_dir, started),
        ),
        "data": f"generated benchmark (generator version {GENERATOR_VERSION}), seed {config.seed}, "
        f"{settings['num_train']} train / "
        f"{settings['num_validation']} validation / {settings['num_test']} test images at 224 px; axes "
        + ", ".join(f"{n} ({a.scale}, {len(a.class_names)} classes)" for n, a in AXES.items()),
        "teacher": f"CLIP ViT, patch {teacher_vision.patch_size}, width {teacher_vision.hidden_size}, "
        f"{teacher_vision.num_hidden_layers} layers, trained contrastively on the captions "
        f"({settings['teacher']})",
        "student": f"WaveCLIP L={config.levels}, cell {student_config.vision_config.cell_size}, distilled with "
        f"{summary.get('step')} steps ({settings['distillation']})",
    }


def _demo(config: EndToEndConfig, results: dict, inputs: MainJobInputs, student_dir: Path) -> dict:
    """Step 5 at the threshold of the best gated point (else the cheapest within 1 point, else 0.5)."""
    chosen = results["summary"]["best_within_budget"] or results["summary"]["cheapest_within_one_point"]
    threshold = chosen["threshold"] if chosen else 0.5
    demo = pipeline_demo(student_dir, inputs.data_root, inputs.rows, threshold, config.demo_images)
    label_free = label_free_pipeline_demo(student_dir, inputs.data_root, inputs.rows, config.demo_images)
    for prefix, items in (("pipeline", demo), ("pipeline, label-free", label_free["demo"])):
        for item in items:
            log(
                f"{prefix}: {item['file_name']}: "
                + ", ".join(
                    f"{axis}={a['predicted']} (true {a['true']}, stage {a['stage']})"
                    for axis, a in item["answers"].items()
                )
            )
    return {"demo_threshold": threshold, "demo": demo, "label_free_demo": label_free}


def _publish_on_model_card(student_dir: Path, results: dict, num_images: int, threshold: float) -> None:
    """The student's model card publishes what was just measured (per axis, every stage, the demo's gate). The
    card is a by-product: a failure to re-render it is logged, never lost figures (the reports are written first)."""
    try:
        card = rewrite_model_card(student_dir, card_results(results, num_images, threshold))
    except Exception as error:  # noqa: BLE001 - see the docstring
        log(f"model card: not updated ({type(error).__name__}: {error})")
    else:
        log(f"model card: {card} publishes the measured accuracy")


def run(config: EndToEndConfig) -> dict:
    """Run (or reuse) every step and write results.{md,json} and the figures into `config.docs_dir`.

    Returns:
        the report written to results.json: {"settings", "context", **results of `run_evaluation.evaluate`}.
    """
    started = time.time()
    settings = config.settings()
    log(f"size={config.size}; cache {config.cache_dir}")
    inputs = main_job_inputs(config, settings)
    student_dir = main_job_student(config, settings, inputs)
    log(f"student: {student_dir}")
    results, student_config = evaluate_main_job_student(config, inputs, student_dir)
    demo = _demo(config, results, inputs, student_dir)
    context = {**_run_context(config, settings, inputs, student_dir, student_config, started), **demo}
    report = {"settings": settings, "context": context, **results}
    results_md = write_reports(config.docs_dir, report, context)
    _publish_on_model_card(student_dir, results, len(inputs.rows), demo["demo_threshold"])
    publish_model(student_dir, Path(config.model_dir))
    log(f"wrote {results_md}, results.json and figures in {(time.time() - started) / 60:.1f} min")
    log(f"the model: {config.model_dir} (load it with AutoModel.from_pretrained(..., trust_remote_code=True))")
    return report


def publish_model(student_dir: Path, model_dir: Path) -> Path:
    """Copy the distilled folder (weights, remote code, processor, card) to `model_dir`, replacing it whole."""
    import shutil

    from ..models.waveclip.folder_io import written_atomically

    with written_atomically(model_dir) as tmp:
        shutil.copytree(student_dir, tmp, dirs_exist_ok=True)
    return model_dir


def evaluate_main_job_student(config: EndToEndConfig, inputs: MainJobInputs, student_dir: Path):
    """`evaluate_student` of a student distilled from the main job's inputs, with the run's evaluation settings:
    (results, the student's config)."""
    return evaluate_student(
        config.cache_dir,
        inputs.data_root,
        inputs.rows,
        inputs.teacher_dir,
        inputs.teacher_config,
        student_dir,
        config.thresholds,
        config.gflops_target,
        config.eval_batch_size,
        config.progress,
    )


def build_parser() -> HfArgumentParser:
    """The command line of `python -m waveclip_hf.experiments.end_to_end`: one flag per `EndToEndConfig` field."""
    return HfArgumentParser(EndToEndConfig, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv=None) -> dict:
    (config,) = build_parser().parse_args_into_dataclasses(argv)
    report = run(config)
    summary = report["summary"]
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "teacher_mean",
                    "student_stage_mean",
                    "stage0_coarse_mean",
                    "stage0_fine_mean",
                    "best_within_budget",
                )
            },
            indent=2,
        )
    )
    return report


__all__ = [
    "SIZES",
    "EndToEndConfig",
    "MainJobInputs",
    "build_parser",
    "evaluate_main_job_student",
    "main",
    "main_job_inputs",
    "main_job_student",
    "publish_model",
    "run",
]


if __name__ == "__main__":
    main()
