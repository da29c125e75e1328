"""The main job's report: docs/results.json, docs/results.md and the two figures, from the results of
`run_evaluation.evaluate` and a context (command, date, machine, wall time, what was trained, the pipeline demo).

Every figure in results.md comes from the results dict; the page says which command, machine and date made it.
"""

import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from ..figures.accuracy_vs_gflops import plot_results
from .cached_steps import settings_hash
from .run_evaluation import COARSE_AXES, FINE_AXES


def utc_now() -> str:
    """The current UTC time as the reports print it, e.g. "2026-11-23 18:20 UTC"."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def recorded_command(program: str, argv: list[str] | None = None) -> str:
    """`program` followed by this process's arguments (`sys.argv[1:]` unless `argv`), as a report records it: an
    absolute path inside the current directory becomes relative, any other becomes ``<folder>``, so that no report
    names a folder of the machine that wrote it; arguments are shell-quoted so the line can be pasted back."""

    def portable_argument(argument: str) -> str:
        flag, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
        if os.path.isabs(value):
            relative = os.path.relpath(value)
            value = relative if not relative.startswith("..") else "<folder>"
        return shlex.quote(flag + equals + value)

    arguments = sys.argv[1:] if argv is None else argv
    return " ".join([program, *map(portable_argument, arguments)])


def machine_description() -> str:
    """CPU model, torch threads, GPU (or "no GPU") and torch version of this process, in one line."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{model}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}"


def first_run_record(cache_dir: Path, key: dict, minutes: float, built_every_step: bool) -> dict | None:
    """The wall time of the first run with these settings, kept in the cache so that a rerun that reuses every
    step still reports what the whole job costs. Written once, by a run that built every step itself
    (`built_every_step`); `None` when no such run was recorded (a cache filled by hand or by other runs)."""
    path = Path(cache_dir) / f"first-run-{settings_hash(key)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not built_every_step:
        return None
    record = {"minutes": round(minutes, 2), "date": utc_now(), "machine": machine_description()}
    path.write_text(json.dumps(record) + "\n")
    return record


def portable_paths(value, roots: dict[str, Path]):
    """`value` (a JSON-like tree) with every string that starts with one of the `roots` folders written relative to
    it as ``"<label>/rest"``, so that the reports in docs/ name no folder of the machine that wrote them.

    `roots` maps a label (e.g. ``"<cache>"``) to a folder; symlinks are resolved on both sides.
    """
    prefixes = []
    for label, folder in roots.items():
        for form in {str(Path(folder).expanduser()), str(Path(folder).expanduser().resolve())}:
            prefixes.append((form.rstrip("/"), label))
    prefixes.sort(key=lambda item: -len(item[0]))  # the most specific folder first

    def convert(item):
        if isinstance(item, dict):
            return {key: convert(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [convert(entry) for entry in item]
        if isinstance(item, (str, Path)):
            text = str(item)
            for prefix, label in prefixes:
                if text == prefix or text.startswith(prefix + "/"):
                    return label + text[len(prefix) :]
            return item if isinstance(item, str) else text
        return item

    return convert(value)


def write_reports(docs_dir: Path, report: dict, context: dict) -> Path:
    """Write the figures into `<docs>/figures/`, then `<docs>/results.json` (`report`) and `<docs>/results.md`.
    Returns the path of results.md."""
    docs = Path(docs_dir)
    plot_results(report, docs / "figures")
    (docs / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return write_results_markdown(docs / "results.md", report, context)


# ----------------------------------------------------------------------------------------------------------------
# results.md, section by section
# ----------------------------------------------------------------------------------------------------------------


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def _header(results: dict, context: dict) -> list[str]:
    first = context.get("first_run")
    first_run = (
        f"; the first run with these settings (nothing cached) took {first['minutes']:.1f} min on "
        f"{first['date']} ({first['machine']})."
        if first
        else "; no first run with these settings (nothing cached) is recorded in this cache."
    )
    return [
        "# Results on the generated offline benchmark",
        "",
        "Written by the README's main job (`bash scripts/run_main.sh`, i.e. "
        f"`{context['command']}`); do not edit by hand.",
        "",
        f"- Date: {context['date']}; machine: {context['machine']}; wall time of this run: "
        f"{context['wall_minutes']:.1f} min (steps reused from the cache take no time)" + first_run,
        f"- Data: {context['data']}.",
        f"- Teacher: {context['teacher']}.",
        f"- Student: {context['student']}.",
        f"- GFLOPs: image encoder only, per image; {results['flops_convention']}",
        "",
    ]


def _accuracy_table(results: dict) -> list[str]:
    per_axis, summary = results["per_axis"], results["summary"]
    stages = len(results["student_cumulative_gflops"])
    lines = [
        "## Zero-shot accuracy on the test split (%)",
        "",
        "| axis | scale | classes | chance | teacher | "
        + " | ".join(f"student stage {s}" for s in range(stages))
        + " |",
        "|---|---|---:|---:|---:|" + "---:|" * stages,
    ]
    for name, row in per_axis.items():
        lines.append(
            f"| {name} | {row['scale']} | {row['num_classes']} | {_pct(row['chance'])} | "
            f"{_pct(row['teacher'])} | " + " | ".join(_pct(a) for a in row["stages"]) + " |"
        )
    lines.append(
        "| **mean** | | | | "
        + f"**{_pct(summary['teacher_mean'])}** | "
        + " | ".join(f"**{_pct(a)}**" for a in summary["student_stage_mean"])
        + " |"
    )
    lines.append(
        "| GFLOPs | | | | "
        + f"{results['teacher_gflops']:.3f} | "
        + " | ".join(f"{g:.3f}" for g in results["student_cumulative_gflops"])
        + " |"
    )
    return lines


def _axis_readings(per_axis: dict) -> list[str]:
    """Per axis: what the detail band adds, read from stage 0 vs the full student."""
    lines = []
    for name, row in per_axis.items():
        gain = round(100 * (row["stages"][-1] - row["stages"][0]), 1) + 0.0  # + 0.0: no "-0.0"
        reading = (
            "the detail band carries it"
            if gain > 10
            else "the approximation band alone answers it"
            if abs(gain) < 1
            else "the detail band helps"
            if gain > 0
            else "the later stage answers it less well than stage 0"
        )
        lines.append(
            f"- {name} ({row['scale']} by construction): stage 0 {_pct(row['stages'][0])}% → full "
            f"{_pct(row['stages'][-1])}% ({gain:+.1f} points): {reading}."
        )
    return lines


def _gate_readings(results: dict) -> list[str]:
    """The best gated point within the GFLOPs budget, the cheapest within 1 point, and the oracle bound."""
    per_axis, summary = results["per_axis"], results["summary"]
    full_gflops = results["student_cumulative_gflops"][-1]
    full = summary["student_stage_mean"][-1]
    best, cheapest = summary["best_within_budget"], summary["cheapest_within_one_point"]
    lines = []
    if best:
        lines.append(
            f"- Best gated point at ≤ {summary['gflops_budget'] / full_gflops:.1f}× the full model's GFLOPs "
            f"({summary['gflops_budget']:.3f}): θ = {best['threshold']:g}, {_pct(best['accuracy'])}% "
            f"at {best['mean_gflops']:.3f} GFLOPs ({100 * (best['accuracy'] - full):+.1f} points vs the full "
            "model)."
        )
    if cheapest:
        lines.append(
            f"- Cheapest gated point within 1 point of the full model: θ = {cheapest['threshold']:g}, "
            f"{_pct(cheapest['accuracy'])}% at {cheapest['mean_gflops']:.3f} GFLOPs "
            f"({cheapest['mean_gflops'] / full_gflops:.2f}× the full model)."
        )
    if "oracle_exit_gflops" in summary:
        oracle = summary["oracle_exit_gflops"]
        lines.append(
            f"- Bound: a gate that knew when an earlier stage already gives the full model's answer would spend "
            f"{oracle:.3f} GFLOPs ({oracle / full_gflops:.2f}× the full model; per axis "
            + ", ".join(f"{n} {row['oracle_exit']['mean_gflops'] / full_gflops:.2f}×" for n, row in per_axis.items())
            + "). No margin gate can keep every full-model answer for less; an axis that stage 0 cannot see "
            "costs ~1× whatever the gate does."
        )
    return lines


def _cost_reading(results: dict) -> str:
    gflops, teacher_gflops = results["student_cumulative_gflops"], results["teacher_gflops"]
    teacher_patch = results["teacher_patch_size"]
    return (
        f"- GFLOPs: the teacher reads one token per {teacher_patch}-px cell; the student reads each cell as one "
        "approximation token (stage 0) plus three detail tokens (stage 1), the layout that at ViT-B/16 geometry "
        "gives 198 tokens against ViT-B/16's 197. So the full student costs "
        f"{gflops[-1] / teacher_gflops:.1f}x this patch-{teacher_patch} teacher, and stage 0 "
        f"{gflops[0] / teacher_gflops:.2f}x. The gate's saving is measured against the full student; the "
        "cost against a plain CLIP ViT of the same token count is in docs/benchmarks.md."
    )


def _findings(results: dict) -> list[str]:
    summary = results["summary"]
    return [
        "## What the numbers say",
        "",
        f"- Student (full) minus teacher, mean over axes: {summary['student_full_minus_teacher_points']:+.1f} points.",
        f"- Stage 0 alone: {_pct(summary['stage0_coarse_mean'])}% on the coarse axes "
        f"({', '.join(COARSE_AXES)}) vs {_pct(summary['stage0_fine_mean'])}% on the fine axes "
        f"({', '.join(FINE_AXES)}).",
        *_axis_readings(results["per_axis"]),
        *_gate_readings(results),
        _cost_reading(results),
        "",
    ]


def _sweep_table(results: dict) -> list[str]:
    full_gflops = results["student_cumulative_gflops"][-1]
    stages = len(results["student_cumulative_gflops"])
    lines = [
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
        lines.append(
            f"| {p['threshold']:g} | {_pct(p['accuracy'])} | {p['mean_gflops']:.3f} | "
            f"{p['mean_gflops'] / full_gflops:.2f} | " + " | ".join(f"{100 * s:.0f}" for s in p["stage_share"]) + " |"
        )
    return lines


def _label_free_table(results: dict) -> list[str]:
    """The label-free gate per axis against the best single threshold and the labelled oracle (`label_free`)."""
    if "label_free" not in results:
        return []
    label_free = results["label_free"]
    summary, per_axis = label_free["summary"], label_free["per_axis"]
    single, oracle = summary["best_single_threshold"], summary["labelled_oracle"]
    drop = summary["comparison_max_drop_points"]

    def cost(figures: dict) -> str:
        return f"{figures['drop_points']:+.1f} / {figures['gflops_ratio']:.2f}×"

    lines = [
        "",
        "## The gate without labels: one threshold per label set",
        "",
        f"Each axis (label set and template) gets its own threshold, chosen without labels on the "
        f"{summary['calibration_images']} {summary['calibration_split']} images (none of them a test image): the "
        f"cheapest whose answers agree with the full student's on at least {100 * summary['target_agreement']:g}% "
        "of them (`classifier.calibrate(images, candidate_labels=..., target_agreement=0.99)`, then "
        '`margin_threshold="auto"`). Measured on the test split against two choices made with the test labels: '
        f"the best single threshold for all axes (the cheapest within {drop:g} points of the full student's mean "
        f"accuracy) and the labelled oracle (per axis, the cheapest within {drop:g} points of that axis's full "
        "accuracy). Cells: accuracy drop vs the full student (points) / GFLOPs as a fraction of the full student's.",
        "",
        "| axis | label-free θ | agreement with the full student: validation / test (%) | label-free | "
        f"best single θ = {_threshold(single['threshold'])} | labelled oracle (θ) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in per_axis.items():
        lines.append(
            f"| {name} | {_threshold(row['threshold'])} | {_pct(row['calibration_agreement'])} / "
            f"{_pct(row['test_agreement'])} | {cost(row)} | {cost(row['single_threshold'])} | "
            f"{cost(row['labelled_oracle'])} ({_threshold(row['labelled_oracle']['threshold'])}) |"
        )
    lines.append(
        f"| **mean** | | | **{summary['mean_drop_points']:+.1f} / {summary['mean_gflops_ratio']:.2f}×** | "
        f"{single['mean_drop_points']:+.1f} / {single['mean_gflops_ratio']:.2f}× | "
        f"{oracle['mean_drop_points']:+.1f} / {oracle['mean_gflops_ratio']:.2f}× |"
    )
    lines += [
        "",
        f"- Label-free, per label set: {summary['mean_gflops_ratio']:.2f}× the full student's GFLOPs, largest axis "
        f"drop {summary['max_axis_drop_points']:.1f} points. Best single threshold: "
        f"{single['mean_gflops_ratio']:.2f}×, largest axis drop {single['max_axis_drop_points']:.1f} points. Labelled "
        f"oracle: {oracle['mean_gflops_ratio']:.2f}×, largest axis drop {oracle['max_axis_drop_points']:.1f} points.",
    ]
    return lines


def _threshold(threshold) -> str:
    """A threshold as the tables print it: `None` (no early exit) as "none"."""
    return "none" if threshold is None else f"{threshold:.3g}"


def _flip_rates(results: dict) -> list[str]:
    """How often each earlier stage's top-1 differs from the full student's (`stage_flip_rate`)."""
    per_axis = results["per_axis"]
    if not all("stage_flip_rate" in row for row in per_axis.values()):
        return []
    stages = len(results["student_cumulative_gflops"]) - 1
    mean = results["summary"]["stage_flip_rate_mean"]
    lines = [
        "",
        "## How often an earlier stage's answer changes by the last",
        "",
        "Share of test images whose top-1 after the stage differs from the full student's (the flip rate); an "
        "image that the gate answers at that stage keeps the earlier answer.",
        "",
        "| axis | " + " | ".join(f"stage {s} (%)" for s in range(stages)) + " |",
        "|---|" + "---:|" * stages,
    ]
    for name, row in per_axis.items():
        lines.append(f"| {name} | " + " | ".join(_pct(rate) for rate in row["stage_flip_rate"][:stages]) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_pct(rate)}**" for rate in mean[:stages]) + " |")
    return lines


def _pipeline_demo(context: dict) -> list[str]:
    lines = [
        "",
        "## Pipeline on the saved folder",
        "",
        f'`pipeline("zero-shot-image-classification", model=<student>, trust_remote_code=True)` with '
        f"`margin_threshold={context['demo_threshold']:g}`, one call per axis:",
        "",
    ]
    return lines + _demo_answers(context["demo"]) + _label_free_demo(context)


def _label_free_demo(context: dict) -> list[str]:
    """The same images after `classifier.calibrate` per axis on the unlabelled validation images, with
    `margin_threshold="auto"`."""
    if "label_free_demo" not in context:
        return []
    label_free = context["label_free_demo"]
    thresholds = ", ".join(f"{axis} {_threshold(t)}" for axis, t in label_free["thresholds"].items())
    lines = [
        "",
        "The same images with one threshold per axis chosen without labels (`classifier.calibrate(<validation "
        f"images>, candidate_labels=..., hypothesis_template=..., target_agreement=0.99)`: {thresholds}), then "
        '`margin_threshold="auto"`:',
        "",
    ]
    return lines + _demo_answers(label_free["demo"])


def _demo_answers(demo: list[dict]) -> list[str]:
    """One line per demo image: every axis's answer, whether it is right, and the stage that gave it."""
    lines = []
    for item in demo:
        answers = "; ".join(
            f"{axis}: {a['predicted']} ({'✓' if a['predicted'] == a['true'] else '✗ ' + a['true']}, "
            f"stage {a['stage']})"
            for axis, a in item["answers"].items()
        )
        lines.append(f"- `{item['file_name']}` — {answers}")
    return lines


def write_results_markdown(path: Path, results: dict, context: dict) -> Path:
    """docs/results.md: provenance, the accuracy table, what the numbers say, the figures, the gate sweep, the
    label-free gate, the flip rates and the pipeline demo. `results` as from `evaluate`; `context` as built by
    `end_to_end.run`."""
    lines = [
        *_header(results, context),
        *_accuracy_table(results),
        "",
        *_findings(results),
        *_sweep_table(results),
        *_label_free_table(results),
        *_flip_rates(results),
        *_pipeline_demo(context),
        "",
    ]
    Path(path).write_text("\n".join(lines))
    return Path(path)


__all__ = [
    "first_run_record",
    "machine_description",
    "portable_paths",
    "utc_now",
    "write_reports",
    "write_results_markdown",
]
