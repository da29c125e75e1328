"""Label-free calibration of the gate (`gating.gate_operating_points`, `gating.calibrate_threshold`): every
operating point is exact, the chosen threshold meets its target on the calibration images, and it does what it
promises when the online refinement runs with it."""

import math

import pytest
import torch
from conftest import tiny_model

from waveclip_hf.evaluation.calibration import collect_stage_embeddings, margin_exit_stages, stage_probabilities
from waveclip_hf.models.waveclip.gate_calibration import calibrate_threshold
from waveclip_hf.models.waveclip.gating import gate_operating_points


def random_stage_probs(num_images: int, num_stages: int, num_labels: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_images, num_stages, num_labels, generator=generator) * 3
    logits[: num_images // 4] = logits[: num_images // 4].round()  # exact ties between margins too
    return logits.softmax(-1)


def replay(stage_probs: torch.Tensor, threshold: float, cumulative_gflops) -> tuple[float, float, torch.Tensor]:
    """Agreement with the last stage, mean GFLOPs and exit stages of the gate at `threshold`, image by image."""
    stages = margin_exit_stages(stage_probs, 2.0 if math.isinf(threshold) else threshold)
    predictions = stage_probs.argmax(-1)
    agreement = (predictions.gather(1, stages[:, None]).squeeze(1) == predictions[:, -1]).double().mean()
    gflops = torch.tensor(cumulative_gflops, dtype=torch.float64)[stages].mean()
    return float(agreement), float(gflops), stages


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_every_operating_point_equals_replaying_the_gate(num_stages):
    probs = random_stage_probs(120, num_stages, seed=num_stages)
    cumulative = [1.0 + 2.0 * stage for stage in range(num_stages)]
    points = gate_operating_points(probs, cumulative)
    # One point per distinct running maximum of the margins, plus "no early exit".
    assert 2 <= len(points.thresholds) <= 120 * (num_stages - 1) + 1
    assert torch.all(points.thresholds[1:] > points.thresholds[:-1]) and math.isinf(points.thresholds[-1])
    assert torch.all(points.mean_gflops[1:] >= points.mean_gflops[:-1])
    assert points.agreement[-1] == 1.0 and points.mean_gflops[-1] == cumulative[-1]
    for index, threshold in enumerate(points.thresholds.tolist()):
        agreement, gflops, stages = replay(probs, threshold, cumulative)
        assert agreement == pytest.approx(float(points.agreement[index]), abs=1e-12), index
        assert gflops == pytest.approx(float(points.mean_gflops[index]), abs=1e-12), index
        share = torch.bincount(stages, minlength=num_stages).double() / 120
        assert torch.allclose(share, points.stage_share[index]), index


def test_operating_points_at_any_threshold_and_against_labels():
    probs = random_stage_probs(150, 3, seed=5)
    cumulative = [1.0, 2.0, 6.0]
    labels = torch.randint(0, 5, (150,), generator=torch.Generator().manual_seed(1))
    points = gate_operating_points(probs, cumulative, reference=labels)
    thresholds = [0.0, 1e-4, 0.05, 0.3, 0.5, float(points.crossings[7]), 0.9, 0.999, 1.0, math.inf]
    for threshold, index in zip(thresholds, points.index_at(thresholds).tolist()):
        stages = margin_exit_stages(probs, 2.0 if math.isinf(threshold) else threshold)
        accuracy = (probs.argmax(-1).gather(1, stages[:, None]).squeeze(1) == labels).double().mean()
        assert float(points.agreement[index]) == pytest.approx(float(accuracy), abs=1e-12), threshold
        gflops = torch.tensor(cumulative, dtype=torch.float64)[stages].mean()
        assert float(points.mean_gflops[index]) == pytest.approx(float(gflops), abs=1e-12), threshold
    # Each representative threshold lands on its own point.
    assert torch.equal(points.index_at(points.thresholds), torch.arange(len(points.thresholds)))


def test_calibrate_threshold_meets_its_target_at_the_least_cost():
    probs = random_stage_probs(200, 2)
    cumulative = [1.0, 4.0]
    points = gate_operating_points(probs, cumulative)
    for target in (0.5, 0.8, 0.95, 0.99, 1.0):
        chosen = calibrate_threshold(probs, cumulative, target_agreement=target)
        agreement, gflops, _ = replay(
            probs, chosen.threshold if chosen.threshold is not None else math.inf, cumulative
        )
        assert (agreement, gflops) == (pytest.approx(chosen.agreement), pytest.approx(chosen.mean_gflops))
        assert chosen.agreement >= target
        # No cheaper operating point reaches the target.
        assert not ((points.agreement >= target) & (points.mean_gflops < chosen.mean_gflops - 1e-12)).any()
        assert chosen.full_gflops == 4.0 and chosen.num_images == 200 and sum(chosen.stage_share) == pytest.approx(1)
    # Agreement 1 on these images: the answer is to keep every image that stage 0 gets wrong running.
    exact = calibrate_threshold(probs, cumulative, target_agreement=1.0)
    assert exact.agreement == 1.0 and exact.mean_gflops < 4.0


def test_calibrate_threshold_for_a_budget_keeps_the_most_answers():
    probs = random_stage_probs(200, 3, seed=1)
    cumulative = [1.0, 3.0, 5.0]
    points = gate_operating_points(probs, cumulative)
    for budget in (1.0, 2.0, 3.5, 5.0):
        chosen = calibrate_threshold(probs, cumulative, gflops_budget=budget)
        assert chosen.mean_gflops <= budget + 1e-12
        affordable = points.mean_gflops <= budget + 1e-12
        assert chosen.agreement == pytest.approx(float(points.agreement[affordable].max()))
    assert calibrate_threshold(probs, cumulative, gflops_budget=5.0).threshold is None  # every stage fits
    assert calibrate_threshold(probs, cumulative, gflops_budget=1.0).stage_share == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="below the 1 GFLOPs of stage 0"):
        calibrate_threshold(probs, cumulative, gflops_budget=0.5)
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate_threshold(probs, cumulative)
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate_threshold(probs, cumulative, target_agreement=0.9, gflops_budget=2.0)
    with pytest.raises(ValueError, match=r"`target_agreement` must be a fraction in \(0, 1\]"):
        calibrate_threshold(probs, cumulative, target_agreement=99)


def test_one_stage_or_one_label_answers_at_stage_zero():
    assert calibrate_threshold(random_stage_probs(10, 1), [2.0], target_agreement=0.99).threshold == 0.0
    single = calibrate_threshold(torch.ones(10, 2, 1), [1.0, 3.0], target_agreement=1.0)
    assert (single.threshold, single.agreement, single.mean_gflops) == (0.0, 1.0, 1.0)


def test_a_calibrated_threshold_does_online_what_it_promised():
    """The threshold chosen offline from one full forward, run through the cached `refine`: same exits, same
    agreement with the full model."""
    model = tiny_model(levels=2)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(40, 3, 64, 64, generator=generator)
    text_embeds = torch.randn(4, 16, generator=generator)
    probs = stage_probabilities(
        collect_stage_embeddings(model, [pixel_values], progress=False), text_embeds, model.logit_scale.exp().item()
    )
    cumulative = (model.answer_gflops()).tolist()
    chosen = calibrate_threshold(probs, cumulative, target_agreement=0.9)
    assert chosen.threshold is not None and 0.9 <= chosen.agreement < 1.0 and chosen.stage_share[0] > 0
    online = model.refine(pixel_values, text_embeds, margin_threshold=chosen.threshold)
    full = model.refine(pixel_values, text_embeds)
    agreement = float((online.scores.argmax(-1) == full.scores.argmax(-1)).double().mean())
    assert agreement == pytest.approx(chosen.agreement)
    assert float(online.gflops.double().mean()) == pytest.approx(chosen.mean_gflops, rel=1e-6)


@pytest.mark.slow  # a fresh process: about 20 s on 2 cores
def test_the_calibration_command_on_an_unlabelled_folder(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_hub_loading import LABELS, save_tiny_folder
    from test_pipeline_waveclip import write_images

    save_tiny_folder(tmp_path / "model")
    write_images(tmp_path / "unlabelled" / "any" / "layout", 12, seed=0)
    script = Path(__file__).resolve().parents[1] / "scripts" / "calibrate_gate.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            str(tmp_path / "model"),
            "--images",
            str(tmp_path / "unlabelled"),
            "--labels",
            *LABELS,
            "--target-agreement",
            "0.75",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gate_calibration.json").read_text())
    assert report["num_images"] == 12 and report["candidate_labels"] == LABELS
    assert report["target"] == "agreement with the full model >= 0.75" and report["agreement"] >= 0.75
    shown = "None (every stage)" if report["threshold"] is None else f"{report['threshold']:.6g}"
    assert result.stdout.startswith(f"margin_threshold = {shown} for 4 labels")
    # The same choice as the pipeline's calibrate on the same images.
    from waveclip_hf.evaluation.calibration import label_free_calibration

    _, again = label_free_calibration(
        str(tmp_path / "model"), str(tmp_path / "unlabelled"), LABELS, target_agreement=0.75
    )
    assert again["threshold"] == pytest.approx(report["threshold"]) and again["agreement"] == report["agreement"]
    bad = subprocess.run(
        [sys.executable, str(script), "--model", "m", "--images", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert bad.returncode == 2 and "needs the label set: --labels a b c, or --labels-file" in bad.stderr
