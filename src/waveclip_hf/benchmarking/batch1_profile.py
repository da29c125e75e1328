"""One image at a time on a CPU, operator by operator: where CLIP's pass and WaveCLIP's cached pass spend their time.

At batch 1 the cached refinement (stage 0 into the stage cache, then stage 1 from it) runs the encoder twice where
CLIP runs it once. `token_scaling` prices that from the token count alone; this module measures the two real passes
of the benchmark's models (random weights, ViT-B/16 geometry, one image), in float32 and with torch's dynamic int8
linear layers (`export.quantization`; WaveCLIP's q/k/v fused into one product, and kept separate as CLIP's are, to
show what the fusion adds), and splits each call's time by kind of operator under `torch.profiler`:

- matrix products (the linear layers: `aten::addmm`, `quantized::linear_dynamic`, ...), which stream every weight
  once per pass: the part the stage split makes WaveCLIP pay twice;
- attention (`scaled_dot_product_attention`; a later stage's queries also read the cached keys);
- norms and element-wise work (layer norms, residual adds, the MLP's activation);
- copies (the cache writes, dtype conversions, concatenations);
- the patch embedding's convolution, and every other operator;
- time between operators (Python, dispatch): the profiled call's wall clock less its operators' self time.

Each call is also timed without the profiler (median of interleaved trials), which is the number to compare; the
profile splits it. The cached pass's excess over CLIP, category by category, says what the second pass costs and
which part of it no scheduling removes (its matrix products). Then the zero-shot pipelines at batch 1 (image side,
θ = 0), float32 and int8: WaveCLIP's speed-up over the stock pipeline against their GFLOPs ratio.

    python -m waveclip_hf.benchmarking.batch1_profile   # docs/batch1_profile.{json,md}, docs/figures/
    python -m waveclip_hf.benchmarking.batch1_profile --from-json docs/batch1_profile.json   # re-render only
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .machine import module_run_meta, usable_cores, written_by
from .models import build_encoder_models, random_pixel_values
from .profiling import stage_calls
from .settings import BenchmarkSettings
from .timing import run_interleaved


# Operator kinds, matched in this order on the operator's name (first match wins); the rest are "other operators".
CATEGORIES: dict[str, tuple[str, ...]] = {
    "matrix products": ("addmm", "aten::mm", "aten::bmm", "aten::matmul", "quantized::linear", "aten::linear"),
    "attention": ("scaled_dot_product", "aten::_softmax", "aten::softmax"),
    "norms and element-wise": ("layer_norm", "aten::mul", "aten::add", "aten::sigmoid", "gelu", "aten::div"),
    "copies": ("copy_", "_to_copy", "aten::cat", "aten::clone", "aten::contiguous"),
    "patch embedding": ("convolution",),
}
OTHER = "other operators"
BETWEEN = "between operators"
KINDS = (*CATEGORIES, OTHER, BETWEEN)
# The calls: CLIP's full pass; stage 0 into a reset stage cache; stage 1 from that cache; the two in a row.
CALLS = ("clip", "stage0", "stage1", "cached")
# The modes: float32; torch's dynamic int8 as `quantize_linear_layers` makes it (WaveCLIP's q, k and v as one
# product; CLIP's attention keeps three); the same with WaveCLIP's three kept separate, as CLIP's are.
MODES = ("float32", "int8", "int8, q/k/v separate")


def operator_kind(name: str) -> str:
    """The `CATEGORIES` entry an operator's name falls in, or `OTHER`."""
    for kind, markers in CATEGORIES.items():
        if any(marker in name for marker in markers):
            return kind
    return OTHER


def split_by_kind(self_ms: dict[str, float], wall_ms: float) -> dict[str, float]:
    """Operator self times (name -> ms) summed per kind, plus `BETWEEN` = `wall_ms` less their total (≥ 0)."""
    kinds = dict.fromkeys(KINDS, 0.0)
    for name, ms in self_ms.items():
        kinds[operator_kind(name)] += ms
    kinds[BETWEEN] = max(wall_ms - sum(self_ms.values()), 0.0)
    return kinds


def profile_once(call: Callable[[], Any]) -> tuple[float, dict[str, tuple[float, int]]]:
    """One call under `torch.profiler` (CPU): (wall ms, operator -> (self ms, calls))."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        call()
        wall_ms = 1e3 * (time.perf_counter() - started)
    return wall_ms, {event.key: (event.self_cpu_time_total / 1e3, event.count) for event in profiler.key_averages()}


def profile_calls(calls: dict[str, Callable[[], Any]], repeats: int = 9) -> dict[str, dict[str, Any]]:
    """Each call under `torch.profiler`, in `repeats` interleaved rounds (so that a slow spell of the machine hits
    every call alike) after one discarded round (the first profiled calls of a process run several times slower).

    Returns:
        name -> {"wall_ms", "self_ms": operator -> self ms, "kinds": `split_by_kind`}, each the median over the
        rounds (an operator absent from a round counts 0 there), and "calls": operator -> calls per call.
    """
    rounds: dict[str, list] = {name: [] for name in calls}
    for repeat in range(repeats + 1):
        for name, call in calls.items():
            measured = profile_once(call)
            if repeat:
                rounds[name].append(measured)
    out = {}
    for name, measured in rounds.items():
        walls, runs = [wall for wall, _ in measured], [ops for _, ops in measured]
        names = sorted({op for run in runs for op in run})
        self_ms = {op: float(np.median([run.get(op, (0.0, 0))[0] for run in runs])) for op in names}
        self_ms = {op: ms for op, ms in self_ms.items() if ms > 0}
        wall_ms = float(np.median(walls))
        out[name] = {
            "wall_ms": wall_ms,
            "self_ms": self_ms,
            "calls": {op: runs[-1].get(op, (0.0, 0))[1] for op in names},
            "kinds": split_by_kind(self_ms, wall_ms),
        }
    return out


def summarize_precision(wall_ms: dict[str, float], profiles: dict[str, dict]) -> dict[str, Any]:
    """The cached pass against CLIP's: measured wall times, the profiled split of each, and the excess per kind.

    Args:
        wall_ms: call -> median ms without the profiler (`CALLS`).
        profiles: "clip", "stage0", "stage1" -> their entry of `profile_calls`.

    Returns:
        {"wall_ms", "cached_over_clip" (measured), "kinds": {"clip", "cached" (stage 0 + stage 1)}: kind -> ms,
        "excess_ms": kind -> cached − clip, "matrix_products_over_clip": the cached pass's matrix products over
        CLIP's, "cached_over_clip_if_only_matrix_products_grew": CLIP's profiled total plus the matrix products'
        excess, over CLIP's total (what the second pass costs if nothing but its weight stream were extra),
        "profiles": `profiles`}.
    """
    clip = profiles["clip"]["kinds"]
    cached = {kind: profiles["stage0"]["kinds"][kind] + profiles["stage1"]["kinds"][kind] for kind in KINDS}
    clip_total = sum(clip.values())
    matrix = "matrix products"
    return {
        "wall_ms": wall_ms,
        "cached_over_clip": wall_ms["cached"] / wall_ms["clip"],
        "kinds": {"clip": clip, "cached": cached},
        "profiled_total_ms": {"clip": clip_total, "cached": sum(cached.values())},
        "excess_ms": {kind: cached[kind] - clip[kind] for kind in KINDS},
        "matrix_products_over_clip": cached[matrix] / clip[matrix],
        "cached_over_clip_if_only_matrix_products_grew": (clip_total + cached[matrix] - clip[matrix]) / clip_total,
        "profiles": profiles,
    }


def measure_batch1_profile(
    settings: BenchmarkSettings, warmup: int, trials: int, profile_repeats: int = 9, log=print
) -> dict[str, Any]:
    """`summarize_precision` at batch 1 in each of `MODES`: {mode: ...}."""
    from ..export.quantization import quantize_linear_layers

    models = build_encoder_models(settings)
    pixel_values = random_pixel_values(settings, 1, torch.Generator().manual_seed(settings.seed))
    clip_int8 = quantize_linear_layers(models.clip_vision)
    encoders = {
        "float32": (models.clip_vision, models.waveclip),
        "int8": (clip_int8, quantize_linear_layers(models.waveclip)),
        "int8, q/k/v separate": (clip_int8, quantize_linear_layers(models.waveclip, fuse_qkv=False)),
    }
    results = {}
    for precision, (clip_vision, waveclip) in encoders.items():
        started = time.perf_counter()
        with torch.inference_mode():
            calls = stage_calls(clip_vision, waveclip, pixel_values)
            cases = {name: (lambda watch, call=call: call()) for name, call in calls.items()}
            times = run_interleaved(cases, warmup, trials, torch.device("cpu"))
            wall_ms = {name: 1e3 * float(np.median(parts["total"])) for name, parts in times.items()}
            profiles = profile_calls({name: calls[name] for name in ("clip", "stage0", "stage1")}, profile_repeats)
        results[precision] = summarize_precision(wall_ms, profiles)
        log(
            f"  {precision}: CLIP {wall_ms['clip']:.1f} ms, cached {wall_ms['cached']:.1f} ms, cached / CLIP "
            f"{results[precision]['cached_over_clip']:.3f} ({time.perf_counter() - started:.0f} s)"
        )
    return results


# The pipelines' runs at batch_size 1 and θ = 0 (every image answered at stage 0), image side only: the stock
# pipeline's text transformer memoised, WaveCLIP's label set cached; `pipelines.pipeline_cases` keys.
PIPELINE_RUNS = {
    "float32": ("stock_image_side", "waveclip_theta0"),
    "int8": ("stock_image_side_int8", "waveclip_theta0_int8"),
}


def measure_pipelines(settings: BenchmarkSettings, warmup: int, trials: int) -> dict[str, Any]:
    """The zero-shot pipelines at batch 1, θ = 0, image side, in float32 and int8 (`benchmarking.pipelines`): ms per
    image, the speed-up of WaveCLIP over the stock pipeline, the GFLOPs ratio, and the speed-up over that ratio; also
    WaveCLIP's image processor and `refine` called without the pipeline (float32), for the pipeline's own cost.

    Returns:
        {"images", "labels", "bare_waveclip_theta0_ms", per precision: {"stock_ms", "waveclip_ms", "speedup",
        "gflops_ratio", "speedup_over_gflops_ratio"}}.
    """
    import dataclasses

    from ..models.waveclip.flops import clip_vit_flops, gflops
    from .pipelines import _warm_up, pipeline_cases, prepare_pipelines

    settings = dataclasses.replace(settings, pipeline_int8=True)
    setup = prepare_pipelines(settings)
    memo, outputs = {}, {}
    with torch.inference_mode():
        _warm_up(setup, memo)
        cases, _ = pipeline_cases(setup, {"waveclip_theta0": 0.0}, (1,), memo, outputs)
        kept = [*PIPELINE_RUNS["float32"], *PIPELINE_RUNS["int8"], "bare_waveclip_theta0"]
        times = run_interleaved({key: cases[key] for key in kept}, warmup, trials, torch.device("cpu"))
    per_image = {key: 1e3 * float(np.median(times[key]["total"])) / len(setup.images) for key in kept}
    text = setup.text_config
    stock_gflops = gflops(
        clip_vit_flops(setup.vision_config, settings.projection_dim)
        + len(setup.labels) * 2 * text.hidden_size * settings.projection_dim  # the stock pipeline's text projection
    )
    stage0_gflops = float(setup.wave.model.answer_gflops()[0])
    result = {
        "images": len(setup.images),
        "labels": len(setup.labels),
        "bare_waveclip_theta0_ms": per_image["bare_waveclip_theta0"],
    }
    for precision, (stock, wave) in PIPELINE_RUNS.items():
        speedup = per_image[stock] / per_image[wave]
        result[precision] = {
            "stock_ms": per_image[stock],
            "waveclip_ms": per_image[wave],
            "speedup": speedup,
            "gflops_ratio": stock_gflops / stage0_gflops,
            "speedup_over_gflops_ratio": speedup / (stock_gflops / stage0_gflops),
            "answered_at_stage0": float(np.mean([image[0]["stage"] == 0 for image in outputs[wave]])),
        }
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any], figure_name: str) -> str:
    meta, results = report["meta"], report["results"]
    rows = [
        "# Batch 1 on a CPU, operator by operator: CLIP's pass against WaveCLIP's cached pass",
        "",
        written_by(meta) + " The benchmark's "
        "models (random weights, ViT-B/16 width and depth, 224 px, one DWT level), one image; wall times are medians "
        f"of {report['settings']['trials']} interleaved trials without the profiler, the split by kind is the "
        f"median of {report['settings']['profile_repeats']} interleaved profiled rounds (the profiler adds a little "
        "to every operator). The cached pass is stage 0 into a reset stage cache, then stage 1 from it. See "
        "`benchmarking/batch1_profile.py`.",
        "",
        f"![time by kind of operator, CLIP against the cached pass, per mode](figures/{figure_name})",
        "",
        "| | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    wall_lines = [
        ("CLIP full pass, ms", lambda r: f"{r['wall_ms']['clip']:.1f}"),
        ("WaveCLIP stage 0, ms", lambda r: f"{r['wall_ms']['stage0']:.1f}"),
        ("WaveCLIP stage 1 from the cache, ms", lambda r: f"{r['wall_ms']['stage1']:.1f}"),
        ("WaveCLIP cached full pass, ms", lambda r: f"{r['wall_ms']['cached']:.1f}"),
        ("**cached / CLIP, measured**", lambda r: f"**{r['cached_over_clip']:.3f}**"),
        ("matrix products: cached / CLIP", lambda r: f"{r['matrix_products_over_clip']:.3f}"),
        (
            "cached / CLIP if only the matrix products grew",
            lambda r: f"{r['cached_over_clip_if_only_matrix_products_grew']:.3f}",
        ),
    ]
    rows += [f"| {label} | " + " | ".join(form(r) for r in results.values()) + " |" for label, form in wall_lines]
    int8_modes = [mode for mode in results if mode.startswith("int8")]
    if len(int8_modes) > 1:
        clip_ms = [results[mode]["wall_ms"]["clip"] for mode in int8_modes]
        rows += [
            "",
            f"CLIP is the same int8 model in the {len(int8_modes)} int8 modes (each mode has its own rounds): its "
            f"times there, {' and '.join(f'{ms:.1f}' for ms in clip_ms)} ms, show how far this machine drifts "
            "between rounds, against which the ratios (taken within a mode's rounds) are steadier.",
        ]
    for precision, result in results.items():
        kinds = result["kinds"]
        rows += [
            "",
            f"**{precision}**, profiled ms by kind of operator (CLIP total {result['profiled_total_ms']['clip']:.1f}, "
            f"cached total {result['profiled_total_ms']['cached']:.1f}):",
            "",
            "| kind | CLIP | stage 0 | stage 1 | cached (0 + 1) | cached − CLIP |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind in KINDS:
            stage0 = result["profiles"]["stage0"]["kinds"][kind]
            stage1 = result["profiles"]["stage1"]["kinds"][kind]
            rows.append(
                f"| {kind} | {kinds['clip'][kind]:.1f} | {stage0:.1f} | {stage1:.1f} | {kinds['cached'][kind]:.1f} "
                f"| {result['excess_ms'][kind]:+.1f} |"
            )
    if "pipelines" in report:
        rows += _pipeline_rows(report["pipelines"], report["settings"].get("pipeline_trials"))
    return "\n".join(rows) + "\n"


def _pipeline_rows(pipelines: dict[str, Any], trials) -> list[str]:
    rows = [
        "",
        "## The zero-shot pipelines at batch 1",
        "",
        f'`pipeline("zero-shot-image-classification")` at `batch_size=1`, {pipelines["images"]} photos, '
        f"{pipelines['labels']} labels, image side only (the stock pipeline's text transformer memoised, WaveCLIP's "
        "label set cached), WaveCLIP at θ = 0 (every image answered at stage 0), int8: both image sides through "
        f"`quantize_linear_layers`; ms per image, median of {trials} interleaved rounds (the runs of "
        "`benchmarking/pipelines.py`). Target: speed-up / GFLOPs ratio ≥ 0.85.",
        "",
        "| | stock CLIP image side, ms | WaveCLIP θ = 0, ms | speed-up | GFLOPs ratio | speed-up / GFLOPs ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for precision in PIPELINE_RUNS:
        r = pipelines[precision]
        rows.append(
            f"| {precision} | {r['stock_ms']:.1f} | {r['waveclip_ms']:.1f} | {r['speedup']:.2f}x | "
            f"{r['gflops_ratio']:.2f}x | **{r['speedup_over_gflops_ratio']:.3f}** |"
        )
    own = pipelines["float32"]["waveclip_ms"] - pipelines["bare_waveclip_theta0_ms"]
    rows += [
        "",
        f"WaveCLIP's image processor and `refine` called directly (float32, same rounds): "
        f"{pipelines['bare_waveclip_theta0_ms']:.1f} ms per image, so the pipeline's own work costs {own:+.1f} ms.",
    ]
    return rows


def plot_batch1_profile(report: dict[str, Any], path: Path) -> Path:
    """Stacked horizontal bars, one per (precision, CLIP / cached), split by kind of operator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7.5, 4.4))
    labels, y = [], 0
    colours = plt.get_cmap("tab10").colors
    for precision, result in report["results"].items():
        for call, name in (("clip", "CLIP"), ("cached", "WaveCLIP cached")):
            left = 0.0
            for index, kind in enumerate(KINDS):
                width = result["kinds"][call][kind]
                ax.barh(y, width, left=left, color=colours[index], label=kind if y == 0 else None)
                left += width
            labels.append(f"{precision}: {name}")
            y += 1
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (profiled, batch 1)")
    ax.set_title("Where one image's time goes, by kind of operator")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("docs"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--profile-repeats", type=int, default=9, help="profiled rounds of the calls, median kept")
    parser.add_argument(
        "--pipeline-trials", type=int, default=5, help="interleaved rounds of the pipelines (0: leave them out)"
    )
    parser.add_argument("--from-json", type=Path, help="do not run: rewrite the Markdown and the figure from a report")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        return write_report(report, args.output_dir)
    torch.set_num_threads(usable_cores())
    settings = BenchmarkSettings()
    meta = module_run_meta(__spec__.name, argv)
    report = {
        "meta": meta,
        "settings": {
            "warmup": args.warmup,
            "trials": args.trials,
            "profile_repeats": args.profile_repeats,
            "pipeline_trials": args.pipeline_trials,
            "batch_size": 1,
        },
        "results": measure_batch1_profile(settings, args.warmup, args.trials, args.profile_repeats),
    }
    if args.pipeline_trials:
        report["pipelines"] = measure_pipelines(settings, 1, args.pipeline_trials)
    return write_report(report, args.output_dir)


def write_report(report: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """batch1_profile.{json,md} and figures/batch1_profile.png in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "batch1_profile.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_batch1_profile(report, output_dir / "figures" / "batch1_profile.png")
    (output_dir / "batch1_profile.md").write_text(render_markdown(report, "batch1_profile.png"))
    return report


if __name__ == "__main__":
    main()
