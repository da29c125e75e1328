"""The models under test: random-weight CLIP and WaveCLIP at the benchmark geometry."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .settings import BenchmarkSettings


class EncoderModels(NamedTuple):
    """The two image encoders the encoder, profile and early-exit sections compare."""

    clip_vision: nn.Module  # `CLIPVisionModelWithProjection`
    waveclip: nn.Module  # `WaveCLIPModel`

    def to(self, device, dtype: torch.dtype) -> EncoderModels:
        """Both models moved (in place, as `nn.Module.to` does) to `device` and `dtype`."""
        return EncoderModels(
            self.clip_vision.to(device=device, dtype=dtype), self.waveclip.to(device=device, dtype=dtype)
        )


def label_names(num_labels: int) -> list[str]:
    """`object 0` ... `object N-1`: distinct labels whose prompts all tokenise to the same length."""
    return [f"object {i}" for i in range(num_labels)]


def clip_vision_config(settings: BenchmarkSettings):
    """The `CLIPVisionConfig` of the vision geometry in `settings` (shared by CLIP and WaveCLIP)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        intermediate_size=settings.intermediate_size,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        projection_dim=settings.projection_dim,
    )


def build_models(settings: BenchmarkSettings, tokenizer=None):
    """Random-weight models at the benchmark geometry.

    Args:
        tokenizer: if given, the text tower's vocabulary and special tokens follow it (the pipelines need that).

    Returns:
        (clip_vision, clip, waveclip): a `CLIPVisionModelWithProjection` (the encoder baseline), a `CLIPModel`
        with the text tower of `settings` (the stock pipeline's model) and `convert_clip_to_waveclip(clip)` (same
        width and text tower; cells of `cell_size`, `levels` DWT levels). All in eval mode with
        `settings.attn_implementation`.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    from ..conversion.clip_to_waveclip import convert_clip_to_waveclip
    from ..data.text_tokenizer import clip_text_config_kwargs

    torch.manual_seed(settings.seed)
    text_config = dict(
        hidden_size=settings.text_hidden_size,
        num_hidden_layers=settings.text_num_hidden_layers,
        num_attention_heads=settings.text_num_attention_heads,
        intermediate_size=settings.text_intermediate_size,
        projection_dim=settings.projection_dim,
    )
    if tokenizer is not None:
        text_config.update(clip_text_config_kwargs(tokenizer))
    vision = clip_vision_config(settings)
    clip_vision = CLIPVisionModelWithProjection(vision).eval()
    clip = CLIPModel(
        CLIPConfig(text_config=text_config, vision_config=vision.to_dict(), projection_dim=settings.projection_dim)
    ).eval()
    waveclip = convert_clip_to_waveclip(clip, cell_size=settings.cell_size, levels=settings.levels).eval()
    for model in (clip_vision, clip, waveclip):
        model.set_attn_implementation(settings.attn_implementation)
    return clip_vision, clip, waveclip


def build_encoder_models(settings: BenchmarkSettings) -> EncoderModels:
    """The CLIP vision encoder and WaveCLIP of `build_models`, on the CPU in float32."""
    clip_vision, _, waveclip = build_models(settings)
    return EncoderModels(clip_vision, waveclip)


def random_pixel_values(settings: BenchmarkSettings, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, 3, image_size, image_size) float32 standard-normal pixel values, as the processors give.

    WaveCLIP reads them as packed wavelet coefficients; both models cast them to their weight dtype.
    """
    return torch.randn(batch_size, 3, settings.image_size, settings.image_size, generator=generator)
