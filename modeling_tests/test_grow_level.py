import numpy as np
import pytest
import skimage.data
import torch
from conftest import tiny_model
from PIL import Image

from waveclip_hf.conversion.grow_level import freeze_all_but_last_stage, grow_level, haar_level_gain, new_stage_rows
from waveclip_hf.models.waveclip.flops import stage_flops
from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor


@pytest.fixture(scope="module")
def source():
    """A tiny student at the main job's geometry: 224 px, one level, 32-px cells (7 x 7)."""
    return tiny_model(levels=1, image_size=224, cell_size=32, seed=3)


@pytest.fixture(scope="module")
def grown(source):
    return grow_level(source).eval()


def photos_448_and_224() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """scikit-image photos centre-cropped and resized to 448 px (uint8), and their exact 2x2 block means (float)."""
    big, small = [], []
    for photo in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()):
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        square = Image.fromarray(photo[top : top + side, left : left + side]).resize(
            (448, 448), Image.Resampling.BICUBIC
        )
        image = np.asarray(square)
        big.append(image)
        small.append(image.astype(np.float32).reshape(224, 2, 224, 2, 3).mean(axis=(1, 3)) / 255)
    return big, small


def test_grown_geometry_repeats_the_source_stages(source, grown):
    old, new = source.config.vision_config, grown.config.vision_config
    assert (new.image_size, new.levels, new.cell_size, new.grid_size) == (448, 2, 64, 7)
    assert new.stage_lengths[:2] == old.stage_lengths == [50, 148] and new.stage_lengths[2] == 148
    assert new.stage_patch_sizes[:2] == old.stage_patch_sizes == [16, 16]
    # Stage 0 (and stage 1) cost exactly what they cost in the 224-px model; only stage 2 is extra.
    assert stage_flops(grown.config)[:2] == stage_flops(source.config)
    assert haar_level_gain("haar") == pytest.approx(2.0)


def test_old_stage_parameters_are_copied_bit_for_bit(source, grown):
    old = dict(source.named_parameters())
    rows = new_stage_rows(grown.config)
    assert set(rows) == {
        "vision_model.embeddings.patch_embeddings.2.weight",
        "vision_model.embeddings.patch_embeddings.2.bias",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.band_embedding.weight",
    }
    for name, parameter in grown.named_parameters():
        if name.startswith("vision_model.embeddings.patch_embeddings.2."):
            continue
        if name == "vision_model.embeddings.class_embedding":
            assert torch.equal(parameter[:2], old[name]) and torch.equal(parameter[2], old[name][1])
        elif name == "vision_model.embeddings.band_embedding.weight":
            assert parameter.shape == (7, 32) and torch.equal(parameter[:4], old[name])
        elif name.startswith("vision_model.embeddings.patch_embeddings.") and name.endswith(".weight"):
            assert torch.equal(parameter * 2, old[name]), name  # the Haar gain, exactly (a power of two)
        else:
            assert torch.equal(parameter, old[name]), name


@torch.no_grad()
def test_grown_stages_answer_like_the_source_on_the_half_resolution_image(source, grown):
    big, small = photos_448_and_224()
    pixels_448 = WaveCLIPImageProcessor(image_size=448, levels=2)(big, return_tensors="pt")["pixel_values"]
    pixels_224 = WaveCLIPImageProcessor(image_size=224, levels=1)(small, return_tensors="pt")["pixel_values"]
    grown_stages = grown.get_image_features(pixels_448).stage_pooler_outputs  # (4, 3, P)
    source_stages = source.get_image_features(pixels_224).stage_pooler_outputs  # (4, 2, P)
    scale = source_stages.abs().max()
    assert (grown_stages[:, :2] - source_stages).abs().max() < 1e-5 * scale
    assert not torch.allclose(grown_stages[:, 2], grown_stages[:, 1], atol=1e-3 * float(scale))
    # Three stages: one block-causal forward equals stage by stage with the cache.
    cache, staged = None, []
    for stage in range(3):
        out = grown.get_image_features(pixels_448, num_stages=stage + 1, cache=cache, use_cache=True)
        staged.append(out.pooler_output)
        cache = out.cache
    torch.testing.assert_close(torch.stack(staged, dim=1), grown_stages, atol=1e-4, rtol=0)


def test_training_only_the_new_stage_keeps_the_old_stages(source):
    grown = grow_level(source)
    restore = freeze_all_but_last_stage(grown)
    before = {name: p.detach().clone() for name, p in grown.named_parameters()}
    trainable = [p for p in grown.parameters() if p.requires_grad]
    assert len(trainable) == 4
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    pixels = torch.randn(2, 3, 448, 448)
    for _ in range(2):
        loss = grown.get_image_features(pixels).stage_pooler_outputs.square().sum()
        loss.backward()
        assert grown.vision_model.embeddings.class_embedding.grad[:2].abs().max() == 0
        optimizer.step()
        restore()
        optimizer.zero_grad()
    rows = new_stage_rows(grown.config)
    for name, parameter in grown.named_parameters():
        keep = rows.get(name)
        if keep is None:
            assert torch.equal(parameter, before[name]), name
            continue
        changed = torch.zeros(parameter.shape[0], dtype=torch.bool)
        changed[keep] = True
        assert torch.equal(parameter[~changed], before[name][~changed]), name
        assert not torch.equal(parameter[changed], before[name][changed]), name


def test_new_stage_gradient_through_the_cache_equals_the_full_forward(source):
    """Training only the new stage, the old stages can run once without autograd and be read from the cache: the
    new stage's gradient is the one of a full forward (block-causal attention, frozen old stages)."""
    from waveclip_hf.experiments.grow_level_measurement import _new_stage_embeddings

    pixels = torch.randn(2, 3, 448, 448)
    target = torch.randn(2, 16)
    grads = []
    for cached in (False, True):
        torch.manual_seed(0)  # the same fresh new stage both times
        grown = grow_level(source)
        freeze_all_but_last_stage(grown)
        if cached:
            embeds = _new_stage_embeddings(grown, pixels)[:, 0]
        else:
            embeds = grown.get_image_features(pixels).stage_pooler_outputs[:, 2]
        (embeds * target).sum().backward()
        grads.append({n: p.grad.clone() for n, p in grown.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)
