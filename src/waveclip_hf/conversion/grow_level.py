"""Grow a level: a WaveCLIP student at twice the resolution, with one more DWT level, from a trained student.

A student at S px, L levels and cells of C px (e.g. 224 / 1 / 32) becomes one at 2S px, L + 1 levels and cells of
2C px (448 / 2 / 64). The grid of cells is the same, and so is every old stage's input up to a constant: for an
image x at 2S px and its 2x2 block mean y at S px (the S-px image), the orthonormal Haar DWT gives

    A_1(x) = 2 y,   so   DWT_{L+1}(x) = [A_1(x)'s L-level DWT, level-1 details of x] = [2 DWT_L(y), details of x]

(the colour transform and normalisation are per pixel and affine, so they commute with the block mean). Stage k of
the grown model (k <= L) therefore reads exactly twice what stage k of the source reads from y, in subbands of the
same size, cut into the same cells, with the same patch size. So the grown model takes:

- unchanged: the text side, logit scale, visual projection, the transformer (pre-layernorm, blocks,
  post-layernorm), the cell position embeddings, the class tokens and band embeddings of stages 0..L;
- halved: the patch projections of stages 0..L (weights / 2, biases unchanged), undoing the Haar gain of 2, so
  every token of stages 0..L equals the source's on the S-px image;
- new: stage L + 1, the level-1 details of the 2S-px image: its patch projection and its three band embeddings are
  initialised like `convert_clip_to_waveclip`'s fresh parameters; its class token starts as a copy of stage L's.

Attention is block-causal, so stages 0..L never see stage L + 1: after growing, the grown model's answers after
stages 0..L on x equal the source's on y up to float rounding, and training only the new stage's parameters
(`freeze_all_but_last_stage`) keeps them so.
"""

from collections.abc import Callable

import pywt
import torch

from ..models.waveclip.configuration_waveclip import WaveCLIPConfig
from ..models.waveclip.modeling_waveclip import WaveCLIPModel


PATCH_PREFIX = "vision_model.embeddings.patch_embeddings"
CLASS_EMBEDDING = "vision_model.embeddings.class_embedding"
BAND_EMBEDDING = "vision_model.embeddings.band_embedding.weight"


def haar_level_gain(wavelet: str) -> float:
    """Factor between a level's approximation and the 2x2 block mean of its input: (sum of the low-pass taps)^2,
    2 for the orthonormal two-tap wavelets the processor accepts."""
    return float(sum(pywt.Wavelet(wavelet).dec_lo)) ** 2


def grown_config(config: WaveCLIPConfig) -> WaveCLIPConfig:
    """The config of the grown model: twice the image size and cell size, one more level, all else the same."""
    vision = config.vision_config
    vision_dict = {
        **vision.to_dict(),
        "image_size": 2 * vision.image_size,
        "cell_size": 2 * vision.cell_size,
        "levels": vision.levels + 1,
    }
    return WaveCLIPConfig(
        text_config=config.text_config.to_dict(),
        vision_config=vision_dict,
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )


def new_stage_rows(config: WaveCLIPConfig) -> dict[str, slice]:
    """Parameter name -> the rows of it that belong to the last stage (`slice(None)`: the whole tensor).

    These are the only parameters a grown model trains: the last stage's patch projection, its class token (a
    row of the stacked class tokens) and its three band embeddings (rows of the band table).
    """
    levels = config.vision_config.levels
    return {
        f"{PATCH_PREFIX}.{levels}.weight": slice(None),
        f"{PATCH_PREFIX}.{levels}.bias": slice(None),
        CLASS_EMBEDDING: slice(levels, levels + 1),
        BAND_EMBEDDING: slice(1 + 3 * (levels - 1), 1 + 3 * levels),
    }


@torch.no_grad()
def grow_level(source: WaveCLIPModel) -> WaveCLIPModel:
    """A WaveCLIP with one more level at twice the resolution, whose stages 0..L are `source`'s (module docstring).

    Args:
        source: a trained `WaveCLIPModel` (e.g. 224 px, L = 1, cell 32).

    Returns:
        A `WaveCLIPModel` (e.g. 448 px, L = 2, cell 64) in `source`'s dtype and on its device; stage L + 1's
        parameters are listed by `new_stage_rows`.
    """
    if not isinstance(source, WaveCLIPModel):
        raise TypeError(f"`grow_level` needs a WaveCLIPModel, got {type(source).__name__}.")
    levels = source.config.vision_config.levels
    gain = haar_level_gain(source.config.vision_config.wavelet)
    grown = WaveCLIPModel(grown_config(source.config)).to(
        device=source.logit_scale.device, dtype=source.logit_scale.dtype
    )
    source_state = source.state_dict()
    for name, tensor in grown.state_dict().items():
        if name.startswith(f"{PATCH_PREFIX}.{levels + 1}."):
            continue  # the new stage's projection keeps its fresh initialisation
        old = source_state[name]
        if name == CLASS_EMBEDDING:
            tensor[: levels + 1] = old
            tensor[levels + 1] = old[levels]
        elif name == BAND_EMBEDDING:
            tensor[: len(old)] = old
        elif name.startswith(PATCH_PREFIX) and name.endswith(".weight"):
            tensor.copy_(old / gain)
        else:
            tensor.copy_(old)
    return grown


def freeze_all_but_last_stage(model: WaveCLIPModel) -> Callable[[], None]:
    """Make only the last stage's parameters (`new_stage_rows`) trainable, and return `restore`.

    Everything else gets `requires_grad=False`. The class-token and band tables are shared by all stages, so they
    stay trainable, with a gradient hook that zeroes their old rows (so gradient clipping sees only the new
    stage). Decoupled weight decay still shrinks rows without gradient: call `restore()` after every optimizer
    step (it copies the old rows back), or put those two tables in a group without weight decay.

    Returns:
        `restore()`: puts the old stages' rows of the shared tables back to their values at this call.
    """
    rows = new_stage_rows(model.config)
    parameters = dict(model.named_parameters())
    saved = {}
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in rows)
    for name in (CLASS_EMBEDDING, BAND_EMBEDDING):
        parameter, keep = parameters[name], rows[name]
        old = torch.ones(parameter.shape[0], dtype=torch.bool, device=parameter.device)
        old[keep] = False
        saved[name] = (old, parameter.detach()[old].clone())
        parameter.register_hook(lambda grad, old=old: grad.masked_fill(old[:, None], 0))

    @torch.no_grad()
    def restore() -> None:
        for name, (old, values) in saved.items():
            parameters[name][old] = values

    return restore


__all__ = ["freeze_all_but_last_stage", "grow_level", "grown_config", "haar_level_gain", "new_stage_rows"]
