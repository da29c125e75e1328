"""The gate's curves for docs/gate.md: per axis, accuracy and disagreement with the full model against GFLOPs, for
every exit signal, with the point each signal's guaranteed calibration chose."""

from pathlib import Path


SIGNAL_COLOURS = {"margin": "#1f77b4", "stability": "#2ca02c", "saturation": "#9467bd", "learned": "#d62728"}


def plot_gate_curves(curves: dict, chosen: dict, path: str | Path, title: str) -> Path:
    """One panel per axis: accuracy (solid) and disagreement with the full model (dashed, right axis) against the
    GFLOPs ratio, one colour per signal; a dot where each signal's guaranteed calibration landed on the test images.

    Args:
        curves: axis -> signal -> {"gflops_ratio", "accuracy", "disagreement"} lists (`gate_study.test_curves`).
        chosen: axis -> signal -> {"gflops_ratio", "accuracy", ...} (`gate_guarantee.gated_result`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    columns = min(len(names), 3)
    rows = (len(names) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.5 * rows), squeeze=False)
    for panel, name in zip(axes.flat, names):
        twin = panel.twinx()
        for signal, curve in curves[name].items():
            colour = SIGNAL_COLOURS.get(signal, "#333333")
            accuracy = [100 * value for value in curve["accuracy"]]
            disagreement = [100 * value for value in curve["disagreement"]]
            panel.plot(curve["gflops_ratio"], accuracy, color=colour, lw=1.2, label=signal)
            twin.plot(curve["gflops_ratio"], disagreement, color=colour, lw=0.9, ls="--", alpha=0.7)
            point = chosen[name][signal]
            panel.plot(point["gflops_ratio"], 100 * point["accuracy"], "o", color=colour, ms=5)
        panel.set_title(name, fontsize=10)
        panel.set_xlabel("GFLOPs / full model")
        panel.set_ylabel("accuracy (%)")
        twin.set_ylabel("disagreement with the full model (%)", fontsize=8)
        twin.set_ylim(0, 20)
        panel.grid(alpha=0.3)
    for panel in list(axes.flat)[len(names) :]:
        panel.axis("off")
    axes.flat[0].legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["plot_gate_curves"]
