"""docs/gate.md from the report of `gate_study` (the numbers are all in docs/gate.json)."""

from pathlib import Path

from ..models.waveclip.exit_signals import EXIT_SIGNALS


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _signal_table(name: str, run: dict, target_points: float) -> list[str]:
    axes = list(run["signals"]["margin"]["per_axis"])
    lines = [
        f"| signal | GFLOPs / full | worst axis drop (points) | {' | '.join(f'{a} drop / GFLOPs' for a in axes)} |",
        "|---|---:|---:|" + "---:|" * len(axes),
    ]
    for signal in EXIT_SIGNALS:
        row = run["signals"][signal]
        cells = [f"{row['per_axis'][a]['drop_points']:+.2f} / {row['per_axis'][a]['gflops_ratio']:.2f}x" for a in axes]
        meets = "" if row["max_axis_drop_points"] <= target_points + 1e-9 else " (over)"
        lines.append(
            f"| {signal} | {row['gflops_ratio']:.3f}x | {row['max_axis_drop_points']:.2f}{meets} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append(
        f"| oracle (knows when an earlier stage already gives the full answer) | "
        f"{run['signals']['oracle']['gflops_ratio']:.3f}x | 0 | {' | '.join('' for _ in axes)} |"
    )
    return lines


def _guarantee_table(guarantee: dict) -> list[str]:
    lines = [
        "| signal | δ | calibration images | violation rate (ε = 0.05) | splits | certified | "
        "mean test disagreement | mean GFLOPs / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for signal, per_delta in guarantee.items():
        for delta, entry in per_delta.items():
            for size, row in entry["per_calibration_size"].items():
                lines.append(
                    f"| {signal} | {_pct(float(delta))} | {size} | {_pct(row['violation_rate'])} | {row['splits']} | "
                    f"{_pct(row['certified'])} | {_pct(row['mean_test_disagreement'])} | "
                    f"{row['mean_gflops_ratio']:.3f}x |"
                )
    return lines


def write_gate_markdown(path: Path, report: dict) -> Path:
    """Write docs/gate.md."""
    context, summary = report["context"], report["summary"]
    target = report["settings"]["max_disagreement"]
    lines = [
        "# The gate: a stated guarantee, and which exit signal spends least for it",
        "",
        f"Written by `{context['command']}` on {context['date']} ({context['machine']}; {context['wall_minutes']:.1f} "
        "min); do not edit by hand. Every number comes from the runs' cached embeddings: the gate is replayed "
        "exactly as `refine` runs it (`gating.gate_operating_points`, `exit_signals.exit_scores`).",
        "",
        "## The promise",
        "",
        "`classifier.calibrate(images, candidate_labels=..., max_disagreement=δ, confidence=1 - ε)` needs no labels: "
        "the full model's answer is the reference. Over a grid of thresholds fixed in advance (most conservative "
        "first), it keeps going down while the Clopper-Pearson upper bound on the share of calibration images whose "
        "gated answer differs from the full model's stays <= δ, and stops at the first threshold that fails "
        "(fixed-sequence testing, as Learn-then-Test). Then, with probability >= 1 - ε over the calibration images, "
        "the gate changes at most a share δ of the full model's answers on new images of the same distribution, so "
        "it loses at most δ of accuracy. Too few images certify nothing (with none disagreeing, "
        "(1 - δ)^n <= ε needs n >= 598 at δ = 0.5%, 299 at 1%, 149 at 2%); the result then says how many are "
        "needed and runs every stage.",
        "",
        f"Checked on the main job: the validation and test images pooled ({report['main']['pool_images']} images), "
        "split at random into calibration and test images; per axis and for label sets of other sizes drawn from "
        "each axis's classes (sizes 2 to all; 3 sets of each size, with a fifth of the splits). A violation is a "
        "split whose test disagreement exceeds δ.",
        "",
        *_guarantee_table(report["guarantee"]),
        "",
        "## The exit signals",
        "",
        f"Each signal calibrated per axis on the {report['main']['validation_images']} unlabelled validation images "
        f"with δ = {_pct(target)} at confidence {report['settings']['confidence']:g} (so that no axis should lose "
        f"more than {100 * target:g} points), then run on the {report['main']['test_images']} test images. "
        "GFLOPs are the image encoder's per image, 1 multiply-add = 2 FLOPs, against the full model's. "
        "`saturation` has no stage-0 score (no earlier stage to compare with): on a two-stage model it never exits "
        "early. The learned head was fitted on 2,000 training images (never calibration or test images).",
        "",
        "### Main job (224 px, two stages)",
        "",
        *_signal_table("main", report["main"], 100 * target),
        "",
        "![main job](figures/gate_curves_main.png)",
        "",
    ]
    if "adaptive" in report:
        lines += [
            "### Adaptive 448-px run (three stages)",
            "",
            "The adaptive preset with 1,000 validation images instead of 200 (`gate_study.adaptive_run`; a cache "
            "entry of its own, built like the preset's).",
            "",
            *_signal_table("adaptive", report["adaptive"], 100 * target),
            "",
            "![adaptive run](figures/gate_curves_adaptive.png)",
            "",
        ]
    lines += _seeds_and_default(report, summary, target)
    lines += _against_the_targets(report, summary)
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def _reproduction_note(previous: dict | None, current: dict) -> str:
    """Whether the earlier run's seed 0 gave this run's main-job row (so its other seeds would retrain the same)."""
    if previous is None:
        return "That run had no seed 0 to compare with."
    keys = ("gflops_ratio", "max_axis_drop_points")
    if all(abs(previous[key] - current[key]) <= 1e-9 for key in keys):
        return (
            "That run's seed 0 gave exactly this run's main-job row, so the carried seeds are what retraining gives."
        )
    return (
        f"That run's seed 0 differs from this run's main job ({previous['gflops_ratio']:.3f}x / "
        f"{previous['max_axis_drop_points']:.2f} points against {current['gflops_ratio']:.3f}x / "
        f"{current['max_axis_drop_points']:.2f}): retrain the seeds (`--seeds 1 2`) for figures of this code."
    )


def _seeds_and_default(report: dict, summary: dict, target: float) -> list[str]:
    default = summary["default_signal"]
    lines = ["## Retrained seeds", ""]
    if summary["seeds"]:
        lines += [
            f"The main job of each seed (new benchmark sample, teacher and student), `{default}` signal:",
            "",
            "| seed | GFLOPs / full | worst axis drop (points) |",
            "|---|---:|---:|",
        ]
        for name, row in summary["seeds"].items():
            lines.append(
                f"| {name.removeprefix('seed')} | {row['gflops_ratio']:.3f}x | {row['max_axis_drop_points']:.2f} |"
            )
        ratios = [row["gflops_ratio"] for row in summary["seeds"].values()]
        lines += ["", f"Mean {sum(ratios) / len(ratios):.3f}x, highest {max(ratios):.3f}x."]
        source = report.get("seeds_source")
        if source:
            carried = ", ".join(name.removeprefix("seed") for name in source["seeds"])
            lines.append(
                f"Seeds {carried} are carried over from the run of {source['date']} (`{source['command']}`, "
                f"{source['machine']}), not retrained in this one; seed 0 is this run's main job. "
                + _reproduction_note(source.get("previous_seed0"), summary["seeds"]["seed0"])
            )
    else:
        lines.append("No seed run was in the cache.")
    lines += [
        "",
        "## Default",
        "",
        f"`{default}`: the signal with the lowest GFLOPs that kept every axis within {100 * target:g} points on the "
        'benchmarks above. `calibrate(..., exit_signal="margin")` is the paper\'s gate.',
    ]
    return lines


def _without_chance_hits(without: float, chosen: float, ratio_bound: float) -> str:
    """The oracle with the chance axes sent to the last stage: a bound where the chosen signal spends more, but with
    more than two stages a middle stage may already read those axes, and a signal can then spend less."""
    if chosen < without:
        return (
            f" Sent to the last stage they would leave an oracle of {without:.3f}x, more than the chosen signal "
            f"spends ({chosen:.3f}x): a middle stage already reads part of them, so on this run that figure bounds "
            "nothing, and what is left to gain lies between the signal and the oracle on the axes below."
        )
    return (
        f" Sent to the last stage, as any honest gate must, they leave an oracle of {without:.3f}x: the bound a "
        "label-free gate can approach on this benchmark."
        + (f" The target ({ratio_bound:g}x) lies below it." if without > ratio_bound else "")
    )


def _oracle_lines(oracle: dict, chosen: dict, ratio_bound: float) -> list[str]:
    """Why a run's chosen signal costs what it costs, from the oracle gate: the oracle's cost per axis, the axes
    whose stage 0 answers at chance (the oracle's early exits there are luck, so a label-free gate cannot follow
    it there), and the axis stage 0 can read with the largest gap between the signal and the oracle."""
    if "per_axis" not in oracle:
        return []
    lines = []
    axes = oracle["per_axis"]
    chance_axes = [name for name, row in axes.items() if row["stage0_at_chance"]]
    lines.append(
        f"  The oracle gate costs {oracle['gflops_ratio']:.3f}x ("
        + ", ".join(f"{name} {row['gflops_ratio']:.2f}x" for name, row in axes.items())
        + ")."
    )
    if chance_axes:
        lines.append(
            f"  On {' and '.join(chance_axes)}, stage 0 answers at chance ("
            + ", ".join(
                f"{100 * axes[n]['stage0_accuracy']:.1f}% against {100 * axes[n]['chance']:.1f}%" for n in chance_axes
            )
            + "): the oracle's early exits there are lucky guesses that equal the full answer, which no signal "
            "computed from the model can tell apart from the others."
            + _without_chance_hits(oracle["gflops_ratio_without_chance_hits"], chosen["gflops_ratio"], ratio_bound)
        )
    per_axis = chosen["per_axis"]
    gaps = {name: per_axis[name]["gflops_ratio"] - axes[name]["gflops_ratio"] for name in per_axis}
    worst = max((name for name in gaps if name not in chance_axes), key=gaps.get, default=None)
    if worst is not None:
        lines.append(
            f"  The largest gap to the oracle on an axis stage 0 can read: {worst}, "
            f"{per_axis[worst]['gflops_ratio']:.2f}x against {axes[worst]['gflops_ratio']:.2f}x."
        )
    return lines


def _against_the_targets(report: dict, summary: dict) -> list[str]:
    """Each target of `gate_study.TARGETS` against the measured best signal, the oracle bounds that explain a miss,
    and the runs this report does not hold, with the command that adds them."""
    from .gate_study import TARGETS

    best = min(EXIT_SIGNALS, key=lambda s: report["main"]["signals"][s]["gflops_ratio"])
    main = report["main"]["signals"][best]
    oracle = report["main"]["signals"]["oracle"]
    ratio_bound, drop_bound = TARGETS["main"]
    met = main["gflops_ratio"] <= ratio_bound + 1e-9 and main["max_axis_drop_points"] <= drop_bound + 1e-9
    lines = [
        "",
        "## Against the targets",
        "",
        f"- Main job: target every axis within {drop_bound:g} points at <= {ratio_bound:g}x; measured "
        f"{main['gflops_ratio']:.3f}x with {main['max_axis_drop_points']:.2f} points at most (`{best}`, the "
        f"cheapest signal): {'met' if met else '**not met**'}.",
    ]
    lines += _oracle_lines(oracle, main, ratio_bound)
    if "adaptive" in report:
        signals = report["adaptive"]["signals"]
        kept = [s for s in EXIT_SIGNALS if signals[s]["max_axis_drop_points"] <= TARGETS["adaptive"][1] + 1e-9]
        adaptive_best = min(kept or EXIT_SIGNALS, key=lambda s: signals[s]["gflops_ratio"])
        row, bound = signals[adaptive_best], TARGETS["adaptive"]
        adaptive_met = row["gflops_ratio"] <= bound[0] + 1e-9 and row["max_axis_drop_points"] <= bound[1] + 1e-9
        lines.append(
            f"- Adaptive 448-px run: target every axis within {bound[1]:g} point at <= {bound[0]:g}x; measured "
            f"{row['gflops_ratio']:.3f}x with {row['max_axis_drop_points']:.2f} points at most (`{adaptive_best}`"
            f"{', the cheapest signal within the bound' if kept else ', no signal within the bound'}): "
            f"{'met' if adaptive_met else '**not met**'}."
        )
        lines += _oracle_lines(signals.get("oracle", {}), row, bound[0])
    else:
        lines.append(
            f"- Adaptive 448-px run (target within {TARGETS['adaptive'][1]:g} point at <= "
            f"{TARGETS['adaptive'][0]:g}x): not in this report. `--adaptive-cache-dir .cache/adaptive_resolution` "
            "adds it (the adaptive preset with 1,000 validation images: its own benchmark, teacher and student; "
            "docs/adaptive_resolution.md records what a run of the preset took)."
        )
    seed_ratios = [row["gflops_ratio"] for row in summary["seeds"].values()]
    if len(seed_ratios) >= 3:
        mean_bound, highest_bound = TARGETS["seeds"]
        mean, highest = sum(seed_ratios) / len(seed_ratios), max(seed_ratios)
        seeds_met = mean <= mean_bound + 1e-9 and highest <= highest_bound + 1e-9
        lines.append(
            f"- Retrained seeds: target mean <= {mean_bound:g}x, none above {highest_bound:g}x; measured mean "
            f"{mean:.3f}x, highest {highest:.3f}x over {len(seed_ratios)} seeds "
            f"({min(seed_ratios):.3f}x-{highest:.3f}x): {'met' if seeds_met else '**not met**'}."
            + (
                ""
                if seeds_met
                else " Every seed is a new sample of the same benchmark design, whose fine-scale axes stage 0 "
                "cannot read, so the main job's reason (above, measured on seed 0) applies to each; the seeds spread "
                "around the main job's figure by what retraining changes."
            )
        )
    if len(summary["seeds"]) < 3:
        lines.append(
            f"- Retrained seeds (target mean <= {TARGETS['seeds'][0]:g}x, none above {TARGETS['seeds'][1]:g}x): "
            f"{len(summary['seeds'])} of 3 here. `--seeds 1 2` adds the others (each a whole main job: about half "
            "an hour on a 2-core CPU)."
        )
    return lines


__all__ = ["write_gate_markdown"]
