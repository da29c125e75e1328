"""The int8 accuracy report compares each route with float32 per axis, per stage and at the gate's threshold."""

import json

import pytest

from waveclip_hf.experiments.int8_accuracy import compare, write_int8_markdown


def results(stages: dict, gated: dict) -> dict:
    """An `evaluate` result with the given per-axis stage accuracies and (accuracy, GFLOPs) at thresholds 0.1/0.5."""
    return {
        "per_axis": {axis: {"stages": accuracies} for axis, accuracies in stages.items()},
        "sweep_per_axis": {
            axis: [
                {"threshold": 0.1, "accuracy": 0.0, "mean_gflops": 1.0},
                {"threshold": 0.5, "accuracy": point[0], "mean_gflops": point[1]},
            ]
            for axis, point in gated.items()
        },
    }


def test_changes_are_in_points_against_float32_and_the_worst_axis_decides():
    float32 = results({"color": [0.90, 0.95], "glyph": [0.20, 0.80]}, {"color": (0.94, 2.0), "glyph": (0.79, 4.0)})
    int8 = results({"color": [0.90, 0.947], "glyph": [0.21, 0.792]}, {"color": (0.94, 2.2), "glyph": (0.785, 4.0)})
    report = compare(float32, int8, threshold=0.5)
    color, glyph = report["per_axis"]["color"], report["per_axis"]["glyph"]
    assert color["stage_change_points"] == pytest.approx([0.0, -0.3])
    assert glyph["stage_change_points"] == pytest.approx([1.0, -0.8])
    assert color["gated_change_points"] == pytest.approx(0.0) and color["gated_gflops_change"] == pytest.approx(0.1)
    assert glyph["gated_change_points"] == pytest.approx(-0.5)
    assert report["worst_full_change_points"] == pytest.approx(-0.8)
    assert report["meets_target"] is False  # glyph's full model lost 0.8 points (> 0.5)
    close = results({"color": [0.9, 0.95], "glyph": [0.2, 0.797]}, {"color": (0.94, 2.0), "glyph": (0.786, 4.0)})
    assert compare(float32, close, threshold=0.5)["meets_target"] is True  # -0.3 and -0.4 points


def test_the_page_shows_every_route_and_axis(tmp_path):
    float32 = results({"color": [0.9, 0.95]}, {"color": (0.94, 2.0)})
    route = compare(float32, results({"color": [0.88, 0.95]}, {"color": (0.93, 2.0)}), 0.5)
    report = {
        "threshold": 0.5,
        "float32": {"per_axis": float32["per_axis"]},
        "routes": {"onnxruntime_int8": route},
        "context": {"command": "python -m x", "date": "d", "machine": "m", "wall_minutes": 1.0, "test_images": 10},
    }
    text = write_int8_markdown(tmp_path / "int8.md", report).read_text()
    assert "## ONNX Runtime, dynamic int8" in text
    assert "| color | 90.00 → 88.00 (-2.00) | 95.00 → 95.00 (+0.00) | -1.00 points | +0.00% |" in text
    assert json.dumps(report)  # JSON-ready
