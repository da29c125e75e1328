"""`WaveCLIPModel.refine`: margin-gated coarse-to-fine answers with batched early exit and no recomputation."""

import pytest
import torch

from conftest import tiny_model
from waveclip_hf.models.waveclip.flops import stage_flops
from waveclip_hf.models.waveclip.gating import effective_threshold, gate_stops, probability_margin
from waveclip_hf.models.waveclip.scoring import zero_shot_logits


def inputs(levels: int = 2, batch: int = 8, labels: int = 5, seed: int = 3):
    model = tiny_model(levels)
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, 64, 64, generator=generator)
    text_embeds = torch.randn(labels, 16, generator=generator)
    # A large logit scale spreads the margins of the random tiny model over (0, 1).
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return model, pixel_values, text_embeds


@torch.no_grad()
def full_model_scores(model, pixel_values, text_embeds, num_stages=None):
    image = model.get_image_features(pixel_values, num_stages=num_stages).stage_pooler_outputs
    return zero_shot_logits(image, text_embeds, model.logit_scale.exp()).softmax(-1)  # (batch, stages, labels)


def test_zero_shot_logits_equal_the_dual_encoders_logits_per_image():
    model, pixel_values, _ = inputs(levels=1, batch=3)
    input_ids = torch.tensor([[0, 5, 6, 1], [0, 7, 8, 1]])
    with torch.no_grad():
        reference = model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image
        image = model.get_image_features(pixel_values).pooler_output
        text = model.get_text_features(input_ids).pooler_output
    assert (zero_shot_logits(image, text, model.logit_scale.exp()) - reference).abs().max() < 1e-5
    assert torch.equal(zero_shot_logits(image, text).argmax(-1), reference.argmax(-1))


def count_tokens_through_first_layer(model):
    seen = []
    model.vision_model.encoder.layers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
    return seen


def test_threshold_zero_answers_everything_at_stage_zero():
    model, pixel_values, text_embeds = inputs()
    out = model.refine(pixel_values, text_embeds, margin_threshold=0.0)
    assert out.exit_stage.tolist() == [0] * 8
    expected = full_model_scores(model, pixel_values, text_embeds)[:, 0]
    assert (out.scores - expected).abs().max() < 1e-4
    assert torch.allclose(out.gflops, torch.full((8,), stage_flops(model.config)[0] / 1e9))


@pytest.mark.parametrize("levels, threshold", [(1, 1.01), (2, 1.01), (3, 1.01), (2, None), (3, None)])
def test_threshold_above_one_or_none_runs_every_stage_and_equals_the_full_model(levels, threshold):
    model, pixel_values, text_embeds = inputs(levels)
    out = model.refine(pixel_values, text_embeds, margin_threshold=threshold)
    assert out.exit_stage.tolist() == [levels] * 8
    expected = full_model_scores(model, pixel_values, text_embeds)[:, -1]
    assert (out.scores - expected).abs().max() < 1e-4
    assert torch.allclose(out.gflops, torch.full((8,), sum(stage_flops(model.config)) / 1e9))


def test_half_exit_early_and_the_rest_equal_running_them_alone():
    model, pixel_values, text_embeds = inputs(levels=2)
    stage_scores = full_model_scores(model, pixel_values, text_embeds)
    margins = probability_margin(stage_scores[:, 0])
    ordered = margins.sort().values
    threshold = float(ordered[3] + ordered[4]) / 2
    early = margins >= threshold
    assert early.sum() == 4  # half of the batch stops at stage 0

    seen = count_tokens_through_first_layer(model)
    out = model.refine(pixel_values, text_embeds, margin_threshold=threshold)
    calls = list(seen)
    assert (out.exit_stage[early] == 0).all() and (out.exit_stage[~early] > 0).all()

    late = (~early).nonzero().squeeze(1)
    alone = model.refine(pixel_values[late], text_embeds, margin_threshold=threshold)
    assert (out.scores[late] - alone.scores).abs().max() < 1e-4
    assert torch.equal(out.exit_stage[late], alone.exit_stage)
    # Every image's answer is the full model's answer at its exit stage.
    expected = stage_scores[torch.arange(8), out.exit_stage]
    assert (out.scores - expected).abs().max() < 1e-4

    # Never recompute: each stage's tokens pass the first layer once, only for the images still running.
    lengths = model.config.vision_config.stage_lengths
    running = [8, int((out.exit_stage >= 1).sum()), int((out.exit_stage >= 2).sum())]
    expected_calls = [(n, length) for n, length in zip(running, lengths) if n > 0]
    assert [tuple(shape) for shape in calls] == expected_calls

    # Total cost is the sum of the per-image figures, and each is the cumulative cached cost of its stage.
    cumulative = torch.tensor(stage_flops(model.config), dtype=torch.float64).cumsum(0) / 1e9
    assert torch.allclose(out.gflops.double(), cumulative[out.exit_stage], rtol=1e-6)
    spent = sum(n * flops for n, flops in zip(running, stage_flops(model.config))) / 1e9
    assert abs(out.gflops.double().sum().item() - spent) < 1e-6 * spent


def test_max_stages_caps_the_refinement():
    model, pixel_values, text_embeds = inputs(levels=3)
    out = model.refine(pixel_values, text_embeds, margin_threshold=1.5, max_stages=2)
    assert out.exit_stage.tolist() == [1] * 8
    expected = full_model_scores(model, pixel_values, text_embeds, num_stages=2)[:, 1]
    assert (out.scores - expected).abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"`max_stages` must be an integer in 1\.\.4"):
        model.refine(pixel_values, text_embeds, margin_threshold=0.5, max_stages=5)


def test_single_label_always_answers_at_stage_zero():
    model, pixel_values, text_embeds = inputs()
    out = model.refine(pixel_values, text_embeds[:1], margin_threshold=5.0)
    assert out.exit_stage.tolist() == [0] * 8
    assert torch.equal(out.scores, torch.ones(8, 1))


def test_class_count_scaled_gate():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    assert torch.allclose(probability_margin(probs), torch.tensor([0.2, 0.85]))
    # p = 0.1 per label with 3 labels is a probability margin of 0.3.
    assert effective_threshold(0.1, 3, "num_labels") == pytest.approx(0.3)
    assert gate_stops(probs, 0.1, "num_labels").tolist() == [False, True]
    assert gate_stops(probs, 0.1).tolist() == [True, True]
    with pytest.raises(ValueError, match="margin_scaling"):
        gate_stops(probs, 0.1, "per_class")
    with pytest.raises(ValueError, match=">= 0"):
        gate_stops(probs, float("nan"))
