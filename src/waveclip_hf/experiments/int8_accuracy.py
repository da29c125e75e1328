"""What int8 costs in accuracy: the main job's student, quantised, on the main job's test split.

    python -m waveclip_hf.experiments.int8_accuracy                      # the main job's cache, docs/int8.{md,json}
    python -m waveclip_hf.experiments.int8_accuracy --override '{"teacher": {"mixed_precision": "no"}, ...}'

The float32 student's test embeddings come from the main job's cache (run it first; `--override` picks the same
variant as the main job's own `--override`). Each route then embeds the 5,000 test images again after every stage:

- `torch_int8`: `export.quantization.quantize_linear_layers` (torch's dynamic int8 linear layers);
- `onnxruntime`: the float32 ONNX export, run by onnxruntime (a control: it should change nothing);
- `onnxruntime_int8`: the same export with its stage graphs dynamically quantised (`onnx_export --int8`).

The text tower stays float32 in every route (it runs once per label set). Per axis: the zero-shot accuracy of
every stage, and the gate's accuracy and GFLOPs at the threshold the main job reports (the cheapest threshold
within 1 point of the full student on the float32 curve), each against float32.
"""

import json
import tempfile
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .report import machine_description, recorded_command, utc_now
from .run_evaluation import embeddings_cache_path, evaluate


ROUTES = {
    "torch_int8": "PyTorch, dynamic int8 linear layers",
    "onnxruntime": "ONNX Runtime, float32 (control)",
    "onnxruntime_int8": "ONNX Runtime, dynamic int8",
}
TARGET_MAX_AXIS_DROP_POINTS = 0.5


def torch_int8_encoder(student_dir: Path):
    """pixel values (B, 3, S, S) -> (B, stages, P) image embeddings of the torch-int8 student."""
    from ..export.quantization import quantize_linear_layers
    from ..hub.loading import load_waveclip

    model = quantize_linear_layers(load_waveclip(student_dir))
    return lambda pixel_values: model.get_image_features(pixel_values).stage_pooler_outputs


def onnx_encoder(student_dir: Path, folder: Path, int8: bool):
    """The same from the student's ONNX export (stage by stage, keys and values carried between the graphs)."""
    from ..export.onnx_export import export_checkpoint
    from ..export.onnx_runner import OnnxWaveCLIP

    export_checkpoint(str(student_dir), str(folder), int8=int8)
    runner = OnnxWaveCLIP(folder)

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        stages, keys, values = [], None, None
        for stage in range(runner.config["num_stages"]):
            embeds, keys, values = runner.stage_outputs(stage, pixel_values.numpy(), keys, values)
            stages.append(torch.from_numpy(embeds))
        return torch.stack(stages, dim=1)

    return encode


@torch.inference_mode()
def test_embeddings(encode, student_dir: Path, data_root: Path, rows, batch_size: int, progress: bool, desc: str):
    """(N, stages, P) L2-normalised embeddings of the test images after every stage, by `encode`."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(student_dir, trust_remote_code=True)
    embeds = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = rows[start : start + batch_size]
        images = [Image.open(data_root / "test" / row["file_name"]).convert("RGB") for row in batch]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        embeds.append(encode(pixel_values).float())
    return torch.nn.functional.normalize(torch.cat(embeds), dim=-1)


def gated_point(results: dict, axis: str, threshold: float) -> dict:
    """The sweep point of `axis` at `threshold` (accuracy, mean GFLOPs, exit shares)."""
    return next(point for point in results["sweep_per_axis"][axis] if abs(point["threshold"] - threshold) < 1e-9)


def compare(float32: dict, route: dict, threshold: float) -> dict:
    """Per axis: every stage's accuracy and the gated point at `threshold`, with the changes from float32 in points
    (and in GFLOPs for the gate); plus the worst change over the axes."""
    per_axis = {}
    for axis, row in route["per_axis"].items():
        base_row = float32["per_axis"][axis]
        gated, base_gated = gated_point(route, axis, threshold), gated_point(float32, axis, threshold)
        per_axis[axis] = {
            "stages": row["stages"],
            "stage_change_points": [100 * (a - b) for a, b in zip(row["stages"], base_row["stages"])],
            "gated_accuracy": gated["accuracy"],
            "gated_change_points": 100 * (gated["accuracy"] - base_gated["accuracy"]),
            "gated_gflops": gated["mean_gflops"],
            "gated_gflops_change": gated["mean_gflops"] / base_gated["mean_gflops"] - 1,
        }
    worst_full = min(axis["stage_change_points"][-1] for axis in per_axis.values())
    worst_gated = min(axis["gated_change_points"] for axis in per_axis.values())
    return {
        "per_axis": per_axis,
        "worst_full_change_points": worst_full,
        "worst_gated_change_points": worst_gated,
        "meets_target": bool(min(worst_full, worst_gated) >= -TARGET_MAX_AXIS_DROP_POINTS - 1e-9),
    }


def run(config, docs_dir: Path, routes=tuple(ROUTES), batch_size: int = 64) -> dict:
    """Every route of `routes` on the main job of `config` (an `EndToEndConfig`); writes docs/int8.{md,json}."""
    import time

    from safetensors.torch import load_file

    from .end_to_end import evaluate_main_job_student, main_job_inputs, main_job_student

    started = time.time()
    settings = config.settings()
    inputs = main_job_inputs(config, settings)
    student_dir = main_job_student(config, settings, inputs)
    float32, student_config = evaluate_main_job_student(config, inputs, student_dir)  # caches the embeddings
    embeddings = load_file(embeddings_cache_path(Path(config.cache_dir), inputs.teacher_dir, student_dir))

    def evaluated(student_embeds):
        return evaluate({**embeddings, "student": student_embeds}, inputs.rows, student_config,
                        inputs.teacher_config, config.thresholds, config.gflops_target)  # fmt: skip

    chosen = float32["summary"]["cheapest_within_one_point"] or float32["summary"]["best_within_budget"]
    threshold = chosen["threshold"]
    report = {"threshold": threshold, "float32": {"per_axis": float32["per_axis"]}, "routes": {}}
    with tempfile.TemporaryDirectory(prefix="waveclip-int8-") as folder:
        for route in routes:
            if route == "torch_int8":
                encode = torch_int8_encoder(student_dir)
            else:
                encode = onnx_encoder(student_dir, Path(folder) / route, int8=route.endswith("int8"))
            embeds = test_embeddings(encode, student_dir, inputs.data_root, inputs.rows, batch_size,
                                     config.progress, f"test split, {route}")  # fmt: skip
            report["routes"][route] = compare(float32, evaluated(embeds), threshold)
    report["context"] = {
        "command": recorded_command("python -m waveclip_hf.experiments.int8_accuracy"),
        "date": utc_now(),
        "machine": machine_description(),
        "wall_minutes": (time.time() - started) / 60,
        "student": student_config.vision_config.to_diff_dict() | {"settings": settings["distillation"]},
        "test_images": len(inputs.rows),
    }
    docs_dir = Path(docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    (docs_dir / "int8.json").write_text(json.dumps(report, indent=1) + "\n")
    write_int8_markdown(docs_dir / "int8.md", report)
    return report


def write_int8_markdown(path: Path, report: dict) -> Path:
    """docs/int8.md: one table per route (per axis: stages and gate against float32)."""
    context = report["context"]
    lines = [
        "# int8: what quantising the image tower costs in accuracy",
        "",
        f"Written by `{context['command']}` on {context['date']} ({context['machine']}; "
        f"{context['wall_minutes']:.1f} min); do not edit by hand. The main job's student on the main job's "
        f"{context['test_images']:,} test images; the text tower stays float32. Gate: the margin threshold "
        f"{report['threshold']:.4f} (the cheapest within 1 point of the full student on the float32 curve). "
        f"Target: no axis loses more than {TARGET_MAX_AXIS_DROP_POINTS} points. Speed: docs/benchmarks.md, "
        "section 5.",
        "",
    ]
    float32 = report["float32"]["per_axis"]
    num_stages = len(next(iter(float32.values()))["stages"])
    for route, result in report["routes"].items():
        verdict = "meets the target" if result["meets_target"] else "**misses the target**"
        lines += [
            f"## {ROUTES.get(route, route)}",
            "",
            f"Worst change over the axes: full model {result['worst_full_change_points']:+.2f} points, gate "
            f"{result['worst_gated_change_points']:+.2f} points ({verdict}).",
            "",
            "| axis | "
            + " | ".join(f"stage {stage}: float32 → this (points)" for stage in range(num_stages))
            + " | gate accuracy change | gate GFLOPs change |",
            "|---|" + "---:|" * (num_stages + 2),
        ]
        for axis, row in result["per_axis"].items():
            stages = " | ".join(
                f"{100 * base:.2f} → {100 * value:.2f} ({change:+.2f})"
                for base, value, change in zip(float32[axis]["stages"], row["stages"], row["stage_change_points"])
            )
            lines.append(
                f"| {axis} | {stages} | {row['gated_change_points']:+.2f} points | "
                f"{100 * row['gated_gflops_change']:+.2f}% |"
            )
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> dict:
    import argparse

    from .end_to_end import EndToEndConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=".cache/end_to_end", help="the main job's cache (default: %(default)s)")
    parser.add_argument("--docs-dir", default="docs", help="where int8.{md,json} go")
    parser.add_argument("--override", type=json.loads, default=None, help="as the main job's --override")
    parser.add_argument("--routes", nargs="+", choices=tuple(ROUTES), default=list(ROUTES))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = EndToEndConfig(cache_dir=args.cache_dir, progress=not args.no_progress, overrides=args.override)
    report = run(config, Path(args.docs_dir), tuple(args.routes))
    for route, result in report["routes"].items():
        print(f"{route}: worst full {result['worst_full_change_points']:+.2f} points, "
              f"gate {result['worst_gated_change_points']:+.2f} points")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
