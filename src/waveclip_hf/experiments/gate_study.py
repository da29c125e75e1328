"""docs/gate.{md,json}: does the gate keep its promise, and which exit signal spends least for it?

    python -m waveclip_hf.experiments.gate_study            # after `bash scripts/run_main.sh` (its cache)

For a run of the main job (and, when their caches exist, the adaptive 448-px run and the retrained seeds), from the
cached embeddings and without running a model again:

1. the learned exit head is fitted on 2,000 training images (`training.exit_head`, label sets drawn at random
   from each axis's classes) and stored in the student folder's config, so the checkpoint ships it;
2. every exit signal (`exit_signals.EXIT_SIGNALS`) is calibrated per axis with the guarantee (disagreement with
   the full model <= δ at confidence 1 - ε) on the 1,000 unlabelled validation images, then applied to the test
   images: GFLOPs against the full model and accuracy lost on each axis;
3. the guarantee is checked: over 500 random calibration / test splits of the validation and test images pooled
   (per axis, and for label sets of other sizes drawn from the axes' classes), how often the test disagreement
   exceeds δ, for δ in {0.5%, 1%, 2%}, ε = 0.05, calibration sizes 200 and 1,000.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..data.synthetic import AXES, label_ids, load_benchmark_split
from ..evaluation.gate_guarantee import cheapest_possible, gated_result, guarantee_check
from ..evaluation.gate_stability import label_subsets
from ..models.waveclip.exit_signals import EXIT_SIGNALS, exit_scores
from ..models.waveclip.flops import answer_gflops
from ..models.waveclip.gating import gate_operating_points
from ..models.waveclip.scoring import zero_shot_logits
from ..training.exit_head import exit_head_examples, fit_exit_head
from .cached_steps import log
from .run_evaluation import embed_split, embeddings_cache_path, split_embeddings_cache_path


MAX_DISAGREEMENT, CONFIDENCE = 0.005, 0.95  # the promise the signals are compared at: at most 0.5 points lost
HEAD_TRAIN_IMAGES = 2_000
# What the gate should reach, label-free, calibrated on 1,000 unlabelled validation images: (GFLOPs ratio at most,
# worst axis drop in points at most) per run, and the retrained seeds' mean and highest GFLOPs ratio.
TARGETS = {"main": (0.62, 0.5), "adaptive": (0.50, 1.0), "seeds": (0.64, 0.68)}
GUARANTEE = dict(max_disagreements=(0.005, 0.01, 0.02), confidence=0.95, calibration_sizes=(200, 1000), splits=500)


def run_embeddings(cache_dir: Path, data_root: Path, teacher_dir: Path, student_dir: Path, batch: int, progress):
    """The run's cached embeddings: test (the main job's), validation and the first training images."""
    from safetensors.torch import load_file

    test = load_file(embeddings_cache_path(cache_dir, teacher_dir, student_dir))
    splits = {}
    for split, limit in (("validation", None), ("train", HEAD_TRAIN_IMAGES)):
        cache = split_embeddings_cache_path(cache_dir, student_dir, split, limit)
        splits[split] = embed_split(data_root, student_dir, cache, batch, progress, split, limit)
    return test, splits


def fit_and_store_head(student_dir: Path, train_embeds: torch.Tensor, texts: dict, logit_scale: float) -> dict:
    """Fit the exit head on training images with label sets of every axis, and write it into the student's config
    (the folder then ships it)."""
    from transformers import AutoConfig

    from ..models.waveclip.folder_io import written_atomically

    features, targets = exit_head_examples(train_embeds, list(texts.values()), logit_scale, num_label_sets=400)
    head = fit_exit_head(features, targets)
    config = AutoConfig.from_pretrained(student_dir, trust_remote_code=True)
    config.exit_head = head
    with written_atomically(student_dir, merge=True) as tmp:
        config.to_json_file(Path(tmp) / "config.json", use_diff=True)
    return head


def split_view(embeds: torch.Tensor, text: torch.Tensor, logit_scale: float) -> dict:
    """What the gate reads of a set of images for one label set: probabilities, embeddings and label embeddings."""
    return {"probs": zero_shot_logits(embeds, text, logit_scale).float().softmax(-1), "embeds": embeds, "text": text}


def compare_signals(test, validation, texts: dict, labels: dict, gflops, head, logit_scale: float) -> dict:
    """Every signal calibrated per axis with the guarantee on the validation images, applied to the test images."""
    report = {}
    for signal in EXIT_SIGNALS:
        per_axis = {}
        for name, text in texts.items():
            per_axis[name] = gated_result(
                split_view(validation, text, logit_scale),
                split_view(test["student"], text, logit_scale),
                gflops,
                signal,
                head,
                labels[name],
                max_disagreement=MAX_DISAGREEMENT,
                confidence=CONFIDENCE,
            )
        report[signal] = {
            "gflops_ratio": float(np.mean([row["gflops_ratio"] for row in per_axis.values()])),
            "max_axis_drop_points": float(max(row["drop_points"] for row in per_axis.values())),
            "per_axis": per_axis,
        }
    report["oracle"] = oracle_bounds(test["student"], texts, labels, gflops, logit_scale)
    return report


def oracle_bounds(test_embeds, texts: dict, labels: dict, gflops, logit_scale: float) -> dict:
    """The oracle gate (each image at the first stage whose answer is already the full model's) per axis, and the
    same bound with every axis whose stage 0 is at chance (within 3 points) sent to the last stage: there stage 0's
    agreements with the full model are lucky guesses, which no signal computed from the model can tell apart."""
    per_axis = {}
    for name, text in texts.items():
        probs = split_view(test_embeds, text, logit_scale)["probs"]
        chance = 1 / probs.shape[-1]
        stage0_accuracy = float((probs[:, 0].argmax(-1) == labels[name]).float().mean())
        per_axis[name] = {
            "gflops_ratio": cheapest_possible(probs, gflops),
            "stage0_accuracy": stage0_accuracy,
            "chance": chance,
            "stage0_at_chance": stage0_accuracy <= chance + 0.03,
        }
    return {
        "gflops_ratio": float(np.mean([row["gflops_ratio"] for row in per_axis.values()])),
        "gflops_ratio_without_chance_hits": float(
            np.mean([1.0 if row["stage0_at_chance"] else row["gflops_ratio"] for row in per_axis.values()])
        ),
        "per_axis": per_axis,
    }


def test_curves(test_embeds, texts: dict, labels: dict, gflops, head, logit_scale: float, points: int = 200) -> dict:
    """Per axis and signal, every operating point on the test images (at most `points` of them, evenly spaced):
    GFLOPs against the full model's, accuracy, and disagreement with the full model."""
    curves = {}
    for name, text in texts.items():
        view = split_view(test_embeds, text, logit_scale)
        curves[name] = {}
        for signal in EXIT_SIGNALS:
            scores = exit_scores(signal, view["probs"], view["embeds"], text, head)
            accuracy = gate_operating_points(view["probs"], gflops, reference=labels[name], signal=scores)
            full = gate_operating_points(view["probs"], gflops, signal=scores)
            keep = torch.linspace(0, len(full.agreement) - 1, min(points, len(full.agreement))).round().long()
            curves[name][signal] = {
                "gflops_ratio": (full.mean_gflops[keep] / gflops[-1]).tolist(),
                "accuracy": accuracy.agreement[keep].tolist(),
                "disagreement": (1 - full.agreement[keep]).tolist(),
            }
    return curves


def check_guarantee(
    pool_embeds: torch.Tensor, texts: dict, gflops, signal: str, head, logit_scale: float, options=None
) -> dict:
    """`guarantee_check` on every axis and on label sets of other sizes drawn from each axis's classes (3 sets of
    each size from 2 to all but one); the violation rate is over all their splits together."""
    reports = []
    for name, text in texts.items():
        subsets = [tuple(range(len(text)))]
        for size in range(2, len(text)):
            subsets += label_subsets(len(text), size, max_subsets=3, seed=size)
        for index, subset in enumerate(subsets):
            view = split_view(pool_embeds, text[list(subset)], logit_scale)
            settings = {**GUARANTEE, **(options or {})}
            splits = settings["splits"] if len(subset) == len(text) else max(settings["splits"] // 5, 1)
            reports.append(
                guarantee_check(view, gflops, signal, head, **{**settings, "splits": splits, "seed": index})
            )
            log(f"guarantee: {name} labels {subset}")
    return _pool_reports(reports)


def _pool_reports(reports: list[dict]) -> dict:
    """Violation rates and means over the label sets' splits, weighted by their number of splits."""
    pooled = {}
    for size, per_delta in reports[0].items():
        pooled[size] = {}
        for delta in per_delta:
            rows = [report[size][delta] for report in reports]
            splits = sum(row["splits"] for row in rows)
            pooled[size][delta] = {
                key: sum(row[key] * row["splits"] for row in rows) / splits
                for key in ("violation_rate", "certified", "mean_test_disagreement", "mean_gflops_ratio")
            }
            pooled[size][delta].update(splits=splits, epsilon=rows[0]["epsilon"], label_sets=len(rows))
    return pooled


def study_run(cache_dir: Path, data_root: Path, teacher_dir: Path, student_dir: Path, axes=None, progress=True):
    """Head, signal comparison and guarantee check of one run (its main-job caches must exist)."""
    axes = axes or AXES
    test, splits = run_embeddings(cache_dir, data_root, teacher_dir, student_dir, 64, progress)
    logit_scale = float(test["logit_scale"])
    texts = {name: test[f"text.{name}"] for name in axes}
    rows = load_benchmark_split(data_root, "test")
    labels = {name: torch.from_numpy(label_ids(rows, name)) for name in axes}
    head = fit_and_store_head(student_dir, splits["train"], texts, logit_scale)
    from transformers import AutoConfig

    gflops = answer_gflops(AutoConfig.from_pretrained(student_dir, trust_remote_code=True))
    return {
        "signals": compare_signals(test, splits["validation"], texts, labels, gflops, head, logit_scale),
        "curves": test_curves(test["student"], texts, labels, gflops, head, logit_scale),
        "head": {k: head[k] for k in ("examples", "positive_share")},
        "gflops": gflops,
        "validation_images": len(splits["validation"]),
        "test_images": len(rows),
        # For the guarantee check (not written out): the pooled images and what scores them.
        "texts": texts,
        "pool": torch.cat([splits["validation"], test["student"]]),
        "logit_scale": logit_scale,
        "head_full": head,
    }


def best_signal(runs: dict) -> str:
    """The signal with the lowest mean GFLOPs ratio over the runs that keeps every axis within 0.5 points."""

    def cost(signal):
        rows = [run["signals"][signal] for run in runs.values()]
        ok = all(row["max_axis_drop_points"] <= 100 * MAX_DISAGREEMENT + 1e-9 for row in rows)
        return (not ok, float(np.mean([row["gflops_ratio"] for row in rows])))

    return min(EXIT_SIGNALS, key=cost)


def portable(value):
    """JSON-ready: tensors to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items() if k not in ("texts", "pool", "head_full")}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, report: dict) -> Path:
    path.write_text(json.dumps(portable(report), indent=1, allow_nan=False) + "\n")
    return path


__all__ = ["CONFIDENCE", "MAX_DISAGREEMENT", "best_signal", "check_guarantee", "compare_signals", "study_run"]


# ---------------------------------------------------------------------------------------------------------------
# The runs: the main job, the adaptive 448-px run, the retrained seeds
# ---------------------------------------------------------------------------------------------------------------


def main_job_run(config) -> dict:
    """`study_run` of the main job of `config.seed` (built first if its cache lacks it)."""
    from .end_to_end import evaluate_main_job_student, main_job_inputs, main_job_student

    settings = config.settings()
    inputs = main_job_inputs(config, settings)
    student_dir = main_job_student(config, settings, inputs)
    evaluate_main_job_student(config, inputs, student_dir)  # caches the test embeddings (reused when there)
    return study_run(Path(config.cache_dir), inputs.data_root, inputs.teacher_dir, student_dir, AXES, config.progress)


def adaptive_run(cache_dir: Path, main_cache_dir: Path, progress: bool) -> dict:
    """`study_run` of the adaptive 448-px run with 1,000 validation images (its preset keeps 200), built first if
    the cache lacks it; the teacher starts from the main job's, as the preset's does."""
    from ..data.synthetic import benchmark_axes, read_benchmark_info
    from .adaptive_resolution import build_adaptive_run, evaluate_adaptive_run, main_job_teacher, preset_settings

    settings = preset_settings("adaptive-448", {"num_validation": 1_000})
    settings["teacher"]["init_from"] = str(main_job_teacher(main_cache_dir, 0).resolve())
    data_root, teacher, student_dir = build_adaptive_run(cache_dir, settings, 0, 2, progress)
    axes = benchmark_axes(read_benchmark_info(data_root))
    evaluate_adaptive_run(cache_dir, data_root, teacher, student_dir, axes, progress)
    return study_run(cache_dir, data_root, teacher.output_dir, student_dir, axes, progress)


def guarantee_section(run: dict, signals, options=None) -> dict:
    """The guarantee check of `signals` on a run, in docs/gate.json's form: per signal, per δ, the worst
    violation rate over the calibration sizes, ε, the splits, and the figures of each size."""
    report = {}
    for signal in signals:
        checked = check_guarantee(
            run["pool"], run["texts"], run["gflops"], signal, run["head_full"], run["logit_scale"], options
        )
        report[signal] = {
            delta: {
                "violation_rate": max(checked[size][delta]["violation_rate"] for size in checked),
                "epsilon": checked[next(iter(checked))][delta]["epsilon"],
                "splits": sum(checked[size][delta]["splits"] for size in checked),
                "per_calibration_size": {size: checked[size][delta] for size in checked},
            }
            for delta in checked[next(iter(checked))]
        }
    return report


def summary(runs: dict) -> dict:
    """docs/gate.json's headline keys: per benchmark and signal the GFLOPs ratio and the worst axis's drop, the
    seeds' ratios of the default signal, and the default signal."""
    default = best_signal({name: run for name, run in runs.items() if name in ("main", "adaptive")})
    table = {
        name: {
            signal: {k: run["signals"][signal][k] for k in ("gflops_ratio", "max_axis_drop_points")}
            for signal in EXIT_SIGNALS
        }
        | {"oracle": run["signals"]["oracle"]}
        for name, run in runs.items()
        if name in ("main", "adaptive")
    }
    seeds = {
        name: {
            "gflops_ratio": run["signals"][default]["gflops_ratio"],
            "max_axis_drop_points": run["signals"][default]["max_axis_drop_points"],
        }
        for name, run in runs.items()
        if name.startswith("seed")
    }
    return {"default_signal": default, **table, "seeds": seeds}


def carried_seeds(previous_report: Path, default_signal: str) -> tuple[dict, dict]:
    """The retrained seeds' rows of an earlier docs/gate.json (seed 0 left out: it is the main job, measured again),
    and where they come from, for a run that does not retrain them.

    Raises:
        ValueError: the earlier report measured the seeds with another default signal (its rows would not be this
            report's), or has no seed besides 0.
    """
    previous = json.loads(Path(previous_report).read_text())
    if previous["summary"]["default_signal"] != default_signal:
        raise ValueError(
            f"{previous_report} measured its seeds with the {previous['summary']['default_signal']!r} signal, this "
            f"run's default is {default_signal!r}: retrain them (`--seeds 1 2`) instead of carrying them over."
        )
    rows = {name: row for name, row in previous["summary"]["seeds"].items() if name != "seed0"}
    if not rows:
        raise ValueError(f"{previous_report} holds no retrained seed besides seed 0: run `--seeds 1 2`.")
    source = {key: previous["context"][key] for key in ("command", "date", "machine")}
    # Its seed 0 against this run's main job (the report compares them): equal rows say the runs reproduce.
    return rows, {**source, "seeds": sorted(rows), "previous_seed0": previous["summary"]["seeds"].get("seed0")}


def run(
    cache_dir,
    docs_dir,
    adaptive_cache_dir=None,
    seeds=(1, 2),
    progress: bool = True,
    overrides=None,
    guarantee=None,
    seeds_from: Path | None = None,
) -> dict:
    """Every run's study, the guarantee check on the main job, docs/gate.{md,json} and the figures.

    Args:
        overrides: merged into the main job's settings (`EndToEndConfig.overrides`), for a quick check.
        guarantee: overrides of `GUARANTEE` (calibration sizes, splits, δs).
        seeds_from: an earlier docs/gate.json whose retrained seeds (each a whole main job) this report carries
            over instead of `seeds`, stating where they come from (`carried_seeds`).
    """
    import time

    from ..figures.gate import plot_gate_curves
    from .end_to_end import EndToEndConfig
    from .gate_report import write_gate_markdown
    from .report import machine_description, recorded_command, utc_now

    started = time.time()
    docs_dir = Path(docs_dir)
    common = dict(cache_dir=str(cache_dir), docs_dir=str(docs_dir), progress=progress, overrides=overrides)
    runs = {"main": main_job_run(EndToEndConfig(**common))}
    if adaptive_cache_dir is not None:
        runs["adaptive"] = adaptive_run(Path(adaptive_cache_dir).resolve(), Path(cache_dir).resolve(), progress)
    for seed in seeds:
        runs[f"seed{seed}"] = main_job_run(EndToEndConfig(**common, seed=seed))
    report_summary = summary({**runs, "seed0": runs["main"]})
    seeds_source = None
    if seeds_from is not None:
        rows, seeds_source = carried_seeds(Path(seeds_from), report_summary["default_signal"])
        report_summary["seeds"] = {**rows, **report_summary["seeds"]}
    signals = sorted({report_summary["default_signal"], "margin"}, key=EXIT_SIGNALS.index)
    report = {
        "settings": {"max_disagreement": MAX_DISAGREEMENT, "confidence": CONFIDENCE, **GUARANTEE, **(guarantee or {})},
        "guarantee": guarantee_section(runs["main"], signals, guarantee),
        "summary": report_summary,
        **({"seeds_source": seeds_source} if seeds_source else {}),
        **{k: v for k, v in report_summary.items() if k in ("default_signal", "main", "adaptive", "seeds")},
    }
    for name in ("main", "adaptive"):
        if name in runs:
            report[name] = {**report.get(name, {}), **runs[name], "pool_images": len(runs[name]["pool"])}
            chosen = {
                axis: {s: runs[name]["signals"][s]["per_axis"][axis] for s in EXIT_SIGNALS}
                for axis in runs[name]["curves"]
            }
            plot_gate_curves(
                runs[name]["curves"],
                chosen,
                docs_dir / "figures" / f"gate_curves_{name}.png",
                f"{name}: accuracy (solid) and disagreement (dashed) vs GFLOPs; dots: the guaranteed "
                f"calibration (δ = {100 * MAX_DISAGREEMENT:g}%, ε = {1 - CONFIDENCE:.2f})",
            )
    report["context"] = {
        "command": recorded_command("python -m waveclip_hf.experiments.gate_study"),
        "date": utc_now(),
        "machine": machine_description(),
        "wall_minutes": (time.time() - started) / 60,
    }
    write_json(docs_dir / "gate.json", report)
    write_gate_markdown(docs_dir / "gate.md", report)
    return report


def main(argv=None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=".cache/end_to_end", help="the main job's cache (default: %(default)s)")
    parser.add_argument("--docs-dir", default="docs", help="where gate.{md,json} and figures/ go")
    parser.add_argument(
        "--adaptive-cache-dir",
        default=".cache/adaptive_resolution",
        help="the adaptive run's cache; 'none' to leave the adaptive run out (default: %(default)s)",
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="retrained seeds besides 0")
    parser.add_argument(
        "--override",
        type=json.loads,
        default=None,
        help="JSON merged into the main job's settings, as the main job's own --override (e.g. the fp32 variant)",
    )
    parser.add_argument(
        "--seeds-from",
        type=Path,
        help="an earlier gate.json whose retrained seeds to carry over (with their date and command) instead of "
        "retraining them; use with --seeds (nothing)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    adaptive = None if args.adaptive_cache_dir == "none" else args.adaptive_cache_dir
    if args.seeds_from is not None and args.seeds:
        parser.error("--seeds-from carries the seeds over: pass `--seeds` with no seed to retrain none.")
    if args.seeds_from is not None:
        args.seeds_from = args.seeds_from.resolve()  # read before docs/gate.json is rewritten
    report = run(
        Path(args.cache_dir).resolve(),
        args.docs_dir,
        adaptive,
        args.seeds,
        not args.no_progress,
        args.override,
        seeds_from=args.seeds_from,
    )
    print(json.dumps(portable(report["summary"]), indent=1))
    return report


if __name__ == "__main__":
    main()
