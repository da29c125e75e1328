"""A gate that keeps its promise: the Clopper-Pearson bound and fixed-sequence testing of the guaranteed calibration,
the promise checked by simulation, the exit signals replayed exactly as `refine` runs them, and the learned exit head.
"""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from scipy import stats
from test_hub_loading import LABELS, save_tiny_folder
from transformers import pipeline

from waveclip_hf.evaluation.gate_guarantee import answers_at, cheapest_possible, gated_result, guarantee_check
from waveclip_hf.models.waveclip.exit_signals import EXIT_HEAD_FEATURES, EXIT_SIGNALS, apply_exit_head, exit_scores
from waveclip_hf.models.waveclip.gate_calibration import (
    binomial_cdf,
    binomial_upper_bound,
    calibrate_threshold,
    critical_disagreements,
    images_needed,
    threshold_grid,
)
from waveclip_hf.models.waveclip.gating import exit_stages
from waveclip_hf.models.waveclip.scoring import zero_shot_logits
from waveclip_hf.training.exit_head import exit_head_examples, fit_exit_head


@pytest.mark.parametrize("k, n, confidence", [(0, 300, 0.95), (3, 1000, 0.95), (10, 200, 0.9), (0, 10, 0.95)])
def test_the_bound_is_clopper_pearson(k, n, confidence):
    assert binomial_upper_bound(k, n, confidence) == pytest.approx(stats.beta.ppf(confidence, k + 1, n - k), abs=1e-9)
    assert binomial_cdf(k, n, 0.01) == pytest.approx(stats.binom.cdf(k, n, 0.01), abs=1e-12)


@pytest.mark.parametrize("n, delta", [(200, 0.02), (1000, 0.01), (1000, 0.005), (5000, 0.01)])
def test_the_critical_count_is_the_last_that_certifies(n, delta):
    k = critical_disagreements(n, delta, 0.95)
    assert binomial_upper_bound(k, n, 0.95) <= delta < binomial_upper_bound(k + 1, n, 0.95)
    # With no disagreement at all, images_needed is where certification starts.
    needed = images_needed(delta, 0.95)
    assert critical_disagreements(needed, delta, 0.95) == 0 and critical_disagreements(needed - 1, delta, 0.95) == -1


def population(num_images: int, seed: int, num_labels: int = 4):
    """Two-stage probabilities where stage 0 is right (agrees with stage 1) more often the larger its margin."""
    generator = torch.Generator().manual_seed(seed)
    stage1 = (torch.randn(num_images, num_labels, generator=generator) * 4).softmax(-1)
    spread = torch.rand(num_images, 1, generator=generator) * 2
    noise = torch.randn(num_images, num_labels, generator=generator) * spread
    stage0 = (stage1.log() + noise).softmax(-1)
    return torch.stack([stage0, stage1], dim=1)


def test_the_guaranteed_threshold_is_the_end_of_the_fixed_sequence():
    probs, gflops = population(1000, seed=1), [1.0, 4.0]
    chosen = calibrate_threshold(probs, gflops, max_disagreement=0.02, confidence=0.95)
    grid, full = threshold_grid(), probs[:, -1].argmax(-1)
    critical = critical_disagreements(1000, 0.02, 0.95)
    top2 = probs.topk(2, -1).values
    margins = top2[..., 0] - top2[..., 1]
    # Brute force: walk the grid from 1 down, stop at the first threshold with too many disagreements.
    kept = None
    for threshold in grid.tolist():
        answers, _ = answers_at(probs, margins, threshold)
        if int((answers != full).sum()) > critical:
            break
        kept = threshold
    assert chosen.threshold == pytest.approx(kept) and 0 < chosen.threshold < 1
    assert chosen.upper_bound <= 0.02 and chosen.max_disagreement == 0.02 and chosen.confidence == 0.95
    assert chosen.gflops_ratio < 1 and chosen.images_needed is None
    assert "disagreement with the full model <= 0.02 at confidence 0.95" == chosen.target


def test_too_few_images_certify_nothing_and_say_how_many_are_needed():
    chosen = calibrate_threshold(population(100, seed=2), [1.0, 4.0], max_disagreement=0.01, confidence=0.95)
    assert chosen.threshold is None and chosen.agreement == 1.0 and chosen.images_needed == 299
    with pytest.raises(ValueError, match="Give exactly one target"):
        calibrate_threshold(population(10, 3), [1.0, 2.0], max_disagreement=0.01, target_agreement=0.9)
    with pytest.raises(ValueError, match="must be fractions in \\(0, 1\\)"):
        calibrate_threshold(population(10, 3), [1.0, 2.0], max_disagreement=1.5)


def test_the_promise_holds_over_random_calibration_sets():
    """Draw calibration sets from a large population whose true disagreement at every threshold is known (to the
    population's precision): the chosen threshold's true disagreement exceeds δ in at most ε of the draws."""
    probs, gflops = population(40_000, seed=4), [1.0, 4.0]
    margins = probs.topk(2, -1).values[..., 0] - probs.topk(2, -1).values[..., 1]
    full = probs[:, -1].argmax(-1)
    generator, delta, violations = np.random.default_rng(0), 0.02, 0
    for _ in range(150):
        sample = torch.from_numpy(generator.choice(len(probs), 500, replace=False))
        threshold = calibrate_threshold(probs[sample], gflops, max_disagreement=delta).threshold
        answers, _ = answers_at(probs, margins, threshold)
        violations += float((answers != full).double().mean()) > delta
    assert violations / 150 <= 0.05 + 0.04  # ε plus three binomial standard errors of 150 draws


@pytest.mark.parametrize("signal", EXIT_SIGNALS)
def test_refine_gates_on_every_signal_exactly_as_the_offline_replay(signal):
    model = tiny_model(levels=2, seed=1)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(12, 3, 64, 64, generator=generator)
    text = torch.randn(4, 16, generator=generator)
    if signal == "learned":
        stages = model.get_image_features(pixel_values).stage_pooler_outputs.detach()
        features, targets = exit_head_examples(stages, [text], model.logit_scale.exp().item(), num_label_sets=20)
        model.config.exit_head = fit_exit_head(features, targets)
    with torch.no_grad():
        stage_embeds = model.get_image_features(pixel_values).stage_pooler_outputs
        probs = zero_shot_logits(stage_embeds, text, model.logit_scale.exp()).softmax(-1)
    scores = exit_scores(signal, probs, stage_embeds, text, model.config.exit_head)
    finite = scores[:, :-1][torch.isfinite(scores[:, :-1])]
    threshold = float(finite.median()) if len(finite) else 0.5
    online = model.refine(pixel_values, text, threshold, exit_signal=signal)
    assert torch.equal(online.exit_stage, exit_stages(scores, threshold)), signal
    assert online.exit_stage.min() == (0 if signal != "saturation" else 1)  # saturation has no stage-0 score


def test_stability_counts_agreeing_stages_and_saturation_reads_the_previous_embedding():
    probs = torch.tensor([[[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]], [[0.6, 0.4], [0.2, 0.8], [0.1, 0.9]]])
    embeds = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]] * 2)
    stability = exit_scores("stability", probs, embeds)
    assert torch.allclose(stability[0], torch.tensor([0.2, 1.4, 2.8]), atol=1e-6)
    assert torch.allclose(stability[1], torch.tensor([0.2, 0.6, 1.8]), atol=1e-6)
    saturation = exit_scores("saturation", probs, embeds)
    assert math.isinf(saturation[0, 0]) and saturation[0, 1] == pytest.approx(2**-0.5)
    assert exit_scores("learned", probs, embeds).equal(exit_scores("margin", probs, embeds))  # no head: the margin


def test_the_learned_head_ranks_the_flips_and_travels_in_the_config(tmp_path):
    generator = torch.Generator().manual_seed(0)
    stage_embeds = torch.randn(400, 2, 16, generator=generator)
    stage_embeds[:, 0] = stage_embeds[:, 1] + torch.randn(400, 16, generator=generator) * torch.rand(400, 1) * 3
    prompts = torch.randn(6, 16, generator=generator)
    features, targets = exit_head_examples(stage_embeds, [prompts], 20.0, num_label_sets=60, seed=1)
    assert features.shape == (60 * 400, len(EXIT_HEAD_FEATURES)) and 0 < targets.mean() < 1
    head = fit_exit_head(features, targets)
    order = apply_exit_head(head, features).argsort()
    # The least sure tenth flips far more often than the surest tenth.
    tenth = len(order) // 10
    assert targets[order[:tenth]].mean() < targets[order[-tenth:]].mean() - 0.2
    folder = tmp_path / "model"
    save_tiny_folder(folder, levels=2)
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    classifier.model.config.exit_head = head
    classifier.save_pretrained(tmp_path / "saved")
    again = pipeline("zero-shot-image-classification", model=str(tmp_path / "saved"), trust_remote_code=True)
    assert again.model.config.exit_head == head


def test_a_pipeline_calibrated_on_a_signal_answers_auto_with_it(tmp_path):
    save_tiny_folder(tmp_path, levels=2)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(40)]
    chosen = classifier.calibrate(images, candidate_labels=LABELS, target_agreement=0.8, exit_signal="stability")
    assert chosen.signal == "stability" and chosen.threshold is not None
    auto = classifier(images[:6], candidate_labels=LABELS, margin_threshold="auto")
    explicit = classifier(
        images[:6], candidate_labels=LABELS, margin_threshold=chosen.threshold, exit_signal="stability"
    )
    assert auto == explicit
    with pytest.raises(ValueError, match="made for exit_signal='stability', but the call asks for 'margin'"):
        classifier(images[:1], candidate_labels=LABELS, margin_threshold="auto", exit_signal="margin")
    # The default calibration is the guarantee: 40 images certify nothing at δ = 1 % and say how many would.
    guaranteed = classifier.calibrate(images, candidate_labels=LABELS)
    assert guaranteed.max_disagreement == 0.01 and guaranteed.threshold is None and guaranteed.images_needed == 299


def test_the_guarantee_check_and_the_oracle_on_a_population():
    probs = population(3000, seed=5)
    pool = {"probs": probs, "embeds": None, "text": None}
    report = guarantee_check(
        pool, [1.0, 4.0], "margin", max_disagreements=(0.02,), calibration_sizes=(200, 1000), splits=40
    )
    small, large = report["200"]["0.02"], report["1000"]["0.02"]
    assert small["splits"] == large["splits"] == 40 and small["epsilon"] == 0.05
    assert large["violation_rate"] <= 0.1 and large["certified"] == 1.0 and large["mean_gflops_ratio"] < 1
    assert small["mean_gflops_ratio"] >= large["mean_gflops_ratio"]  # fewer images, a more cautious gate
    oracle = cheapest_possible(probs, [1.0, 4.0])
    result = gated_result(pool, pool, [1.0, 4.0], "margin", target_agreement=1.0)
    assert result["disagreement"] == 0 and result["gflops_ratio"] >= oracle - 1e-12


@pytest.mark.slow  # a miniature main job (benchmark, teacher, student) and its gate study: about 2 minutes
def test_the_gate_study_on_a_miniature_main_job(tmp_path):
    from test_end_to_end import MINIATURE

    from waveclip_hf.experiments.gate_study import run

    report = run(
        tmp_path / "cache",
        tmp_path / "docs",
        None,
        (),
        False,
        MINIATURE,
        {"calibration_sizes": (20,), "splits": 10, "max_disagreements": (0.2,)},
    )
    assert set(report["main"]) >= set(EXIT_SIGNALS) | {"oracle"}
    for signal in EXIT_SIGNALS:
        assert 0 < report["main"][signal]["gflops_ratio"] <= 1 + 1e-9
    entry = report["guarantee"]["margin"]["0.2"]
    assert entry["epsilon"] == 0.05 and entry["splits"] > 0 and 0 <= entry["violation_rate"] <= 1
    assert report["default_signal"] in EXIT_SIGNALS
    page = (tmp_path / "docs" / "gate.md").read_text()
    assert "## The promise" in page and "## The exit signals" in page
    assert (tmp_path / "docs" / "figures" / "gate_curves_main.png").stat().st_size > 10_000
    head = json.loads(next((tmp_path / "cache").glob("student-*/final/config.json")).read_text())["exit_head"]
    assert head["features"][0] == "margin"
