"""Gate calibration: the offline replay equals the online refinement loop, and the script writes its report."""

import json
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import skimage.data
import torch
from conftest import tiny_model
from test_hub_loading import save_tiny_folder

from waveclip_hf.evaluation.calibration import (
    OperatingPoint,
    choose_threshold,
    collect_stage_embeddings,
    margin_exit_stages,
    stage_probabilities,
    sweep_thresholds,
)
from waveclip_hf.models.waveclip.flops import answer_gflops


REPO = Path(__file__).resolve().parents[1]


def test_offline_replay_equals_refine():
    model = tiny_model(levels=2)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(12, 3, 64, 64, generator=generator)
    text_embeds = torch.randn(4, 16, generator=generator)
    stage_embeds = collect_stage_embeddings(model, [pixel_values[:5], pixel_values[5:]], progress=False)
    probs = stage_probabilities(stage_embeds, text_embeds, model.logit_scale.exp().item())
    for threshold in (0.0, 0.2, 0.5, 0.8, 1.01):
        online = model.refine(pixel_values, text_embeds, threshold)
        offline = margin_exit_stages(probs, threshold)
        assert torch.equal(online.exit_stage, offline), threshold
        answered = probs[torch.arange(12), offline]
        assert (online.scores - answered).abs().max() < 1e-4


def test_sweep_end_points_and_choice():
    probs = torch.tensor(
        [  # 3 images, 2 stages, 2 labels
            [[0.9, 0.1], [0.95, 0.05]],
            [[0.55, 0.45], [0.2, 0.8]],
            [[0.4, 0.6], [0.3, 0.7]],
        ]
    )
    labels = torch.tensor([0, 1, 1])
    points = sweep_thresholds(probs, labels, cumulative_gflops=[1.0, 4.0], thresholds=[0.0, 0.5, 1.01])
    assert points[0] == OperatingPoint(0.0, pytest.approx(2 / 3), 1.0, [1.0, 0.0])
    assert points[1] == OperatingPoint(0.5, 1.0, pytest.approx(3.0), [pytest.approx(1 / 3), pytest.approx(2 / 3)])
    assert points[2] == OperatingPoint(1.01, 1.0, 4.0, [0.0, 1.0])
    assert choose_threshold(points, full_accuracy=1.0, max_accuracy_drop=0.0).threshold == 0.5
    assert choose_threshold(points, full_accuracy=1.0, gflops_budget=2.0).threshold == 0.0
    assert choose_threshold(points, full_accuracy=1.0, gflops_budget=0.5) is None
    with pytest.raises(ValueError, match="exactly one target"):
        choose_threshold(points, 1.0)


def test_calibration_script_on_a_labelled_image_folder(tmp_path):
    model_dir = tmp_path / "model"
    save_tiny_folder(model_dir, levels=2)
    photos = {
        "cat": skimage.data.chelsea(),
        "astronaut": skimage.data.astronaut(),
        "coffee cup": skimage.data.coffee(),
    }
    for name, array in photos.items():
        folder = tmp_path / "data" / "validation" / name
        folder.mkdir(parents=True)
        for i, angle in enumerate((0, 90, 180)):
            PIL.Image.fromarray(array).rotate(angle).save(folder / f"{i}.png")
    out = tmp_path / "calibration"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "calibrate_gate.py"),
            "--model",
            str(model_dir),
            "--data",
            str(tmp_path / "data"),
            "--output-dir",
            str(out),
            "--batch-size",
            "4",
            "--thresholds",
            "0",
            "0.5",
            "1.01",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "gate_calibration.json").read_text())
    assert report["num_images"] == 9
    assert [p["threshold"] for p in report["sweep"]] == [0.0, 0.5, 1.01]
    gflops = answer_gflops(tiny_model(levels=2).config)
    assert report["sweep"][0]["mean_gflops"] == pytest.approx(gflops[0])
    assert report["sweep"][-1]["mean_gflops"] == pytest.approx(gflops[-1])
    assert report["sweep"][-1]["accuracy"] == pytest.approx(report["fixed_stages"][-1]["accuracy"])
    assert (out / "gate_calibration.png").stat().st_size > 10_000
    assert "chosen θ" in result.stdout or "no threshold meets" in result.stdout


def test_oracle_exit_takes_the_earliest_stage_that_agrees_with_the_last():
    from waveclip_hf.evaluation.calibration import oracle_exit_point

    # 3 images, 3 stages, 2 classes: stage predictions (0,0,0), (1,0,0), (1,1,0).
    predictions = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]])
    probs = torch.nn.functional.one_hot(predictions, 2).float() * 0.8 + 0.1
    point = oracle_exit_point(probs, torch.tensor([0, 0, 1]), [1.0, 3.0, 10.0])
    assert point.stage_share == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert point.mean_gflops == pytest.approx((1.0 + 3.0 + 10.0) / 3)
    assert point.accuracy == pytest.approx(2 / 3)  # the full model's: image 2 ends at class 0, label 1
