"""The analytic FLOPs count against `torch.utils.flop_counter.FlopCounterMode`.

Counted with `eager` attention: on CPU `FlopCounterMode` does not see the matmuls inside SDPA (docs/model.md,
section 5).
The ViT-B/16-sized models are built without weight initialisation (the values do not change the count, and
initialising 86M parameters would take most of the time budget).
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.initialization import no_init_weights

from waveclip_hf import WaveCLIPConfig, WaveCLIPModel, WaveCLIPVisionConfig, WaveCLIPVisionModel
from waveclip_hf.models.waveclip.flops import (
    FLOPS_CONVENTION,
    clip_vit_flops,
    cumulative_flops,
    flops_table,
    format_flops_table,
    full_forward_flops,
    gflops,
    stage_flops,
)


TEXT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=3,
)
# Distinct, unround sizes so that a swapped or missing term changes the count.
SMALL_VISION = dict(
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=3,
    image_size=48,
    cell_size=16,
)
B16_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


@pytest.fixture(autouse=True)
def one_thread():
    # These tests count FLOPs, not time, but must stay fast: on a busy 2-core machine a second OpenMP thread
    # mostly waits at barriers (tiny models ran ~30x slower with 2 threads under load, B/16 ~3x).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(levels: int, projection_dim: int, **vision) -> WaveCLIPConfig:
    # The vision config's own projection_dim is left at its default on purpose: the model projects with the
    # top-level one, and the count must follow the model.
    vision_config = WaveCLIPVisionConfig(levels=levels, **vision)
    return WaveCLIPConfig(text_config=TEXT, vision_config=vision_config.to_dict(), projection_dim=projection_dim)


def build(model_class, config, initialise: bool = True):
    if initialise:
        return model_class._from_config(config, attn_implementation="eager").eval()
    with no_init_weights():
        return model_class._from_config(config, attn_implementation="eager").eval()


def count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure_stages(model: WaveCLIPModel, batch_size: int = 1, naive_first: int = 0) -> tuple[list[int], list[int]]:
    """Measured (cached increments, naive re-runs) per stage for one random batch.

    Naive re-runs are measured from stage `naive_first` on; earlier entries are `None`.
    """
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size)
    cached, naive, cache = [], [], None
    for stage in range(model.num_stages):

        def step():
            nonlocal cache
            out = model.get_image_features(pixel_values, num_stages=stage + 1, cache=cache, use_cache=True)
            cache = out.cache

        cached.append(count(step))
        if stage < naive_first:
            naive.append(None)
        else:
            naive.append(count(lambda: model.get_image_features(pixel_values, num_stages=stage + 1)))
    return cached, naive


def assert_within(analytic, measured, rel=0.02):
    assert len(analytic) == len(measured)
    for a, m in zip(analytic, measured):
        assert abs(a - m) <= rel * m, (analytic, measured)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_small_model_stage_counts_match_flop_counter(levels):
    config = make_config(levels, projection_dim=20, **SMALL_VISION)
    torch.manual_seed(0)
    cached, naive = measure_stages(build(WaveCLIPModel, config))
    assert_within(stage_flops(config, mode="cached"), cached)
    assert_within(stage_flops(config, mode="naive"), naive)
    # The count models exactly the ops FlopCounterMode sees, so at this size it agrees to the FLOP: a tolerance
    # would hide small terms (the projection, the patch convolutions).
    assert stage_flops(config, mode="cached") == cached
    assert stage_flops(config, mode="naive") == naive
    assert cumulative_flops(config, mode="cached")[-1] == sum(cached)
    assert cumulative_flops(config, mode="naive")[-1] == sum(naive)
    assert full_forward_flops(config) == naive[-1]
    # Stage 0 from scratch is the same computation either way.
    assert cached[0] == naive[0]


def test_counts_are_per_image():
    config = make_config(2, projection_dim=20, **SMALL_VISION)
    torch.manual_seed(0)
    cached, naive = measure_stages(build(WaveCLIPModel, config), batch_size=3)
    assert [3 * f for f in stage_flops(config, mode="cached")] == cached
    assert [3 * f for f in stage_flops(config, mode="naive")] == naive


def test_projection_dim_zero_counts_the_bare_vision_tower():
    config = make_config(2, projection_dim=20, **SMALL_VISION).vision_config
    torch.manual_seed(0)
    model = build(WaveCLIPVisionModel, config)
    pixel_values = torch.randn(1, 3, config.image_size, config.image_size)
    out = model(pixel_values, num_stages=1, use_cache=True)
    increment = count(lambda: model(pixel_values, num_stages=2, cache=out.cache))
    full = count(lambda: model(pixel_values))
    assert stage_flops(config, projection_dim=0)[1] == increment
    assert full_forward_flops(config, projection_dim=0) == full


def test_waveclip_config_uses_the_projection_the_model_uses():
    config = make_config(1, projection_dim=20, **SMALL_VISION)
    assert config.vision_config.projection_dim != 20
    hidden = config.vision_config.hidden_size
    with_vision_default = stage_flops(config.vision_config)
    assert stage_flops(config) == stage_flops(config.vision_config, projection_dim=20)
    assert stage_flops(config)[0] == with_vision_default[0] - 2 * hidden * (config.vision_config.projection_dim - 20)


def test_b16_geometry_matches_flop_counter():
    """ViT-B/16 widths, image 224, cell 32, L = 1: stage 0 is 50 tokens, the full image 198."""
    config = make_config(1, projection_dim=512, **B16_VISION)
    # Each B/16 forward takes about a second here: the naive stage 0 is the cached stage 0 (checked on the small
    # models), so only the full re-run is measured.
    cached, naive = measure_stages(build(WaveCLIPModel, config, initialise=False), naive_first=1)
    assert_within(stage_flops(config, mode="cached"), cached)
    assert_within(stage_flops(config, mode="naive")[1:], naive[1:])
    assert_within(cumulative_flops(config, mode="naive"), [cached[0], cached[0] + naive[1]])
    assert gflops(cached[0]) == pytest.approx(8.64, abs=0.01)
    assert gflops(sum(cached)) == pytest.approx(35.04, abs=0.01)


def test_plain_clip_b16_matches_flop_counter_and_open_clip():
    clip_config = CLIPVisionConfig(patch_size=16, projection_dim=512, **B16_VISION)
    model = build(CLIPVisionModelWithProjection, clip_config, initialise=False)
    measured = count(lambda: model(pixel_values=torch.randn(1, 3, 224, 224)))
    assert_within([clip_vit_flops(clip_config)], [measured])
    assert clip_vit_flops(clip_config) == measured
    assert gflops(measured) == pytest.approx(35.13, abs=0.01)  # open_clip's published ViT-B/16 figure


def test_b16_ratios():
    vision = WaveCLIPVisionConfig(**B16_VISION)
    clip = clip_vit_flops(CLIPVisionConfig(patch_size=16, projection_dim=512, **B16_VISION))
    cached = cumulative_flops(vision, 512, "cached")
    naive = cumulative_flops(vision, 512, "naive")
    assert cached[0] / cached[-1] == pytest.approx(0.25, abs=0.01)
    assert cached[-1] / clip == pytest.approx(1.0, abs=0.01)
    assert naive[-1] / cached[-1] == pytest.approx(1.25, abs=0.01)
    # The masked full forward pays for the hidden entries: dearer than the cached sum, but only by the attention.
    assert full_forward_flops(vision, projection_dim=512) > cached[-1]


def test_table_rows_and_format():
    config = WaveCLIPVisionConfig(**B16_VISION, levels=3)
    rows = flops_table(config, 512)
    assert [row.stage for row in rows] == [0, 1, 2, 3]
    assert [row.tokens for row in rows] == [50, 148, 148, 148]
    assert [row.total_tokens for row in rows] == [50, 198, 346, 494]
    assert [row.cumulative_cached_gflops for row in rows] == pytest.approx(
        [gflops(f) for f in cumulative_flops(config, 512, "cached")]
    )
    assert rows[-1].cumulative_naive_gflops == pytest.approx(gflops(sum(stage_flops(config, 512, "naive"))))
    text = format_flops_table(config, 512, CLIPVisionConfig(patch_size=16, projection_dim=512, **B16_VISION))
    assert FLOPS_CONVENTION in text and "35.13" in text


def test_bad_arguments_raise():
    config = WaveCLIPVisionConfig()
    with pytest.raises(ValueError, match="mode"):
        stage_flops(config, mode="dense")
    with pytest.raises(ValueError, match="num_stages"):
        full_forward_flops(config, num_stages=3)
    with pytest.raises(ValueError, match="projection_dim"):
        stage_flops(config, projection_dim=-1)
    with pytest.raises(TypeError, match="WaveCLIPVisionConfig"):
        stage_flops(CLIPVisionConfig())


def test_twice_the_size_with_one_more_level_repeats_the_stages():
    """Adaptive resolution: 2S px with L + 1 levels and 2C-px cells reads, in stages 0..L, the same tokens at the
    same cost as S px with L levels and C-px cells (measured by FlopCounterMode), and only adds a last stage."""
    small = make_config(1, projection_dim=20, **SMALL_VISION)
    doubled = make_config(2, projection_dim=20, **{**SMALL_VISION, "image_size": 96, "cell_size": 32})
    torch.manual_seed(0)
    small_cached, _ = measure_stages(build(WaveCLIPModel, small), naive_first=2)
    doubled_cached, _ = measure_stages(build(WaveCLIPModel, doubled), naive_first=3)
    assert doubled.vision_config.stage_lengths[:2] == small.vision_config.stage_lengths
    assert doubled.vision_config.stage_patch_sizes[:2] == small.vision_config.stage_patch_sizes
    assert doubled_cached[:2] == small_cached and doubled_cached[2] > doubled_cached[1]
    # ViT-B/16 widths: 448 px / L=2 / 64-px cells. Stage 0 is the 224-px model's 50 tokens at 8.64 GFLOPs.
    b16_224 = make_config(1, projection_dim=512, **B16_VISION)
    b16_448 = make_config(2, projection_dim=512, **B16_VISION, image_size=448, cell_size=64)
    assert [row.tokens for row in flops_table(b16_448)] == [50, 148, 148]
    assert stage_flops(b16_448)[:2] == stage_flops(b16_224)
    assert gflops(stage_flops(b16_448)[0]) == pytest.approx(8.64, abs=0.01)
    clip_448 = clip_vit_flops(CLIPVisionConfig(patch_size=16, projection_dim=512, image_size=448, **B16_VISION))
    assert cumulative_flops(b16_448)[-1] < 0.5 * clip_448
