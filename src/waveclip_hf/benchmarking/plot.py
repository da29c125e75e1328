"""The plot of a run: measured time against analytic GFLOPs, per configuration (`benchmark_time_vs_gflops.png`).

One row of panels per (device, dtype) of the encoder section, one panel per batch size; a last row with each
early-exit sweep and the pipelines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.waveclip.flops import FLOPS_CONVENTION
from .early_exit import early_exit_entries
from .encoder import ENCODER_CONFIGURATIONS
from .pipelines import PIPELINE_SHORT_NAMES


def _encoder_panel(ax, title: str, configs: dict[str, dict[str, Any]]) -> None:
    """Median ms per image (IQR bars) against GFLOPs per image of every configuration, with the line of CLIP's
    achieved GFLOP/s through the origin."""
    top = 0.0
    for index, (name, row) in enumerate(configs.items()):
        scale = 1e3 / row["batch_size"]
        ax.errorbar(
            row["gflops_per_image"],
            row["ms_per_image"],
            yerr=[[scale * (row["median"] - row["q1"])], [scale * (row["q3"] - row["median"])]],
            marker=ENCODER_CONFIGURATIONS[name].marker,
            linestyle="none",
            markersize=7,
            capsize=3,
            color=f"C{index}",
            label=ENCODER_CONFIGURATIONS[name].short_name,
        )
        top = max(top, row["ms_per_image"])
    clip = configs["clip_full"]
    rate = clip["ms_per_image"] / clip["gflops_per_image"]
    right = 1.1 * max(row["gflops_per_image"] for row in configs.values())
    ax.plot([0, right], [0, rate * right], "k:", linewidth=1, label="CLIP's GFLOP/s")
    ax.set_xlim(0, right)
    ax.set_ylim(0, 1.15 * max(top, rate * right))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("analytic GFLOPs / image")
    ax.set_ylabel("median ms / image (IQR bars)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _early_exit_panel(ax, device: str, dtype: str, sweep: dict[str, Any]) -> None:
    """Measured ms per image of the early-exit sweep against its two predictions, labelled by exit fraction."""
    points = sweep["rows"]
    x = [r["gflops_per_image"] for r in points]
    ax.plot(x, [r["ms_per_image"] for r in points], "o-", label="measured")
    ax.plot(
        x,
        [1e3 * r["predicted_seconds"] / sweep["batch_size"] for r in points],
        "--",
        label="t(stage 0) + (1 − f) t(later)",
    )
    ax.plot(x, [1e3 * r["gflops_line_seconds"] / sweep["batch_size"] for r in points], ":", label="time ∝ GFLOPs")
    for r in points:
        ax.annotate(
            f"{100 * r['exit_fraction']:.0f}%",
            (r["gflops_per_image"], r["ms_per_image"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    ax.set_xlabel("analytic GFLOPs / image")
    ax.set_ylabel("median ms / image")
    ax.set_title(f"early exit, {device} {dtype}, batch {sweep['batch_size']} (label: exit fraction)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _pipeline_panel(ax, pipe: dict[str, Any]) -> None:
    """ms per image against GFLOPs per image of every pipeline run, log-log (red: stock CLIP, blue: WaveCLIP)."""
    for key, run in pipe["runs"].items():
        base = key.split("@")[0]
        colour = "C3" if base.startswith("stock") else "C0"
        marker = "s" if run["batch_size"] == 1 else "o"
        ax.plot(run["gflops_per_image"], run["ms_per_image"], marker=marker, color=colour, linestyle="none")
        label = PIPELINE_SHORT_NAMES[base] + ("" if run["batch_size"] == 1 else f" (bs {run['batch_size']})")
        ax.annotate(
            label,
            (run["gflops_per_image"], run["ms_per_image"]),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GFLOPs / image (image encoder + text where run)")
    ax.set_ylabel("ms / image")
    ax.set_title(f"zero-shot pipelines, {pipe['num_labels']} labels (red: stock CLIP, blue: WaveCLIP)", fontsize=10)
    ax.grid(alpha=0.3, which="both")


def _panels(results: dict[str, Any]):
    """(encoder rows [(device, dtype, {batch: entry})], early-exit sweeps [(device, dtype, sweep)], pipeline)."""
    encoder_rows = [
        (device, dtype, per_batch)
        for device, per_dtype in results.get("encoder", {}).items()
        if "skipped" not in per_dtype
        for dtype, per_batch in per_dtype.items()
    ]
    sweeps = [
        (device, dtype, sweep)
        for device, entry in results.get("early_exit", {}).items()
        if "skipped" not in entry
        for dtype, sweep in early_exit_entries(entry)
    ]
    return encoder_rows, sweeps, results.get("pipeline")


def plot_time_vs_gflops(results: dict[str, Any], path) -> Path | None:
    """Measured ms per image against analytic GFLOPs per image, per configuration, one panel per batch size (with
    the line of CLIP's achieved GFLOP/s through the origin), and the early-exit sweep against its predictions.

    Returns:
        `path`, or None when the results hold nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoder_rows, sweeps, pipe = _panels(results)
    last_row = len(sweeps) + (1 if pipe else 0)
    columns = max([len(per_batch) for *_, per_batch in encoder_rows] + [last_row, 1])
    count = len(encoder_rows) + (1 if last_row else 0)
    if count == 0:
        return None
    figure, axes = plt.subplots(count, columns, figsize=(4.6 * columns, 4.0 * count), squeeze=False)
    for row_axes, (device, dtype, per_batch) in zip(axes, encoder_rows):
        for ax, (batch, entry) in zip(row_axes, per_batch.items()):
            _encoder_panel(ax, f"{device} {dtype}, batch {batch}", entry["configs"])
        for ax in row_axes[len(per_batch) :]:
            ax.set_axis_off()
    if last_row:
        for ax, (device, dtype, sweep) in zip(axes[-1], sweeps):
            _early_exit_panel(ax, device, dtype, sweep)
        if pipe:
            _pipeline_panel(axes[-1][len(sweeps)], pipe)
        for ax in axes[-1][last_row:]:
            ax.set_axis_off()
    meta = results["meta"]
    figure.suptitle(
        f"Time vs GFLOPs per configuration — {meta['cpu_model']}, {meta['cpu_cores']} cores, torch "
        f"{meta['torch']}; {FLOPS_CONVENTION.split(';')[0]}",
        fontsize=10,
    )
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
