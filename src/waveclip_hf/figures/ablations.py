"""The pictures of docs/ablations.md, from the report of `experiments.method_ablations`: block-causal against
bidirectional per axis, both band orders along accuracy / GFLOPs, each gate's shortfall by label-set size, and the
main job's figures per seed."""

from pathlib import Path

import numpy as np

from ..data.synthetic import AXES
from .accuracy_vs_gflops import _figure, _save


GATE_LABELS = {"margin": "margin", "margin_per_label": "margin per label (θ·N)", "top1": "top-1 probability"}


def plot_causality(causality: dict, path) -> Path:
    """Per axis: teacher, block-causal and bidirectional full-resolution accuracy (bars: mean over seeds; dots:
    each seed)."""
    figure, ax = _figure((7.5, 3.6), 110)
    kinds = [
        ("teacher", "teacher", "0.6"),
        ("block_causal", "block-causal", "C0"),
        ("bidirectional", "bidirectional", "C1"),
    ]
    positions = np.arange(len(AXES))
    for i, (kind, label, colour) in enumerate(kinds):
        x = positions + (i - 1) * 0.27
        ax.bar(
            x, [100 * causality["per_axis_mean"][kind][name] for name in AXES], width=0.25, color=colour, label=label
        )
        for entry in causality["per_seed"].values():
            ax.scatter(x, [100 * entry[kind][name] for name in AXES], s=9, c="black", zorder=3)
    ax.set_xticks(positions, [f"{name}\n({AXES[name].scale})" for name in AXES])
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title(f"Full resolution, seeds {causality['seeds']} (dots: each seed)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_ordering(ordering: dict, path) -> Path:
    """Mean accuracy over axes against mean GFLOPs per image: each order's gate sweep (one line per seed) and its
    fixed stages."""
    figure, ax = _figure((6.0, 4.2), 110)
    for order, colour in (("coarse_to_fine", "C0"), ("fine_to_coarse", "C3")):
        for i, (seed, entry) in enumerate(ordering["per_seed"].items()):
            result = entry[order]
            label = order.replace("_", "-") if i == 0 else None
            ax.plot(
                [p["mean_gflops"] for p in result["sweep_mean"]],
                [100 * p["accuracy"] for p in result["sweep_mean"]],
                "-",
                color=colour,
                lw=1.2,
                alpha=0.9 if i == 0 else 0.45,
                label=label,
            )
            ax.scatter(
                result["cumulative_gflops"],
                [100 * a for a in result["stage_mean_accuracy"]],
                marker="s",
                s=28,
                color=colour,
                zorder=3,
            )
            for stage, (g, a) in enumerate(zip(result["cumulative_gflops"], result["stage_mean_accuracy"])):
                if i == 0:
                    ax.annotate(
                        f"stage {stage}",
                        (g, 100 * a),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize=7,
                        color=colour,
                    )
    ax.set_xlabel("mean GFLOPs per image (gated; squares: every image after that stage)")
    ax.set_ylabel("zero-shot accuracy, mean over axes (%)")
    ax.set_title(f"Band order, seeds {ordering['seeds']} (one line per seed)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_gate_stability(stability: dict, path, drop: str = "0.01") -> Path:
    """Each gate's threshold chosen on the whole label set, applied to n labels: mean shortfall below the target
    (points; below 0: margin to spare), labelled (solid) and label-free (dashed) calibration."""
    figure, ax = _figure((6.4, 4.0), 110)
    for i, gate in enumerate(stability["gates"]):
        for calibration, style in (("labelled", "-o"), ("label_free", "--^")):
            by_size = stability["results"][f"{gate}/{calibration}/{drop}"]["from_all_labels_by_size"]
            sizes = sorted(int(size) for size in by_size)
            ax.plot(
                sizes,
                [by_size[size] if size in by_size else by_size[str(size)] for size in sizes],
                style,
                color=f"C{i}",
                ms=4,
                label=f"{GATE_LABELS[gate]}, {calibration.replace('_', '-')}",
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("labels in the candidate set (threshold chosen with all of the axis's labels)")
    ax.set_ylabel("shortfall below the target (points)")
    ax.set_title(f"Target: within {float(drop) * 100:g} point of the full model; mean over axes and seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_seed_spread(spread: dict, path) -> Path:
    """Per seed (filled): the teacher and the student at each stage, mean over axes and per axis; per benchmark
    sample read by the first seed's models (hollow)."""
    last = spread["last_stage"]
    names = ["teacher_mean_accuracy", "student_stage0_mean_accuracy", f"student_stage{last}_mean_accuracy"]
    names += [f"{axis}_{kind}" for axis in AXES for kind in ("teacher", f"stage{last}")]
    samples = spread.get("benchmark_samples") or {"data_seeds": [], "per_sample": {}}
    points = [(f"seed {seed}", spread["per_seed"][seed], "o", True) for seed in spread["seeds"]]
    points += [
        (f"seed-{samples['student_seed']} models, data seed {seed}", samples["per_sample"][seed], "s", False)
        for seed in samples["data_seeds"]
        if seed != samples.get("student_seed")
    ]
    figure, ax = _figure((9.0, 3.8), 110)
    width = 0.6 / max(len(points), 1)
    for i, (label, figures, marker, filled) in enumerate(points):
        colour = f"C{i}"
        ax.scatter(
            np.arange(len(names)) + (i - (len(points) - 1) / 2) * width,
            [100 * figures[n] for n in names],
            s=18,
            marker=marker,
            label=label,
            zorder=3,
            color=colour if filled else "none",
            edgecolors=colour,
        )
    ax.set_xticks(
        np.arange(len(names)), [n.replace("_mean_accuracy", "").replace("_", "\n") for n in names], fontsize=7
    )
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title("The main job's figures per benchmark seed", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_ablations(report: dict, figures: Path) -> dict[str, Path]:
    """All four pictures into `figures/`; returns name -> path."""
    figures = Path(figures)
    paths = {
        "gate_stability": plot_gate_stability(report["gate_stability"], figures / "ablation_gate_stability.png"),
        "seed_spread": plot_seed_spread(report["seed_spread"], figures / "ablation_seed_spread.png"),
    }
    if report["causality"].get("status") != "not run":  # sections without their ablation students have no plot
        paths["causality"] = plot_causality(report["causality"], figures / "ablation_causality.png")
    if report["ordering"].get("status") != "not run":
        paths["ordering"] = plot_ordering(report["ordering"], figures / "ablation_band_order.png")
    return paths


__all__ = ["plot_ablations", "plot_causality", "plot_gate_stability", "plot_ordering", "plot_seed_spread"]
