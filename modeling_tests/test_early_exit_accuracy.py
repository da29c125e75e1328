"""The `early_exit_accuracy` metric module (`evaluate`, loaded by path): its numbers, its errors, that it ships in
the wheel, and that computing the main job's and the calibration's metrics through it leaves their numbers as the
hand computation made them."""

import dataclasses
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from waveclip_hf.data.synthetic import AXES
from waveclip_hf.evaluation.calibration import (
    margin_exit_stages,
    stage_probabilities,
    sweep_thresholds,
)
from waveclip_hf.evaluation.metrics import EARLY_EXIT_ACCURACY_DIR, early_exit_accuracy
from waveclip_hf.evaluation.zero_shot import zero_shot_predictions
from waveclip_hf.experiments.report import write_reports
from waveclip_hf.experiments.run_evaluation import evaluate
from waveclip_hf.models.waveclip.flops import answer_gflops, clip_vit_flops


REPO = Path(__file__).resolve().parents[1]


def test_the_metric_loads_by_path_and_reports_accuracy_with_the_compute_spent():
    import evaluate as hf_evaluate

    metric = hf_evaluate.load(str(EARLY_EXIT_ACCURACY_DIR), keep_in_memory=True)
    result = metric.compute(
        predictions=[0, 1, 1, 2], references=[0, 1, 0, 2], gflops=[1.5, 4.0, 1.5, 4.0], full_gflops=4.0
    )
    assert result == {"accuracy": 0.75, "mean_gflops": 2.75, "gflops_ratio": 0.6875, "num_examples": 4}
    # Without the full cost there is no ratio; batches add up like any `evaluate` metric.
    metric.add_batch(predictions=[3], references=[3], gflops=[0.1])
    metric.add_batch(predictions=[3, 1], references=[2, 1], gflops=[0.2, 0.3])
    assert metric.compute() == {"accuracy": 2 / 3, "mean_gflops": pytest.approx(0.2, abs=1e-15), "num_examples": 3}
    # The mean cost is exact: a constant comes back as itself (a float64 mean of 5,000 copies does not).
    assert early_exit_accuracy([1] * 5000, [1] * 5000, 8.640123)["mean_gflops"] == 8.640123
    with pytest.raises(ValueError, match="`full_gflops` must be positive"):
        early_exit_accuracy([0], [0], [1.0], full_gflops=0)
    with pytest.raises(ValueError, match="must be finite and at least 0"):
        early_exit_accuracy([0], [0], [float("nan")])


def test_the_wheel_ships_the_metric_module():
    setuptools_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "waveclip_hf.evaluation.metrics" in setuptools_config["packages"]
    shipped = setuptools_config["package-data"]["waveclip_hf.evaluation.metrics"]
    in_folder = sorted(f"early_exit_accuracy/{p.name}" for p in EARLY_EXIT_ACCURACY_DIR.iterdir() if p.is_file())
    assert sorted(shipped) == in_folder  # every file of the module folder, and nothing else


@pytest.mark.slow
def test_an_installed_wheel_loads_the_metric_offline(tmp_path):
    """Build the wheel (offline, from a copy of the repository), unpack it as a site-packages folder, and load the
    metric there in a fresh process with the Hub and `evaluate`'s network switched off."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("src", "hub_card"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    site = tmp_path / "site"
    with zipfile.ZipFile(next((tmp_path / "dist").glob("waveclip_hf-*.whl"))) as wheel:
        wheel.extractall(site)
    code = (
        "import waveclip_hf.evaluation.metrics as m; print(m.EARLY_EXIT_ACCURACY_DIR); "
        "print(m.early_exit_accuracy([0, 1], [0, 0], [2.0, 6.0], full_gflops=8.0))"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HOME": str(tmp_path / "home"),
    }
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    folder, result = out.stdout.strip().splitlines()[-2:]
    assert folder == str(site / "waveclip_hf" / "evaluation" / "metrics" / "early_exit_accuracy")
    assert result == "{'accuracy': 0.5, 'mean_gflops': 4.0, 'gflops_ratio': 0.5, 'num_examples': 2}"


# ----------------------------------------------------------------------------------- the numbers do not change


def random_embeddings(num_images: int = 300, seed: int = 0):
    """Teacher, two-stage student and text embeddings where the stages answer differently, with test rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = [
        {
            name: axis.class_names[int(torch.randint(len(axis.class_names), (1,), generator=generator))]
            for name, axis in AXES.items()
        }
        for _ in range(num_images)
    ]

    def normal(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)

    embeddings = {
        "teacher": normal(num_images, 16),
        "student": normal(num_images, 2, 16),
        "logit_scale": torch.tensor([30.0]),
    }
    for name, axis in AXES.items():
        embeddings[f"text.{name}"] = normal(len(axis.class_names), 16)
        embeddings[f"student_text.{name}"] = embeddings[f"text.{name}"].clone()
    return embeddings, rows


def hand_computed_axis(name, embeddings, rows, gflops, thresholds):
    """What run_evaluation and sweep_thresholds computed before the metric module: accuracies as float64 means of
    matches, mean GFLOPs as a torch float64 mean."""
    from waveclip_hf.data.synthetic import label_ids

    labels = torch.from_numpy(label_ids(rows, name))
    text = embeddings[f"text.{name}"]
    probs = stage_probabilities(embeddings["student"], text, float(embeddings["logit_scale"]))
    predictions = probs.argmax(-1)
    table = torch.tensor(gflops, dtype=torch.float64)
    sweep = []
    for threshold in thresholds:
        stages = margin_exit_stages(probs, threshold)
        answered = predictions.gather(1, stages[:, None]).squeeze(1)
        sweep.append((float((answered == labels).double().mean()), float(table[stages].mean())))
    return {
        "teacher": float((zero_shot_predictions(embeddings["teacher"], text) == labels).double().mean()),
        "stages": [float((predictions[:, s] == labels).double().mean()) for s in range(len(gflops))],
        "sweep": sweep,
    }


def test_main_job_numbers_through_the_metric_equal_the_hand_computation(tmp_path):
    from test_end_to_end import tiny_clip_config

    embeddings, rows = random_embeddings()
    student_config, teacher_config = tiny_config(levels=1), tiny_clip_config()
    thresholds = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.01]
    results = evaluate(embeddings, rows, student_config, teacher_config, thresholds, 0.6)
    gflops = answer_gflops(student_config)
    for name in AXES:
        hand = hand_computed_axis(name, embeddings, rows, gflops, thresholds)
        assert results["per_axis"][name]["teacher"] == hand["teacher"]  # bit for bit
        assert results["per_axis"][name]["stages"] == hand["stages"]
        measured = [(p["accuracy"], p["mean_gflops"]) for p in results["sweep_per_axis"][name]]
        assert [a for a, _ in measured] == [a for a, _ in hand["sweep"]]
        # Mean GFLOPs: the metric's sum is correctly rounded, torch's is not; they agree to the last bits.
        assert [g for _, g in measured] == pytest.approx([g for _, g in hand["sweep"]], rel=1e-14, abs=0)
    # The stages answer differently, so the sweep has points between the two costs (not a trivial comparison).
    assert any(gflops[0] < p["mean_gflops"] < gflops[-1] for p in results["sweep_mean"])
    assert (
        results["teacher_gflops"] == clip_vit_flops(teacher_config.vision_config, teacher_config.projection_dim) / 1e9
    )

    # What the main job publishes: results.json up to the last bits of the mean GFLOPs, and results.md exactly.
    hand_results = json.loads(json.dumps(results))
    for name in AXES:
        hand = hand_computed_axis(name, embeddings, rows, gflops, thresholds)
        for point, (_, mean) in zip(hand_results["sweep_per_axis"][name], hand["sweep"]):
            point["mean_gflops"] = mean
    context = {
        "command": "test",
        "date": "2026-01-01 00:00 UTC",
        "machine": "test",
        "wall_minutes": 0.1,
        "first_run": None,
        "data": "random",
        "teacher": "tiny",
        "student": "tiny",
        "demo_threshold": 0.5,
        "demo": [],
    }
    ours = write_reports(tmp_path / "ours", {"settings": {}, "context": context, **results}, context).read_text()
    theirs = write_reports(tmp_path / "hand", {"settings": {}, "context": context, **hand_results}, context)
    assert ours == theirs.read_text()


def test_calibration_sweep_through_the_metric_equals_the_hand_computation():
    generator = torch.Generator().manual_seed(1)
    probs = torch.randn(500, 3, 7, generator=generator).mul(3).softmax(-1)
    labels = torch.randint(7, (500,), generator=generator)
    gflops = [1.25, 3.1, 7.7]
    points = sweep_thresholds(probs, labels, gflops, [0.0, 0.1, 0.3, 0.6, 1.01])
    table = torch.tensor(gflops, dtype=torch.float64)
    for point in points:
        stages = margin_exit_stages(probs, point.threshold)
        answered = probs.argmax(-1).gather(1, stages[:, None]).squeeze(1)
        assert point.accuracy == float((answered == labels).double().mean())
        assert point.mean_gflops == pytest.approx(float(table[stages].mean()), rel=1e-14, abs=0)
    assert [p.mean_gflops for p in points][0] == 1.25 and [p.mean_gflops for p in points][-1] == 7.7
    assert len({dataclasses.astuple(p)[1] for p in points}) > 2  # the accuracy moves with the threshold
