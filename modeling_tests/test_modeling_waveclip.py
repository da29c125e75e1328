"""The staged vision model: token counts, cache == block-causal full forward, early exit, backends, gradients."""

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers.cache_utils import DynamicCache

from waveclip_hf import WaveCLIPConfig, WaveCLIPVisionConfig, WaveCLIPVisionModel
from waveclip_hf.conversion import convert_clip_to_waveclip


def random_pixels(batch: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run_stage_by_stage(model, pixel_values):
    """Answer after every stage through the cache; returns [(pooler (B,P), last_hidden_state)] per stage."""
    cache, results = None, []
    for stage in range(1, model.num_stages + 1):
        out = model.get_image_features(pixel_values, num_stages=stage, cache=cache, use_cache=True)
        cache = out.cache
        results.append((out.pooler_output, out.last_hidden_state))
    return results, cache


def test_default_geometry_has_the_papers_token_counts():
    config = WaveCLIPVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert (config.image_size, config.cell_size, config.levels) == (224, 32, 1)
    assert config.stage_lengths == [50, 148]
    model = WaveCLIPVisionModel(config).eval()
    pixel_values = random_pixels(1, 224)
    with torch.no_grad():
        assert model(pixel_values, num_stages=1).last_hidden_state.shape == (1, 50, 32)
        assert model(pixel_values).last_hidden_state.shape == (1, 198, 32)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_cached_stage_by_stage_equals_one_block_causal_forward(levels):
    model = tiny_model(levels, cell_size=16)
    pixel_values = random_pixels(3)
    with torch.no_grad():
        full = model.get_image_features(pixel_values)
        staged, cache = run_stage_by_stage(model, pixel_values)
        full_vision = model.vision_model(pixel_values)
    assert full.stage_pooler_outputs.shape == (3, levels + 1, 16)
    assert cache.get_seq_length() == sum(model.config.vision_config.stage_lengths)
    for stage, (pooled, _) in enumerate(staged):
        assert (full.stage_pooler_outputs[:, stage] - pooled).abs().max() < 1e-4
    # The final-stage image embedding and the vision tower's pooler_output agree too.
    assert (full.pooler_output - staged[-1][0]).abs().max() < 1e-4
    with torch.no_grad():
        cache2 = None
        for stage in range(1, levels + 2):
            out = model.vision_model(pixel_values, num_stages=stage, cache=cache2, use_cache=True)
            cache2 = out.cache
    assert (full_vision.pooler_output - out.pooler_output).abs().max() < 1e-4


def test_the_pre_5_24_spelling_past_key_values_still_works():
    """transformers 5.24 renamed `past_key_values` to `cache`; callers written for older releases keep working."""
    model = tiny_model(1)
    pixel_values = random_pixels(2)
    with torch.no_grad():
        first = model.get_image_features(pixel_values, num_stages=1, use_cache=True)
        assert first.past_key_values is first.cache and first.cache.get_seq_length() == 17
        legacy = model.get_image_features(pixel_values, past_key_values=first.cache).pooler_output
        legacy_vision = model.vision_model(pixel_values, num_stages=1, use_cache=True)
        continued = model.vision_model(pixel_values, past_key_values=legacy_vision.past_key_values)
        full = model.get_image_features(pixel_values)
    assert (legacy - full.pooler_output).abs().max() < 1e-5
    assert continued.stage_pooler_outputs.shape == (2, 1, 32)


@pytest.mark.parametrize("levels", [1, 2])
def test_earlier_stages_do_not_change_when_details_arrive(levels):
    model = tiny_model(levels)
    pixel_values = random_pixels(2)
    stage0_length = model.config.vision_config.stage_lengths[0]
    with torch.no_grad():
        stage0 = model.vision_model(pixel_values, num_stages=1)
        full = model.vision_model(pixel_values)
    assert (full.last_hidden_state[:, :stage0_length] - stage0.last_hidden_state).abs().max() < 1e-5
    assert (full.stage_pooler_outputs[:, 0] - stage0.pooler_output).abs().max() < 1e-5
    # ... while adding the details does change the final answer.
    assert (full.pooler_output - stage0.pooler_output).abs().max() > 1e-3


def test_several_stages_in_one_call_on_top_of_a_cache():
    model = tiny_model(levels=3)
    pixel_values = random_pixels(2)
    with torch.no_grad():
        full = model.get_image_features(pixel_values)
        first = model.get_image_features(pixel_values, num_stages=1, use_cache=True)
        rest = model.get_image_features(pixel_values, cache=first.cache)
    assert rest.stage_pooler_outputs.shape[1] == 3
    assert (rest.stage_pooler_outputs - full.stage_pooler_outputs[:, 1:]).abs().max() < 1e-4


@pytest.mark.parametrize("levels", [1, 2])
def test_sdpa_and_eager_agree(levels):
    model = tiny_model(levels)
    pixel_values = random_pixels(2)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa_full = model.get_image_features(pixel_values).stage_pooler_outputs
        sdpa_staged = run_stage_by_stage(model, pixel_values)[0][-1][0]
        model.set_attn_implementation("eager")
        eager_full = model.get_image_features(pixel_values).stage_pooler_outputs
    assert (sdpa_full - eager_full).abs().max() < 1e-5
    assert (sdpa_staged - eager_full[:, -1]).abs().max() < 1e-4


def test_attentions_are_block_causal():
    model = tiny_model(levels=2)
    lengths = model.config.vision_config.stage_lengths
    with torch.no_grad():
        out = model.vision_model(random_pixels(1), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    attention = out.attentions[0][0, 0]  # (tokens, tokens)
    assert attention.shape == (sum(lengths), sum(lengths))
    end0, end1 = lengths[0], lengths[0] + lengths[1]
    assert attention[:end0, end0:].abs().max() == 0  # stage 0 sees nothing later
    assert attention[end0:end1, end1:].abs().max() == 0  # stage 1 does not see stage 2
    assert attention[end1:, :end0].sum() > 0  # the last stage sees the first
    assert torch.allclose(attention.sum(-1), torch.ones(sum(lengths)), atol=1e-5)


def test_gradients_reach_every_parameter():
    model = tiny_model(levels=2).train()
    input_ids = torch.tensor([[0, 5, 6, 1], [0, 7, 1, 3]])
    out = model(input_ids=input_ids, pixel_values=random_pixels(2), return_loss=True)
    # Every stage's answer enters the loss, so every stage projection and class token gets a gradient.
    loss = out.loss + out.vision_model_output.stage_pooler_outputs.square().mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_early_exit_continues_the_remaining_images_exactly():
    model = tiny_model(levels=2)
    pixel_values = random_pixels(4)
    keep = torch.tensor([1, 3])
    with torch.no_grad():
        stage0 = model.get_image_features(pixel_values, num_stages=1, use_cache=True)
        cache = stage0.cache
        cache.batch_select_indices(keep)
        continued = model.get_image_features(pixel_values[keep], cache=cache)
        alone = model.get_image_features(pixel_values[keep])
    assert (continued.pooler_output - alone.pooler_output).abs().max() < 1e-4
    assert (continued.stage_pooler_outputs - alone.stage_pooler_outputs[:, 1:]).abs().max() < 1e-4


def test_text_tower_is_clips():
    model = tiny_model()
    input_ids = torch.tensor([[0, 5, 6, 1]])
    with torch.no_grad():
        ours = model.get_text_features(input_ids).pooler_output
        clip_text = model.text_projection(model.text_model(input_ids).pooler_output)
    assert torch.equal(ours, clip_text)


def test_forward_returns_clip_shaped_logits():
    model = tiny_model()
    input_ids = torch.tensor([[0, 5, 6, 1], [0, 7, 8, 1], [0, 9, 1, 3]])
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=random_pixels(2))
    assert out.logits_per_image.shape == (2, 3) and out.logits_per_text.shape == (3, 2)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    expected = out.image_embeds @ out.text_embeds.t() * model.logit_scale.exp()
    assert torch.allclose(out.logits_per_image, expected, atol=1e-5)


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.zeros(1, 3, 32, 32), r"must have shape \(batch, 3, 64, 64\)"),
        (torch.zeros(3, 64, 64), r"must have shape"),
        (torch.zeros(1, 1, 64, 64), r"must have shape"),
    ],
)
def test_bad_pixel_values_name_the_problem(pixel_values, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().vision_model(pixel_values)


def test_num_stages_out_of_range_and_cache_mismatches_are_clear_errors():
    model = tiny_model(levels=1)
    pixel_values = random_pixels(2)
    with pytest.raises(ValueError, match=r"must be an integer in 1\.\.2"):
        model.vision_model(pixel_values, num_stages=3)
    with pytest.raises(ValueError, match=r"must be an integer in 1\.\.2"):
        model.vision_model(pixel_values, num_stages=0)
    with torch.no_grad():
        cache = model.vision_model(pixel_values, num_stages=1, use_cache=True).cache
    with pytest.raises(
        ValueError,
        match=r"must be an integer in 2\.\.2 \(the stages processed after this call; the cache holds 1 of 2\)",
    ):
        model.vision_model(pixel_values, num_stages=1, cache=cache)
    with pytest.raises(ValueError, match="batch_select_indices"):
        model.vision_model(pixel_values[:1], cache=cache)
    other = tiny_model(levels=1, num_hidden_layers=3)
    with pytest.raises(ValueError, match="comes from another model"):
        other.vision_model(pixel_values, cache=cache)
    odd_cache = DynamicCache()
    odd_cache.update(torch.zeros(2, 4, 7, 8), torch.zeros(2, 4, 7, 8), 0)
    with pytest.raises(ValueError, match="not a whole number of stages"):
        model.vision_model(pixel_values, cache=odd_cache)


def test_config_rejects_geometry_that_does_not_tile():
    with pytest.raises(Exception, match="multiple of `cell_size`"):
        WaveCLIPVisionConfig(image_size=224, cell_size=30)
    with pytest.raises(Exception, match=r"divisible by 2\*\*levels"):
        WaveCLIPVisionConfig(cell_size=32, levels=6)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(levels=3)
    config.save_pretrained(tmp_path)
    loaded = WaveCLIPConfig.from_pretrained(tmp_path)
    assert loaded.vision_config.levels == 3
    assert loaded.vision_config.stage_lengths == config.vision_config.stage_lengths
    assert loaded.text_config.eos_token_id == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_run_and_stay_close(dtype):
    model = tiny_model(levels=1)
    pixel_values = random_pixels(2)
    with torch.no_grad():
        reference = model.get_image_features(pixel_values).pooler_output
        half = model.to(dtype).get_image_features(pixel_values).pooler_output
    assert half.dtype == dtype
    assert (half.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_conversion_copies_the_teacher_and_stage0_is_the_teacher_at_half_resolution():
    import skimage.data
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from waveclip_hf import WaveCLIPModel
    from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor

    torch.manual_seed(0)
    teacher_config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=99,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=3,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=16,
        ),
        projection_dim=16,
    )
    teacher = CLIPModel(teacher_config).eval()
    student = convert_clip_to_waveclip(teacher).eval()
    assert student.config.vision_config.stage_lengths == [50, 148]
    input_ids = torch.tensor([[0, 5, 6, 1]])
    images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    half = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    with torch.no_grad():
        assert torch.equal(
            student.get_text_features(input_ids).pooler_output, teacher.get_text_features(input_ids).pooler_output
        )
        pixel_values = WaveCLIPImageProcessor()(images=images, return_tensors="pt")["pixel_values"]
        stage0 = student.get_image_features(pixel_values, num_stages=1).pooler_output
        teacher_half = teacher.get_image_features(
            half(images=images, return_tensors="pt")["pixel_values"], interpolate_pos_encoding=True
        ).pooler_output
    cosine = torch.nn.functional.cosine_similarity(stage0, teacher_half)
    # Exact up to resampling differences (resize kernels, position-embedding interpolation).
    assert cosine.min() > 0.999
    with pytest.raises(TypeError, match="needs a transformers `CLIPModel` teacher"):
        convert_clip_to_waveclip(student)
