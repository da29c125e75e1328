"""A generated zero-shot benchmark whose label axes live at different wavelet scales.

No real dataset can be downloaded on this project's machines, and a real one would not say
*which* labels need fine detail anyway. This one does, by construction (the reasoning, and
what each design choice was measured against: docs/offline_benchmark.md). Every image
(RGB, 224x224 by default) shows one large main object on a varied background with
clutter and noise, and carries four independent labels:

- ``color``   (coarse): the hue of the main object.
- ``shape``   (coarse): the main object's outline (circle, square, ...), 100-170 px.
- ``texture`` (fine):   a 2x2-periodic luminance pattern filling the object
  (1-px stripes, checkers, dots, ...). Every pattern has the same mean over each
  aligned 2x2 block, and the object's mask is drawn on the half-resolution grid, so
  the Haar level-1 approximation (the 2x2 block mean) of the image does not depend on
  the texture at all: it lives entirely in the level-1 detail bands.
- ``glyph``   (fine):   a 5x7 digit on 14x18-px grey tags near the centre of three random
  cells of the 32-px grid (the same digit on each). Each pixel of the 5x7 bitmap is an
  aligned 2x2 checker block (+a, -a / -a, +a) on the tag, so every aligned 2x2 block of
  the tag has the tag's grey as its mean: the digit is invisible in the Haar level-1
  approximation and lives entirely in the diagonal detail band.

A second layout, ``layout="three-scale"`` (448 px, `THREE_SCALE_AXES`), adds a third scale for
adaptive resolution: the scene above drawn at 224 px and upsampled 2x, plus

- ``grain``   (micro):  a 1-px print grain over the whole 448-px image (row, column, checker, dot or mesh
  grain, or none): the texture's 2x2-periodic patterns one octave finer, added to every aligned 2x2 block
  at the amplitude it has room for without clipping. Every aligned 2x2 block keeps its mean, so the grain is invisible
  at 224 px and lives only in the level-1 detail bands of the 448-px image. Texture and glyph, drawn at
  224 px, then live in the level-2 detail bands, and colour and shape in the level-2 approximation (see
  `render_three_scale_image`).

Images are written in the `datasets` imagefolder layout::

    <root>/info.json
    <root>/{train,validation,test}/metadata.jsonl   # file_name, caption, color, shape, texture, glyph
    <root>/{train,validation,test}/00000.png ...

so ``datasets.load_dataset("imagefolder", data_dir=root)`` reads it offline. Each image
is drawn from its own seed ``(seed, split, index)``: the result does not depend on the
number of workers or on chunking.
"""

import json
import math
import multiprocessing
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..models.waveclip.folder_io import publish


# Bump whenever a change alters the pixels or the metadata: it invalidates caches.
GENERATOR_VERSION = 5
# The generator's name in info.json: the module path it had when version 5 was made. It is an identifier, not an
# import path: info.json enters the key of every cache built on a benchmark (the teacher, its pixel cache), so
# following the module when it moves would regenerate every benchmark and retrain every teacher.
GENERATOR_NAME = "waveclip_hf.benchmarks.synthetic"

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class LabelAxis:
    """One label axis of the benchmark.

    Attributes:
        name: the metadata column, e.g. ``"texture"``.
        class_names: the labels, in class-id order; each is a phrase that reads inside
            ``template`` and inside captions.
        template: the zero-shot prompt, with ``{}`` for the class name.
        scale: ``"coarse"`` (visible at half resolution) or ``"fine"`` (needs full resolution); in the
            three-scale layout (`THREE_SCALE_AXES`, 448 px) ``"coarse"`` is visible at quarter resolution,
            ``"fine"`` at half resolution but not at quarter, and ``"micro"`` only at full resolution.
    """

    name: str
    class_names: tuple[str, ...]
    template: str
    scale: str

    def prompts(self) -> list[str]:
        """The zero-shot prompt of every class, in class-id order ("a" -> "an" before a vowel)."""
        return [_fix_articles(self.template.format(name)) for name in self.class_names]


# RGB of each hue. Channels stay in [55, 200] so the texture (up to +-52 around the
# base) is never clipped, which would shift a 2x2 block mean and leak texture into the
# coarse band.
COLORS = {
    "red": (200, 55, 55),
    "orange": (200, 125, 55),
    "yellow": (195, 190, 55),
    "green": (60, 165, 60),
    "cyan": (60, 185, 195),
    "blue": (60, 85, 200),
    "purple": (135, 60, 195),
    "pink": (200, 95, 160),
}

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")

# 2x2 tiles (rows = y, cols = x) of "ink on"/"ink off"; made zero-mean when drawn.
# Any 2x2-periodic pattern has the same mean over every aligned 2x2 block, which is why
# all of them vanish from the Haar approximation.
TEXTURE_TILES = {
    "no pattern": ((0, 0), (0, 0)),
    "horizontal stripes": ((1, 1), (0, 0)),
    "vertical stripes": ((1, 0), (1, 0)),
    "checkers": ((1, 0), (0, 1)),
    "dots": ((1, 0), (0, 0)),
    "a grid": ((1, 1), (1, 0)),
}

# 5x7 bitmaps (rows top to bottom), the classic LCD font.
GLYPH_BITMAPS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
}

# Each template is "a photo of " + the caption that names only that axis (see
# `caption_for`), so the prompts are phrases the text tower has seen in training.
GLYPH_CELL_SIZE = 32
GLYPH_PIXEL = 2  # each bitmap pixel is an aligned 2x2 zero-mean checker block
TAG_MARGIN = 2
# (width, height): the 10x14-px glyph with a 2-px margin. Tag origins are even, so the
# glyph's blocks are aligned with the Haar level-1 2x2 blocks.
TAG_SIZE = (5 * GLYPH_PIXEL + 2 * TAG_MARGIN, 7 * GLYPH_PIXEL + 2 * TAG_MARGIN)
# Tags per image, all showing the image's glyph: one tag (1 token of 49) was too rare a signal
# for a small ViT trained for minutes (docs/offline_benchmark.md).
GLYPH_COPIES = 3

AXES: dict[str, LabelAxis] = {
    "color": LabelAxis("color", tuple(COLORS), "a photo of a {} shape", "coarse"),
    "shape": LabelAxis("shape", SHAPES, "a photo of a {}", "coarse"),
    "texture": LabelAxis("texture", tuple(TEXTURE_TILES), "a photo of a shape with {}", "fine"),
    "glyph": LabelAxis("glyph", tuple(GLYPH_BITMAPS), "a photo of a shape with the glyph {}", "fine"),
}
"""Axis name -> `LabelAxis` (class names, zero-shot template, scale), for evaluation code."""


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption_for(labels: dict[str, str], axes: Sequence[str] | None = None) -> str:
    """Caption that names the labels of `axes` (default: all), e.g.
    ``"a red star with vertical stripes and the glyph 7"``.

    With a subset of axes the caption only mentions those (``["shape", "glyph"]`` ->
    ``"a star with the glyph 7"``, ``["color"]`` -> ``"a red shape"``).
    """
    axes = tuple(AXES) if axes is None else tuple(axes)
    words = ["a"]
    if "color" in axes:
        words.append(labels["color"])
    words.append(labels["shape"] if "shape" in axes else "shape")
    details = _detail_phrases(labels, axes)
    if details:
        words += ["with", details[0] if len(details) == 1 else ", ".join(details[:-1]) + " and " + details[-1]]
    return _fix_articles(" ".join(words))


def _detail_phrases(labels: dict[str, str], axes: Sequence[str]) -> list[str]:
    """The "with ..." phrases of `axes`, e.g. ``["vertical stripes", "the glyph 7", "row grain"]``."""
    phrases = []
    if "texture" in axes:
        phrases.append(labels["texture"])
    if "glyph" in axes:
        phrases.append(f"the glyph {labels['glyph']}")
    if "grain" in axes:
        phrases.append(labels["grain"])
    return phrases


def sample_caption(
    labels: dict[str, str],
    rng: np.random.Generator,
    p_full: float = 0.25,
    return_axes: bool = False,
    axes: Sequence[str] | None = None,
    single_axis: bool = False,
) -> str | tuple[str, tuple[str, ...]]:
    """A random training caption for an image: the full caption with probability
    `p_full`, else one naming a random non-empty subset of the axes (with
    `single_axis=True`: exactly one axis, uniformly); half of the time prefixed with
    "a photo of ".

    Varied captions teach the text tower what each word means on its own, which is
    what single-axis zero-shot prompts rely on. They also keep the contrastive task
    from being solved by the easy axes alone: in a batch of full captions, colour and
    texture already tell most pairs apart, and shape and glyph get little gradient.

    `axes` are the benchmark's axes (default `AXES`; `THREE_SCALE_AXES` for the 448-px layout).

    Returns:
        The caption, or `(caption, axes it names)` with `return_axes=True` (a caption
        that does not name an axis is true of every value of that axis).
    """
    candidates = tuple(AXES) if axes is None else tuple(axes)
    if rng.random() < p_full:
        axes = candidates
    elif single_axis:
        axes = (candidates[rng.integers(len(candidates))],)
    else:
        keep = rng.random(len(candidates)) < 0.5
        if not keep.any():
            keep[rng.integers(len(candidates))] = True
        axes = tuple(axis for axis, k in zip(candidates, keep) if k)
    caption = caption_for(labels, axes)
    if rng.random() < 0.5:
        caption = _fix_articles("a photo of " + caption)
    return (caption, axes) if return_axes else caption


# --------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class ImageParams:
    """Everything that defines one image; `render_image(params)` is a pure function of it.

    Labels are class names (see `AXES`). Geometry is in pixels of the full image.
    """

    color: str
    shape: str
    texture: str
    glyph: str
    center: tuple[float, float]  # (x, y) of the main object
    radius: float
    angle: float  # radians
    color_jitter: tuple[int, int, int]
    texture_amplitude: float  # peak-to-peak, in 0..255 units
    background: tuple[tuple[int, int, int], tuple[int, int, int], float]  # two colours, gradient angle
    clutter: tuple[tuple[str, str, float, float, float, float], ...]  # (shape, color, x, y, radius, angle)
    tag_origins: tuple[tuple[int, int], ...]  # top-left (x, y) of each glyph tag (all show the same glyph)
    tag_shade: tuple[int, int]  # (tag grey, checker amplitude a of the glyph's 2x2 blocks)
    noise_sigma: float
    noise_seed: int


def _sample_labels(rng: np.random.Generator) -> tuple[str, str, str, str]:
    """(color, shape, texture, glyph), each uniform over its axis, independent."""
    return (
        str(rng.choice(list(COLORS))),
        str(rng.choice(SHAPES)),
        str(rng.choice(list(TEXTURE_TILES))),
        str(rng.choice(list(GLYPH_BITMAPS))),
    )


def _sample_placement(rng: np.random.Generator, s: int, object_radius: tuple[float, float]):
    """(radius, (x, y) centre) of the main object, which stays fully inside the image.

    The object spans 3-5 cells of 32 px: small objects leave `shape` too hard for a small ViT trained for
    minutes (colour and texture are read from any single cell, shape is not; docs/offline_benchmark.md).
    """
    radius = rng.uniform(*object_radius) * s
    margin = radius + 2
    center = (rng.uniform(margin, s - margin), rng.uniform(margin, s - margin))
    return float(radius), (float(center[0]), float(center[1]))


def _sample_clutter(rng: np.random.Generator, s: int, color: str, num_clutter: tuple[int, int]):
    """Distractor shapes in other colours than the object's: (shape, color, x, y, radius, angle) each."""
    other_colors = [c for c in COLORS if c != color]
    return tuple(
        (
            str(rng.choice(SHAPES)),
            str(rng.choice(other_colors)),
            float(rng.uniform(0, s)),
            float(rng.uniform(0, s)),
            float(rng.uniform(0.025, 0.055) * s),
            float(rng.uniform(0, 2 * math.pi)),
        )
        for _ in range(int(rng.integers(num_clutter[0], num_clutter[1] + 1)))
    )


def _sample_tag_origins(rng: np.random.Generator, s: int, glyph_copies: int) -> tuple[tuple[int, int], ...]:
    """Top-left corners of the glyph tags, centred in distinct random cells of the 32-px grid.

    Centred in a cell (the teacher's patches, WaveCLIP's cells), a tag is read by one token; anywhere (or even
    +-2 px) would ask a small model to learn every glyph at every sub-cell offset. Origins are even, so the
    glyph's 2x2 blocks align with the Haar level-1 blocks.
    """
    cell = GLYPH_CELL_SIZE
    cells = rng.choice((s // cell) ** 2, size=glyph_copies, replace=False)
    return tuple(
        (
            int(c % (s // cell)) * cell + ((cell - TAG_SIZE[0]) // 2 & ~1),
            int(c // (s // cell)) * cell + ((cell - TAG_SIZE[1]) // 2 & ~1),
        )
        for c in cells
    )


def _sample_background_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A greyish colour of random brightness, so that the object's hue stands out."""
    grey = rng.uniform(40, 215)
    tint = rng.uniform(-25, 25, size=3)
    return tuple(int(v) for v in np.clip(grey + tint, 0, 255))


def sample_image_params(
    rng: np.random.Generator,
    image_size: int = 224,
    glyph_copies: int = GLYPH_COPIES,
    num_clutter: tuple[int, int] = (2, 5),
    object_radius: tuple[float, float] = (0.22, 0.38),
) -> ImageParams:
    """Draw the labels (independently, uniformly) and all nuisance factors of one image.

    `glyph_copies` tags show the glyph in distinct cells; `num_clutter` is the inclusive
    range of the number of distractor shapes; `object_radius` the range of the main
    object's circumradius, as a fraction of the image side. The order of the draws is part
    of the benchmark (`GENERATOR_VERSION`): keep it.
    """
    s = image_size
    color, shape, texture, glyph = _sample_labels(rng)
    radius, center = _sample_placement(rng, s, object_radius)
    clutter = _sample_clutter(rng, s, color, num_clutter)
    tag_origins = _sample_tag_origins(rng, s, glyph_copies)
    # Upright shapes, slightly tilted: a full rotation only makes `shape` slower to learn and adds nothing to
    # the coarse/fine question (docs/offline_benchmark.md).
    angle = float(rng.uniform(-math.pi / 12, math.pi / 12))
    color_jitter = tuple(int(v) for v in rng.integers(-5, 6, size=3))
    texture_amplitude = float(rng.uniform(45, 70))
    background = (_sample_background_color(rng), _sample_background_color(rng), float(rng.uniform(0, 2 * math.pi)))
    # grey +- a stays within [20, 240]: no clipping, which would shift a block mean.
    tag_shade = (int(rng.integers(110, 151)), int(rng.integers(60, 91)))
    noise_sigma = float(rng.uniform(1.0, 5.0))
    noise_seed = int(rng.integers(0, 2**31 - 1))
    return ImageParams(
        color=color,
        shape=shape,
        texture=texture,
        glyph=glyph,
        center=center,
        radius=radius,
        angle=angle,
        color_jitter=color_jitter,
        texture_amplitude=texture_amplitude,
        background=background,
        clutter=clutter,
        tag_origins=tag_origins,
        tag_shade=tag_shade,
        noise_sigma=noise_sigma,
        noise_seed=noise_seed,
    )


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ~r (square, triangle, star, cross)."""
    if shape == "square":
        radii, angles = [r] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif shape == "triangle":
        radii, angles = [r] * 3, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    elif shape == "star":
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    elif shape == "cross":
        a, b = r, r * 0.36  # arm half-length, arm half-width
        corners = [
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
            (-b, -a),
        ]
        radii = [math.hypot(x, y) for x, y in corners]
        angles = [math.atan2(y, x) for x, y in corners]
    else:
        raise ValueError(f"{shape!r} is not a polygonal shape")
    return [(cx + q * math.cos(t + angle), cy + q * math.sin(t + angle)) for q, t in zip(radii, angles)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        # Width 0.45 r: wide enough to show a texture, hollow enough to differ from a circle.
        # An outline, not a filled disc with a hole punched, so it never erases what lies below.
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.45 * r)))
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=fill)


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Binary (size, size) bool mask of one shape; coordinates in pixels of that grid."""
    canvas = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r, angle, fill=255)
    return np.asarray(canvas) > 127


def texture_pattern(texture: str, size: int, amplitude: float) -> np.ndarray:
    """(size, size) float32 zero-mean luminance pattern, tiled from a 2x2 tile.

    Peak-to-peak is `amplitude`; every aligned 2x2 block sums to exactly 0.
    """
    tile = np.asarray(TEXTURE_TILES[texture], dtype=np.float32)
    tile = (tile - tile.mean()) * amplitude
    reps = (size + 1) // 2
    return np.tile(tile, (reps, reps))[:size, :size]


_NOISE_BANK_SIZE = 1024
_noise_bank: np.ndarray | None = None


def _noise_crop(noise_seed: int, size: int) -> np.ndarray:
    """(size, size, 3) unit Gaussian noise: a seeded crop of a fixed noise bank.

    Fresh Gaussian noise per image was the slowest step of rendering; a random crop of one
    fixed 1024x1024 field is as good for a nuisance factor and much cheaper
    (docs/offline_benchmark.md).
    """
    global _noise_bank
    if _noise_bank is None:
        _noise_bank = np.random.default_rng(20240917).standard_normal((_NOISE_BANK_SIZE,) * 2 + (3,), dtype=np.float32)
    if size > _NOISE_BANK_SIZE:
        return np.random.default_rng(noise_seed).standard_normal((size, size, 3), dtype=np.float32)
    x, y = np.random.default_rng(noise_seed).integers(0, _NOISE_BANK_SIZE - size + 1, size=2)
    return _noise_bank[y : y + size, x : x + size]


def render_image(params: ImageParams, image_size: int = 224) -> np.ndarray:
    """Draw one image; returns (image_size, image_size, 3) uint8 RGB. `image_size` must be even."""
    if image_size % 2:
        raise ValueError(f"image_size must be even (the benchmark is built around 2x2 blocks), got {image_size}")
    s = image_size

    # Background: a linear gradient between two greyish colours.
    c0, c1, theta = params.background
    c0, c1 = np.asarray(c0, np.float32), np.asarray(c1, np.float32)
    coords = np.linspace(-0.5, 0.5, s, dtype=np.float32) / math.sqrt(2)
    t = (coords[None, :] * math.cos(theta) + coords[:, None] * math.sin(theta)) + 0.5  # (y, x), in [0, 1]
    image = c0 + t[..., None] * (c1 - c0)

    # Clutter: small plain shapes in other colours, behind the main object.
    # Drawn on one RGB layer + one coverage mask, then composited once (faster than a
    # numpy mask per shape).
    layer, coverage = Image.new("RGB", (s, s)), Image.new("L", (s, s), 0)
    draw_layer, draw_coverage = ImageDraw.Draw(layer), ImageDraw.Draw(coverage)
    for shape, color, x, y, r, angle in params.clutter:
        _draw_shape(draw_layer, shape, x, y, r, angle, fill=COLORS[color])
        _draw_shape(draw_coverage, shape, x, y, r, angle, fill=255)
    image = np.where(np.asarray(coverage)[..., None] > 127, np.asarray(layer, dtype=np.float32), image)

    # Main object. The mask is drawn on the half-resolution grid and upsampled 2x, so
    # every aligned 2x2 block is entirely inside or outside it; together with the
    # zero-mean 2x2 texture this makes the 2x2 block means texture-independent.
    half = shape_mask(
        params.shape, s // 2, params.center[0] / 2, params.center[1] / 2, params.radius / 2, params.angle
    )
    mask = half.repeat(2, axis=0).repeat(2, axis=1)
    base = np.asarray(COLORS[params.color], np.float32) + np.asarray(params.color_jitter, np.float32)
    pattern = texture_pattern(params.texture, s, params.texture_amplitude)
    image[mask] = base + pattern[mask][:, None]

    # Glyph: zero-mean 2x2 checker blocks on a grey tag, on top of everything.
    grey, amplitude = params.tag_shade
    bitmap = np.asarray([[c == "1" for c in row] for row in GLYPH_BITMAPS[params.glyph]], np.float32)
    checker = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
    glyph = amplitude * np.kron(bitmap, checker)  # (14, 10), every aligned 2x2 block sums to 0
    for tx, ty in params.tag_origins:
        image[ty : ty + TAG_SIZE[1], tx : tx + TAG_SIZE[0]] = grey
        m = TAG_MARGIN
        image[ty + m : ty + m + glyph.shape[0], tx + m : tx + m + glyph.shape[1]] += glyph[:, :, None]

    image += params.noise_sigma * _noise_crop(params.noise_seed, s)
    return np.clip(np.rint(image, out=image), 0, 255, out=image).astype(np.uint8)


def labels_of(params: ImageParams) -> dict[str, str]:
    """Axis name -> class name of an image."""
    return {axis: getattr(params, axis) for axis in AXES}


def labels_of_row(row: dict, axes: Sequence[str] | None = None) -> dict[str, str]:
    """Axis name -> class name, from a metadata (or `datasets`) row; `axes` default to `AXES`."""
    return {axis: row[axis] for axis in (AXES if axes is None else axes)}


def image_params(seed: int, split: str, index: int, image_size: int = 224) -> ImageParams:
    """The parameters of image `index` of `split`: a pure function of (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    return sample_image_params(rng, image_size)


# ------------------------------------------------------------------ three scales (448 px)
#
# The 448-px layout adds a third scale. Its image is the two-scale scene rendered at half resolution (224 px)
# and upsampled 2x (each scene pixel becomes a 2x2 block), plus detail that exists only at full resolution:
# full-resolution noise and a 1-px print grain (a zero-mean 2x2 tile, as the texture's tiles, added to the
# aligned 2x2 blocks, `add_grain`). So
# - every aligned 2x2 block mean (the Haar level-1 approximation) is the scene pixel plus noise whatever the
#   grain: the grain is invisible at 224 px and lives in the level-1 detail bands (the "micro" scale);
# - every aligned 4x4 block mean (the level-2 approximation) is a 2x2 block mean of the scene, which the
#   scene's texture and glyph do not change: they live in the level-2 detail bands (the "fine" scale);
# - colour and shape survive both averages (the "coarse" scale).
#
# The first micro axis was a 5x7 letter in 2x2 checker blocks on three small tags (0.2% of the image's area).
# A 448-px teacher grown from the 224-px one did not learn it within the preset's budget (at chance after 368
# steps, docs/adaptive_resolution.md); the grain carries the same kind of evidence (a pattern only the level-1
# detail bands hold) over the whole image, as the texture does over the object one octave coarser.

LAYOUTS = ("two-scale", "three-scale")
DEFAULT_IMAGE_SIZE = {"two-scale": 224, "three-scale": 448}
# Bump whenever a change alters the three-scale layout's pixels or metadata (the two-scale layout has
# GENERATOR_VERSION); written into its info.json, so it invalidates caches.
THREE_SCALE_VERSION = 2

# 2x2 tiles of the micro axis: the texture's tiles, in `TEXTURE_TILES` order, under names of their own, so that no
# word is shared with the texture axis (made zero-mean when drawn).
GRAIN_TILES = dict(
    zip(
        ("plain grain", "row grain", "column grain", "checker grain", "dot grain", "mesh grain"),
        TEXTURE_TILES.values(),
    )
)
# Peak-to-peak amplitudes, multiples of 4: every zero-mean tile value (a multiple of a / 4) is then an integer, so
# adding the grain commutes with rounding to uint8 and every 2x2 block mean stays exactly what it was.
GRAIN_AMPLITUDES = (32, 36, 40, 44, 48)

THREE_SCALE_AXES: dict[str, LabelAxis] = {
    **AXES,
    "grain": LabelAxis("grain", tuple(GRAIN_TILES), "a photo of a shape with {}", "micro"),
}
"""The three-scale layout's axes: `AXES` (colour and shape coarse, texture and glyph fine) plus the micro
``grain``. A superset of `AXES`, so it also serves to look up any axis by name."""

# Nuisance settings of the three-scale layout's half-resolution scene: `sample_image_params` keywords, plus
# `center_jitter` (the main object's centre is the image centre + uniform(-j, j) x side per coordinate; None:
# anywhere it fits, as in the two-scale layout).
THREE_SCALE_SCENE: dict = {}


@dataclass(frozen=True)
class ThreeScaleParams:
    """Everything that defines one three-scale image; `render_three_scale_image(params)` is a pure function of it.

    `scene` is a two-scale image at half resolution (its geometry in half-resolution pixels); the rest is in
    full-resolution pixels.
    """

    scene: ImageParams
    grain: str
    grain_amplitude: int  # peak-to-peak, a multiple of 4
    noise_sigma: float
    noise_seed: int


def sample_three_scale_params(rng: np.random.Generator, image_size: int = 448, **scene_kwargs) -> ThreeScaleParams:
    """Draw a half-resolution scene (`sample_image_params` with `THREE_SCALE_SCENE`, overridden by
    `scene_kwargs`) and the micro detail of one `image_size` image: the grain (uniform) and its amplitude."""
    settings = {**THREE_SCALE_SCENE, **scene_kwargs}
    center_jitter = settings.pop("center_jitter", None)
    scene = sample_image_params(rng, image_size // 2, **settings)
    if center_jitter is not None:
        scene = _recentred(scene, rng, image_size // 2, center_jitter)
    return ThreeScaleParams(
        scene=scene,
        grain=str(rng.choice(list(GRAIN_TILES))),
        grain_amplitude=int(rng.choice(GRAIN_AMPLITUDES)),
        noise_sigma=float(rng.uniform(1.0, 3.0)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _recentred(scene: ImageParams, rng: np.random.Generator, size: int, jitter: float) -> ImageParams:
    """`scene` with its main object moved to the centre of the (size x size) image, +- `jitter` x size."""
    offset = rng.uniform(-jitter, jitter, size=2) * size
    return replace(scene, center=(float(size / 2 + offset[0]), float(size / 2 + offset[1])))


def add_grain(image: np.ndarray, grain: str, amplitude: int) -> None:
    """Add the 2x2-periodic `grain` tile (zero-mean, peak-to-peak `amplitude`, a multiple of 4) in place to every
    aligned 2x2 block of the (H, W, 3) float32 `image`, at the largest multiple of 4 up to `amplitude` that the
    block's values leave room for within [0, 255] (0 in a block at 0 or 255).

    Each block's amplitude depends on the image and `amplitude`, never on the grain's class, every added value is
    an integer, and no value leaves [0, 255]: on an integer-valued `image`, every 2x2 block mean is the same for
    all six grains, exactly.
    """
    tile = np.asarray(GRAIN_TILES[grain], np.float32)
    tile = tile - tile.mean()  # peak-to-peak 1, values in quarters: times a multiple of 4, integers
    h, w = image.shape[:2]
    blocks = image.reshape(h // 2, 2, w // 2, 2, 3)
    room = np.minimum(blocks.min(axis=(1, 3, 4)), 255 - blocks.max(axis=(1, 3, 4)))  # (H/2, W/2)
    # The largest |tile value| of any grain is 3/4 of its peak-to-peak amplitude.
    quarters = np.clip(np.floor(room / 3), 0, amplitude // 4)  # amplitude / 4 of each block
    quarters = quarters.repeat(2, axis=0).repeat(2, axis=1)
    image += (4 * quarters * np.tile(tile, (h // 2, w // 2)))[:, :, None]


def render_three_scale_image(params: ThreeScaleParams, image_size: int = 448) -> np.ndarray:
    """Draw one three-scale image; returns (image_size, image_size, 3) uint8 RGB (see the section comment)."""
    scene = render_image(params.scene, image_size // 2)
    image = scene.repeat(2, axis=0).repeat(2, axis=1).astype(np.float32)
    image += params.noise_sigma * _noise_crop(params.noise_seed, image_size)
    # Round before the grain: adding integers to integers is exact in float32, so the block means stay exact.
    image = np.clip(np.rint(image, out=image), 0, 255, out=image)
    add_grain(image, params.grain, params.grain_amplitude)
    return image.astype(np.uint8)


def three_scale_labels_of(params: ThreeScaleParams) -> dict[str, str]:
    """Axis name -> class name of a three-scale image, in `THREE_SCALE_AXES` order."""
    return {**labels_of(params.scene), "grain": params.grain}


def three_scale_image_params(seed: int, split: str, index: int, image_size: int = 448) -> ThreeScaleParams:
    """The parameters of three-scale image `index` of `split`: a pure function of (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index, image_size])
    return sample_three_scale_params(rng, image_size)


def render_benchmark_image(
    layout: str, seed: int, split: str, index: int, image_size: int
) -> tuple[np.ndarray, dict[str, str]]:
    """Image `index` of `split` in `layout` ("two-scale" or "three-scale"): (S, S, 3) uint8 RGB and its labels."""
    if layout == "three-scale":
        params = three_scale_image_params(seed, split, index, image_size)
        return render_three_scale_image(params, image_size), three_scale_labels_of(params)
    params = image_params(seed, split, index, image_size)
    return render_image(params, image_size), labels_of(params)


def layout_axes(layout: str) -> dict[str, LabelAxis]:
    """The label axes of a layout."""
    return THREE_SCALE_AXES if layout == "three-scale" else AXES


def benchmark_axes(info: dict | None) -> dict[str, LabelAxis]:
    """The label axes a generated benchmark's `info.json` records (`AXES` when `info` is None)."""
    if info is None:
        return dict(AXES)
    return {
        name: LabelAxis(**{**axis, "class_names": tuple(axis["class_names"])}) for name, axis in info["axes"].items()
    }


def _check_layout(layout: str, image_size: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown benchmark layout {layout!r}: use one of {LAYOUTS}.")
    if layout == "three-scale" and image_size % (2 * GLYPH_CELL_SIZE):
        raise ValueError(
            f"The three-scale layout draws its scene at half resolution on a {GLYPH_CELL_SIZE}-px grid: image_size "
            f"must be a multiple of {2 * GLYPH_CELL_SIZE}, got {image_size} (use 448)."
        )


# ------------------------------------------------------------------------- writing


def _write_chunk(job: tuple[str, int, str, int, int, int, str]) -> list[dict]:
    """Worker: render and save images [start, stop) of one split; returns their metadata rows."""
    folder, seed, split, start, stop, image_size, layout = job
    rows = []
    for index in range(start, stop):
        image, labels = render_benchmark_image(layout, seed, split, index, image_size)
        file_name = f"{index:05d}.png"
        # compress_level=1: PNG encoding dominates generation time; a little larger files for much less time.
        Image.fromarray(image).save(os.path.join(folder, file_name), compress_level=1)
        rows.append({"file_name": file_name, "caption": caption_for(labels, tuple(labels)), **labels})
    return rows


def _benchmark_info(seed: int, counts: dict[str, int], image_size: int, layout: str = "two-scale") -> dict:
    # Round-tripped through JSON (tuples -> lists) so it compares equal to info.json read back.
    info = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_images": counts,
        "axes": {name: asdict(axis) for name, axis in layout_axes(layout).items()},
    }
    if layout != "two-scale":  # the two-scale info stays as it was, so existing caches stay valid
        info.update(layout=layout, layout_version=THREE_SCALE_VERSION, scene=THREE_SCALE_SCENE)
    return json.loads(json.dumps(info))


def read_benchmark_info(root: str | os.PathLike) -> dict | None:
    """The `info.json` of a generated benchmark, or None if `root` holds none."""
    path = Path(root) / "info.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _remove_stale_temporaries(root: Path) -> None:
    """Delete temporary folders left by killed runs (their process no longer exists)."""
    for path in root.parent.glob(f".{root.name}.*-*"):
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours, or a live process of another user


def generate_benchmark(
    root: str | os.PathLike,
    num_train: int = 30_000,
    num_validation: int = 2_000,
    num_test: int = 5_000,
    seed: int = 0,
    image_size: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    layout: str = "two-scale",
) -> Path:
    """Generate the benchmark under `root` (or reuse it) and return `root`.

    Idempotent: if `root` already holds a benchmark with the same seed, counts, image
    size and generator version (its `info.json`), nothing is done. Generation writes to
    a temporary sibling folder that is renamed onto `root` only once complete, so an
    interrupted run never leaves a half-written benchmark behind. A different benchmark
    at `root` (with an `info.json`) is replaced; any other non-empty folder is refused.

    Args:
        root: output folder; `datasets.load_dataset("imagefolder", data_dir=root)` reads it.
        num_train, num_validation, num_test: images per split.
        seed: the seed of the whole benchmark; image i of a split depends only on (seed, split, i).
        image_size: side of the square images, even (default: 224 for "two-scale", 448 for "three-scale").
        num_workers: processes that render and encode PNGs (1 = in this process).
        progress: show a tqdm progress bar.
        layout: "two-scale" (coarse and fine axes, `AXES`) or "three-scale" (plus the micro axis,
            `THREE_SCALE_AXES`; see `render_three_scale_image`).

    Returns:
        `Path(root)`.
    """
    root = Path(root)
    image_size = DEFAULT_IMAGE_SIZE.get(layout, 224) if image_size is None else image_size
    _check_layout(layout, image_size)
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    info = _benchmark_info(seed, counts, image_size, layout)
    existing = read_benchmark_info(root)
    if existing == info:
        return root
    if root.exists() and existing is None and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists, is not empty and holds no benchmark info.json; refusing to overwrite it"
        )

    _remove_stale_temporaries(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        jobs = _render_jobs(tmp, counts, seed, image_size, layout)
        rows = _run_render_jobs(jobs, counts, f"generating {root.name}", num_workers, progress)
        _write_metadata(tmp, rows, info)
        _move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _render_jobs(
    folder: Path, counts: dict[str, int], seed: int, image_size: int, layout: str, chunk: int = 250
) -> list[tuple]:
    """Create `<folder>/<split>/` and cut every split into `_write_chunk` jobs of `chunk` images."""
    jobs = []
    for split, count in counts.items():
        (folder / split).mkdir(parents=True)
        jobs += [
            (str(folder / split), seed, split, a, min(a + chunk, count), image_size, layout)
            for a in range(0, count, chunk)
        ]
    return jobs


def _run_render_jobs(
    jobs: list[tuple], counts: dict[str, int], desc: str, num_workers: int, progress: bool
) -> dict[str, list[dict]]:
    """Run the jobs (in `num_workers` processes if > 1); returns the metadata rows of every split, in order."""
    rows: dict[str, list[dict]] = {split: [] for split in counts}
    with tqdm(total=sum(counts.values()), desc=desc, unit="img", disable=not progress) as bar:
        if num_workers > 1:
            # fork: workers only need numpy and PIL, and re-importing transformers in
            # each spawned worker would cost seconds.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(num_workers) as pool:
                for job, chunk_rows in zip(jobs, pool.imap(_write_chunk, jobs)):
                    rows[job[2]] += chunk_rows
                    bar.update(len(chunk_rows))
        else:
            for job in jobs:
                chunk_rows = _write_chunk(job)
                rows[job[2]] += chunk_rows
                bar.update(len(chunk_rows))
    return rows


def _write_metadata(folder: Path, rows: dict[str, list[dict]], info: dict) -> None:
    """`<split>/metadata.jsonl` (one JSON row per image) and `info.json` (written last: it marks completion)."""
    for split, split_rows in rows.items():
        with open(folder / split / "metadata.jsonl", "w") as f:
            for row in split_rows:
                f.write(json.dumps(row) + "\n")
    (folder / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def _move_into_place(tmp: Path, root: Path) -> None:
    """Rename the finished `tmp` onto `root`; an outdated benchmark at `root` is moved away first, then deleted."""
    publish(tmp, root)


def load_benchmark_split(root: str | os.PathLike, split: str) -> list[dict]:
    """The metadata rows of one split (file_name, caption and one column per axis), in file order."""
    with open(Path(root) / split / "metadata.jsonl") as f:
        return [json.loads(line) for line in f]


def label_ids(rows: Sequence[dict], axis: str) -> np.ndarray:
    """(N,) int64 class ids of `axis` (of either layout) for metadata rows (or dataset rows) with class-name
    columns."""
    index = {name: i for i, name in enumerate(THREE_SCALE_AXES[axis].class_names)}
    return np.asarray([index[row[axis]] for row in rows], dtype=np.int64)


__all__ = [
    "AXES",
    "GRAIN_TILES",
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "ImageParams",
    "LAYOUTS",
    "LabelAxis",
    "THREE_SCALE_AXES",
    "ThreeScaleParams",
    "add_grain",
    "benchmark_axes",
    "caption_for",
    "generate_benchmark",
    "image_params",
    "label_ids",
    "labels_of",
    "labels_of_row",
    "layout_axes",
    "load_benchmark_split",
    "read_benchmark_info",
    "render_benchmark_image",
    "render_three_scale_image",
    "sample_caption",
    "render_image",
    "sample_image_params",
    "sample_three_scale_params",
    "texture_pattern",
    "three_scale_image_params",
    "three_scale_labels_of",
]
