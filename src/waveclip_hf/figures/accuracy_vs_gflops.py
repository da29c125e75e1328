"""Accuracy / GFLOPs pictures: the main job's results (docs/results.md) and a gate calibration's trade-off.

All figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend or figure state is touched.
"""

from pathlib import Path

import numpy as np

from ..models.waveclip.flops import FLOPS_CONVENTION


def _figure(figsize: tuple[float, float], dpi: int, ncols: int = 1):
    """A (figure, axes) pair on the Agg canvas; `axes` is a list when `ncols` > 1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, ncols)


def _save(figure, path) -> Path:
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return Path(path)


def _result_panels(results: dict) -> list[tuple]:
    """(title, sweep, teacher accuracy, stage accuracies, oracle GFLOPs) for the mean over axes, then each axis."""
    per_axis, summary = results["per_axis"], results["summary"]
    panels = [
        (
            "mean over axes",
            results["sweep_mean"],
            summary["teacher_mean"],
            summary["student_stage_mean"],
            summary.get("oracle_exit_gflops"),
        )
    ]
    panels += [
        (
            name,
            results["sweep_per_axis"][name],
            row["teacher"],
            row["stages"],
            row.get("oracle_exit", {}).get("mean_gflops"),
        )
        for name, row in per_axis.items()
    ]
    return panels


def plot_accuracy_vs_gflops(results: dict, path) -> Path:
    """One panel for the mean over axes and one per axis: the gated student's threshold sweep as a curve, each
    fixed stage, the oracle gate's bound and the teacher, zero-shot accuracy against mean GFLOPs per image.

    Args:
        results: the dict of `experiments.run_evaluation.evaluate`.
        path: where to save the PNG.
    """
    gflops = results["student_cumulative_gflops"]
    per_axis = results["per_axis"]
    panels = _result_panels(results)
    figure, axes = _figure((4.2 * len(panels), 3.8), 110, ncols=len(panels))
    for ax, (title, sweep, teacher, stages, oracle) in zip(axes, panels):
        ax.plot(
            [p["mean_gflops"] for p in sweep],
            [100 * p["accuracy"] for p in sweep],
            "-o",
            ms=2.5,
            label="gated student (θ sweep)",
        )
        for s, accuracy in enumerate(stages):
            ax.scatter(gflops[s], 100 * accuracy, marker="s", s=36, zorder=3, label=f"stage {s} (fixed)")
        if oracle is not None:  # the oracle keeps every full-model answer: the full model's accuracy
            ax.scatter(
                oracle,
                100 * stages[-1],
                marker="D",
                s=30,
                facecolors="none",
                edgecolors="red",
                zorder=3,
                label="oracle gate (bound)",
            )
        ax.scatter(results["teacher_gflops"], 100 * teacher, marker="*", s=110, c="black", zorder=3, label="teacher")
        if title in per_axis:
            ax.axhline(100 * per_axis[title]["chance"], color="gray", ls=":", lw=1, label="chance")
        ax.set_title(f"{title}" + (f" ({per_axis[title]['scale']})" if title in per_axis else ""), fontsize=10)
        ax.set_xlabel("mean GFLOPs per image")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("zero-shot accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def plot_exit_stage_share(results: dict, path) -> Path:
    """Share of images answered at each stage against the margin threshold (mean over axes), stacked."""
    figure, ax = _figure((6, 3.6), 110)
    sweep = results["sweep_mean"]
    thresholds = [p["threshold"] for p in sweep]
    shares = np.array([p["stage_share"] for p in sweep]).T
    ax.stackplot(thresholds, 100 * shares, labels=[f"answered at stage {s}" for s in range(len(shares))], alpha=0.8)
    ax.set_xlabel("margin threshold θ")
    ax.set_ylabel("images (%) — mean over axes")
    ax.set_xlim(min(thresholds), max(thresholds))
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Which stage answers, by threshold", fontsize=10)
    return _save(figure, path)


def plot_results(results: dict, figures: Path) -> dict:
    """The main job's two pictures in the folder `figures`: e2e_accuracy_vs_gflops.png and
    e2e_exit_stage_share.png. Returns {"curve": path, "shares": path}."""
    figures = Path(figures)
    return {
        "curve": plot_accuracy_vs_gflops(results, figures / "e2e_accuracy_vs_gflops.png"),
        "shares": plot_exit_stage_share(results, figures / "e2e_exit_stage_share.png"),
    }


def plot_tradeoff(points, fixed_points, path, chosen=None, reference_points=None, title="Gate calibration") -> Path:
    """Accuracy vs mean GFLOPs of a gate calibration: the threshold sweep as a curve, each fixed stage (and
    references such as the teacher) as labelled points, the chosen threshold circled. Saves a PNG at `path`.

    Args:
        points: `OperatingPoint`s of the sweep; fixed_points: dicts with "stage", "accuracy", "gflops".
        chosen: the chosen `OperatingPoint`, if any; reference_points: name -> (GFLOPs, accuracy).
    """
    figure, ax = _figure((6.4, 4.4), 120)
    ax.plot([p.mean_gflops for p in points], [100 * p.accuracy for p in points], "-o", ms=3, label="gated (θ sweep)")
    for point in fixed_points:
        ax.scatter(point["gflops"], 100 * point["accuracy"], marker="s", s=40, zorder=3)
        ax.annotate(
            f"stage {point['stage']}",
            (point["gflops"], 100 * point["accuracy"]),
            textcoords="offset points",
            xytext=(5, -10),
            fontsize=8,
        )
    for name, (gflops, accuracy) in (reference_points or {}).items():
        ax.scatter(gflops, 100 * accuracy, marker="*", s=90, zorder=3)
        ax.annotate(name, (gflops, 100 * accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if chosen is not None:
        ax.scatter(
            chosen.mean_gflops,
            100 * chosen.accuracy,
            s=160,
            facecolors="none",
            edgecolors="red",
            zorder=4,
            label=f"chosen θ = {chosen.threshold:g}",
        )
    ax.set_xlabel(f"mean image-encoder GFLOPs per image ({FLOPS_CONVENTION.split(';')[0]})")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


__all__ = ["plot_accuracy_vs_gflops", "plot_exit_stage_share", "plot_results", "plot_tradeoff"]
