"""Section `single_image`: one image at a time (and a batch of 8) on the CPU, in every way one can serve it.

A zero-shot service answers one request at a time; there the GFLOPs WaveCLIP saves must reach the clock. Each mode
runs plain CLIP and WaveCLIP the same way, in interleaved rounds of its own (modes one after another):

- `eager`: PyTorch float32, as `encoder` times it;
- `compiled`: `torch.compile` (WaveCLIP through `compile_stages`, CLIP's embeddings and encoder);
- `torch_int8`: torch's dynamic int8 quantisation of the image side's linear layers (`export.quantization`; in
  WaveCLIP's attention q, k and v are one product, while transformers' CLIP attention keeps three);
- `onnxruntime`: the graphs `export.onnx_export` writes (WaveCLIP: one per stage, the cached keys and values as
  explicit tensors; CLIP: its vision model with projection), run by onnxruntime;
- `onnxruntime_int8`: the same graphs after onnxruntime's dynamic int8 quantisation.

Per mode: the CLIP full pass, WaveCLIP's stage 0 alone, the cached full pass (stage 0 into the cache, then the
later stages from it) and the naive re-run (stage 0, then one block-causal full forward without cache). Random
weights and pixel values, as in `encoder`.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.waveclip.flops import clip_vit_flops, cumulative_flops, gflops, stage_flops
from .contention import load_average, quiet_policy
from .machine import usable_cores
from .models import EncoderModels, random_pixel_values
from .settings import BenchmarkSettings
from .timing import Case, rate_summary, run_interleaved


SINGLE_IMAGE_MODES = {
    "eager": "PyTorch eager, float32",
    "compiled": "torch.compile (inductor), float32",
    "torch_int8": "PyTorch, dynamic int8 linear layers (WaveCLIP: q, k, v as one product)",
    "onnxruntime": "ONNX Runtime, float32",
    "onnxruntime_int8": "ONNX Runtime, dynamic int8 (weights of every constant matrix product)",
}
# Per mode, the calls timed; "clip" is the baseline of its mode.
SINGLE_IMAGE_CALLS = {
    "clip": "CLIP full pass",
    "stage0": "WaveCLIP stage 0 only",
    "cached": "WaveCLIP cached full pass",
    "naive": "WaveCLIP naive re-run (stage 0, then a full forward)",
}


# ---------------------------------------------------------------------------------------------------------------
# The ways to run: each gives (clip, stage 0, cached full pass, full forward) callables on a pixel-value batch
# ---------------------------------------------------------------------------------------------------------------


class TorchRunner:
    """A CLIP vision model and a WaveCLIP model run by PyTorch (eager, compiled or quantised copies)."""

    def __init__(self, clip_vision: nn.Module, waveclip: nn.Module):
        self.clip_vision, self.waveclip = clip_vision, waveclip
        self.cache = waveclip.new_stage_cache()

    def clip(self, pixel_values: torch.Tensor):
        return self.clip_vision(pixel_values=pixel_values).image_embeds

    def stage0(self, pixel_values: torch.Tensor):
        return self.waveclip.get_image_features(pixel_values, num_stages=1).pooler_output

    def cached(self, pixel_values: torch.Tensor):
        """Stage 0 into the kept stage cache (reset first, as the pipeline does), then each later stage from it."""
        self.cache.reset()
        self.waveclip.get_image_features(pixel_values, num_stages=1, cache=self.cache, use_cache=True)
        for stage in range(2, self.waveclip.num_stages + 1):
            output = self.waveclip.get_image_features(pixel_values, num_stages=stage, cache=self.cache)
        return output.pooler_output

    def full_forward(self, pixel_values: torch.Tensor):
        return self.waveclip.get_image_features(pixel_values).pooler_output


class OnnxRunner:
    """The same four calls on ONNX Runtime sessions of exported graphs (numpy in and out)."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1

        def session(name: str):
            return onnxruntime.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])

        self.clip_session = session("clip_vision.onnx")
        self.stage_sessions = sorted(folder.glob("stage_*.onnx"), key=lambda path: int(path.stem.split("_")[1]))
        self.stage_sessions = [session(path.name) for path in self.stage_sessions]
        self.full_session = session("full_forward.onnx")

    def clip(self, pixel_values: np.ndarray):
        return self.clip_session.run(None, {"pixel_values": pixel_values})[0]

    def stage0(self, pixel_values: np.ndarray):
        return self.stage_sessions[0].run(None, {"pixel_values": pixel_values})[0]

    def cached(self, pixel_values: np.ndarray):
        embeds, keys, values = self.stage_sessions[0].run(None, {"pixel_values": pixel_values})
        for session in self.stage_sessions[1:]:
            inputs = {"pixel_values": pixel_values, "past_keys": keys, "past_values": values}
            embeds, keys, values = session.run(None, inputs)
        return embeds

    def full_forward(self, pixel_values: np.ndarray):
        return self.full_session.run(None, {"pixel_values": pixel_values})[0]


class _ClipVisionGraph(nn.Module):
    def __init__(self, clip_vision: nn.Module):
        super().__init__()
        self.clip_vision = clip_vision

    def forward(self, pixel_values):
        return self.clip_vision(pixel_values=pixel_values).image_embeds


def export_models(clip_vision: nn.Module, waveclip: nn.Module, folder: Path, int8_folder: Path) -> None:
    """`clip_vision.onnx`, `stage_<k>.onnx` and `full_forward.onnx` (every stage in one call, no past) into
    `folder`, and their dynamically quantised twins into `int8_folder`."""
    from ..export.onnx_export import StageGraph, _export, export_stages
    from ..export.quantization import quantize_onnx_graph

    config = waveclip.config.vision_config
    folder.mkdir(parents=True, exist_ok=True)
    pixel_values = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    dynamic = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=1024)}}
    _export(_ClipVisionGraph(clip_vision).eval(), (pixel_values,), ["pixel_values"], ["image_embeds"], dynamic,
            folder / "clip_vision.onnx")  # fmt: skip
    export_stages(waveclip, folder)
    full = StageGraph(waveclip, config.num_stages - 1).eval()  # no past: all stages in one block-causal call
    _export(full, (pixel_values,), ["pixel_values"], ["image_embeds", "keys", "values"], dynamic,
            folder / "full_forward.onnx")  # fmt: skip
    int8_folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("*.onnx"):
        quantize_onnx_graph(path, int8_folder / path.name)


def build_runners(models: EncoderModels, settings: BenchmarkSettings, folder: Path, log) -> dict[str, Any]:
    """mode -> runner, and mode -> seconds it took to build (compilation happens on the first call, later)."""
    from ..export.quantization import quantize_linear_layers
    from .encoder import compile_encoders

    clip_vision, waveclip = (model.float().cpu().eval() for model in models)
    runners, build_seconds = {"eager": TorchRunner(clip_vision, waveclip)}, {}
    if settings.compile_backend:
        started = time.perf_counter()
        runners["compiled"] = TorchRunner(*compile_encoders(clip_vision, waveclip, settings.compile_backend))
        build_seconds["compiled"] = time.perf_counter() - started
    started = time.perf_counter()
    runners["torch_int8"] = TorchRunner(quantize_linear_layers(clip_vision), quantize_linear_layers(waveclip))
    build_seconds["torch_int8"] = time.perf_counter() - started
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log("  single_image: onnxruntime is not installed (`pip install waveclip-hf[onnx]`): no ONNX Runtime modes")
        return runners, build_seconds
    started = time.perf_counter()
    log("  single_image: exporting CLIP and WaveCLIP to ONNX (float32 and int8)")
    export_models(copy.deepcopy(clip_vision), copy.deepcopy(waveclip), folder / "float32", folder / "int8")
    build_seconds["onnx_export_and_quantization"] = time.perf_counter() - started
    runners["onnxruntime"] = OnnxRunner(folder / "float32", usable_cores())
    runners["onnxruntime_int8"] = OnnxRunner(folder / "int8", usable_cores())
    return runners, build_seconds


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def single_image_cases(runners: dict[str, Any], pixel_values: torch.Tensor) -> dict[str, Case]:
    """`<mode>/<call>` -> a case running that call once; the naive re-run times its two calls as parts."""
    numpy_pixels = pixel_values.numpy()
    cases = {}
    for mode, runner in runners.items():
        inputs = numpy_pixels if isinstance(runner, OnnxRunner) else pixel_values

        def naive(watch, runner=runner, inputs=inputs):
            with watch.part("stage0"):
                runner.stage0(inputs)
            with watch.part("full_forward"):
                runner.full_forward(inputs)

        cases[f"{mode}/clip"] = lambda watch, runner=runner, inputs=inputs: runner.clip(inputs)
        cases[f"{mode}/stage0"] = lambda watch, runner=runner, inputs=inputs: runner.stage0(inputs)
        cases[f"{mode}/cached"] = lambda watch, runner=runner, inputs=inputs: runner.cached(inputs)
        cases[f"{mode}/naive"] = naive
    return cases


def call_gflops(clip_vision, waveclip) -> dict[str, float]:
    """GFLOPs per image of each call (`FLOPS_CONVENTION`; int8 modes do the same multiply-adds)."""
    return {
        "clip": gflops(clip_vit_flops(clip_vision.config)),
        "stage0": gflops(stage_flops(waveclip.config)[0]),
        "cached": gflops(sum(stage_flops(waveclip.config))),
        "naive": gflops(cumulative_flops(waveclip.config, mode="naive")[-1]),
    }


def mode_ratios(rows: dict[str, dict], per_image: dict[str, float]) -> dict[str, float]:
    """The issue's three ratios in one mode: cached / CLIP, naive / cached, and stage 0's speed-up over CLIP
    divided by its GFLOPs ratio (1.0: stage 0 runs at CLIP's GFLOP/s)."""
    clip, stage0, cached, naive = (rows[call]["median"] for call in ("clip", "stage0", "cached", "naive"))
    return {
        "cached_over_clip": cached / clip,
        "naive_over_cached": naive / cached,
        "stage0_speedup_over_gflops_ratio": (clip / stage0) / (per_image["clip"] / per_image["stage0"]),
    }


def _run_mode_by_mode(cases: dict[str, Case], modes: list[str], schedule, settings, contention: dict) -> dict:
    """`run_interleaved` over one mode's four calls at a time, mode after mode; `contention` gathers the rounds'.

    Rounds interleave the calls of one mode, never two runtimes. With every mode in one set of rounds, eager CLIP at
    batch 1 read 404 ms (IQR 80) against 261 ms in `encoder`'s torch-only rounds of the same run (2026-12-07): a
    call that follows the other runtime's call on the same two cores runs slower (both runtimes' worker threads
    spin-wait for a while after a call; not isolated further).
    """
    times = {}
    for mode in modes:
        stats: dict = {}
        mode_cases = {name: case for name, case in cases.items() if name.startswith(f"{mode}/")}
        times.update(
            run_interleaved(
                mode_cases, schedule.warmup, schedule.trials, torch.device("cpu"), quiet_policy(settings), stats
            )
        )
        contention.setdefault("rounds_busy_cores", []).extend(stats.get("rounds_busy_cores", []))
        for key in ("discarded_rounds", "contended_rounds_kept"):
            contention[key] = contention.get(key, 0) + stats.get(key, 0)
    return times


def single_image_section(settings: BenchmarkSettings, models: EncoderModels, log=print) -> dict[str, Any]:
    """Every mode's four calls at each of `settings.single_image_schedules`, in interleaved rounds per mode.

    Returns:
        {"modes": `SINGLE_IMAGE_MODES`, "threads", "build_seconds", "first_call_seconds" (per case, compilation
        included), "gflops_per_image", str(batch) -> {"warmup", "trials", "contention", "rows": {mode: {call:
        `rate_summary`}}, "ratios": {mode: `mode_ratios`}, "int8_speedup": {route: eager / int8 time of each call},
        "wall_seconds"}}.
    """
    per_image = call_gflops(*models)
    out: dict[str, Any] = {"modes": SINGLE_IMAGE_MODES, "threads": usable_cores(), "gflops_per_image": per_image}
    with tempfile.TemporaryDirectory(prefix="waveclip-single-image-") as folder:
        runners, out["build_seconds"] = build_runners(models, settings, Path(folder), log)
        with torch.inference_mode():
            for schedule in settings.single_image_schedules:
                generator = torch.Generator().manual_seed(settings.seed)
                pixel_values = random_pixel_values(settings, schedule.batch_size, generator)
                if schedule.batch_size > 1:  # one compiled graph for every batch of 2 or more, as `encoder` does
                    torch._dynamo.maybe_mark_dynamic(pixel_values, 0)
                cases = single_image_cases(runners, pixel_values)
                started, first, contention = time.perf_counter(), {}, {}
                for name, case in cases.items():  # the first call of each (compilation) is not a trial
                    first[name] = _seconds(case)
                times = _run_mode_by_mode(cases, list(runners), schedule, settings, contention)
                rows = {
                    mode: {
                        call: rate_summary(times[f"{mode}/{call}"]["total"], schedule.batch_size, per_image[call])
                        for call in SINGLE_IMAGE_CALLS
                    }
                    for mode in runners
                }
                out[str(schedule.batch_size)] = {
                    "warmup": schedule.warmup,
                    "trials": schedule.trials,
                    "contention": contention,
                    "first_call_seconds": first,
                    "rows": rows,
                    "ratios": {mode: mode_ratios(mode_rows, per_image) for mode, mode_rows in rows.items()},
                    "int8_speedup": _int8_speedups(rows),
                    "wall_seconds": time.perf_counter() - started,
                    "load_average_end": load_average(),
                }
                log(
                    f"  single_image batch {schedule.batch_size}: "
                    + ", ".join(
                        f"{mode} cached/CLIP {ratios['cached_over_clip']:.3f}"
                        for mode, ratios in out[str(schedule.batch_size)]["ratios"].items()
                    )
                )
    return out


def _seconds(case: Callable) -> float:
    from .timing import Stopwatch

    started = time.perf_counter()
    case(Stopwatch(torch.device("cpu")))
    return time.perf_counter() - started


def _int8_speedups(rows: dict[str, dict]) -> dict[str, dict[str, float]]:
    """route -> call -> float32 median / int8 median (torch int8 against eager, ONNX Runtime int8 against float)."""
    pairs = {"torch_int8": "eager", "onnxruntime_int8": "onnxruntime"}
    return {
        route: {call: rows[base][call]["median"] / rows[route][call]["median"] for call in SINGLE_IMAGE_CALLS}
        for route, base in pairs.items()
        if route in rows and base in rows
    }
