"""docs/ablations.json, docs/ablations.md and their figures, from the report of `method_ablations`.

Each answer is one sentence written from the numbers (so a rerun that measures something else says something
else), followed by its table, its figure and its provenance (command, machine, date, wall and CPU time).
"""

import json
from pathlib import Path

import numpy as np

from ..data.synthetic import AXES
from ..figures.ablations import plot_ablations


GATE_NAMES = {
    "margin": "margin (p1 - p2 >= θ)",
    "margin_per_label": "margin per label (p1 - p2 >= θ·N, the paper's)",
    "top1": "top-1 probability (p1 >= θ)",
}
CALIBRATION_NAMES = {"labelled": "labelled", "label_free": "label-free"}


def write_ablation_reports(docs: Path, report: dict) -> Path:
    """Figures into `<docs>/figures/`, then `<docs>/ablations.json` and `<docs>/ablations.md`; returns the .md."""
    docs.mkdir(parents=True, exist_ok=True)
    report["figures"] = {
        name: str(path.relative_to(docs)) for name, path in plot_ablations(report, docs / "figures").items()
    }
    (docs / "ablations.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    path = docs / "ablations.md"
    path.write_text(ablations_markdown(report))
    return path


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def _sign_agreement(differences: list[float]) -> str:
    if len(differences) < 2:
        return "one seed only"
    if all(d > 0 for d in differences) or all(d < 0 for d in differences):
        return f"the same sign on all {len(differences)} seeds"
    return f"not the same sign on all {len(differences)} seeds"


def _timing(timing: dict | None) -> str:
    if not timing:
        return "not recorded"
    load = timing.get("load_average_1_5_15")
    loads = f", 1-min load average {load[0][0]} at the start and {load[1][0]} at the end" if load else ""
    return f"{timing['wall_minutes']:.1f} min wall, {timing['cpu_minutes']:.1f} min CPU{loads}"


# ----------------------------------------------------------------------------------------------------------------
# The four answers
# ----------------------------------------------------------------------------------------------------------------


def noise_level(spread: dict) -> str:
    """The spread the full student's mean accuracy shows: over retrained seeds when there are several, else over
    benchmark samples read by one student, else none measured."""
    name = f"student_stage{spread['last_stage']}_mean_accuracy"
    if len(spread["seeds"]) > 1:
        return (
            f"a seed-to-seed spread of {100 * spread['spread'][name]['std']:.1f} points (std over "
            f"{len(spread['seeds'])} retrained seeds) of the block-causal student itself"
        )
    samples = spread.get("benchmark_samples")
    if samples:
        return (
            f"a spread of {100 * samples['spread'][name]['std']:.1f} points (std) of the same student over the "
            f"test splits of {len(samples['data_seeds'])} benchmark seeds (retraining adds to this)"
        )
    return "no measured seed-to-seed spread"


def noise_std_points(spread: dict) -> float | None:
    """The std (points) behind `noise_level`: over retrained seeds, else over benchmark samples, else `None`."""
    name = f"student_stage{spread['last_stage']}_mean_accuracy"
    if len(spread["seeds"]) > 1:
        return 100 * spread["spread"][name]["std"]
    samples = spread.get("benchmark_samples")
    return 100 * samples["spread"][name]["std"] if samples else None


def _not_run_text(section: dict) -> str:
    minutes = section.get("minutes_per_student_at_main_rate")
    cost = f" (about {minutes:.0f} min of 2-core CPU per student at the main student's rate)" if minutes else ""
    return f"Not measured in this report: the ablation students were not distilled{cost}. `{section['command']}` does."


def causality_answer(causality: dict, spread: dict) -> str:
    if causality.get("status") == "not run":
        return (
            f"**Cost of causality.** {_not_run_text(causality)} The block-causal student's full-resolution mean "
            f"accuracy, the side it would be compared with, is {_pct(causality['block_causal_mean_accuracy'])}%."
        )
    diffs = causality["difference_points_per_seed"]
    mean_diff = float(np.mean(diffs))
    noise = noise_std_points(spread)
    # A difference within three times the measured spread is not called a cost: one seed cannot tell it apart.
    verb = (
        "does not cost accuracy"
        if mean_diff <= 0
        else "costs little accuracy, if any,"
        if noise is not None and mean_diff <= 3 * noise
        else "costs accuracy"
    )
    return (
        f"**Cost of causality.** At full resolution the block-causal mask {verb} here: the block-causal "
        f"student averages {_pct(causality['block_causal_mean_accuracy'])}% over the four axes and the "
        f"bidirectional one {_pct(causality['bidirectional_mean_accuracy'])}% ({mean_diff:+.1f} points for "
        f"bidirectional; per seed {', '.join(f'{d:+.1f}' for d in diffs)}: {_sign_agreement(diffs)}), against "
        f"{noise_level(spread)}."
    )


def ordering_answer(ordering: dict) -> str:
    if ordering.get("status") == "not run":
        stages = ", ".join(_pct(a) for a in ordering["coarse_to_fine_stage_mean_accuracy"])
        return (
            f"**Order of the bands.** {_not_run_text(ordering)} The coarse-to-fine student's per-stage mean "
            f"accuracy is {stages}%."
        )
    seeds = list(ordering["per_seed"].values())
    c2f, f2c = ordering["coarse_to_fine_stage_mean_accuracy"], ordering["fine_to_coarse_stage_mean_accuracy"]
    g_c2f, g_f2c = seeds[0]["coarse_to_fine"]["cumulative_gflops"], seeds[0]["fine_to_coarse"]["cumulative_gflops"]
    ratios = {
        order: [s[order]["gated"]["within_0.01"]["gflops_ratio"] for s in seeds if s[order]["gated"]["within_0.01"]]
        for order in ("coarse_to_fine", "fine_to_coarse")
    }
    return (
        f"**Order of the bands.** The order matters for what an early exit costs and reads: stage 0 of the "
        f"fine-to-coarse student (the finest details first) answers {_pct(f2c[0])}% for {g_f2c[0]:.3f} GFLOPs, "
        f"stage 0 of the coarse-to-fine one {_pct(c2f[0])}% for {g_c2f[0]:.3f}; with every band both reach "
        f"{_pct(f2c[-1])}% and {_pct(c2f[-1])}% for the same {g_c2f[-1]:.3f} GFLOPs. Gated within 1 point of its "
        f"own full model, fine-to-coarse spends {_mean_text(ratios['fine_to_coarse'])}x its full GFLOPs and "
        f"coarse-to-fine {_mean_text(ratios['coarse_to_fine'])}x (mean over seeds)."
    )


def _mean_text(values: list[float]) -> str:
    return f"{np.mean(values):.2f}" if values else "no point"


TRANSFER_NAMES = {
    "across_label_set_sizes": "another number of labels of the same axis",
    "across_benchmark_samples": "the test split of another benchmark seed (the same student)",
    "across_retrained_models": "another seed's teacher and student on its own benchmark",
}


def gate_answer(stability: dict) -> str:
    results = stability["results"]
    labelled = {gate: results[f"{gate}/labelled/0.01"] for gate in stability["gates"]}
    sizes = {gate: entry["across_label_set_sizes"] for gate, entry in labelled.items()}
    best = min(sizes, key=lambda gate: sizes[gate]["mean_shortfall_points"])
    parts = "; ".join(
        f"{gate}: {sizes[gate]['mean_shortfall_points']:.2f} points on average, "
        f"{100 * sizes[gate]['share_missed']:.0f}% of transfers missed, "
        f"{sizes[gate]['mean_cost_ratio']:.2f}x the GFLOPs of a threshold chosen in place"
        for gate in stability["gates"]
    )
    others = []
    for kind in ("across_benchmark_samples", "across_retrained_models"):
        if kind in labelled[best]:
            others.append(
                f"moved to {TRANSFER_NAMES[kind]}, "
                + ", ".join(
                    f"{gate} {labelled[gate][kind]['mean_shortfall_points']:.2f} points "
                    f"({100 * labelled[gate][kind]['share_missed']:.0f}% missed)"
                    for gate in stability["gates"]
                )
            )
    label_free = {gate: results[f"{gate}/label_free/0.01"] for gate in stability["gates"]}
    free_parts = ", ".join(
        f"{gate} {label_free[gate]['across_label_set_sizes']['mean_shortfall_points']:.2f}"
        for gate in stability["gates"]
    )
    smallest = min(int(size) for size in labelled[best]["from_all_labels_by_size"])
    at_smallest = ", ".join(
        f"{gate} {_by_size(labelled[gate]['from_all_labels_by_size'], smallest):.1f}" for gate in stability["gates"]
    )
    scaled, plain = sizes["margin_per_label"]["mean_shortfall_points"], sizes["margin"]["mean_shortfall_points"]
    verdict = "more stable than the plain margin" if scaled < plain else "less stable than the plain margin"
    return (
        f"**Stability of the gate.** With thresholds chosen on labelled images for accuracy within 1 point of the "
        f"full model and moved to {TRANSFER_NAMES['across_label_set_sizes']}, the shortfall below that target is "
        f"smallest for the {best} gate ({parts}); "
        + "; ".join(
            others
            + [
                f"chosen label-free (agreement with the full model) and moved across label-set sizes: {free_parts} "
                "points"
            ]
        )
        + f". The misses come from thresholds chosen with all of an axis's labels and used with "
        f"fewer: with {smallest} labels the gate misses by {at_smallest} points (mean over axes). On this "
        f"benchmark the paper's class-count scaling makes the margin gate {verdict}, and the top-1 probability "
        f"gate is the {'least' if sizes['top1']['mean_shortfall_points'] >= max(scaled, plain) else 'not the least'} "
        "stable of the three."
    )


def _by_size(by_size: dict, size: int) -> float:
    return by_size[size] if size in by_size else by_size[str(size)]


def spread_answer(spread: dict) -> str:
    s = spread["spread"]
    last = spread["last_stage"]
    if len(spread["seeds"]) < 2:
        return _sample_spread_answer(spread) + (
            " Retrained seeds were not run (one seed only), so the spread a "
            "new teacher and student add is not measured here."
        )
    widest = max(AXES, key=lambda axis: s[f"{axis}_stage{last}"]["max"] - s[f"{axis}_stage{last}"]["min"])
    within_1 = s.get("gflops_ratio_within_0.01")
    within_half = s.get("gflops_ratio_within_0.005")
    gated = ""
    if within_1 and within_half:
        gated = (
            f" The cheapest gated point costs {within_1['mean']:.2f} ± {within_1['std']:.2f}x the full GFLOPs "
            f"within 1 point and {within_half['mean']:.2f} ± {within_half['std']:.2f}x within 0.5 points."
        )
    return (
        f"**Spread.** Over seeds {', '.join(map(str, spread['seeds']))} the teacher averages "
        f"{_pct(s['teacher_mean_accuracy']['mean'])} ± {_pct(s['teacher_mean_accuracy']['std'])}% and the full "
        f"student {_pct(s[f'student_stage{last}_mean_accuracy']['mean'])} ± "
        f"{_pct(s[f'student_stage{last}_mean_accuracy']['std'])}% (mean ± std); the widest axis is {widest} "
        f"({_pct(s[f'{widest}_stage{last}']['min'])}-{_pct(s[f'{widest}_stage{last}']['max'])}% for the full "
        f"student).{gated} A difference between two runs smaller than about twice these standard deviations "
        "is within what a new benchmark seed changes."
    )


def _sample_spread_answer(spread: dict) -> str:
    samples = spread.get("benchmark_samples")
    if not samples:
        return "**Spread.** Not measured (one seed, no other benchmark sample)."
    s, last = samples["spread"], spread["last_stage"]
    full = s[f"student_stage{last}_mean_accuracy"]
    within_1 = s.get("gflops_ratio_within_0.01")
    gated = (
        (
            f"; its cheapest gated point within 1 point costs {within_1['min']:.2f}-{within_1['max']:.2f}x the full "
            "GFLOPs"
        )
        if within_1
        else ""
    )
    return (
        f"**Spread.** The seed-{samples['student_seed']} teacher and student read on the test splits of "
        f"benchmark seeds {', '.join(map(str, samples['data_seeds']))}: teacher "
        f"{_pct(s['teacher_mean_accuracy']['mean'])} ± {_pct(s['teacher_mean_accuracy']['std'])}%, full student "
        f"{_pct(full['mean'])} ± {_pct(full['std'])}% (mean ± std){gated}. This is the part of the spread that "
        "the 5,000 test images alone account for."
    )


# ----------------------------------------------------------------------------------------------------------------
# The sections
# ----------------------------------------------------------------------------------------------------------------


def recorded_costs(report: dict) -> dict:
    """What building the steps this report reads cost, as recorded by the runs that built them (a step built by an
    earlier, partial run keeps its own record): wall minutes per step, and CPU minutes where recorded."""
    steps = {}
    for seed, timing in report["seed_spread"]["main_job_timing"].items():
        if timing.get("main_job_first_run"):
            steps[f"main job, seed {seed}"] = {"wall_minutes": timing["main_job_first_run"]["minutes"]}
            continue
        # Built by this command rather than the main job: its teacher's training loop and its distillation.
        if timing.get("teacher_training_minutes"):
            steps[f"teacher, seed {seed} (training loop)"] = {"wall_minutes": timing["teacher_training_minutes"]}
        if timing.get("student_distillation"):
            steps[f"student, seed {seed}"] = timing["student_distillation"]
    for section, variant in (("causality", "bidirectional"), ("ordering", "fine-to-coarse")):
        for seed, entry in report[section].get("per_seed", {}).items():
            if entry["distillation_timing"]:
                steps[f"{variant} student, seed {seed}"] = entry["distillation_timing"]
    samples = report["seed_spread"].get("benchmark_samples") or {}
    for seed, timing in samples.get("timing", {}).items():
        if timing["first_run"]:
            steps[f"benchmark sample {seed} (generation and embedding)"] = timing["first_run"]
    return {"steps": steps, "wall_minutes": sum(step["wall_minutes"] for step in steps.values())}


def _costs_text(costs: dict) -> str:
    parts = [
        f"{name}: {step['wall_minutes']:.1f} min wall"
        + (f" ({step['cpu_minutes']:.1f} min CPU)" if "cpu_minutes" in step else "")
        for name, step in costs["steps"].items()
    ]
    return f"{costs['wall_minutes']:.1f} min wall in all ({'; '.join(parts)})" if parts else "not recorded"


def _header(report: dict) -> list[str]:
    context = report["context"]
    return [
        "# Method ablations on the generated offline benchmark",
        "",
        f"Written by `{context['command']}` on {context['date']} ({context['machine']}); do not edit by hand. This "
        f"run (reusing what the cache held): {_timing(context['this_run'])}. Building the steps it reads took, as "
        f"recorded by the runs that built them: {_costs_text(recorded_costs(report))}. Each seed's data, teacher and "
        "student are the main job's (`python -m waveclip_hf.experiments.end_to_end --seed <seed>`, docs/results.md), "
        "reused "
        "from its cache; accuracies are zero-shot on each seed's 5,000-image test split, means over the four axes "
        "unless an axis is named; GFLOPs per image, 1 multiply-add = 2 FLOPs (docs/model.md). The time each student "
        "took to distil, and the machine's load meanwhile, is given with its section (the machine was shared).",
        "",
        "## The answers",
        "",
        f"1. {causality_answer(report['causality'], report['seed_spread'])}",
        f"2. {ordering_answer(report['ordering'])}",
        f"3. {gate_answer(report['gate_stability'])}",
        f"4. {spread_answer(report['seed_spread'])}",
        "",
    ]


def _distillation_times(section: dict) -> str:
    return "; ".join(
        f"seed {seed}: {_timing(entry['distillation_timing'])}" for seed, entry in section["per_seed"].items()
    )


def _causality_section(report: dict) -> list[str]:
    causality = report["causality"]
    means = causality["per_axis_mean"]
    lines = [
        "## 1. Cost of causality",
        "",
        "The bidirectional student (`attention=\"bidirectional\"`) has the main job's student's architecture, tokens, "
        "teacher, data, seed and steps; only the attention mask differs: every token attends to every stage. Its "
        "stages are not exits (every class token sees every band), so its distillation puts all the loss weight on "
        "the last stage's class token, its only answer (`DistillationConfig`: stage weights (0, 1)); the "
        "block-causal student keeps the main job's equal weights, every stage being an exit. Both are read at full "
        f"resolution. Per image, the block-causal answer costs {causality['gflops']['block_causal']:.3f} GFLOPs "
        f"through the cache, the bidirectional one {causality['gflops']['bidirectional']:.3f} (one full forward).",
        "",
        "| axis | scale | teacher | block-causal | bidirectional | bidirectional - block-causal (points) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in AXES:
        diff = 100 * (means["bidirectional"][name] - means["block_causal"][name])
        lines.append(
            f"| {name} | {AXES[name].scale} | {_pct(means['teacher'][name])} | {_pct(means['block_causal'][name])}"
            f" | {_pct(means['bidirectional'][name])} | {diff:+.1f} |"
        )
    lines.append(
        f"| **mean** | | | **{_pct(causality['block_causal_mean_accuracy'])}** | "
        f"**{_pct(causality['bidirectional_mean_accuracy'])}** | "
        f"**{np.mean(causality['difference_points_per_seed']):+.1f}** |"
    )
    lines += [
        "",
        f"Accuracy (%), mean over seeds {causality['seeds']}. Per seed, mean over axes: block-causal "
        + ", ".join(_pct(a) for a in causality["block_causal_mean_accuracy_per_seed"])
        + "; bidirectional "
        + ", ".join(_pct(a) for a in causality["bidirectional_mean_accuracy_per_seed"])
        + ".",
        "",
        f"![block-causal vs bidirectional]({report['figures']['causality']})",
        "",
        f"Distilling the bidirectional students: {_distillation_times(causality)}. Section time in this run: "
        f"{_timing(causality['timing_this_run'])}.",
        "",
    ]
    return lines


def _ordering_section(report: dict) -> list[str]:
    ordering = report["ordering"]
    seeds = ordering["per_seed"]
    first = next(iter(seeds.values()))
    lines = [
        "## 2. Order of the bands",
        "",
        'The fine-to-coarse student (`band_order="fine_to_coarse"`) reads the same tokens in the reverse order: '
        "stage 0 the finest (level-1) detail bands, the last stage the approximation, with block-causal attention, "
        "the same projections per band (the teacher's patch convolution folded into the approximation's) and the "
        "main job's distillation (equal stage weights, every stage an exit).",
        "",
        "| order | stage | GFLOPs (cumulative) | " + " | ".join(AXES) + " | mean |",
        "|---|---:|---:|" + "---:|" * (len(AXES) + 1),
    ]
    for order in ("coarse_to_fine", "fine_to_coarse"):
        for stage, gflops in enumerate(first[order]["cumulative_gflops"]):
            per_axis = [
                np.mean([entry[order]["stage_accuracy_per_axis"][name][stage] for entry in seeds.values()])
                for name in AXES
            ]
            mean = ordering[f"{order}_stage_mean_accuracy"][stage]
            lines.append(
                f"| {order.replace('_', '-')} | {stage} | {gflops:.3f} | "
                + " | ".join(_pct(a) for a in per_axis)
                + f" | {_pct(mean)} |"
            )
    lines += [
        "",
        f"Accuracy (%), mean over seeds {ordering['seeds']}.",
        "",
        _gated_table_intro(),
        "",
        "| seed | order | within 0.5 point | within 1 point | oracle gate |",
        "|---:|---|---:|---:|---:|",
    ]
    for seed, entry in seeds.items():
        for order in ("coarse_to_fine", "fine_to_coarse"):
            cells = [_gated_cell(entry[order]["gated"][f"within_{drop}"]) for drop in ("0.005", "0.01")]
            oracle = entry[order]["oracle_exit_gflops"] / entry[order]["cumulative_gflops"][-1]
            lines.append(f"| {seed} | {order.replace('_', '-')} | " + " | ".join(cells) + f" | {oracle:.2f}x |")
    lines += [
        "",
        f"![accuracy vs GFLOPs for both orders]({report['figures']['ordering']})",
        "",
        f"Distilling the fine-to-coarse students: {_distillation_times(ordering)}. Section time in this run: "
        f"{_timing(ordering['timing_this_run'])}.",
        "",
    ]
    return lines


def _gated_table_intro() -> str:
    return (
        "Cheapest gated point within 0.5 and 1 point of the student's own full accuracy (one margin threshold "
        "for all axes, from the main job's sweep), as accuracy and GFLOPs relative to the full student; the "
        "oracle gate keeps every full-model answer at the least cost (`oracle_exit_point`)."
    )


def _gated_cell(point: dict | None) -> str:
    return f"{_pct(point['accuracy'])}% at {point['gflops_ratio']:.2f}x" if point else "none"


def _stability_rows(stability: dict, drop: str) -> list[str]:
    kinds = [kind for kind in TRANSFER_NAMES if kind in stability["transfer_kinds"]]
    headers = {
        "across_label_set_sizes": "across label-set sizes",
        "across_benchmark_samples": "across benchmark samples",
        "across_retrained_models": "across retrained models",
    }
    lines = [
        "| gate | calibration | "
        + " | ".join(f"{headers[kind]}: mean / worst shortfall (points), missed, cost" for kind in kinds)
        + " | on itself: worst shortfall, cost vs labelled |",
        "|---|---|" + "---|" * (len(kinds) + 1),
    ]
    results = stability["results"]
    for gate in stability["gates"]:
        labelled_self = results[f"{gate}/labelled/{drop}"]["on_itself"]["mean_gflops"]
        for calibration in stability["calibrations"]:
            entry = results[f"{gate}/{calibration}/{drop}"]
            cells = [
                f"{entry[kind]['mean_shortfall_points']:.2f} / {entry[kind]['worst_shortfall_points']:.2f}, "
                f"{100 * entry[kind]['share_missed']:.0f}%, {entry[kind]['mean_cost_ratio']:.2f}x"
                for kind in kinds
            ]
            itself = entry["on_itself"]
            cells.append(f"{itself['worst_shortfall_points']:.2f}, {itself['mean_gflops'] / labelled_self:.2f}x")
            lines.append(f"| {GATE_NAMES[gate]} | {CALIBRATION_NAMES[calibration]} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{headers[kind]} {stability['transfer_counts'][kind]}" for kind in kinds)
    return lines + ["", f"Transfers per row: {counts}."]


def _stability_section(report: dict) -> list[str]:
    stability = report["gate_stability"]
    lines = [
        "## 3. Stability of the gate",
        "",
        "The main job's student of each seed, on its test split. A setting is one axis with a label set of n of its "
        f"classes (n = 2 to all; up to {stability['max_subsets_per_size']} subsets per n, pooled: each image whose "
        "class is in a subset is classified among that subset's labels). On each setting a threshold is chosen for "
        "each gate, either on labelled images (the cheapest threshold whose accuracy is within the target of the "
        "full model's) or label-free (the cheapest threshold whose answers agree with the full model's on at least "
        "1 - target of the images: no labels needed, and it implies the accuracy target on the same images), and "
        "applied to another setting: another n of the same axis, model and data (across label-set sizes); the whole "
        "label set of the same axis read by the same student on the test split of another benchmark seed (across "
        "benchmark samples: no new teacher, only new images); or the whole label set of the same axis with "
        "another seed's teacher and student on its own benchmark (across retrained models, when other seeds were "
        "run). Shortfall: how many points the gated accuracy lands below that setting's own target (the full "
        "model's accuracy minus the target); the mean counts a met target as 0. Missed: the share of transfers "
        "with a shortfall. Cost: mean GFLOPs over those of the threshold chosen the same way on the setting itself "
        "(below 1: the transferred threshold is cheaper than it should be, and usually misses). On itself: the "
        "calibration on the setting it is used on; cost relative to the labelled calibration there.",
        "",
        f"Target: within 1 point of the full model ({stability['settings']} settings; main-job seeds "
        f"{stability['seeds']}, benchmark samples {stability['sample_seeds']} read by seed {stability['seeds'][0]}'s "
        "student).",
        "",
    ]
    lines += _stability_rows(stability, "0.01")
    lines += ["", "Target: within 0.5 point.", ""]
    lines += _stability_rows(stability, "0.005")
    lines += [
        "",
        f"![shortfall by label-set size]({report['figures']['gate_stability']})",
        "",
        f"Section time in this run: {_timing(stability['timing_this_run'])} (computed from the cached test "
        "embeddings).",
        "",
    ]
    return lines


def _figures_table(columns: dict, spread: dict) -> list[str]:
    """One row per figure: its value in each column (column name -> figures), mean ± std, min - max."""
    lines = [
        "| figure | " + " | ".join(columns) + " | mean ± std | min - max |",
        "|---|" + "---:|" * (len(columns) + 2),
    ]
    for name, values in spread.items():
        ratio = name.startswith(("gflops", "oracle"))
        show = (lambda v: f"{v:.2f}x") if ratio else _pct
        cells = [show(figures[name]) if figures[name] is not None else "none" for figures in columns.values()]
        std = f"{values['std']:.2f}" if ratio else _pct(values["std"])
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {show(values['mean'])} ± {std} | "
            f"{show(values['min'])} - {show(values['max'])} |"
        )
    return lines


def _spread_section(report: dict) -> list[str]:
    spread = report["seed_spread"]
    lines = [
        "## 4. Spread over benchmark seeds",
        "",
        "Each seed is the whole main job again (a new benchmark sample, a new teacher, a new student), as a new user "
        "would run it with `--seed`. Accuracy (%) and GFLOPs as a fraction of the full student's.",
        "",
    ]
    lines += _figures_table({f"seed {seed}": spread["per_seed"][seed] for seed in spread["seeds"]}, spread["spread"])
    samples = spread.get("benchmark_samples")
    if samples:
        lines += [
            "",
            f"The seed-{samples['student_seed']} teacher and student on the test split of each benchmark seed "
            "(only the benchmark is generated; the images change, the models do not):",
            "",
        ]
        lines += _figures_table(
            {f"data seed {seed}": samples["per_sample"][seed] for seed in samples["data_seeds"]}, samples["spread"]
        )
    lines += ["", f"![spread over seeds]({report['figures']['seed_spread']})", ""]
    for seed, timing in spread["main_job_timing"].items():
        first = timing.get("main_job_first_run")
        first_text = f"took {first['minutes']:.1f} min on {first['date']}" if first else "is not recorded"
        teacher = timing.get("teacher_training_minutes")
        teacher_text = f"its teacher's training loop {teacher:.1f} min wall, " if teacher else ""
        lines.append(
            f"- seed {seed}: the main job's first run {first_text}; {teacher_text}its distillation "
            f"{_timing(timing['student_distillation'])}."
        )
    for seed, timing in (samples or {}).get("timing", {}).items():
        lines.append(
            f"- data seed {seed}: generating the benchmark and embedding its test split took "
            f"{_timing(timing['first_run'])}."
        )
    lines.append("")
    return lines


def ablations_markdown(report: dict) -> str:
    """docs/ablations.md: the four answers, then one section per question."""
    lines = _header(report)
    for name, title, write in (
        ("causality", "## 1. Cost of causality", _causality_section),
        ("ordering", "## 2. Order of the bands", _ordering_section),
    ):
        measured = report[name].get("status") != "not run"
        lines += write(report) if measured else [title, "", _not_run_text(report[name]), ""]
    lines += _stability_section(report)
    lines += _spread_section(report)
    return "\n".join(lines)
