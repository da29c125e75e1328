"""The README's main job on a miniature benchmark: every step runs, reports are written, a rerun reuses them.

Marked slow (about 1.5 minutes on 2 cores): `bash scripts/run_tests.sh -m slow`.
"""

import json

import pytest

from waveclip_hf.experiments.end_to_end import EndToEndConfig, run, run_distillation_ablation

MINIATURE = {
    "num_train": 192, "num_validation": 32, "num_test": 64,
    "teacher": {"num_epochs": 1.0, "batch_size": 32},
    "distillation": {"max_steps": 6, "batch_size": 16},
}


@pytest.mark.slow
def test_end_to_end_miniature_run_and_cached_rerun(tmp_path):
    config = EndToEndConfig(cache_dir=str(tmp_path / "cache"), docs_dir=str(tmp_path / "docs"), overrides=MINIATURE,
                            progress=False, demo_images=2)
    report = run(config)
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
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["summary"] == report["summary"]

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
