"""The method's open questions, answered on the generated benchmark (docs/ablations.md):

1. causality: does the block-causal mask cost accuracy at full resolution? A student whose tokens attend over all
   stages at once (`attention="bidirectional"`), distilled like the main job's, against the main job's student;
2. band order: does coarse-to-fine matter? A student that reads the finest details first and the approximation
   last (`band_order="fine_to_coarse"`), per stage and along the gated accuracy / GFLOPs curve;
3. gate stability: does a margin threshold (plain, or scaled by the number of labels as the paper does) transfer
   across label sets, benchmark samples and retrained models better than a top-1 probability threshold?
   (`evaluation.gate_stability`); the benchmark samples are the test splits generated with other seeds, read by the
   first seed's teacher and student (no new teacher: only the benchmark is generated);
4. spread: the main job's figures over several benchmark seeds, so that a difference can be told from noise.

    python scripts/method_ablations.py --cache-dir .cache/end_to_end     # after (or instead of) the main job

Every step is the main job's cached step (`cached_steps`): each seed's benchmark, teacher and student are those
`python -m waveclip_hf.experiments.end_to_end --seed <seed>` builds (and reuses), and the ablation students are
distilled with the same data, teacher, seed and steps, with one distillation setting changed. Every metric comes
from one forward per test image per student (`run_evaluation.embed_test_split`, cached).
"""

import argparse
import dataclasses
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from ..data.synthetic import AXES, GENERATOR_VERSION, label_ids, load_benchmark_split
from ..evaluation.calibration import OperatingPoint, choose_threshold
from ..evaluation.gate_stability import (
    CALIBRATIONS,
    GATE_SCORES,
    axis_settings,
    summarise_transfers,
    transfers,
)
from ..evaluation.zero_shot import zero_shot_predictions
from ..models.waveclip.flops import answer_flops
from ..training.teacher import read_training_info
from .cached_steps import (
    build_benchmark,
    distil_or_reuse_student,
    log,
    settings_hash,
    student_distillation_fields,
    student_output_dir,
)
from .end_to_end import EndToEndConfig, MainJobInputs, evaluate_main_job_student, main_job_inputs
from .end_to_end import build_parser as end_to_end_parser
from .report import first_run_record, machine_description, portable_paths, recorded_command, utc_now
from .run_evaluation import embed_test_split, embeddings_cache_path, evaluate


# Each variant is merged into the main job's distillation settings (so it enters the student's cache key, and the
# main job's key is unchanged). The bidirectional student's stage weights default to the last stage only
# (`DistillationConfig.resolved_stage_weights`): its only answer.
VARIANTS = {
    "bidirectional": {"attention": "bidirectional"},
    "fine_to_coarse": {"band_order": "fine_to_coarse"},
}
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_SAMPLE_SEEDS = (1, 2)
ACCURACY_DROPS = (0.005, 0.01)  # the gated points and gate targets: within 0.5 and 1 point of the full model


@dataclass
class SeedRun:
    """One seed's main job: its inputs, student, evaluation and test embeddings (all from the cache)."""

    seed: int
    config: EndToEndConfig
    inputs: MainJobInputs
    student_dir: Path
    results: dict  # `run_evaluation.evaluate`
    embeddings: dict  # `run_evaluation.embed_test_split`
    timing: dict  # this run's time on the seed, the student's distillation, the main job's first run


def resource_snapshot() -> dict:
    """Wall clock, CPU seconds of this process and its children, and the load average, to time a step."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {"wall": time.time(), "cpu": sum(u.ru_utime + u.ru_stime for u in usage), "load": os.getloadavg()}


def elapsed(start: dict) -> dict:
    """Wall and CPU minutes since `start` (a `resource_snapshot`), with the load average at both ends."""
    end = resource_snapshot()
    return {
        "wall_minutes": round((end["wall"] - start["wall"]) / 60, 2),
        "cpu_minutes": round((end["cpu"] - start["cpu"]) / 60, 2),
        "load_average_1_5_15": [list(np.round(start["load"], 2)), list(np.round(end["load"], 2))],
    }


def timed_student(config: EndToEndConfig, settings: dict, inputs: MainJobInputs) -> tuple[Path, dict | None]:
    """`main_job_student`, and the wall / CPU time and load of the run that distilled it: recorded beside the
    cache folder by the run that builds it, so that a rerun that reuses the student still reports what it cost
    (None for a student built by another command, e.g. the main job)."""
    fields = student_distillation_fields(
        settings, inputs.data_root, inputs.teacher_dir, config.levels, config.seed, config.num_workers, config.progress
    )
    output_dir = student_output_dir(config.cache_dir, fields)
    record = Path(config.cache_dir) / f"timing-{output_dir.name}.json"
    built_here = not (output_dir / "summary.json").is_file()
    start = resource_snapshot()
    student_dir = distil_or_reuse_student(config.cache_dir, fields)
    if built_here and not record.is_file():
        record.write_text(json.dumps({**elapsed(start), "date": utc_now(), "machine": machine_description()}) + "\n")
    return student_dir, json.loads(record.read_text()) if record.is_file() else None


def seed_run(config: EndToEndConfig, seed: int) -> SeedRun:
    """The main job of `seed` (benchmark, teacher, student, test embeddings): reused from the cache or built."""
    start = resource_snapshot()
    seed_config = dataclasses.replace(config, seed=seed)
    settings = seed_config.settings()
    inputs = main_job_inputs(seed_config, settings)
    student_dir, distillation = timed_student(seed_config, settings, inputs)
    results, _ = evaluate_main_job_student(seed_config, inputs, student_dir)
    embeddings = _test_embeddings(seed_config, inputs, student_dir)
    teacher_info = read_training_info(inputs.teacher_dir) or {}
    timing = {
        "this_run": elapsed(start),
        "student_distillation": distillation,
        "teacher_training_minutes": teacher_info["train_seconds"] / 60 if "train_seconds" in teacher_info else None,
        "main_job_first_run": _main_job_first_run(seed_config, settings, student_dir),
    }
    return SeedRun(seed, seed_config, inputs, student_dir, results, embeddings, timing)


def _main_job_first_run(config: EndToEndConfig, settings: dict, student_dir: Path) -> dict | None:
    """The wall time `end_to_end` recorded for its first run of this seed (None if it never ran it)."""
    key = {
        "settings": settings,
        "seed": config.seed,
        "levels": config.levels,
        "generator_version": GENERATOR_VERSION,
        "student": student_dir.parent.name,
    }
    path = Path(config.cache_dir) / f"first-run-{settings_hash(key)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _test_embeddings(config: EndToEndConfig, inputs: MainJobInputs, student_dir: Path) -> dict:
    cache = embeddings_cache_path(config.cache_dir, inputs.teacher_dir, student_dir)
    return embed_test_split(
        inputs.data_root, inputs.rows, inputs.teacher_dir, student_dir, cache, config.eval_batch_size, config.progress
    )


@dataclass
class SampleRun:
    """The first seed's teacher and student on the test split of the benchmark generated with another seed."""

    student_seed: int
    data_seed: int
    rows: list
    results: dict  # `run_evaluation.evaluate`
    embeddings: dict  # `run_evaluation.embed_test_split`
    timing: dict


def sample_run(run: SeedRun, data_seed: int) -> SampleRun:
    """Generate (or reuse) the benchmark of `data_seed` and read its test split with `run`'s teacher and student
    (no teacher is trained: a new benchmark sample, the same model). The embeddings are cached under a key that
    holds the data folder too (the main job's key holds only the teacher's and the student's)."""
    start = resource_snapshot()
    config = run.config
    data_root = build_benchmark(config.cache_dir, config.settings(), data_seed, config.num_workers, config.progress)
    rows = load_benchmark_split(data_root, "test")
    key = settings_hash([str(run.inputs.teacher_dir), str(run.student_dir), str(data_root)])
    cache = Path(config.cache_dir) / f"test-embeddings-{key}.safetensors"
    record = Path(config.cache_dir) / f"timing-sample-{key}.json"
    built_here = not cache.is_file()
    embeddings = embed_test_split(
        data_root, rows, run.inputs.teacher_dir, run.student_dir, cache, config.eval_batch_size, config.progress
    )
    if built_here and not record.is_file():  # what generating the benchmark and embedding its test split cost
        record.write_text(json.dumps({**elapsed(start), "date": utc_now(), "machine": machine_description()}) + "\n")
    student_config = AutoConfig.from_pretrained(run.student_dir, trust_remote_code=True)
    results = evaluate(
        embeddings, rows, student_config, run.inputs.teacher_config, list(config.thresholds), config.gflops_target
    )
    timing = {"this_run": elapsed(start), "first_run": json.loads(record.read_text()) if record.is_file() else None}
    return SampleRun(run.seed, data_seed, rows, results, embeddings, {**timing, "data": str(data_root)})


def variant_student(run: SeedRun, overrides: dict) -> tuple[Path, dict]:
    """A student of `run`'s data, teacher, seed and steps with `overrides` merged into the distillation settings;
    returns its folder and its timing record."""
    settings = run.config.settings()
    settings["distillation"].update(overrides)
    log(f"seed {run.seed}, variant {overrides}")
    return timed_student(run.config, settings, run.inputs)


# ----------------------------------------------------------------------------------------------------------------
# 1. Causality
# ----------------------------------------------------------------------------------------------------------------


def full_resolution_accuracy(embeddings: dict, rows) -> dict[str, float]:
    """Per-axis zero-shot accuracy of the student's last stage (its answer after every band)."""
    return {
        name: float(
            (
                zero_shot_predictions(embeddings["student"][:, -1], embeddings[f"text.{name}"])
                == torch.from_numpy(label_ids(rows, name))
            )
            .double()
            .mean()
        )
        for name in AXES
    }


def causality(runs: list[SeedRun]) -> dict:
    """Block-causal (the main job's student) against bidirectional, per axis at full resolution, per seed."""
    per_seed = {}
    for run in runs:
        student_dir, timing = variant_student(run, VARIANTS["bidirectional"])
        embeddings = _test_embeddings(run.config, run.inputs, student_dir)
        per_seed[run.seed] = {
            "block_causal": {name: run.results["per_axis"][name]["stages"][-1] for name in AXES},
            "bidirectional": full_resolution_accuracy(embeddings, run.inputs.rows),
            "teacher": {name: run.results["per_axis"][name]["teacher"] for name in AXES},
            "student_dir": str(student_dir),
            "distillation_timing": timing,
        }
    means = {
        kind: [float(np.mean(list(entry[kind].values()))) for entry in per_seed.values()]
        for kind in ("block_causal", "bidirectional", "teacher")
    }
    bidirectional_config = AutoConfig.from_pretrained(per_seed[runs[0].seed]["student_dir"], trust_remote_code=True)
    return {
        "seeds": [run.seed for run in runs],
        "block_causal_mean_accuracy": float(np.mean(means["block_causal"])),
        "bidirectional_mean_accuracy": float(np.mean(means["bidirectional"])),
        "block_causal_mean_accuracy_per_seed": means["block_causal"],
        "bidirectional_mean_accuracy_per_seed": means["bidirectional"],
        "difference_points_per_seed": [100 * (b - c) for b, c in zip(means["bidirectional"], means["block_causal"])],
        "per_axis_mean": {
            kind: {name: float(np.mean([entry[kind][name] for entry in per_seed.values()])) for name in AXES}
            for kind in ("block_causal", "bidirectional", "teacher")
        },
        # Per image: the block-causal student's full answer through the cache, the bidirectional one's forward.
        "gflops": {
            "block_causal": runs[0].results["student_cumulative_gflops"][-1],
            "bidirectional": answer_flops(bidirectional_config)[-1] / 1e9,
        },
        "per_seed": per_seed,
    }


# ----------------------------------------------------------------------------------------------------------------
# 2. Band order
# ----------------------------------------------------------------------------------------------------------------


def cheapest_within(sweep_mean: list[dict], drop: float) -> dict | None:
    """The cheapest point of a mean gate sweep within `drop` (a fraction) of its full model's accuracy."""
    points = [OperatingPoint(**point) for point in sweep_mean]
    chosen = choose_threshold(points, points[-1].accuracy, max_accuracy_drop=drop)
    return dataclasses.asdict(chosen) if chosen else None


def gated_points(results: dict) -> dict:
    """The cheapest gated points within each of `ACCURACY_DROPS`, with GFLOPs as a fraction of the full model's."""
    full = results["student_cumulative_gflops"][-1]
    points = {}
    for drop in ACCURACY_DROPS:
        point = cheapest_within(results["sweep_mean"], drop)
        points[f"within_{drop:g}"] = point and {**point, "gflops_ratio": point["mean_gflops"] / full}
    return points


def band_order(runs: list[SeedRun]) -> dict:
    """Coarse-to-fine (the main job's student) against fine-to-coarse: per-stage accuracy and the gate sweep."""
    per_seed = {}
    for run in runs:
        student_dir, timing = variant_student(run, VARIANTS["fine_to_coarse"])
        results, _ = evaluate_main_job_student(run.config, run.inputs, student_dir)
        per_seed[run.seed] = {
            order: _order_entry(result)
            for order, result in (("coarse_to_fine", run.results), ("fine_to_coarse", results))
        }
        per_seed[run.seed]["student_dir"] = str(student_dir)
        per_seed[run.seed]["distillation_timing"] = timing
    stage_means = {
        order: np.mean([entry[order]["stage_mean_accuracy"] for entry in per_seed.values()], axis=0)
        for order in ("coarse_to_fine", "fine_to_coarse")
    }
    return {
        "seeds": [run.seed for run in runs],
        "coarse_to_fine_stage_mean_accuracy": [float(a) for a in stage_means["coarse_to_fine"]],
        "fine_to_coarse_stage_mean_accuracy": [float(a) for a in stage_means["fine_to_coarse"]],
        "per_seed": per_seed,
    }


def _order_entry(results: dict) -> dict:
    """What the band-order comparison keeps of one student's evaluation."""
    return {
        "stage_mean_accuracy": results["summary"]["student_stage_mean"],
        "stage_accuracy_per_axis": {name: row["stages"] for name, row in results["per_axis"].items()},
        "cumulative_gflops": results["student_cumulative_gflops"],
        "sweep_mean": results["sweep_mean"],
        "oracle_exit_gflops": results["summary"]["oracle_exit_gflops"],
        "gated": gated_points(results),
    }


# ----------------------------------------------------------------------------------------------------------------
# 3. Gate stability
# ----------------------------------------------------------------------------------------------------------------


def stability_settings(runs: list[SeedRun], samples: list[SampleRun], max_subsets: int) -> dict:
    """(student seed, data seed, axis, label-set size) -> pooled (probabilities, labels): each seed's main student
    on its own test split, and the first seed's student on the other benchmark samples."""
    sources = [(run.seed, run.seed, run.inputs.rows, run.embeddings) for run in runs]
    sources += [(sample.student_seed, sample.data_seed, sample.rows, sample.embeddings) for sample in samples]
    settings = {}
    for student_seed, data_seed, rows, embeddings in sources:
        for name in AXES:
            labels = torch.from_numpy(label_ids(rows, name))
            by_size = axis_settings(
                embeddings["student"],
                embeddings[f"text.{name}"],
                float(embeddings["logit_scale"]),
                labels,
                max_subsets,
                seed=data_seed,
            )
            settings.update({(student_seed, data_seed, name, size): setting for size, setting in by_size.items()})
    return settings


TRANSFER_KINDS = ("across_label_set_sizes", "across_benchmark_samples", "across_retrained_models", "on_itself")


def transfer_pairs(settings: dict) -> dict[str, list[tuple]]:
    """Which transfers each question asks about (source setting, target setting); keys are (student seed, data
    seed, axis, label-set size)."""
    keys = sorted(settings)
    full = {key[:3]: max(k[3] for k in keys if k[:3] == key[:3]) for key in keys}
    whole = [key for key in keys if key[3] == full[key[:3]]]
    return {
        # Same student, data and axis; another number of labels.
        "across_label_set_sizes": [(a, b) for a in keys for b in keys if a[:3] == b[:3] and a[3] != b[3]],
        # Same student and axis with all its labels; the test split of another benchmark seed.
        "across_benchmark_samples": [
            (a, b) for a in whole for b in whole if a[0] == b[0] and a[2] == b[2] and a[1] != b[1]
        ],
        # Same axis with all its labels; another seed's teacher and student, each on its own benchmark.
        "across_retrained_models": [
            (a, b) for a in whole for b in whole if a[0] == a[1] and b[0] == b[1] and a[0] != b[0] and a[2] == b[2]
        ],
        # From the whole label set to each smaller one (the figure).
        "from_all_labels": [(a, b) for a in whole for b in keys if a[:3] == b[:3]],
        # Each setting calibrated on itself (for the label-free calibration's own guarantee and cost).
        "on_itself": [(a, a) for a in keys],
    }


def gate_stability(runs: list[SeedRun], samples: list[SampleRun], max_subsets: int) -> dict:
    """For each gate, calibration and accuracy target: how far a threshold chosen on one setting misses the target
    on another (summaries per kind of transfer that has pairs; the shortfall by label-set size from the whole
    label set)."""
    settings = stability_settings(runs, samples, max_subsets)
    gflops = runs[0].results["student_cumulative_gflops"]
    pairs = {kind: kind_pairs for kind, kind_pairs in transfer_pairs(settings).items() if kind_pairs}
    report = {}
    for gate in GATE_SCORES:
        for calibration in CALIBRATIONS:
            for drop in ACCURACY_DROPS:
                rows = {
                    kind: transfers(settings, kind_pairs, gflops, gate, calibration, drop)
                    for kind, kind_pairs in pairs.items()
                }
                entry = {
                    kind: summarise_transfers(kind_rows)
                    for kind, kind_rows in rows.items()
                    if kind != "from_all_labels"
                }
                entry["from_all_labels_by_size"] = _shortfall_by_size(rows["from_all_labels"])
                report[f"{gate}/{calibration}/{drop:g}"] = entry
    return {
        "gates": list(GATE_SCORES),
        "calibrations": list(CALIBRATIONS),
        "accuracy_drops": list(ACCURACY_DROPS),
        "max_subsets_per_size": max_subsets,
        "seeds": [run.seed for run in runs],
        "sample_seeds": [sample.data_seed for sample in samples],
        "transfer_kinds": sorted(pairs),
        "transfer_counts": {kind: len(kind_pairs) for kind, kind_pairs in pairs.items()},
        "settings": len(settings),
        "results": report,
    }


def _shortfall_by_size(rows: list[dict]) -> dict[int, float]:
    """Mean shortfall (points, negative = margin to spare) per target label-set size, over seeds and axes."""
    sizes = sorted({row["target"][3] for row in rows})
    return {
        size: float(np.mean([row["shortfall_points"] for row in rows if row["target"][3] == size])) for size in sizes
    }


# ----------------------------------------------------------------------------------------------------------------
# 4. Spread over seeds
# ----------------------------------------------------------------------------------------------------------------


def _seed_figures(results: dict) -> dict:
    """The main job's headline figures of one evaluation (`run_evaluation.evaluate`; accuracies as fractions,
    GFLOPs as fractions of the full student's)."""
    summary, gated = results["summary"], gated_points(results)
    figures = {"teacher_mean_accuracy": summary["teacher_mean"]}
    for stage, accuracy in enumerate(summary["student_stage_mean"]):
        figures[f"student_stage{stage}_mean_accuracy"] = accuracy
    for name, row in results["per_axis"].items():
        figures[f"{name}_teacher"] = row["teacher"]
        figures.update({f"{name}_stage{stage}": accuracy for stage, accuracy in enumerate(row["stages"])})
    for key, point in gated.items():
        figures[f"gflops_ratio_{key}"] = point["gflops_ratio"] if point else None
    figures["oracle_gflops_ratio"] = summary["oracle_exit_gflops"] / summary["full_gflops"]
    return figures


def _spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min and max of one figure over seeds."""
    return {
        "values": values,
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def _sample_spread(runs: list[SeedRun], samples: list[SampleRun]) -> dict | None:
    """The first seed's teacher and student on every benchmark sample's test split (its own first): how much the
    figures move with the test images alone."""
    if not samples:
        return None
    per_sample = {runs[0].seed: _seed_figures(runs[0].results)}
    per_sample.update({sample.data_seed: _seed_figures(sample.results) for sample in samples})
    names = list(per_sample[runs[0].seed])
    return {
        "student_seed": runs[0].seed,
        "data_seeds": list(per_sample),
        "spread": {
            name: _spread([figures[name] for figures in per_sample.values() if figures[name] is not None])
            for name in names
        },
        "per_sample": per_sample,
        "timing": {sample.data_seed: sample.timing for sample in samples},
    }


def seed_spread(runs: list[SeedRun], samples: list[SampleRun] = ()) -> dict:
    """The main job's headline figures for every seed, with their spread over seeds; and the first seed's models
    on the other benchmark samples (`_sample_spread`)."""
    per_seed = {run.seed: _seed_figures(run.results) for run in runs}
    last = len(runs[0].results["summary"]["student_stage_mean"]) - 1
    names = list(per_seed[runs[0].seed])
    return {
        "benchmark_samples": _sample_spread(runs, list(samples)),
        "seeds": [run.seed for run in runs],
        "last_stage": last,
        "teacher_mean_accuracy": [figures["teacher_mean_accuracy"] for figures in per_seed.values()],
        "student_full_mean_accuracy": [figures[f"student_stage{last}_mean_accuracy"] for figures in per_seed.values()],
        "spread": {
            name: _spread([figures[name] for figures in per_seed.values() if figures[name] is not None])
            for name in names
        },
        "per_seed": per_seed,
        "folders": {
            run.seed: {
                "data": str(run.inputs.data_root),
                "teacher": str(run.inputs.teacher_dir),
                "student": str(run.student_dir),
            }
            for run in runs
        },
        "main_job_timing": {run.seed: run.timing for run in runs},
    }


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def run_method_ablations(
    config: EndToEndConfig,
    seeds=DEFAULT_SEEDS,
    variant_seeds=None,
    sample_seeds=DEFAULT_SAMPLE_SEEDS,
    max_subsets: int = 10,
) -> dict:
    """Build (or reuse) every seed's main job and the ablation students, answer the four questions and write
    docs/ablations.{json,md} and the figures into `config.docs_dir`.

    Args:
        config: the main job's configuration (size, cache and docs folders, ...); its seed is replaced by each of
            `seeds`.
        seeds: benchmark seeds of the main job (the spread and the gate's transfers across seeds).
        variant_seeds: seeds for which the bidirectional and fine-to-coarse students are distilled (default: all).
        sample_seeds: benchmark seeds whose test split the first seed's teacher and student read (only the
            benchmark is generated; the gate's transfers across benchmark samples).
        max_subsets: label subsets per label-set size in the gate-stability analysis.

    Returns:
        the report written to docs/ablations.json.
    """
    from .ablations_report import write_ablation_reports

    start = resource_snapshot()
    runs = [seed_run(config, seed) for seed in seeds]
    variant_runs = [run for run in runs if run.seed in (seeds if variant_seeds is None else variant_seeds)]
    report = {}

    def section(name, compute):
        section_start = resource_snapshot()
        report[name] = compute()
        report[name]["timing_this_run"] = elapsed(section_start)
        log(f"{name}: done in {report[name]['timing_this_run']['wall_minutes']} min")

    # In order of priority: the ablation students first, then the benchmark samples. Without variant seeds the
    # two sections hold only the main student's side and say how to measure the other (`not_run`).
    if variant_runs:
        section("causality", lambda: causality(variant_runs))
        section("ordering", lambda: band_order(variant_runs))
    else:
        report["causality"], report["ordering"] = not_run(runs[0], config, seeds, sample_seeds)
    samples = [sample_run(runs[0], seed) for seed in sample_seeds if seed != runs[0].seed]
    section("gate_stability", lambda: gate_stability(runs, samples, max_subsets))
    section("seed_spread", lambda: seed_spread(runs, samples))
    total = elapsed(start)
    key = {
        "settings": config.settings(),
        "seeds": list(seeds),
        "variant_seeds": [run.seed for run in variant_runs],
        "sample_seeds": [sample.data_seed for sample in samples],
        "max_subsets": max_subsets,
        "generator_version": GENERATOR_VERSION,
        "students": sorted(str(run.student_dir) for run in runs),
    }
    report["context"] = {
        "command": recorded_command("python scripts/method_ablations.py"),
        "date": utc_now(),
        "machine": machine_description(),
        "this_run": total,
        "first_run": first_run_record(
            config.cache_dir, {"method_ablations": key}, total["wall_minutes"], built_every_step=True
        ),
        "settings": config.settings(),
    }
    # docs/ names no folder of this machine; the returned report keeps the real paths, for code that reads them.
    write_ablation_reports(Path(config.docs_dir), portable_paths(report, {"<cache>": config.cache_dir}))
    return report


def not_run(run: SeedRun, config: EndToEndConfig, seeds, sample_seeds) -> tuple[dict, dict]:
    """The causality and ordering sections of a run without ablation students: the main student's side, None for
    the other, the command that measures both and what one student costs (the main student's recorded rate)."""
    summary = json.loads((run.student_dir.parent / "summary.json").read_text())
    rate = summary["train_metrics"].get("images_per_second")
    settings = config.settings()["distillation"]
    minutes = settings["max_steps"] * settings["batch_size"] / rate / 60 if rate else None
    command = " ".join(
        [
            "python scripts/method_ablations.py --cache-dir <the main job's cache> --seeds",
            *map(str, seeds),
            "--variant-seeds",
            str(run.seed),
            "--sample-seeds",
            *map(str, sample_seeds or DEFAULT_SAMPLE_SEEDS),
        ]
    )
    status = {
        "status": "not run",
        "command": command,
        "minutes_per_student_at_main_rate": minutes,
        "main_student_images_per_second": rate,
    }
    full = run.results["summary"]["student_stage_mean"]
    return (
        {"block_causal_mean_accuracy": full[-1], "bidirectional_mean_accuracy": None, **status},
        {"coarse_to_fine_stage_mean_accuracy": full, "fine_to_coarse_stage_mean_accuracy": None, **status},
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python scripts/method_ablations.py`: the main job's (`end_to_end.build_parser`, one flag
    per `EndToEndConfig` field) plus the ablation's own."""
    parser = end_to_end_parser()
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        help="benchmark seeds of the main job (default: %(default)s)",
    )
    parser.add_argument(
        "--variant-seeds",
        type=int,
        nargs="*",
        default=None,
        help="seeds with bidirectional and fine-to-coarse students (default: every seed; none: "
        "the causality and band-order sections are not measured)",
    )
    parser.add_argument(
        "--sample-seeds",
        type=int,
        nargs="*",
        default=list(DEFAULT_SAMPLE_SEEDS),
        help="benchmark seeds whose test split the first seed's student reads, with no new teacher "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-subsets",
        type=int,
        default=10,
        help="label subsets per label-set size in the gate-stability analysis (default: %(default)s)",
    )
    return parser


def main(argv=None) -> dict:
    config, args = build_parser().parse_args_into_dataclasses(argv)
    return run_method_ablations(config, args.seeds, args.variant_seeds, args.sample_seeds, args.max_subsets)


__all__ = [
    "ACCURACY_DROPS",
    "DEFAULT_SAMPLE_SEEDS",
    "DEFAULT_SEEDS",
    "VARIANTS",
    "SampleRun",
    "SeedRun",
    "band_order",
    "build_parser",
    "causality",
    "gate_stability",
    "main",
    "run_method_ablations",
    "sample_run",
    "seed_spread",
    "stability_settings",
    "transfer_pairs",
]


if __name__ == "__main__":
    main()
