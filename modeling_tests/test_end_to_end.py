"""The README's main job: its evaluation and report on embeddings with known answers, its cache keys and default
folders (fast), and the whole job on a miniature benchmark, where a rerun reuses every step (slow, about 1.5
minutes on 2 cores: `bash scripts/run_tests.sh -m slow`).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from transformers import CLIPConfig

from waveclip_hf.data.synthetic import AXES
from waveclip_hf.experiments import cached_steps, end_to_end
from waveclip_hf.experiments.cached_steps import settings_hash, student_distillation_fields, student_output_dir
from waveclip_hf.experiments.distillation_ablation import run_distillation_ablation
from waveclip_hf.experiments.end_to_end import SIZES, EndToEndConfig, build_parser, run
from waveclip_hf.experiments.report import _axis_readings, first_run_record, write_reports
from waveclip_hf.experiments.run_evaluation import embeddings_cache_path, evaluate


REPO = Path(__file__).resolve().parents[1]

MINIATURE = {
    "num_train": 192,
    "num_validation": 32,
    "num_test": 64,
    "teacher": {"num_epochs": 1.0, "batch_size": 32},
    "distillation": {"max_steps": 6, "batch_size": 16},
}


@pytest.mark.slow
def test_end_to_end_miniature_run_and_cached_rerun(tmp_path):
    config = EndToEndConfig(
        cache_dir=str(tmp_path / "cache"),
        docs_dir=str(tmp_path / "docs"),
        overrides=MINIATURE,
        progress=False,
        demo_images=2,
        model_dir=str(tmp_path / "runs" / "waveclip-offline"),
    )
    report = run(config)
    # The model is left at the stable path, with its card, and loads from there.
    published = tmp_path / "runs" / "waveclip-offline"
    assert {"model.safetensors", "config.json", "README.md", "modeling_waveclip.py"} <= set(os.listdir(published))
    assert "## Words this model knows" in (published / "README.md").read_text()
    per_axis = report["per_axis"]
    assert set(per_axis) == {"color", "shape", "texture", "glyph"}
    for row in per_axis.values():
        assert len(row["stages"]) == 2 and all(0 <= a <= 1 for a in row["stages"])
        assert row["student_text_equals_teacher"]
    sweep = report["sweep_mean"]
    gflops = report["student_cumulative_gflops"]
    assert sweep[0]["threshold"] == 0 and sweep[0]["mean_gflops"] == pytest.approx(gflops[0])
    assert sweep[-1]["threshold"] > 1 and sweep[-1]["mean_gflops"] == pytest.approx(gflops[-1])
    assert sweep[-1]["accuracy"] == pytest.approx(report["summary"]["student_stage_mean"][-1])
    # The oracle gate bounds every threshold that keeps the full model's answers: between stage 0 and the full cost.
    assert gflops[0] - 1e-9 <= report["summary"]["oracle_exit_gflops"] <= gflops[-1] + 1e-9
    results_md = (tmp_path / "docs" / "results.md").read_text()
    assert "| texture | fine |" in results_md and "python -m waveclip_hf.experiments.end_to_end" in results_md
    assert (tmp_path / "docs" / "figures" / "e2e_accuracy_vs_gflops.png").stat().st_size > 10_000
    assert len(report["context"]["demo"]) == 2
    # The label-free gate, per axis, calibrated on the unlabelled validation split (issue 15, item 1).
    label_free = report["summary"]["label_free"]
    assert gflops[0] / gflops[-1] - 1e-9 <= label_free["mean_gflops_ratio"] <= 1 + 1e-9
    assert label_free["max_axis_drop_points"] >= label_free["mean_drop_points"]
    assert set(report["label_free"]["per_axis"]) == set(per_axis)
    assert "## The gate without labels" in results_md and "## How often an earlier stage" in results_md
    assert len(report["context"]["label_free_demo"]["demo"]) == 2
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["summary"] == report["summary"]
    # The student's card publishes the accuracy just measured, per axis, in its model-index too.
    card = next((tmp_path / "cache").glob("student-*/final/README.md")).read_text()
    assert "Not measured" not in card and "the main job of waveclip_hf" in card
    color = per_axis["color"]
    assert (
        f"| {100 * color['teacher']:.1f}% | {100 * color['stages'][0]:.1f}% | {100 * color['stages'][1]:.1f}% |"
        in card
    )
    assert f"value: {round(color['stages'][-1], 4)}" in card and "config: glyph" in card

    # A second run reuses data, teacher, student and test embeddings: same numbers.
    again = run(config)
    assert again["per_axis"] == per_axis
    # ... and still reports what the first, uncached run took.
    assert again["context"]["first_run"] == report["context"]["first_run"]
    assert again["context"]["first_run"]["minutes"] == pytest.approx(report["context"]["wall_minutes"], abs=0.01)
    assert "the first run with these settings (nothing cached) took" in (tmp_path / "docs" / "results.md").read_text()

    # The ablation reuses the main job's data, teacher and (for the unchanged variant) student.
    ablation = run_distillation_ablation(config, {"main job": {}, "fresh at 1x": {"fresh_lr_multiplier": 1.0}})
    assert ablation["main job"]["per_axis"] == per_axis
    assert ablation["fresh at 1x"]["distillation"]["fresh_lr_multiplier"] == 1.0
    assert ablation["fresh at 1x"]["student_dir"] != ablation["main job"]["student_dir"]
    table = (tmp_path / "docs" / "distillation_ablation.md").read_text()
    assert "| main job |" in table and "| fresh at 1x |" in table


def known_answer_embeddings(num_images: int = 12):
    """Embeddings whose zero-shot answers are known: each axis owns its own dimensions (class c of an axis is a
    unit vector), the teacher and the student's last stage point at every true class, and stage 0 points at the
    true class of the coarse axes but at a wrong class of the fine ones."""
    offsets, dim = {}, 0
    for name, axis in AXES.items():
        offsets[name], dim = dim, dim + len(axis.class_names)
    rows = [
        {name: axis.class_names[i % len(axis.class_names)] for name, axis in AXES.items()} for i in range(num_images)
    ]
    full, coarse_only = torch.zeros(num_images, dim), torch.zeros(num_images, dim)
    for i, row in enumerate(rows):
        for name, axis in AXES.items():
            true = axis.class_names.index(row[name])
            wrong = (true + 1) % len(axis.class_names)
            full[i, offsets[name] + true] = 0.5
            coarse_only[i, offsets[name] + (true if axis.scale == "coarse" else wrong)] = 0.5
    embeddings = {
        "teacher": full,
        "student": torch.stack([coarse_only, full], dim=1),
        "logit_scale": torch.tensor([10.0]),
    }
    for name, axis in AXES.items():
        text = torch.eye(dim)[offsets[name] : offsets[name] + len(axis.class_names)]
        embeddings[f"text.{name}"], embeddings[f"student_text.{name}"] = text, text.clone()
    return embeddings, rows


def tiny_clip_config():
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return CLIPConfig(text_config=layers, vision_config=dict(layers, image_size=64, patch_size=16), projection_dim=16)


def test_evaluation_and_report_on_known_answers(tmp_path):
    embeddings, rows = known_answer_embeddings()
    results = evaluate(embeddings, rows, tiny_config(levels=1), tiny_clip_config(), [0.0, 0.5, 0.99, 1.01], 0.6)
    g0, g1 = results["student_cumulative_gflops"]
    assert results["per_axis"]["color"]["stages"] == [1.0, 1.0] and results["per_axis"]["shape"]["teacher"] == 1.0
    assert results["per_axis"]["texture"]["stages"] == [0.0, 1.0] and results["per_axis"]["glyph"]["stages"] == [
        0.0,
        1.0,
    ]
    assert all(row["student_text_equals_teacher"] for row in results["per_axis"].values())
    summary = results["summary"]
    assert (summary["stage0_coarse_mean"], summary["stage0_fine_mean"], summary["teacher_mean"]) == (1.0, 0.0, 1.0)
    assert summary["student_full_minus_teacher_points"] == 0.0
    # The oracle answers the coarse axes at stage 0 and the fine ones at stage 1.
    assert summary["oracle_exit_gflops"] == pytest.approx((g0 + g1) / 2)
    assert results["per_axis"]["glyph"]["oracle_exit"]["stage_share"] == [0.0, 1.0]
    # Every margin is above 0.5 and below 0.99 (softmax of 10 x cos 0.5 against cos 0): θ = 0.5 answers all at
    # stage 0 (half the axes right), θ = 0.99 none; the cheapest point within 1 point of the full model is 0.99.
    sweep = results["sweep_mean"]
    assert [(p["accuracy"], p["stage_share"]) for p in sweep] == [
        (0.5, [1.0, 0.0]),
        (0.5, [1.0, 0.0]),
        (1.0, [0.0, 1.0]),
        (1.0, [0.0, 1.0]),
    ]
    assert summary["cheapest_within_one_point"]["threshold"] == 0.99
    assert summary["best_within_budget"]["threshold"] == 0.0 and summary["gflops_budget"] == pytest.approx(0.6 * g1)

    context = {
        "command": "python -m waveclip_hf.experiments.end_to_end",
        "date": "2026-01-01 00:00 UTC",
        "machine": "test machine",
        "wall_minutes": 0.25,
        "first_run": None,
        "data": "known answers",
        "teacher": "tiny",
        "student": "tiny",
        "demo_threshold": 0.5,
        "demo": [
            {
                "file_name": "00000.png",
                "caption": "c",
                "answers": {
                    "color": {"predicted": "red", "true": "red", "stage": 0},
                    "glyph": {"predicted": "1", "true": "0", "stage": 1},
                },
            }
        ],
    }
    results_md = write_reports(tmp_path / "docs", {"settings": {}, "context": context, **results}, context)
    text = results_md.read_text()
    assert "| texture | fine | 6 | 16.7 | 100.0 | 0.0 | 100.0 |" in text
    assert (
        "- color (coarse by construction): stage 0 100.0% → full 100.0% (+0.0 points): the approximation band "
        "alone answers it." in text
    )
    assert (
        "- glyph (fine by construction): stage 0 0.0% → full 100.0% (+100.0 points): the detail band carries it."
        in text
    )
    assert (
        "- Stage 0 alone: 100.0% on the coarse axes (color, shape) vs 0.0% on the fine axes (texture, glyph)." in text
    )
    assert (
        f"- Cheapest gated point within 1 point of the full model: θ = 0.99, 100.0% at {g1:.3f} GFLOPs (1.00×" in text
    )
    assert "- `00000.png` — color: red (✓, stage 0); glyph: 1 (✗ 0, stage 1)" in text
    assert (
        "wall time of this run: 0.2 min (steps reused from the cache take no time); no first run with these "
        "settings (nothing cached) is recorded in this cache."
    ) in text
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["summary"] == summary
    for name in ("e2e_accuracy_vs_gflops.png", "e2e_exit_stage_share.png"):
        assert (tmp_path / "docs" / "figures" / name).stat().st_size > 10_000


def test_cache_keys_are_those_of_existing_caches(monkeypatch):
    """The keys name the cached folders: a changed key silently retrains, an unchanged one after a change to the
    trainer silently reuses a stale student. Benchmark and teacher keys are those of existing caches; the student
    keys moved when the optimisation rules changed (`OPTIMIZATION_RULES_VERSION` 2). Precision "auto" resolves to
    bf16 here, as on the machine that made those caches."""
    monkeypatch.setattr(cached_steps, "auto_mixed_precision", lambda: "bf16")
    settings = EndToEndConfig(cache_dir="/c/cache").settings()
    counts = {k: settings[k] for k in ("num_train", "num_validation", "num_test")}
    assert settings_hash({"seed": 0, "generator_version": 5, **counts}) == "6a4eae49cbab"
    data_root, teacher_dir = Path("/c/cache/benchmark-v5-abc"), Path("/c/cache/teacher-def")
    fields = student_distillation_fields(
        settings, data_root, teacher_dir, levels=1, seed=0, num_workers=2, progress=True
    )
    assert student_output_dir(Path("/c/cache"), fields) == Path("/c/cache/student-3ce23c2bf13a")
    # Under the version-1 rules the key is the one the old caches carry.
    monkeypatch.setattr(cached_steps, "OPTIMIZATION_RULES_VERSION", 1)
    assert student_output_dir(Path("/c/cache"), fields) == Path("/c/cache/student-770427770943")
    monkeypatch.setattr(cached_steps, "OPTIMIZATION_RULES_VERSION", 2)
    # Progress bars and worker counts do not change the student.
    quiet = student_distillation_fields(settings, data_root, teacher_dir, 1, 0, num_workers=0, progress=False)
    assert student_output_dir(Path("/c/cache"), quiet) == Path("/c/cache/student-3ce23c2bf13a")
    settings["distillation"]["kl_on_benchmark_prompts"] = True
    with_kl = student_distillation_fields(settings, data_root, teacher_dir, 1, 0, 2, True)
    assert len(with_kl["label_vocabulary"]) == sum(len(axis.class_names) for axis in AXES.values())
    assert student_output_dir(Path("/c/cache"), with_kl) == Path("/c/cache/student-dc1b3daf287a")
    assert (
        embeddings_cache_path(Path("/c"), teacher_dir, Path("/c/cache/student-x/final")).name
        == "test-embeddings-3fe05b030915.safetensors"
    )
    # The first-run record's key holds the teacher's resolved precision since precision became "auto" (before:
    # af9269a97052, with the teacher's bf16 implied by its default).
    first_run_key = {"settings": EndToEndConfig().settings(), "seed": 0, "levels": 1, "generator_version": 5}
    assert settings_hash(first_run_key) == "b6c84958a601"


def test_default_folders_follow_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = EndToEndConfig()
    assert (config.cache_dir, config.docs_dir) == (str(tmp_path / ".cache" / "end_to_end"), str(tmp_path / "docs"))
    args = build_parser().parse_args(["--cache-dir", "runs/cache", "--docs-dir", "../elsewhere"])
    config = EndToEndConfig(cache_dir=args.cache_dir, docs_dir=args.docs_dir)
    assert (config.cache_dir, config.docs_dir) == (
        str(tmp_path / "runs" / "cache"),
        str(tmp_path.parent / "elsewhere"),
    )
    with pytest.raises(ValueError, match="Unknown size 'huge'; choose one of"):
        EndToEndConfig(size="huge")
    assert set(SIZES) == {"small", "large"}


def test_an_installed_package_defaults_to_the_working_directory(tmp_path):
    """Installed from a wheel, no repository around it: the defaults are the caller's ./.cache and ./docs."""
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "src" / "waveclip_hf", site / "waveclip_hf", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import waveclip_hf.experiments.end_to_end as e; c = e.EndToEndConfig(); "
        "print(e.__file__); print(c.cache_dir); print(c.docs_dir)"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert found == [
        str(site / "waveclip_hf" / "experiments" / "end_to_end.py"),
        str(work / ".cache" / "end_to_end"),
        str(work / "docs"),
    ]


def test_label_free_gate_and_flip_rates_on_known_answers(tmp_path):
    """Stage 0 answers the coarse axes and gets every fine one wrong, with the same confident margin: the label-free
    gate, calibrated on other images of the same kind, answers the coarse axes at stage 0 and refines the fine
    ones, as the labelled oracle does; one threshold for all axes must refine everything."""
    embeddings, rows = known_answer_embeddings(12)
    calibration, _ = known_answer_embeddings(20)
    results = evaluate(
        embeddings,
        rows,
        tiny_config(levels=1),
        tiny_clip_config(),
        [0.0, 0.5, 1.01],
        0.6,
        calibration_embeddings=calibration["student"],
    )
    g0, g1 = results["student_cumulative_gflops"]
    label_free = results["label_free"]
    for name in ("color", "shape"):
        row = label_free["per_axis"][name]
        assert (row["stage_share"], row["drop_points"], row["calibration_agreement"]) == ([1.0, 0.0], 0.0, 1.0)
        assert row["labelled_oracle"]["stage_share"] == [1.0, 0.0] and 0 < row["threshold"] < 1
    for name in ("texture", "glyph"):
        row = label_free["per_axis"][name]
        assert (row["threshold"], row["stage_share"], row["test_agreement"]) == (None, [0.0, 1.0], 1.0)
        assert results["per_axis"][name]["stage_flip_rate"] == [1.0, 0.0]
    assert results["per_axis"]["color"]["stage_flip_rate"] == [0.0, 0.0]
    assert results["summary"]["stage_flip_rate_mean"] == [0.5, 0.0]
    summary = results["summary"]["label_free"]
    assert summary["mean_gflops_ratio"] == pytest.approx((2 * g0 / g1 + 2) / 4)
    assert summary["labelled_oracle"]["mean_gflops_ratio"] == pytest.approx(summary["mean_gflops_ratio"])
    assert (summary["max_axis_drop_points"], summary["calibration_images"], summary["target_agreement"]) == (
        0,
        20,
        0.99,
    )
    # The coarse axes' confident margin is the fine axes' too: a shared threshold that refines texture and glyph
    # refines colour and shape as well.
    assert summary["best_single_threshold"]["mean_gflops_ratio"] == pytest.approx(1.0)

    context = {
        "command": "python -m waveclip_hf.experiments.end_to_end",
        "date": "2026-01-01 00:00 UTC",
        "machine": "test machine",
        "wall_minutes": 0.25,
        "first_run": None,
        "data": "known answers",
        "teacher": "tiny",
        "student": "tiny",
        "demo_threshold": 0.5,
        "demo": [],
        "label_free_demo": {
            "thresholds": {"color": 0.47, "texture": None},
            "demo": [
                {
                    "file_name": "00000.png",
                    "caption": "c",
                    "answers": {"texture": {"predicted": "dots", "true": "dots", "stage": 1}},
                }
            ],
        },
    }
    text = write_reports(tmp_path / "docs", {"settings": {}, "context": context, **results}, context).read_text()
    ratio = summary["mean_gflops_ratio"]
    assert f"| **mean** | | | **+0.0 / {ratio:.2f}×** | +0.0 / 1.00× | +0.0 / {ratio:.2f}× |" in text
    assert "| texture | none | 100.0 / 100.0 | +0.0 / 1.00× | +0.0 / 1.00× | +0.0 / 1.00× (none) |" in text
    assert "| **mean** | **50.0** |" in text  # the flip rate of stage 0
    assert (
        "(`classifier.calibrate(<validation images>, candidate_labels=..., hypothesis_template=..., "
        "target_agreement=0.99)`: color 0.47, texture none)" in text
    )
    assert "- `00000.png` — texture: dots (✓, stage 1)" in text
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["summary"]["label_free"] == summary


def test_only_a_run_that_built_every_step_records_the_first_run_time(tmp_path):
    key = {"settings": "small", "student": "student-abc"}
    # A rerun on a cache it did not fill (steps reused) records nothing, and reports nothing as a first run.
    assert first_run_record(tmp_path, key, 0.7, built_every_step=False) is None
    assert list(tmp_path.iterdir()) == []
    record = first_run_record(tmp_path, key, 13.42, built_every_step=True)
    assert record["minutes"] == 13.42
    # Later runs read the record back and never overwrite it.
    assert first_run_record(tmp_path, key, 0.5, built_every_step=True)["minutes"] == 13.42
    assert first_run_record(tmp_path, key, 0.5, built_every_step=False)["minutes"] == 13.42


def test_axis_readings_say_which_way_the_detail_band_moves_an_axis():
    rows = {
        "color": {"scale": "coarse", "stages": [1.0, 1.0]},
        "shape": {"scale": "coarse", "stages": [0.58, 0.563]},
        "glyph": {"scale": "fine", "stages": [0.164, 1.0]},
        "x": {"scale": "fine", "stages": [0.5, 0.55]},
    }
    readings = dict(zip(rows, _axis_readings(rows)))
    assert readings["color"].endswith("(+0.0 points): the approximation band alone answers it.")
    assert readings["shape"].endswith("(-1.7 points): the later stage answers it less well than stage 0.")
    assert readings["glyph"].endswith("(+83.6 points): the detail band carries it.")
    assert readings["x"].endswith("(+5.0 points): the detail band helps.")


def test_precision_auto_is_bf16_only_where_the_hardware_runs_it(monkeypatch):
    """bf16 autocast on a CPU without AVX-512 BF16 or AMX is emulated and several times slower than float32."""
    from waveclip_hf.training import config as training_config

    monkeypatch.setattr(training_config.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training_config, "cpu_flags", lambda: {"avx", "avx2", "fma"})
    assert training_config.auto_mixed_precision() == "no"
    monkeypatch.setattr(training_config, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert training_config.auto_mixed_precision() == "bf16"
    monkeypatch.setattr(training_config, "cpu_flags", lambda: {"amx_bf16"})
    assert training_config.auto_mixed_precision("cpu") == "bf16"
    # The main job's settings hold the resolved value (so do its cache keys and reports); an override wins.
    monkeypatch.setattr(cached_steps, "auto_mixed_precision", lambda: "no")
    settings = EndToEndConfig().settings()
    assert settings["teacher"]["mixed_precision"] == settings["distillation"]["mixed_precision"] == "no"
    forced = EndToEndConfig(overrides={"distillation": {"mixed_precision": "bf16"}}).settings()
    assert forced["distillation"]["mixed_precision"] == "bf16" and forced["teacher"]["mixed_precision"] == "no"
    assert SIZES["small"]["distillation"]["mixed_precision"] == "auto"
