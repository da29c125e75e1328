"""The architecture picture of docs/architecture.md: how an image becomes a pipeline result, and how a CLIP
teacher becomes a checkpoint, with the folder that owns each step.

`python scripts/make_figures.py` renders it into docs/figures/architecture.png.
"""

from pathlib import Path


SHIPPED_COLOUR = "#d8e8f8"  # models/waveclip/: the files a checkpoint carries as remote code
OUTSIDE_COLOUR = "#f6e6cc"  # everything else: training, conversion, hub, data, ...
NEUTRAL_COLOUR = "#eeeeee"  # inputs and outputs

# (key, x centre, y centre, colour, title, body); coordinates in a 0-17 x 0-9 box.
_INFERENCE_Y, _BUILD_Y = 6.55, 2.35
_BOXES = [
    ("image", 1.15, _INFERENCE_Y, NEUTRAL_COLOUR, "image", "PIL, array,\ntensor or path"),
    (
        "processor",
        3.55,
        _INFERENCE_Y,
        SHIPPED_COLOUR,
        "image processor",
        "RGB → YCbCr\nL-level DWT (ptwt)\npacked Mallat layout\n(B, 3, S, S)",
    ),
    (
        "tokens",
        5.95,
        _INFERENCE_Y,
        SHIPPED_COLOUR,
        "stage tokens",
        "stage 0: A_L, 1 per cell\nstage k: H, V, D of\nlevel L−k+1, 3 per cell\n+ a class token each",
    ),
    (
        "encoder",
        8.35,
        _INFERENCE_Y,
        SHIPPED_COLOUR,
        "block-causal encoder",
        "stage s sees stages ≤ s\nKV cache per stage:\na new stage reads\nonly its own tokens",
    ),
    (
        "scoring",
        10.75,
        _INFERENCE_Y,
        SHIPPED_COLOUR,
        "scoring",
        "softmax over labels of\nlogit_scale · cos(image,\ntext) after stage s",
    ),
    ("gate", 13.15, _INFERENCE_Y, SHIPPED_COLOUR, "margin gate", "top-1 − top-2 ≥ θ ?\n(θ or θ·N)"),
    ("output", 15.6, _INFERENCE_Y, NEUTRAL_COLOUR, "pipeline result", "label, score,\nstage, GFLOPs"),
    (
        "teacher",
        1.6,
        _BUILD_Y,
        OUTSIDE_COLOUR,
        "CLIP teacher",
        "any CLIPModel (Hub id\nor folder); offline: a\nsmall CLIP trained on\nthe generated benchmark",
    ),
    (
        "conversion",
        5.0,
        _BUILD_Y,
        OUTSIDE_COLOUR,
        "conversion",
        "copy text tower, blocks,\nlayernorms, projection;\nresample positions;\n"
        "fold stage 0 from the\npatch convolution",
    ),
    (
        "distillation",
        8.4,
        _BUILD_Y,
        OUTSIDE_COLOUR,
        "distillation",
        "frozen teacher; loss at\nevery stage: 1 − cos\n(+ optional zero-shot KL);\naccelerate, checkpoints",
    ),
    (
        "save",
        11.8,
        _BUILD_Y,
        OUTSIDE_COLOUR,
        "save_pretrained",
        "safetensors + config\n+ remote-code files\n+ filled-in model card",
    ),
    (
        "checkpoint",
        15.25,
        _BUILD_Y,
        NEUTRAL_COLOUR,
        "checkpoint folder",
        "AutoModel / pipeline(\n..., trust_remote_code\n=True), anywhere",
    ),
]
_FOLDERS = {
    "processor": "models/waveclip/\nimage_processing, wavelet_layout",
    "tokens": "models/waveclip/modeling\n(VisionEmbeddings)",
    "encoder": "models/waveclip/modeling\n(Encoder, refine)",
    "scoring": "models/waveclip/scoring",
    "gate": "models/waveclip/gating",
    "output": "models/waveclip/pipeline,\nflops",
    "teacher": "training/teacher,\ndata/",
    "conversion": "conversion/clip_to_waveclip",
    "distillation": "training/distillation",
    "save": "models/waveclip/modeling,\nhub/model_card",
    "checkpoint": "cli/distill writes it",
}
_BOX_WIDTH, _BOX_HEIGHT = 1.95, 1.75


def _draw_box(ax, x: float, y: float, colour: str, title: str, body: str, folder: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x - _BOX_WIDTH / 2, y - _BOX_HEIGHT / 2),
            _BOX_WIDTH,
            _BOX_HEIGHT,
            boxstyle="round,pad=0.04,rounding_size=0.12",
            fc=colour,
            ec="#555555",
            lw=0.9,
        )
    )
    ax.text(x, y + _BOX_HEIGHT / 2 - 0.2, title, ha="center", va="center", fontsize=8.6, weight="bold")
    ax.text(x, y - 0.12, body, ha="center", va="center", fontsize=6.8, linespacing=1.25)
    if folder:
        ax.text(
            x,
            y - _BOX_HEIGHT / 2 - 0.1,
            folder,
            ha="center",
            va="top",
            fontsize=6.2,
            color="#224488",
            family="monospace",
            linespacing=1.15,
        )


def _arrow(ax, start, end, text: str = "", curve: float = 0.0, text_offset=(0.0, 0.0), colour="#333333") -> None:
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops=dict(
            arrowstyle="-|>", color=colour, lw=1.1, shrinkA=1, shrinkB=1, connectionstyle=f"arc3,rad={curve}"
        ),
    )
    if text:
        ax.text(
            (start[0] + end[0]) / 2 + text_offset[0],
            (start[1] + end[1]) / 2 + text_offset[1],
            text,
            ha="center",
            va="center",
            fontsize=6.6,
            color=colour,
            style="italic",
        )


def _draw_flows(ax, centre: dict) -> None:
    half = _BOX_WIDTH / 2
    for a, b in [
        ("image", "processor"),
        ("processor", "tokens"),
        ("tokens", "encoder"),
        ("encoder", "scoring"),
        ("scoring", "gate"),
        ("teacher", "conversion"),
        ("conversion", "distillation"),
        ("distillation", "save"),
        ("save", "checkpoint"),
    ]:
        (xa, ya), (xb, yb) = centre[a], centre[b]
        _arrow(ax, (xa + half, ya), (xb - half, yb))
    (xg, yg), (xo, yo) = centre["gate"], centre["output"]
    _arrow(ax, (xg + half, yg), (xo - half, yo), "yes, or\nlast\nstage", text_offset=(0, -0.55))
    (xt, yt) = centre["tokens"]
    _arrow(
        ax,
        (xg, yg + _BOX_HEIGHT / 2),
        (xt, yt + _BOX_HEIGHT / 2),
        curve=0.22,
        colour="#b03a2e",
        text="no: the images still undecided continue with the next stage's tokens, from the cache",
        text_offset=(0, 1.02),
    )
    (xc, yc), (_, ye) = centre["checkpoint"], centre["encoder"]
    _arrow(
        ax,
        (xc, yc + _BOX_HEIGHT / 2),
        (xc, ye - _BOX_HEIGHT / 2 - 0.72),
        colour="#1f6f3f",
        text="from_pretrained\n(processor + model\n+ pipeline)",
        text_offset=(-0.95, 0.05),
    )


def plot_architecture(path) -> Path:
    """Draw the two data flows (image -> pipeline result, teacher -> checkpoint) with the folder owning each
    step, on matplotlib's Agg canvas; saves a PNG at `path` and returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    figure = Figure(figsize=(14.2, 7.6), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 17)
    ax.set_ylim(0, 9)
    ax.set_axis_off()
    centre = {}
    for key, x, y, colour, title, body in _BOXES:
        _draw_box(ax, x, y, colour, title, body, _FOLDERS.get(key, ""))
        centre[key] = (x, y)
    _draw_flows(ax, centre)
    ax.text(0.1, 8.7, "Inference: an image to a pipeline result", fontsize=11, weight="bold", va="center")
    ax.text(
        0.1, 4.5, "Building a checkpoint: a CLIP teacher to a saved WaveCLIP", fontsize=11, weight="bold", va="center"
    )
    ax.legend(
        handles=[
            Patch(fc=SHIPPED_COLOUR, ec="#555555", label="shipped with every checkpoint (models/waveclip/)"),
            Patch(fc=OUTSIDE_COLOUR, ec="#555555", label="library only (training/, conversion/, hub/, data/)"),
        ],
        loc="lower left",
        bbox_to_anchor=(0.005, 0.005),
        fontsize=7.5,
        frameon=False,
        ncol=2,
    )
    ax.text(
        16.9,
        0.2,
        "paths under src/waveclip_hf/; evaluation/, experiments/ and benchmarking/ drive both flows",
        ha="right",
        va="bottom",
        fontsize=7,
        color="#555555",
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return Path(path)


__all__ = ["plot_architecture"]
