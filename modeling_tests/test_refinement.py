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


def test_a_gflops_budget_refines_the_smallest_margins_first():
    model, pixel_values, text_embeds = inputs(levels=2, batch=8)
    step = torch.tensor(stage_flops(model.config), dtype=torch.float64) / 1e9  # each stage's own cost
    stage_scores = full_model_scores(model, pixel_values, text_embeds)
    margins = probability_margin(stage_scores[:, 0])
    # Stage 0 for all 8 images, then 3.5 images' worth of stage 1: the 3 least sure images get it; the half left
    # over cannot pay for stage 2.
    budget = float(8 * step[0] + 3.5 * step[1]) / 8
    out = model.refine(pixel_values, text_embeds, gflops_budget=budget)
    assert sorted((out.exit_stage == 1).nonzero().squeeze(1).tolist()) == sorted(margins.argsort()[:3].tolist())
    assert (out.exit_stage == 2).sum() == 0 and out.gflops.double().mean() <= budget + 1e-9
    assert (out.scores - stage_scores[torch.arange(8), out.exit_stage]).abs().max() < 1e-4

    # Stage 1 for everybody and one stage 2: it goes to the image least sure after stage 1.
    budget = float(8 * step[0] + 8 * step[1] + step[2]) / 8
    out = model.refine(pixel_values, text_embeds, gflops_budget=budget)
    assert (out.exit_stage == 2).nonzero().squeeze(1).tolist() == [
        int(probability_margin(stage_scores[:, 1]).argmin())
    ]
    assert (out.exit_stage == 1).sum() == 7

    # With a threshold, only the images the gate sends on compete for the budget.
    threshold = float(margins.sort().values[1] + margins.sort().values[2]) / 2  # 2 images below it
    capped = model.refine(pixel_values, text_embeds, margin_threshold=threshold, gflops_budget=float(step[:2].sum()))
    assert sorted((capped.exit_stage >= 1).nonzero().squeeze(1).tolist()) == sorted(margins.argsort()[:2].tolist())
    # Stage 0 is the floor: every image needs it.
    everything_at_stage_0 = model.refine(pixel_values, text_embeds, gflops_budget=float(step[0]))
    assert everything_at_stage_0.exit_stage.tolist() == [0] * 8
    with pytest.raises(ValueError, match=r"below the .* GFLOPs of stage 0, which every image needs"):
        model.refine(pixel_values, text_embeds, gflops_budget=float(step[0]) * 0.9)
    with pytest.raises(ValueError, match="`gflops_budget` must be a number"):
        model.refine(pixel_values, text_embeds, gflops_budget="0.1")


def test_return_all_stages_gives_every_stage_an_image_ran():
    model, pixel_values, text_embeds = inputs(levels=2, batch=8)
    stage_scores = full_model_scores(model, pixel_values, text_embeds)
    margins = probability_margin(stage_scores[:, 0])
    threshold = float(margins.sort().values[3] + margins.sort().values[4]) / 2
    out = model.refine(pixel_values, text_embeds, margin_threshold=threshold, return_all_stages=True)
    assert out.stage_scores.shape == (8, 3, 5)
    for image, stage in enumerate(out.exit_stage.tolist()):
        ran = out.stage_scores[image, : stage + 1]
        assert (ran - stage_scores[image, : stage + 1]).abs().max() < 1e-4
        assert torch.equal(ran[-1], out.scores[image])
        assert out.stage_scores[image, stage + 1 :].isnan().all()
    assert model.refine(pixel_values, text_embeds, margin_threshold=threshold).stage_scores is None


def test_refine_takes_the_labels_as_tokens():
    model, pixel_values, _ = inputs(levels=1, batch=4)
    input_ids = torch.tensor([[0, 5, 6, 1, 3], [0, 7, 1, 3, 3], [0, 9, 8, 2, 1]])
    attention_mask = (input_ids != 3).long()
    text_embeds = model.get_text_features(input_ids, attention_mask=attention_mask).pooler_output
    from_tokens = model.refine(pixel_values, input_ids=input_ids, attention_mask=attention_mask, margin_threshold=0.1)
    from_embeds = model.refine(pixel_values, text_embeds, margin_threshold=0.1)
    assert torch.equal(from_tokens.exit_stage, from_embeds.exit_stage)
    assert (from_tokens.scores - from_embeds.scores).abs().max() < 1e-6
    with pytest.raises(ValueError, match="Pass the labels once"):
        model.refine(pixel_values, text_embeds, input_ids=input_ids)
    with pytest.raises(ValueError, match="Pass the labels once"):
        model.refine(pixel_values)
