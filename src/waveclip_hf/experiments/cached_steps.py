"""The main job's expensive steps, each cached under the cache folder by a hash of its settings.

    benchmark-v<version>-<hash>/   the generated benchmark (`data.synthetic.generate_benchmark`)
    teacher-<hash>/                the small CLIP teacher trained on it (`training.teacher.train_clip_teacher`)
    student-<hash>/final/          the WaveCLIP distilled from that teacher (`training.distillation.distill`)

A step whose folder is complete is reused; an interrupted distillation resumes from its last checkpoint. The
keys hold the absolute paths of the folders a step reads (the teacher's and the data's), so a cache is tied to
where it lives: a copied cache folder retrains its students. docs/offline_benchmark.md describes the steps.
"""

import hashlib
import json
import time
from pathlib import Path

from ..data.synthetic import AXES, GENERATOR_VERSION, THREE_SCALE_VERSION, generate_benchmark
from ..training.config import auto_mixed_precision
from ..training.distillation import DistillationConfig, distill
from ..training.optimization import OPTIMIZATION_RULES_VERSION
from ..training.teacher import TeacherTrainingConfig, train_clip_teacher


# Distillation fields that change how a run looks or resumes, not what it computes: left out of the cache key.
_UNKEYED_DISTILLATION_FIELDS = ("progress_bar", "num_workers", "resume", "report_to")


def settings_hash(payload) -> str:
    """12 hex digits of the SHA-256 of `payload` as sorted JSON (non-JSON values by their `str`)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def log(message: str) -> None:
    """One timestamped progress line of the main job, flushed at once (runs are long and often piped to a file)."""
    print(f"[end_to_end {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fresh_accelerator_state() -> None:
    """Let the next step build its own `Accelerator` (teacher and student may use other mixed precision).

    accelerate keeps one `AcceleratorState` per process and refuses a second `Accelerator` with other settings;
    the process-level `PartialState` (device, process group) is kept, so multi-GPU launches still work.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def run_settings(base: dict, overrides: dict | None = None) -> dict:
    """A copy of a run's settings (the main job's size, the adaptive preset) with `overrides` merged in (dict values
    update the dict of that name), and `mixed_precision: "auto"` resolved for this machine (`auto_mixed_precision`:
    bf16 where it runs natively, float32 elsewhere) before any cache key is made from them."""
    settings = json.loads(json.dumps(base))
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            settings.setdefault(key, {}).update(value)
        else:
            settings[key] = value
    for step in ("teacher", "distillation"):
        if settings.get(step, {}).get("mixed_precision") == "auto":
            settings[step]["mixed_precision"] = auto_mixed_precision()
    return settings


def build_benchmark(cache_dir: Path, settings: dict, seed: int, num_workers: int, progress: bool) -> Path:
    """Generate (or reuse) the benchmark with the split sizes (and `layout`, default "two-scale") of `settings`;
    returns its root folder."""
    counts = dict(
        num_train=settings["num_train"], num_validation=settings["num_validation"], num_test=settings["num_test"]
    )
    layout = settings.get("layout", "two-scale")
    root = benchmark_folder(cache_dir, settings, seed)
    return generate_benchmark(root, seed=seed, num_workers=num_workers, progress=progress, layout=layout, **counts)


def benchmark_folder(cache_dir: Path, settings: dict, seed: int) -> Path:
    """Where `build_benchmark` keeps the benchmark of these settings and seed (its cache key)."""
    counts = dict(
        num_train=settings["num_train"], num_validation=settings["num_validation"], num_test=settings["num_test"]
    )
    layout = settings.get("layout", "two-scale")
    keyed = {"seed": seed, "generator_version": GENERATOR_VERSION, **counts}
    if layout != "two-scale":  # the two-scale key stays what it was, so the main job's cache stays valid
        keyed.update(layout=layout, layout_version=THREE_SCALE_VERSION)
    return Path(cache_dir) / f"benchmark-v{GENERATOR_VERSION}-{settings_hash(keyed)}"


def build_teacher(cache_dir: Path, settings: dict, data_root: Path, seed: int, num_workers: int, progress: bool):
    """Train (or reuse) the CLIP teacher of `settings["teacher"]` on the benchmark; returns its training result
    (`output_dir`, `skipped` = reused)."""
    teacher_config = TeacherTrainingConfig(seed=seed, **settings.get("teacher", {}))
    fresh_accelerator_state()
    output = teacher_folder(cache_dir, settings, data_root, seed)
    return train_clip_teacher(data_root, output, teacher_config, num_workers=num_workers, progress=progress)


def teacher_folder(cache_dir: Path, settings: dict, data_root: Path, seed: int) -> Path:
    """Where `build_teacher` keeps the teacher of these settings, benchmark and seed (its cache key)."""
    teacher_config = TeacherTrainingConfig(seed=seed, **settings.get("teacher", {}))
    return Path(cache_dir) / f"teacher-{teacher_config.config_hash({'data': str(Path(data_root).name)})}"


def student_distillation_fields(
    settings: dict, data_root: Path, teacher_dir: Path, levels: int, seed: int, num_workers: int, progress: bool
) -> dict:
    """The `DistillationConfig` fields (less `output_dir`) of the main job's student for these settings.

    `kl_on_benchmark_prompts` in the distillation settings expands to a label vocabulary of every axis's
    prompts: the teacher's zero-shot distribution over them is matched at every stage (the optional KL term of
    the distillation loss, docs/distillation.md).
    """
    distillation = dict(settings.get("distillation", {}))
    if distillation.pop("kl_on_benchmark_prompts", False):
        distillation["label_vocabulary"] = [prompt for axis in AXES.values() for prompt in axis.prompts()]
    return dict(
        teacher=str(teacher_dir),
        train_data=str(data_root / "train"),
        eval_data=str(data_root / "validation"),
        levels=levels,
        seed=seed,
        num_workers=num_workers,
        cache_teacher_embeddings=True,
        checkpoint_every=200,
        eval_every=0,
        progress_bar=progress,
        resume=True,
        **distillation,
    )


def student_output_dir(cache_dir: Path, fields: dict) -> Path:
    """`<cache>/student-<hash>`: the hash covers every field of `student_distillation_fields` that changes the
    student."""
    keyed = {k: v for k, v in fields.items() if k not in _UNKEYED_DISTILLATION_FIELDS}
    if OPTIMIZATION_RULES_VERSION != 1:  # version 1 students keep the keys they were cached under
        keyed["optimization_rules_version"] = OPTIMIZATION_RULES_VERSION
    return Path(cache_dir) / f"student-{settings_hash(keyed)}"


def distil_or_reuse_student(cache_dir: Path, fields: dict) -> Path:
    """The main job's student step: distil a WaveCLIP with `fields` (from `student_distillation_fields`) into its
    cache folder, or reuse the finished one; resumes an interrupted run. Returns its Hub-ready `final` folder.

    Raises:
        RuntimeError: the distillation stopped before the end (run the same command again to resume).
    """
    output_dir = student_output_dir(cache_dir, fields)
    final = output_dir / "final"
    if (final / "config.json").is_file() and (output_dir / "summary.json").is_file():
        log(f"student: reusing {final}")
        return final
    fresh_accelerator_state()
    result = distill(DistillationConfig(output_dir=str(output_dir), **fields))
    if result.interrupted or result.final_dir is None:
        raise RuntimeError(f"distillation into {output_dir} was interrupted; run the same command again to resume")
    return Path(result.final_dir)


__all__ = [
    "benchmark_folder",
    "build_benchmark",
    "build_teacher",
    "distil_or_reuse_student",
    "fresh_accelerator_state",
    "run_settings",
    "settings_hash",
    "student_distillation_fields",
    "student_output_dir",
    "teacher_folder",
]
