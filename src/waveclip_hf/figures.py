"""Pictures for the docs: the subband pyramid of a real photo, the token layout and the block-causal mask.

`python scripts/make_figures.py` renders them into docs/figures/.
"""

from pathlib import Path

import torch

from .configuration_waveclip import WaveCLIPVisionConfig
from .modeling_waveclip import block_causal_mask, token_stage_ids


def plot_attention_mask(config: WaveCLIPVisionConfig, path, title: str | None = None):
    """The full-forward attention mask (query token x key token) with stage blocks labelled.

    White = may attend, dark = masked. Row blocks are query stages, column blocks key stages; the lower
    block triangle shows that stage s sees stages <= s, and the caption gives the token counts per stage.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = token_stage_ids(config, 0, config.num_stages)
    mask = block_causal_mask(stages, stages, torch.float32)
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
    ax.set_title(title or f"Block-causal attention, {config.image_size}px, cell {config.cell_size}, L={config.levels}\n"
                 f"tokens per stage: {counts} = {sum(lengths)}", fontsize=9)
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
    shown[:approx, :approx] = (luma[:approx, :approx] - luma[:approx, :approx].min()) / (
        luma[:approx, :approx].max() - luma[:approx, :approx].min() + 1e-8
    ) * shown.max()
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
