"""The two model options the method ablations use (docs/ablations.md): `attention="bidirectional"` (one full
forward over all tokens, no cache, no early exit) and `band_order="fine_to_coarse"` (the finest details first, the
approximation last). The defaults are the method and are covered by every other test."""

import pytest
import torch
from conftest import tiny_config
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel
from transformers.cache_utils import DynamicCache

from waveclip_hf import WaveCLIPModel
from waveclip_hf.conversion import convert_clip_to_waveclip
from waveclip_hf.models.waveclip.configuration_waveclip import WaveCLIPVisionConfig
from waveclip_hf.models.waveclip.flops import (
    answer_flops,
    embedding_flops,
    format_flops_table,
    full_forward_flops,
    stage_flops,
)
from waveclip_hf.models.waveclip.modeling_waveclip import block_causal_mask
from waveclip_hf.models.waveclip.wavelet_layout import unpack_coefficients
from waveclip_hf.training.config import DistillationConfig
from waveclip_hf.training.optimization import fresh_parameter_names


def twin(model: WaveCLIPModel, **vision) -> WaveCLIPModel:
    """The same weights under other vision options."""
    config = model.config.to_dict()
    config["vision_config"].update(vision)
    other = WaveCLIPModel(type(model.config).from_dict(config)).eval()
    other.load_state_dict(model.state_dict())
    return other


def pixels(config, batch_size: int = 3, seed: int = 1) -> torch.Tensor:
    size = config.vision_config.image_size
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


def test_options_are_validated_and_saved(tmp_path):
    # `@strict` wraps the validator's ValueError in its own error class, whose message keeps ours.
    with pytest.raises(Exception, match=r"`attention` must be one of \('block_causal', 'bidirectional'\)"):
        WaveCLIPVisionConfig(attention="causal")
    with pytest.raises(Exception, match=r"`band_order` must be one of \('coarse_to_fine', 'fine_to_coarse'\)"):
        WaveCLIPVisionConfig(band_order="reversed")
    with pytest.raises(ValueError, match="`attention` must be one of"):
        DistillationConfig(attention="full")
    with pytest.raises(ValueError, match="`band_order` must be one of"):
        DistillationConfig(band_order="random")
    config = tiny_config(attention="bidirectional", band_order="fine_to_coarse")
    config.save_pretrained(tmp_path)
    loaded = type(config).from_pretrained(tmp_path).vision_config
    assert (loaded.attention, loaded.band_order) == ("bidirectional", "fine_to_coarse")


def test_fine_to_coarse_geometry_at_the_default_size():
    # 224 px, cell 32: 7 x 7 cells. Coarse-to-fine L = 2 reads A_2 (patch 8), level-2 details (8), level-1 (16).
    coarse_first = WaveCLIPVisionConfig(levels=2)
    fine_first = WaveCLIPVisionConfig(levels=2, band_order="fine_to_coarse")
    assert coarse_first.stage_lengths == [50, 148, 148] and coarse_first.stage_patch_sizes == [8, 8, 16]
    assert fine_first.stage_band_groups == [2, 1, 0]
    assert fine_first.stage_lengths == [148, 148, 50]
    assert fine_first.stage_offsets == [0, 148, 296, 346]
    assert fine_first.stage_patch_sizes == [16, 8, 8]
    # Projections are kept per band group, so both orders have the same parameters.
    assert fine_first.band_group_patch_sizes == coarse_first.band_group_patch_sizes == [8, 8, 16]
    one_level = WaveCLIPVisionConfig(band_order="fine_to_coarse")
    assert one_level.stage_lengths == [148, 50] and one_level.stage_offsets == [0, 148, 198]


def test_fine_to_coarse_gflops_per_stage_at_vit_b16_geometry():
    # Width 768, MLP 3072, 12 layers, projection 512. Stage 0 = the 147 level-1 detail tokens + class token,
    # attending to themselves; stage 1 = 49 approximation tokens + class token attending to all 198.
    config = WaveCLIPVisionConfig(band_order="fine_to_coarse")

    def layers(new, keys):
        return 12 * (8 * new * 768**2 + 4 * new * 768 * 3072 + 4 * new * keys * 768)

    approximation_convolution = 2 * 49 * 768 * 3 * 16 * 16
    projection = 2 * 768 * 512
    expected = [
        3 * approximation_convolution + layers(148, 148) + projection,
        approximation_convolution + layers(50, 198) + projection,
    ]
    assert embedding_flops(config, 0) == 3 * embedding_flops(config, 1) == 3 * approximation_convolution
    assert stage_flops(config, projection_dim=512) == expected
    assert [round(f / 1e9, 2) for f in expected] == [26.12, 8.92]
    # The total is the same in either order (n0^2 + n1 (n0 + n1) is symmetric): the order moves cost between stages.
    coarse_first = stage_flops(WaveCLIPVisionConfig(), projection_dim=512)
    assert sum(expected) == sum(coarse_first) and round(coarse_first[0] / 1e9, 2) == 8.64


def test_fine_to_coarse_counts_match_the_flop_counter():
    torch.manual_seed(0)
    model = WaveCLIPModel._from_config(
        tiny_config(levels=2, band_order="fine_to_coarse"), attn_implementation="eager"
    ).eval()
    x = pixels(model.config, batch_size=1)
    measured, cache = [], None
    for stage in range(3):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            cache = model.get_image_features(x, num_stages=stage + 1, cache=cache, use_cache=True).cache
        measured.append(counter.get_total_flops())
    assert stage_flops(model.config) == measured
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.get_image_features(x)
    assert full_forward_flops(model.config) == counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------------
# Fine-to-coarse model
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [1, 2])
def test_fine_to_coarse_reads_the_same_tokens_in_reverse_order(levels):
    coarse_first = WaveCLIPModel(tiny_config(levels)).eval()
    fine_first = twin(coarse_first, band_order="fine_to_coarse")
    x = pixels(coarse_first.config)
    coefficients = unpack_coefficients(x, levels)
    with torch.no_grad():
        for stage in range(levels + 1):
            # Class tokens belong to stages (each stage's exit), the other tokens to the band they read.
            assert torch.equal(
                fine_first.vision_model.embeddings.embed_stage(coefficients, stage)[:, 1:],
                coarse_first.vision_model.embeddings.embed_stage(coefficients, levels - stage)[:, 1:],
            )


@pytest.mark.parametrize("levels", [1, 2])
def test_fine_to_coarse_cached_stage_by_stage_equals_one_forward(levels):
    torch.manual_seed(0)
    model = WaveCLIPModel(tiny_config(levels, band_order="fine_to_coarse")).eval()
    x = pixels(model.config)
    with torch.no_grad():
        full = model.get_image_features(x).stage_pooler_outputs
        cache, staged = None, []
        for stage in range(levels + 1):
            out = model.get_image_features(x, num_stages=stage + 1, cache=cache, use_cache=True)
            cache = out.cache
            staged.append(out.pooler_output)
    assert (torch.stack(staged, dim=1) - full).abs().max() < 1e-4
    # Gated refinement follows the order: its GFLOPs are this order's cumulative counts.
    text = torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    refined = model.refine(x, text, margin_threshold=0.0)
    assert refined.exit_stage.tolist() == [0, 0, 0]
    assert refined.gflops[0].item() == pytest.approx(stage_flops(model.config)[0] / 1e9)


def tiny_teacher() -> CLIPModel:
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return CLIPModel(
        CLIPConfig(
            text_config=dict(layers, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=3),
            vision_config=dict(layers, image_size=64, patch_size=16),
            projection_dim=16,
        )
    ).eval()


def test_conversion_folds_the_teacher_into_the_approximation_projection_in_either_order():
    teacher = tiny_teacher()
    torch.manual_seed(5)
    coarse_first = convert_clip_to_waveclip(teacher, levels=2, cell_size=16).eval()
    torch.manual_seed(5)
    fine_first = convert_clip_to_waveclip(teacher, levels=2, cell_size=16, band_order="fine_to_coarse").eval()
    # L = 2, cell 16: the approximation reads 4 x 4 patches and comes last in the fine-to-coarse order.
    assert fine_first.config.vision_config.stage_patch_sizes == [8, 4, 4]
    assert fine_first.vision_model.embeddings.patch_embeddings[0].kernel_size == (4, 4)
    for (name, a), (_, b) in zip(coarse_first.state_dict().items(), fine_first.state_dict().items()):
        assert torch.equal(a, b), name
    # Its tokens are the coarse-to-fine model's stage-0 tokens, whose projection is the teacher's folded one.
    coefficients = unpack_coefficients(pixels(coarse_first.config), 2)
    with torch.no_grad():
        assert torch.equal(
            fine_first.vision_model.embeddings.embed_stage(coefficients, 2),
            coarse_first.vision_model.embeddings.embed_stage(coefficients, 0),
        )  # equal class tokens too
    # The distiller's fresh parameters are the detail projections in either order.
    assert "vision_model.embeddings.patch_embeddings.0.weight" not in fresh_parameter_names(fine_first)
    assert "vision_model.embeddings.patch_embeddings.2.weight" in fresh_parameter_names(fine_first)


# ----------------------------------------------------------------------------------------------------------------
# Bidirectional model
# ----------------------------------------------------------------------------------------------------------------


def test_bidirectional_mask_is_none_and_every_token_sees_every_stage():
    causal = WaveCLIPModel(tiny_config(levels=2)).eval()
    bidirectional = twin(causal, attention="bidirectional")
    vision_config = bidirectional.config.vision_config
    assert block_causal_mask(vision_config, 0, 3, torch.float32) is None
    assert block_causal_mask(causal.config.vision_config, 0, 3, torch.float32) is not None
    x = pixels(causal.config)
    with torch.no_grad():
        out = bidirectional.get_image_features(x).stage_pooler_outputs
        tower = causal.vision_model
        hidden = tower.encoder(tower.pre_layrnorm(tower.embeddings(x, 0, 3)), None).last_hidden_state
        unmasked = causal.visual_projection(tower.post_layernorm(hidden[:, vision_config.stage_offsets[:-1]]))
        masked = causal.get_image_features(x).stage_pooler_outputs
    assert torch.allclose(out, unmasked, atol=1e-6)
    # Stage 0's class token now sees the details, so it differs from the block-causal one.
    assert (out[:, 0] - masked[:, 0]).abs().max() > 1e-3


def test_bidirectional_model_refuses_a_cache_and_early_exit():
    model = WaveCLIPModel(tiny_config(attention="bidirectional")).eval()
    x = pixels(model.config)
    message = "attention='bidirectional'.*one full forward"
    for kwargs in ({"num_stages": 1}, {"use_cache": True}, {"cache": DynamicCache()}):
        with pytest.raises(ValueError, match=message):
            model.get_image_features(x, **kwargs)
    text = torch.randn(4, 16)
    with pytest.raises(ValueError, match="no early exit. Call `refine` with margin_threshold=None"):
        model.refine(x, text, margin_threshold=0.3)
    with pytest.raises(ValueError, match="no early exit"):
        model.refine(x, text, max_stages=1)
    with torch.no_grad():
        refined = model.refine(x, text)
        full = model.get_image_features(x).pooler_output
    assert refined.exit_stage.tolist() == [1, 1, 1]
    expected = (
        model.logit_scale.exp()
        * torch.nn.functional.normalize(full, dim=-1)
        @ torch.nn.functional.normalize(text, dim=-1).T
    )
    assert torch.allclose(refined.logits_per_image, expected, atol=1e-5)
    assert refined.gflops.tolist() == pytest.approx([full_forward_flops(model.config) / 1e9] * 3)


def test_bidirectional_flops_and_stage_weights():
    config = WaveCLIPVisionConfig(attention="bidirectional")
    with pytest.raises(ValueError, match="no cache and no per-stage answers.*answer_flops"):
        stage_flops(config)
    assert answer_flops(config) == [full_forward_flops(config)] * 2
    assert answer_flops(WaveCLIPVisionConfig()) == [sum(stage_flops(WaveCLIPVisionConfig())[: s + 1]) for s in (0, 1)]
    table = format_flops_table(config, projection_dim=512)
    assert "| one full forward (bidirectional attention: no cache, no early exit) | 198 | 35.31 |" in table
    # The last class token is the only answer: by default all the distillation weight goes there.
    assert DistillationConfig(attention="bidirectional").resolved_stage_weights(2).tolist() == [0.0, 1.0]
    assert DistillationConfig(attention="bidirectional", stage_weights=[1, 1]).resolved_stage_weights(2).tolist() == [
        0.5,
        0.5,
    ]
    assert DistillationConfig().resolved_stage_weights(2).tolist() == [0.5, 0.5]
