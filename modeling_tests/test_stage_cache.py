"""The stage cache: same keys, values and answers as a DynamicCache, early exit, and clear errors."""

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from transformers.cache_utils import Cache, DynamicCache

from waveclip_hf.models.waveclip.stage_cache import WaveCLIPStageCache, WaveCLIPStageCacheLayer


def random_pixels(batch: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cache_geometry(levels: int, layers: int = 2, heads: int = 4, head_dim: int = 8):
    """Just what the cache reads from a vision config; stages of 5, 13, 13, ... tokens."""
    offsets = [0, 5] + [5 + 13 * k for k in range(1, levels + 1)]
    return SimpleNamespace(
        stage_offsets=offsets, num_hidden_layers=layers, num_attention_heads=heads, hidden_size=heads * head_dim
    )


def stage_states(batch: int, tokens: int, seed: int, heads: int = 4, head_dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_every_update_returns_what_a_dynamic_cache_returns(levels):
    geometry = cache_geometry(levels)
    static, dynamic = WaveCLIPStageCache(geometry), DynamicCache()
    offsets = geometry.stage_offsets
    for stage in range(levels + 1):
        for layer in range(geometry.num_hidden_layers):
            keys, values = stage_states(3, offsets[stage + 1] - offsets[stage], seed=10 * stage + layer)
            got = static.update(keys, values, layer)
            want = dynamic.update(keys, values, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert torch.equal(static.layers[layer].keys, want[0])
        assert static.get_seq_length() == dynamic.get_seq_length() == offsets[stage + 1]
    # The filled prefix is a view of the buffer allocated at the first stage, never a copy.
    layer = static.layers[0]
    assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()
    assert layer.key_buffer.shape == (3, 4, offsets[-1], 8)


def test_batch_select_indices_keeps_the_chosen_images_in_order():
    geometry = cache_geometry(2)
    static, dynamic = WaveCLIPStageCache(geometry), DynamicCache()
    for cache in (static, dynamic):
        for layer in range(2):
            cache.update(*stage_states(4, 5, seed=layer), layer)
    keep = torch.tensor([3, 0])  # unsorted: the order given is the order kept
    static.batch_select_indices(keep)
    dynamic.batch_select_indices(keep)
    for layer in range(2):
        keys, values = stage_states(2, 13, seed=7 + layer)
        got, want = static.update(keys, values, layer), dynamic.update(keys, values, layer)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert static.layers[0].key_buffer.shape == (2, 4, 31, 8)
    static.batch_repeat_interleave(2)
    assert torch.equal(static.layers[1].keys[1], static.layers[1].keys[0])
    assert torch.equal(static.layers[1].keys[2], want[0][1])


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_model_answers_with_the_stage_cache_equal_dynamic_cache_and_full_forward(levels):
    model = tiny_model(levels, cell_size=16)
    pixel_values = random_pixels(3)
    static, dynamic = WaveCLIPStageCache(model.config), None
    with torch.no_grad():
        full = model.get_image_features(pixel_values)
        for stage in range(1, levels + 2):
            ours = model.get_image_features(pixel_values, num_stages=stage, cache=static)
            theirs = model.get_image_features(pixel_values, num_stages=stage, cache=dynamic, use_cache=True)
            dynamic = theirs.cache
            assert ours.cache is static
            assert (ours.pooler_output - theirs.pooler_output).abs().max() < 1e-5
            assert (ours.last_hidden_state - theirs.last_hidden_state).abs().max() < 1e-5
            assert (ours.pooler_output - full.stage_pooler_outputs[:, stage - 1]).abs().max() < 1e-4
    assert static.get_seq_length() == dynamic.get_seq_length() == model.config.vision_config.stage_offsets[-1]


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_early_exit_through_the_model_matches_dynamic_cache(levels):
    """Images leave after stage 0 (and after stage 1 when there is a stage 2); the rest continue exactly."""
    model = tiny_model(levels, cell_size=16)
    pixel_values = random_pixels(4)
    exits = [torch.tensor([2, 0, 3]), torch.tensor([1, 2]), torch.tensor([1])]  # positions among those still running
    static, dynamic = WaveCLIPStageCache(model.config), None
    active = torch.arange(4)
    with torch.no_grad():
        for stage in range(1, levels + 2):
            ours = model.get_image_features(pixel_values[active], num_stages=stage, cache=static)
            theirs = model.get_image_features(pixel_values[active], num_stages=stage, cache=dynamic, use_cache=True)
            dynamic = theirs.cache
            assert (ours.pooler_output - theirs.pooler_output).abs().max() < 1e-5
            if stage <= levels:
                keep = exits[stage - 1]
                static.batch_select_indices(keep)
                dynamic.batch_select_indices(keep)
                active = active[keep]
        alone = model.get_image_features(pixel_values[active])
    assert (ours.pooler_output - alone.pooler_output).abs().max() < 1e-4


def test_mismatched_batch_dtype_device_and_geometry_are_clear_errors():
    model = tiny_model(levels=1)
    pixel_values = random_pixels(2)
    cache = WaveCLIPStageCache(model.config)
    with torch.no_grad():
        model.vision_model(pixel_values, num_stages=1, cache=cache)
    with pytest.raises(ValueError, match="batch_select_indices"):
        model.vision_model(pixel_values[:1], cache=cache)
    layer = cache.layers[0]
    with pytest.raises(ValueError, match=r"holds 2 images but got keys for 1.*batch_select_indices"):
        layer.update(*stage_states(1, 49, seed=0))
    keys, values = stage_states(2, 49, seed=0)
    with pytest.raises(ValueError, match=r"holds torch.float32 on cpu but got keys in torch.float64"):
        layer.update(keys.double(), values.double())
    with pytest.raises(ValueError, match=r"holds torch.float32 on cpu but got keys in torch.float32 on meta"):
        layer.update(keys.to("meta"), values.to("meta"))
    with pytest.raises(ValueError, match=r"holds 4 heads x 8 but got keys of shape \(2, 2, 49, 16\).*another model"):
        layer.update(keys.view(2, 2, 49, 16), values.view(2, 2, 49, 16))
    with pytest.raises(ValueError, match="has 2 layers, got layer_idx=2"):
        cache.update(keys, values, 2)
    with pytest.raises(ValueError, match=r"holds 17 tokens and got 7 more.*stage boundary"):
        layer.update(keys[:, :, :7], values[:, :, :7])
    with torch.no_grad():
        model.double()
        with pytest.raises(ValueError, match="holds torch.float32 keys but the model runs in torch.float64"):
            model.vision_model(pixel_values.double(), cache=cache)
    assert cache.get_seq_length() == 17  # nothing above wrote anything


def test_a_cache_built_for_fewer_stages_refuses_more():
    model = tiny_model(levels=2)
    pixel_values = random_pixels(1)
    cache = WaveCLIPStageCache(model.config, num_stages=2)
    assert cache.layers[0].max_cache_len == cache.get_max_length() == 17 + 49
    with torch.no_grad():
        model.get_image_features(pixel_values, num_stages=2, cache=cache)  # stages 0 and 1 in one call
        with pytest.raises(ValueError, match="build the cache with `num_stages` covering every stage"):
            model.get_image_features(pixel_values, num_stages=3, cache=cache)
    with pytest.raises(ValueError, match=r"`num_stages` must be an integer in 1\.\.3"):
        WaveCLIPStageCache(model.config, num_stages=4)


def test_crop_and_reset_go_back_to_a_stage_boundary():
    model = tiny_model(levels=2)
    pixel_values = random_pixels(2)
    cache = WaveCLIPStageCache(model.config)
    with torch.no_grad():
        first = model.get_image_features(pixel_values, num_stages=2, cache=cache).pooler_output
        model.get_image_features(pixel_values, num_stages=3, cache=cache)
        cache.crop(-49)  # back to stages 0 and 1
        assert cache.get_seq_length() == 66
        again = model.get_image_features(pixel_values, num_stages=3, cache=cache).pooler_output
        with pytest.raises(ValueError, match="does not leave whole stages"):
            cache.crop(-1)
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.layers[0].key_buffer is not None
        restarted = model.get_image_features(pixel_values, num_stages=2, cache=cache).pooler_output
        alone = model.get_image_features(pixel_values).pooler_output
    assert (again - alone).abs().max() < 1e-5 and torch.equal(restarted, first)


def test_a_reset_cache_is_reused_without_allocating():
    """The next images of the same batch size go into the same buffers; an empty cache takes any batch size or
    dtype (new buffers), and early exit copies the kept images into buffers of their size."""
    model = tiny_model(levels=2)
    cache = WaveCLIPStageCache(model.config)
    buffer = lambda: cache.layers[1].key_buffer.data_ptr()  # noqa: E731
    pixel_values = random_pixels(4)
    with torch.no_grad():
        model.get_image_features(random_pixels(4, seed=5), num_stages=1, cache=cache)
        first = buffer()
        cache.reset()
        model.get_image_features(pixel_values, num_stages=1, cache=cache)
        assert buffer() == first and cache.get_seq_length() == 17
        cache.batch_select_indices(torch.tensor([3, 1]))
        assert cache.layers[1].key_buffer.shape == (2, 4, 115, 8)
        continued = model.get_image_features(pixel_values[[3, 1]], num_stages=3, cache=cache).pooler_output
        alone = model.get_image_features(pixel_values[[3, 1]]).pooler_output
        cache.reset()
        model.double()
        doubled = model.get_image_features(random_pixels(3).double(), num_stages=2, cache=cache)
        model.float()
    assert (continued - alone).abs().max() < 1e-5
    assert doubled.cache is cache and cache.layers[0].keys.dtype == torch.float64
    assert cache.layers[0].key_buffer.shape == (3, 4, 115, 8) and cache.get_seq_length() == 66


def test_it_is_a_transformers_cache_with_static_shapes():
    geometry = cache_geometry(1)
    cache = WaveCLIPStageCache(geometry)
    assert isinstance(cache, Cache) and all(isinstance(layer, WaveCLIPStageCacheLayer) for layer in cache.layers)
    assert cache.is_compileable and len(cache) == 2 and cache.get_seq_length() == 0
    cache.update(*stage_states(3, 5, seed=0), 0)
    assert cache.layers[0].get_mask_sizes(13) == (18, 0)
    assert cache.layers[0].get_mask_sizes(torch.arange(13)) == (18, 0)  # transformers < 5.1 passes positions
    assert cache.layers[0].batch_size == 3
