"""Shared fixtures: tiny WaveCLIP configs built the way transformers tests its own models."""

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from waveclip_hf import WaveCLIPConfig, WaveCLIPModel


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons, so that the next `Accelerator` in this process starts fresh (as
    a new run, or a resumed one, would in its own process)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_config(levels: int = 1, image_size: int = 64, cell_size: int = 16, **vision) -> WaveCLIPConfig:
    """A WaveCLIP config small enough for a 2-core CPU: 2 layers, width 32, a 4x4 grid of cells."""
    vision_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        cell_size=cell_size,
        levels=levels,
        projection_dim=16,
    )
    vision_config.update(vision)
    text_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=99,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
        projection_dim=16,
    )
    return WaveCLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)


def tiny_model(levels: int = 1, seed: int = 0, **vision) -> WaveCLIPModel:
    torch.manual_seed(seed)
    return WaveCLIPModel(tiny_config(levels, **vision)).eval()


@pytest.fixture
def make_tiny_model():
    return tiny_model
