"""Pictures for the docs: the subband pyramid of a real photo, the token layout and the block-causal mask.

`python scripts/make_figures.py` renders them into docs/figures/.
"""

import os
from pathlib import Path

import numpy as np
import torch

from ..models.waveclip.configuration_waveclip import WaveCLIPVisionConfig
from ..models.waveclip.image_processing_waveclip import CHANNEL_NAMES, as_packed_tensor
from ..models.waveclip.modeling_waveclip import block_causal_mask, token_stage_ids
from ..models.waveclip.wavelet_layout import ORIENTATIONS, unpack_coefficients


def plot_attention_mask(config: WaveCLIPVisionConfig, path, title: str | None = None):
    """The full-forward attention mask (query token x key token) with stage blocks labelled.

    White = may attend, dark = masked. Row blocks are query stages, column blocks key stages; the lower
    block triangle shows that stage s sees stages <= s, and the caption gives the token counts per stage.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = token_stage_ids(config, 0, config.num_stages)
    mask = block_causal_mask(config, 0, config.num_stages, torch.float32)
    allowed = torch.ones(len(stages), len(stages)) if mask is None else (mask[0, 0] == 0).float()
    lengths = config.stage_lengths
    edges = torch.tensor([0] + lengths).cumsum(0).tolist()

    fig = Figure(figsize=(5.6, 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(allowed.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for edge in edges[1:-1]:
        ax.axhline(edge - 0.5, color="tab:red", lw=0.8)
        ax.axvline(edge - 0.5, color="tab:red", lw=0.8)
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    names = ["stage 0\n(A)"] + [f"stage {k}\n(H,V,D L{config.levels - k + 1})" for k in range(1, config.num_stages)]
    ax.set_xticks(centres, names, fontsize=7)
    ax.set_yticks(centres, [n.replace("\n", " ") for n in names], fontsize=7)
    ax.set_xlabel("key tokens (cached stages first)")
    ax.set_ylabel("query tokens")
    counts = " + ".join(str(n) for n in lengths)
    ax.set_title(
        title
        or f"Block-causal attention, {config.image_size}px, cell {config.cell_size}, L={config.levels}\n"
        f"tokens per stage: {counts} = {sum(lengths)}",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


def plot_stage_tokens(pixel_values: torch.Tensor, config: WaveCLIPVisionConfig, path):
    """Which coefficients each stage's tokens read: the packed Y pyramid with the cell grid of every subband.

    Args:
        pixel_values: (3, S, S) packed coefficients of one image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    size, levels, grid = config.image_size, config.levels, config.grid_size
    luma = pixel_values[0].float()
    fig = Figure(figsize=(5.6, 5.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown = luma.abs().log1p()
    approx = size >> levels
    shown[:approx, :approx] = (
        (luma[:approx, :approx] - luma[:approx, :approx].min())
        / (luma[:approx, :approx].max() - luma[:approx, :approx].min() + 1e-8)
        * shown.max()
    )
    ax.imshow(shown.numpy(), cmap="gray", interpolation="nearest")
    colours = ["tab:orange", "tab:cyan", "tab:green", "tab:purple", "tab:pink"]

    def draw_grid(x0, y0, side, colour, label):
        cell = side / grid
        for i in range(grid + 1):
            ax.plot([x0 - 0.5, x0 + side - 0.5], [y0 + i * cell - 0.5] * 2, color=colour, lw=0.4)
            ax.plot([x0 + i * cell - 0.5] * 2, [y0 - 0.5, y0 + side - 0.5], color=colour, lw=0.4)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), side, side, fill=False, ec=colour, lw=1.2))
        ax.text(x0 + 2, y0 + 8, label, color=colour, fontsize=7, weight="bold")

    draw_grid(0, 0, approx, colours[0], f"stage 0: A{levels}")
    side = approx
    for stage in range(1, config.num_stages):
        level = levels - stage + 1
        colour = colours[stage % len(colours)]
        draw_grid(side, 0, side, colour, f"s{stage}: V{level}")
        draw_grid(0, side, side, colour, f"s{stage}: H{level}")
        draw_grid(side, side, side, colour, f"s{stage}: D{level}")
        side *= 2
    ax.set_axis_off()
    ax.set_title(f"Tokens per stage: one per cell ({grid}x{grid}) and subband", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


def _one_channel(pixel_values, channel: int | str) -> tuple[torch.Tensor, int]:
    """(S, S) float64 CPU coefficients of one channel of one packed image, and the channel's index."""
    packed = as_packed_tensor(pixel_values)
    if packed.ndim == 4:
        if packed.shape[0] != 1:
            raise ValueError(f"plot_subband_pyramid draws one image, got a batch of {packed.shape[0]}.")
        packed = packed[0]
    if isinstance(channel, str):
        if channel not in CHANNEL_NAMES:
            raise ValueError(f"`channel` must be 0, 1, 2 or one of {CHANNEL_NAMES}, got {channel!r}.")
        channel = CHANNEL_NAMES.index(channel)
    if channel not in (0, 1, 2):
        raise ValueError(f"`channel` must be 0, 1, 2 or one of {CHANNEL_NAMES}, got {channel!r}.")
    return packed[channel].detach().to(torch.float64).cpu(), channel


def _stretch(band: np.ndarray) -> np.ndarray:
    """Map percentiles 1-99 of `band` to [0, 1], clipped (all zeros for a constant band)."""
    low, high = np.percentile(band, [1, 99])
    return np.clip((band - low) / (high - low), 0, 1) if high > low else np.zeros_like(band)


def _pyramid_canvas(coefficients, size: int, levels: int):
    """The (S, S) picture in [0, 1] of `unpack_coefficients`' output, and the labels to draw on it as
    (text, row centre, column centre, subband side)."""
    canvas = np.zeros((size, size))
    labels = []
    n = size >> levels
    canvas[:n, :n] = _stretch(coefficients[0].numpy())
    labels.append((f"$A_{{{levels}}}$", n / 2, n / 2, n))
    for level_offset, details in enumerate(coefficients[1:]):
        level = levels - level_offset
        # ORIENTATIONS order = (horizontal, vertical, diagonal); their quadrants (row, column) in the layout.
        for name, band, (row, col) in zip(ORIENTATIONS, details, ((n, 0), (0, n), (n, n))):
            canvas[row : row + n, col : col + n] = _stretch(np.log1p(np.abs(band.numpy())))
            labels.append((f"${name[0].upper()}_{{{level}}}$", row + n / 2, col + n / 2, n))
        n *= 2
    return canvas, labels


def plot_subband_pyramid(pixel_values, levels: int, path: str | os.PathLike | None = None, channel: int | str = 0):
    """Render one channel of packed `pixel_values` as the classic wavelet pyramid picture.

    Each subband is contrast-stretched on its own (percentiles 1-99): the approximation linearly, details as
    log(1 + |c|) so that weak edges stay visible next to strong ones. Thin lines separate the subbands and each
    carries its label (A_L, then H_j, V_j, D_j).

    Args:
        pixel_values: (3, S, S) or (1, 3, S, S) packed coefficients of one image (tensor or array).
        levels: number of DWT levels L they hold.
        path: where to save a PNG, if given.
        channel: 0 / "Y", 1 / "Cb" or 2 / "Cr".

    Returns:
        `matplotlib.figure.Figure` (drawn with the Agg canvas, so no display or pyplot state is touched).
    """
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    band, channel = _one_channel(pixel_values, channel)
    size = band.shape[-1]
    canvas, labels = _pyramid_canvas(unpack_coefficients(band, levels), size, levels)

    figure = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 0.94))
    axes.imshow(canvas, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    axes.set_axis_off()
    n = size >> levels
    for _ in range(levels):
        # Pixel centres sit at integers, so subband borders are at k - 0.5.
        axes.plot([n - 0.5, n - 0.5], [-0.5, 2 * n - 0.5], color="tab:orange", linewidth=0.8)
        axes.plot([-0.5, 2 * n - 0.5], [n - 0.5, n - 0.5], color="tab:orange", linewidth=0.8)
        n *= 2
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for text, row, col, side in labels:
        axes.text(
            col,
            row,
            text,
            color="yellow",
            ha="center",
            va="center",
            fontsize=max(6.0, min(16.0, 40.0 * side / size)),
            path_effects=outline,
        )
    figure.suptitle(f"{CHANNEL_NAMES[channel]} subbands, {levels}-level DWT", y=0.985)
    if path is not None:
        figure.savefig(os.fspath(path), dpi=100)
    return figure
