"""Speed benchmarks: WaveCLIP against a plain CLIP ViT, side by side, in one process and one run.

Four sections, each comparing like with like on the same machine, interleaved so that a noisy neighbour slows
every configuration alike:

1. `encoder`: a transformers `CLIPVisionModelWithProjection` full pass against WaveCLIP's image encoder
   (`WaveCLIPModel.get_image_features`): stage 0 only, the cached full pass (stage 0 with a KV cache, then the
   later stages from it), the naive re-run (stage 0, then every stage again without a cache) and the single
   block-causal full forward. Random weights at ViT-B/16 geometry by default; `sdpa` attention.
2. `preprocessing`: `WaveCLIPImageProcessor` (YCbCr + DWT) against what `transformers.CLIPImageProcessor()`
   returns (without torchvision: `CLIPImageProcessorPil`), on scikit-image photos of various sizes and a random
   1024 x 1024 image, one image per call and a batch per call.
3. `pipeline`: the stock `pipeline("zero-shot-image-classification")` around a `CLIPModel` against the WaveCLIP
   pipeline (loaded through `trust_remote_code`) on 1,000 labels, in images per second. The stock pipeline
   re-encodes every prompt for every image (that is its behaviour); a second, "image side only" measurement
   memoises its text tower so the comparison isolates the image side.
4. `early_exit`: the batched early-exit path of `WaveCLIPModel.refine` with the fraction of images that stop at
   stage 0 forced to 0, 25, 50, 75 and 100 %, against the line the GFLOPs count predicts.

Every figure carries the analytic GFLOPs of `flops.py` (`FLOPS_CONVENTION`) and the achieved GFLOP/s.
`run_benchmarks` runs the sections and `write_reports` writes `benchmarks.json`, `benchmarks.md` and
`benchmark_time_vs_gflops.png`; `scripts/benchmark.py` is the command line.

Timing: `time.perf_counter` around each call (with `torch.cuda.synchronize` on a GPU), under
`torch.inference_mode()`, `torch.set_num_threads(<all cores>)`, warm-up rounds first, then repeated trials;
reports give the median, the inter-quartile range and min / max over the trials.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.waveclip.flops import FLOPS_CONVENTION, clip_vit_flops, cumulative_flops, full_forward_flops, gflops, stage_flops
from ..models.waveclip.gating import probability_margin
from ..models.waveclip.scoring import zero_shot_logits


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Warm-up rounds (not recorded) and timed trials for one batch size."""

    batch_size: int
    warmup: int
    trials: int


@dataclass
class BenchmarkSettings:
    """Every knob of a benchmark run; `asdict(settings)` goes into the JSON report.

    The defaults are the full CPU run: ViT-B/16 geometry (width 768, 12 layers, 12 heads, MLP 3072, 224 px, patch
    16, projection 512) against WaveCLIP at the same width with cells of 32 px and one DWT level; a CLIP-sized text
    tower (12 layers, width 512, 8 heads) for the pipelines; 1,000 labels.
    """

    # Vision geometry, shared by CLIP and WaveCLIP.
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    projection_dim: int = 512
    cell_size: int = 32
    levels: int = 1
    # Text tower of the pipelines (CLIP ViT-B/16's is 12 layers, width 512, 8 heads, MLP 2048).
    text_hidden_size: int = 512
    text_num_hidden_layers: int = 12
    text_num_attention_heads: int = 8
    text_intermediate_size: int = 2048
    text_max_length: int = 77
    attn_implementation: str = "sdpa"
    sections: tuple[str, ...] = ("encoder", "profile", "early_exit", "preprocessing", "pipeline")
    profile_batch_size: int = 8  # torch.profiler of one call per encoder configuration
    # Encoder: (batch size, warm-up rounds, trials). Fewer trials where one round costs minutes.
    cpu_schedules: tuple[Schedule, ...] = (Schedule(1, 2, 10), Schedule(8, 1, 6), Schedule(64, 1, 3))
    gpu_schedules: tuple[Schedule, ...] = (Schedule(1, 5, 20), Schedule(64, 3, 10), Schedule(512, 2, 5))
    gpu_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    use_gpu: bool = True
    # Early exit: forced exit fractions at one batch size.
    exit_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    cpu_early_exit: Schedule = field(default_factory=lambda: Schedule(64, 1, 3))
    gpu_early_exit: Schedule = field(default_factory=lambda: Schedule(512, 2, 5))
    # Preprocessing: one image per call, and a batch per call.
    preprocessing_single: Schedule = field(default_factory=lambda: Schedule(1, 2, 10))
    preprocessing_batch: Schedule = field(default_factory=lambda: Schedule(32, 1, 5))
    # Pipelines.
    num_labels: int = 1000
    pipeline_images: int = 16
    stock_pipeline_images: int = 4  # each one re-encodes every prompt: the costliest calls of the run
    pipeline_rounds: int = 3  # interleaved rounds of every pipeline run (the cold first call is measured once)
    pipeline_batch_sizes: tuple[int, ...] = (1, 16)  # the pipelines' `batch_size` (1 is their default)
    high_threshold: float = 1.01
    seed: int = 0
    # On a shared machine: before each section wait (at most this long) until other processes keep fewer than
    # `idle_busy_cores` cores busy. 0 = do not wait. Contention is recorded either way.
    wait_for_idle_seconds: float = 0.0
    idle_busy_cores: float = 0.3

    @property
    def is_vit_b16(self) -> bool:
        return (self.hidden_size, self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                self.image_size, self.patch_size) == (768, 12, 12, 3072, 224, 16)


def quick_settings() -> BenchmarkSettings:
    """Every section at a narrow geometry, tiny batches and one or two trials: well under a minute on 2 cores."""
    return BenchmarkSettings(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, projection_dim=128,
        text_hidden_size=128, text_num_hidden_layers=2, text_num_attention_heads=4, text_intermediate_size=256,
        cpu_schedules=(Schedule(1, 1, 2), Schedule(4, 1, 2)),
        gpu_schedules=(Schedule(1, 1, 3), Schedule(64, 1, 3)),
        cpu_early_exit=Schedule(8, 1, 2), gpu_early_exit=Schedule(64, 1, 2),
        preprocessing_single=Schedule(1, 1, 2), preprocessing_batch=Schedule(8, 1, 2), profile_batch_size=2,
        num_labels=100, pipeline_images=4, stock_pipeline_images=2, pipeline_rounds=1,
        pipeline_batch_sizes=(1, 4),
    )


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------------------


class Stopwatch:
    """Times named parts of one trial; parts with the same name add up.

    `part` synchronises the GPU before reading the clock on both sides, so a part's time is its own kernels'.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.parts: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def part(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles (linear interpolation), IQR, min, max and the raw samples, in seconds."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("No samples to summarize.")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
        "min": float(values.min()), "max": float(values.max()), "n": int(values.size),
        "samples": [float(v) for v in values],
    }


@dataclass
class QuietPolicy:
    """Retry a timed round when other processes kept the machine busy during it (for shared machines).

    A round whose `CpuMonitor` reading shows more than `max_busy_cores` of other processes' work is discarded, the
    run waits (at most `wait_seconds`) for a quiet machine and repeats the round, up to `max_retries` times; after
    that the round is kept and counted as contended. Rounds shorter than `min_round_seconds` are not judged:
    /proc/stat counts in 10 ms ticks, too coarse for them.
    """

    max_busy_cores: float = 0.3
    max_retries: int = 3
    wait_seconds: float = 600.0
    min_round_seconds: float = 0.25


def quiet_policy(settings: "BenchmarkSettings") -> QuietPolicy | None:
    """The retry policy of a run: active when the settings ask to wait for a quiet machine."""
    if settings.wait_for_idle_seconds <= 0:
        return None
    return QuietPolicy(max_busy_cores=settings.idle_busy_cores, wait_seconds=settings.wait_for_idle_seconds)


def wait_if_asked(settings: "BenchmarkSettings", log=print) -> dict:
    """`wait_for_idle` under the settings' limits, or nothing when they do not ask to wait."""
    if settings.wait_for_idle_seconds <= 0:
        return {}
    return wait_for_idle(settings.wait_for_idle_seconds, settings.idle_busy_cores, log)


def run_interleaved(
    cases: dict[str, Callable[[Stopwatch], None]],
    warmup: int,
    trials: int,
    device: torch.device,
    quiet: QuietPolicy | None = None,
    stats: dict | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Run every case `warmup` times untimed, then `trials` timed rounds, interleaved.

    Each round runs every case once, starting one case later than the previous round, so a slowdown from another
    process hits all cases alike and no case always follows the same one.

    Args:
        cases: name -> callable taking a `Stopwatch`; it times its own parts with `stopwatch.part(name)`.
        quiet: retry rounds during which other processes were busy (see `QuietPolicy`); None keeps every round.
        stats: if given, filled with `rounds_busy_cores` (other processes' cores per kept round; None for rounds
            too short to judge), `discarded_rounds` and `contended_rounds_kept`.

    Returns:
        name -> {"total": [seconds per trial], <part>: [seconds per trial], ...}.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name](Stopwatch(device))
    results: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    kept_busy, discarded, contended = [], 0, 0
    for trial in range(trials):
        shift = trial % len(names)
        for attempt in range(1 + (quiet.max_retries if quiet else 0)):
            parts: dict[str, dict[str, float]] = {}
            with CpuMonitor() as monitor:
                for name in names[shift:] + names[:shift]:
                    watch = Stopwatch(device)
                    with watch.part("__total__"):
                        cases[name](watch)
                    parts[name] = watch.parts
            reading = monitor.result
            shortest = (quiet or QuietPolicy()).min_round_seconds
            busy = reading["others_busy_cores"] if reading and reading["seconds"] >= shortest else None
            if quiet is None or busy is None or busy <= quiet.max_busy_cores:
                break
            if attempt == quiet.max_retries:
                contended += 1
                break
            discarded += 1
            wait_for_idle(quiet.wait_seconds, quiet.max_busy_cores, log=lambda *_: None)
        kept_busy.append(busy)
        for name, watch_parts in parts.items():
            results[name].setdefault("total", []).append(watch_parts.pop("__total__"))
            for part, seconds in watch_parts.items():
                results[name].setdefault(part, []).append(seconds)
    if stats is not None:
        stats.update(rounds_busy_cores=kept_busy, discarded_rounds=discarded, contended_rounds_kept=contended)
    return results


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, steal) jiffies of the whole machine so far, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal


class CpuMonitor:
    """How busy the machine was with *other* processes while a block ran, in cores.

    Other engineers' jobs share this machine; with every core given to torch, a process that takes a core away
    stalls each parallel region, and small-batch calls (many short operators) suffer most. Each section records
    `others_busy_cores` = (machine busy time - this process's CPU time) / wall time, and `steal_cores` (time the
    hypervisor gave to other guests), so a reader can tell a clean run from a contended one.
    """

    def __enter__(self):
        self.start = (_cpu_jiffies(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        self.result = self.read()
        return False

    def read(self) -> dict[str, float] | None:
        jiffies0, cpu0, wall0 = self.start
        jiffies1, cpu1, wall1 = _cpu_jiffies(), time.process_time(), time.perf_counter()
        if jiffies0 is None or jiffies1 is None or wall1 <= wall0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        wall = wall1 - wall0
        others = max(0.0, (jiffies1[0] - jiffies0[0]) / hz - (cpu1 - cpu0)) / wall
        return {"others_busy_cores": round(others, 2), "steal_cores": round((jiffies1[1] - jiffies0[1]) / hz / wall, 2),
                "seconds": round(wall, 1)}


def wait_for_idle(max_seconds: float, max_busy_cores: float = 0.3, log=print, window: float = 1.0) -> dict:
    """Wait (at most `max_seconds`) until other processes keep fewer than `max_busy_cores` cores busy.

    Returns {"waited_seconds", "others_busy_cores"} of the last sample (`others_busy_cores` None off Linux).
    """
    waited, busy = 0.0, None
    while True:
        with CpuMonitor() as monitor:
            time.sleep(window)
        busy = (monitor.result or {}).get("others_busy_cores")
        if busy is None or busy <= max_busy_cores or waited >= max_seconds:
            break
        if waited == 0:
            log(f"  other processes keep {busy:.2f} cores busy: waiting up to {max_seconds:.0f} s for a quiet machine")
        waited += window
    return {"waited_seconds": waited, "others_busy_cores": busy}


def machine_info() -> dict[str, Any]:
    """CPU model (from `lscpu`), core count, threads, accelerator, library versions, date and load average."""
    import transformers

    cpu_model, cpus = platform.processor() or "unknown", os.cpu_count()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        cpu_model = fields.get("Model name", cpu_model).strip()
        cpus = int(fields.get("CPU(s)", cpus))
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    info = {
        "cpu_model": cpu_model,
        "cpu_cores": cpus,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_start": _load_average(),
    }
    return info


# ---------------------------------------------------------------------------------------------------------------
# Models at the benchmark geometry
# ---------------------------------------------------------------------------------------------------------------


def label_names(num_labels: int) -> list[str]:
    """`object 0` ... `object N-1`: distinct labels whose prompts all tokenise to the same length."""
    return [f"object {i}" for i in range(num_labels)]


def clip_vision_config(settings: BenchmarkSettings):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=settings.hidden_size, num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads, intermediate_size=settings.intermediate_size,
        image_size=settings.image_size, patch_size=settings.patch_size, projection_dim=settings.projection_dim,
    )


def build_models(settings: BenchmarkSettings, tokenizer=None):
    """Random-weight models at the benchmark geometry.

    Returns:
        (clip_vision, clip, waveclip): a `CLIPVisionModelWithProjection` (the encoder baseline), a `CLIPModel`
        with the text tower of `settings` (the stock pipeline's model) and `convert_clip_to_waveclip(clip)` (same
        width and text tower; cells of `cell_size`, `levels` DWT levels). All in eval mode with
        `settings.attn_implementation`.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    from ..conversion.clip_to_waveclip import convert_clip_to_waveclip
    from ..data.text_tokenizer import clip_text_config_kwargs

    torch.manual_seed(settings.seed)
    text_config = dict(
        hidden_size=settings.text_hidden_size, num_hidden_layers=settings.text_num_hidden_layers,
        num_attention_heads=settings.text_num_attention_heads, intermediate_size=settings.text_intermediate_size,
        projection_dim=settings.projection_dim,
    )
    if tokenizer is not None:
        text_config.update(clip_text_config_kwargs(tokenizer))
    vision = clip_vision_config(settings)
    clip_vision = CLIPVisionModelWithProjection(vision).eval()
    clip = CLIPModel(
        CLIPConfig(text_config=text_config, vision_config=vision.to_dict(), projection_dim=settings.projection_dim)
    ).eval()
    waveclip = convert_clip_to_waveclip(clip, cell_size=settings.cell_size, levels=settings.levels).eval()
    for model in (clip_vision, clip, waveclip):
        model.set_attn_implementation(settings.attn_implementation)
    return clip_vision, clip, waveclip


def text_tower_flops(text_config, sequence_length: int, projection_dim: int) -> int:
    """FLOPs of one prompt through a CLIP text tower (`FLOPS_CONVENTION`), text projection of the pooled token
    included: per layer 8 T D^2 + 4 T D I + 4 T^2 D, as `flops.py` counts a vision layer."""
    hidden, intermediate, tokens = text_config.hidden_size, text_config.intermediate_size, sequence_length
    layer = 8 * tokens * hidden**2 + 4 * tokens * hidden * intermediate + 4 * tokens * tokens * hidden
    return text_config.num_hidden_layers * layer + 2 * hidden * projection_dim


# ---------------------------------------------------------------------------------------------------------------
# 1. Encoder
# ---------------------------------------------------------------------------------------------------------------

ENCODER_CONFIGS = {
    "clip_full": "CLIP ViT full pass",
    "waveclip_stage0": "WaveCLIP stage 0 only",
    "waveclip_cached_full": "WaveCLIP cached full pass (stage 0 with cache, then later stages from it)",
    "waveclip_naive": "WaveCLIP naive re-run (stage 0, then all stages again without cache)",
    "waveclip_full_forward": "WaveCLIP single block-causal full forward (all stages, one call)",
}


def encoder_gflops(clip_vision, waveclip) -> dict[str, float]:
    """Analytic GFLOPs per image of every encoder configuration (`FLOPS_CONVENTION`)."""
    config = waveclip.config
    return {
        "clip_full": gflops(clip_vit_flops(clip_vision.config)),
        "waveclip_stage0": gflops(stage_flops(config)[0]),
        "waveclip_cached_full": gflops(sum(stage_flops(config))),
        "waveclip_naive": gflops(cumulative_flops(config, mode="naive")[-1]),
        "waveclip_full_forward": gflops(full_forward_flops(config)),
    }


def encoder_cases(clip_vision, waveclip, pixel_values: torch.Tensor) -> dict[str, Callable[[Stopwatch], None]]:
    """The three timed units of a round; the other two configurations are parts of the naive re-run.

    - `clip_full`: one `CLIPVisionModelWithProjection` call.
    - `waveclip_cached_full`: stage 0 with `use_cache=True`, then stages 1..L, each from the cache (parts
      `stage0_cached`, `stage1`, ...).
    - `waveclip_naive`: stages 0..s from scratch for every s (parts `stages_0-0`, ..., `stages_0-L`); for L = 1 that is
      stage 0, then the full forward. Its first part is "stage 0 only" and its last the single full forward, each
      timed on its own, so neither is run twice.
    """
    num_stages = waveclip.num_stages

    def clip_full(watch: Stopwatch) -> None:
        clip_vision(pixel_values=pixel_values)

    def cached_full(watch: Stopwatch) -> None:
        with watch.part("stage0_cached"):
            out = waveclip.get_image_features(pixel_values, num_stages=1, use_cache=True)
        for stage in range(1, num_stages):
            with watch.part(f"stage{stage}"):
                out = waveclip.get_image_features(
                    pixel_values, num_stages=stage + 1, cache=out.cache,
                    use_cache=stage + 1 < num_stages,
                )

    def naive(watch: Stopwatch) -> None:
        for stage in range(num_stages):
            with watch.part(f"stages_0-{stage}"):
                waveclip.get_image_features(pixel_values, num_stages=stage + 1)

    return {"clip_full": clip_full, "waveclip_cached_full": cached_full, "waveclip_naive": naive}


def _rate_entry(summary: dict, batch_size: int, gflops_per_image: float) -> dict[str, Any]:
    median = summary["median"]
    return {
        **summary,
        "batch_size": batch_size,
        "ms_per_image": 1e3 * median / batch_size,
        "gflops_per_image": gflops_per_image,
        "gflops_per_second": gflops_per_image * batch_size / median,
    }


def benchmark_encoder(clip_vision, waveclip, schedules: Sequence[Schedule], device, dtype: torch.dtype,
                      settings: BenchmarkSettings, log=print) -> dict[str, Any]:
    """All encoder configurations at each batch size: seconds per batch call, ms per image, GFLOP/s."""
    device = torch.device(device)
    clip_vision = clip_vision.to(device=device, dtype=dtype)
    waveclip = waveclip.to(device=device, dtype=dtype)
    per_image = encoder_gflops(clip_vision, waveclip)
    num_stages = waveclip.num_stages
    out: dict[str, Any] = {}
    for schedule in schedules:
        generator = torch.Generator().manual_seed(settings.seed)
        # float32 inputs, as the processors give; both models cast to their weight dtype.
        pixel_values = torch.randn(
            schedule.batch_size, 3, settings.image_size, settings.image_size, generator=generator
        ).to(device)
        start, contention = time.perf_counter(), {}
        times = run_interleaved(encoder_cases(clip_vision, waveclip, pixel_values), schedule.warmup,
                                schedule.trials, device, quiet_policy(settings), contention)
        naive = times["waveclip_naive"]
        timed = {
            "clip_full": times["clip_full"]["total"],
            "waveclip_stage0": naive["stages_0-0"],
            "waveclip_cached_full": times["waveclip_cached_full"]["total"],
            "waveclip_naive": naive["total"],
            "waveclip_full_forward": naive[f"stages_0-{num_stages - 1}"],
        }
        rows = {name: _rate_entry(summarize(samples), schedule.batch_size, per_image[name])
                for name, samples in timed.items()}
        rows["waveclip_cached_full"]["parts"] = {
            part: summarize(samples) for part, samples in times["waveclip_cached_full"].items() if part != "total"
        }
        rows["waveclip_naive"]["parts"] = {
            part: summarize(samples) for part, samples in naive.items() if part != "total"
        }
        out[str(schedule.batch_size)] = {
            "warmup": schedule.warmup, "trials": schedule.trials, "configs": rows, "contention": contention,
            "wall_seconds": time.perf_counter() - start, "load_average_end": _load_average(),
        }
        log(f"  encoder {device.type} {str(dtype).removeprefix('torch.')} batch {schedule.batch_size}: "
            + ", ".join(f"{name} {1e3 * row['median']:.1f} ms" for name, row in rows.items()))
    return out


def profile_calls(calls: dict[str, Callable[[], Any]], device, row_limit: int = 8,
                  before: Callable[[], Any] | None = None) -> dict[str, Any]:
    """`torch.profiler` of one call each (after one untimed call): total and the top operators by self time.

    `before` runs ahead of each profiled call (e.g. waiting for a quiet machine); the other processes' CPU use
    during the call is recorded as `others_busy_cores`.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for name, call in calls.items():
        call()
        if before is not None:
            before()
        with CpuMonitor() as monitor, profile(activities=activities) as profiler:
            call()
        events = list(profiler.key_averages())
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(event, key) for event in events)
        top = sorted(events, key=lambda event: getattr(event, key), reverse=True)[:row_limit]
        out[name] = {
            "self_time_total_ms": total / 1e3,
            "others_busy_cores": (monitor.result or {}).get("others_busy_cores"),
            "ops": [{"op": event.key, "self_ms": getattr(event, key) / 1e3, "calls": event.count,
                     "share": getattr(event, key) / total if total else 0.0} for event in top],
        }
    return out


def profile_encoder(clip_vision, waveclip, batch_size: int, settings: BenchmarkSettings, device="cpu") -> dict:
    """Top operators of the CLIP full pass, WaveCLIP's stage 0 (with cache), stage 1 from the cache, and the single
    block-causal full forward, one call each at `batch_size`: where the time of the encoder targets goes."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(settings.seed)
    pixel_values = torch.randn(batch_size, 3, settings.image_size, settings.image_size, generator=generator)
    pixel_values = pixel_values.to(device)
    held = {}

    def stage0():
        held["cache"] = waveclip.get_image_features(pixel_values, num_stages=1, use_cache=True).cache

    def stage1():
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in held["cache"].layers])
        waveclip.get_image_features(pixel_values, num_stages=2, cache=cache)

    stage0()
    calls = {"clip_full": lambda: clip_vision(pixel_values=pixel_values), "waveclip_stage0_cached": stage0}
    if waveclip.num_stages == 2:
        calls["waveclip_stage1_from_cache"] = stage1
    calls["waveclip_full_forward"] = lambda: waveclip.get_image_features(pixel_values)
    before = (lambda: wait_if_asked(settings, log=lambda *_: None)) if settings.wait_for_idle_seconds > 0 else None
    return {"batch_size": batch_size, "device": device.type, "calls": profile_calls(calls, device, before=before)}


# ---------------------------------------------------------------------------------------------------------------
# 4. Early exit
# ---------------------------------------------------------------------------------------------------------------


def _forced_exit_counts(batch_size: int, fractions: Sequence[float]) -> list[int]:
    return [int(round(f * batch_size)) for f in fractions]


def early_exit_case(waveclip, pixel_values: torch.Tensor, text_embeds: torch.Tensor, fractions: Sequence[float]):
    """One round of `refine`'s batched early-exit path at every forced exit fraction.

    Mirrors `WaveCLIPModel.refine` step by step: stage 0 with a cache, scores against the labels and the gate's
    margin (part `stage0`), then - with the first `round(f * batch)` images forced to stop - the cache and the
    inputs cut down to the continuing images with `batch_select_indices` (part `select@f`) and the later stages
    from the cache with their scores (part `later@f`). The stage-0 work does not depend on f, so it runs once per
    round and every fraction's time is `stage0 + select@f + later@f`; each fraction starts from its own copy of
    the stage-0 cache (the copy is not timed: `refine` has no such step).
    """
    from transformers.cache_utils import DynamicCache

    batch_size = pixel_values.shape[0]
    num_stages = waveclip.num_stages
    scale = waveclip.logit_scale.exp()
    counts = _forced_exit_counts(batch_size, fractions)

    def score(outputs):
        return zero_shot_logits(outputs.pooler_output, text_embeds, scale).softmax(-1)

    def run(watch: Stopwatch) -> None:
        with watch.part("stage0"):
            out0 = waveclip.get_image_features(pixel_values, num_stages=1, use_cache=True)
            probability_margin(score(out0))  # the gate's statistic; the decision itself is forced below
        stage0_cache = [(layer.keys, layer.values) for layer in out0.cache.layers]
        for fraction, stopped in zip(fractions, counts):
            if stopped == batch_size:
                continue
            cache = DynamicCache(ddp_cache_data=stage0_cache)
            with watch.part(f"select@{fraction:g}"):
                if stopped:
                    continuing = torch.arange(stopped, batch_size, device=pixel_values.device)
                    cache.batch_select_indices(continuing)
                    inputs = pixel_values[continuing]
                else:
                    inputs = pixel_values
            with watch.part(f"later@{fraction:g}"):
                for stage in range(1, num_stages):
                    last = stage == num_stages - 1
                    out = waveclip.get_image_features(
                        inputs, num_stages=stage + 1, cache=cache, use_cache=not last
                    )
                    score(out)
                    cache = out.cache

    return run


def benchmark_early_exit(waveclip, schedule: Schedule, fractions: Sequence[float], device, dtype: torch.dtype,
                         settings: BenchmarkSettings, log=print) -> dict[str, Any]:
    """Time per image at each forced exit fraction against two predictions.

    - `predicted_line` (the target): t(stage 0) + (1 - f) x t(later stages on the whole batch), i.e. the later
      stages' time scaled by their GFLOPs, which fall linearly with the continuing fraction.
    - `gflops_line`: time proportional to the GFLOPs per image, at the rate of the no-exit point (f = 0).
    """
    device = torch.device(device)
    waveclip = waveclip.to(device=device, dtype=dtype)
    batch_size = schedule.batch_size
    generator = torch.Generator().manual_seed(settings.seed + 1)
    pixel_values = torch.randn(batch_size, 3, settings.image_size, settings.image_size, generator=generator)
    text_embeds = torch.randn(settings.num_labels, waveclip.projection_dim, generator=generator)
    pixel_values, text_embeds = pixel_values.to(device), text_embeds.to(device=device, dtype=dtype)
    start, contention = time.perf_counter(), {}
    times = run_interleaved(
        {"early_exit": early_exit_case(waveclip, pixel_values, text_embeds, fractions)},
        schedule.warmup, schedule.trials, device, quiet_policy(settings), contention,
    )["early_exit"]
    stage0 = np.asarray(times["stage0"])
    costs = stage_flops(waveclip.config)
    rows, totals = [], {}
    for fraction in fractions:
        key = f"{fraction:g}"
        total = stage0 + np.asarray(times.get(f"select@{key}", 0.0)) + np.asarray(times.get(f"later@{key}", 0.0))
        totals[key] = total
    full_later = np.median(np.asarray(times["later@0"]) + np.asarray(times["select@0"]))
    stage0_median = float(np.median(stage0))
    no_exit = float(np.median(totals["0"]))
    gflops_no_exit = gflops(sum(costs))
    for fraction in fractions:
        key = f"{fraction:g}"
        summary = summarize(totals[key])
        per_image_gflops = gflops(costs[0] + (1 - fraction) * sum(costs[1:]))
        predicted = stage0_median + (1 - fraction) * full_later
        gflops_line = no_exit * per_image_gflops / gflops_no_exit
        rows.append({
            "exit_fraction": fraction,
            "exited_images": _forced_exit_counts(batch_size, [fraction])[0],
            **_rate_entry(summary, batch_size, per_image_gflops),
            "predicted_seconds": predicted,
            "deviation_percent": 100 * (summary["median"] - predicted) / predicted,
            "gflops_line_seconds": gflops_line,
            "gflops_line_deviation_percent": 100 * (summary["median"] - gflops_line) / gflops_line,
            "parts": {part: summarize(samples) for part, samples in times.items()
                      if part == "stage0" or part.endswith(f"@{key}")},
        })
    log(f"  early exit {device.type} batch {batch_size}: "
        + ", ".join(f"{100 * r['exit_fraction']:.0f}% {1e3 * r['median']:.0f} ms ({r['deviation_percent']:+.1f}%)"
                    for r in rows))
    return {
        "batch_size": batch_size, "warmup": schedule.warmup, "trials": schedule.trials,
        "num_labels": settings.num_labels, "rows": rows, "contention": contention,
        "wall_seconds": time.perf_counter() - start, "load_average_end": _load_average(),
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. Preprocessing
# ---------------------------------------------------------------------------------------------------------------


def sample_images(seed: int = 0) -> dict[str, Any]:
    """scikit-image sample photos of various sizes plus a random 1024 x 1024 image, as RGB PIL images."""
    import PIL.Image
    import skimage.data

    images = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        images[name] = PIL.Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    rng = np.random.default_rng(seed)
    images["random_1024"] = PIL.Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    return images


def benchmark_preprocessing(settings: BenchmarkSettings, log=print) -> dict[str, Any]:
    """`WaveCLIPImageProcessor` against `CLIPImageProcessor()` per image and per batch, on the same PIL images."""
    from transformers import CLIPImageProcessor

    from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor

    processors = {
        "waveclip": WaveCLIPImageProcessor(image_size=settings.image_size, levels=settings.levels),
        "clip": CLIPImageProcessor(size={"shortest_edge": settings.image_size},
                                   crop_size={"height": settings.image_size, "width": settings.image_size}),
    }
    images = sample_images(settings.seed)
    start = time.perf_counter()

    def call(processor, batch, threads=None):
        def run(watch):
            if threads is None:
                processor(images=batch, return_tensors="pt")
                return
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                processor(images=batch, return_tensors="pt")
            finally:
                torch.set_num_threads(previous)
        return run

    def cases(batch):
        # The WaveCLIP processor runs torch operators, which use every core torch is given; it is also timed on
        # one thread, because its operators are small and a busy core stalls each parallel region.
        return {**{proc: call(processor, batch) for proc, processor in processors.items()},
                "waveclip_1_thread": call(processors["waveclip"], batch, threads=1)}

    single: dict[str, dict[str, Any]] = {}
    for name, image in images.items():
        schedule = settings.preprocessing_single
        wait_if_asked(settings, log=lambda *_: None)  # single-image rounds are too short to judge one by one
        times = run_interleaved(cases([image]), schedule.warmup, schedule.trials, torch.device("cpu"))
        single[name] = {"size": f"{image.width}x{image.height}",
                        **{case: summarize(case_times["total"]) for case, case_times in times.items()}}
    batch_schedule = settings.preprocessing_batch
    names = list(images)
    batch = [images[names[i % len(names)]] for i in range(batch_schedule.batch_size)]
    contention: dict = {}
    times = run_interleaved(cases(batch), batch_schedule.warmup, batch_schedule.trials, torch.device("cpu"),
                            quiet_policy(settings), contention)
    batched = {case: summarize(case_times["total"]) for case, case_times in times.items()}
    mean_single = {case: float(np.mean([single[n][case]["median"] for n in images])) for case in batched}
    per_image_batched = {case: batched[case]["median"] / batch_schedule.batch_size for case in batched}
    log("  preprocessing per image (single call, mean over images): "
        + ", ".join(f"{p} {1e3 * t:.1f} ms" for p, t in mean_single.items())
        + "; in a batch of " + str(batch_schedule.batch_size) + ": "
        + ", ".join(f"{p} {1e3 * t:.1f} ms" for p, t in per_image_batched.items()))
    return {
        "processors": {proc: type(processor).__name__ for proc, processor in processors.items()},
        "single": single,
        "single_schedule": asdict(settings.preprocessing_single),
        "batch": {"batch_size": batch_schedule.batch_size, "warmup": batch_schedule.warmup,
                  "trials": batch_schedule.trials, "images": [image_name for image_name in names],
                  "contention": contention, **batched},
        "mean_single_seconds": mean_single,
        "batched_seconds_per_image": per_image_batched,
        "wall_seconds": time.perf_counter() - start,
        "load_average_end": _load_average(),
    }


# ---------------------------------------------------------------------------------------------------------------
# 3. Pipelines
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def memoized_text_tower(clip_model, memo: dict):
    """Within this block, `clip_model.text_model` returns its stored output for inputs it has already seen.

    Used for the "image side only" stock-pipeline measurement: the stock pipeline still tokenises every prompt per
    image and `CLIPModel` still projects the pooled text, but the text transformer runs once per label set. `memo`
    keeps the outputs between blocks; leaving the block restores the model's own `forward`.
    """
    text_model = clip_model.text_model
    original = text_model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        key = hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest()
        if attention_mask is not None:
            key += hashlib.sha1(attention_mask.cpu().numpy().tobytes()).hexdigest()
        if key not in memo:
            memo[key] = original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 **kwargs)
        # A fresh output object: `CLIPModel.get_text_features` overwrites `pooler_output` with its projection.
        stored = memo[key]
        return type(stored)(**dict(stored.items()))

    text_model.forward = forward
    try:
        yield memo
    finally:
        del text_model.forward  # back to the class's method


PIPELINE_RUNS = {
    "stock": "stock CLIP pipeline, as shipped (re-encodes all prompts for every image)",
    "stock_image_side": "stock CLIP pipeline, image side only (text transformer memoised; prompts still tokenised "
                        "and projected per image)",
    "waveclip_theta0_first": "WaveCLIP θ = 0, first call (text cache cold; measured once)",
    "waveclip_theta0": "WaveCLIP θ = 0, text cache warm",
    "waveclip_theta_middle": "WaveCLIP θ = {threshold:.3g} (median stage-0 margin), cache warm",
    "waveclip_theta_high": "WaveCLIP θ = {threshold:g} (every stage), cache warm",
}


def benchmark_pipelines(settings: BenchmarkSettings, log=print) -> dict[str, Any]:
    """The stock zero-shot pipeline around a `CLIPModel` against the WaveCLIP pipeline, both loaded from folders.

    Both models share the text tower (`convert_clip_to_waveclip`), the labels, the tokenizer (word level, built over
    the prompts) and the images. Each pipeline first classifies one image against two unrelated labels, which
    warms its kernels without touching the 1,000-label text cache. Then, at the default `batch_size=1`:
    - WaveCLIP at theta = 0, first call: the text cache is cold, so the 1,000 prompts are encoded once (one
      measurement: after it the cache is warm);
    - `pipeline_rounds` interleaved rounds of: the stock pipeline as shipped (every image re-encodes the 1,000
      prompts; `stock_pipeline_images` images), the stock pipeline "image side only" (its text transformer
      memoised, warm), and WaveCLIP with a warm cache at theta = 0, at a middle theta (the median stage-0 margin of
      these images, so about half stop at stage 0) and at theta > 1 (every image through every stage).
    Also times the tokenisation of the prompts, which the stock pipeline repeats per image.
    """
    from transformers import CLIPImageProcessor, pipeline

    from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor
    from ..data.text_tokenizer import build_word_level_tokenizer

    labels = label_names(settings.num_labels)
    template = "This is a photo of {}."
    prompts = [template.format(label) for label in labels]
    tokenizer = build_word_level_tokenizer(prompts + ["warm up"], max_length=settings.text_max_length)
    sequence_length = tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"].shape[1]
    _, clip, waveclip = build_models(settings, tokenizer)
    photos = list(sample_images(settings.seed).values())
    images = [photos[i % len(photos)] for i in range(settings.pipeline_images)]
    stock_images = images[: settings.stock_pipeline_images]

    with tempfile.TemporaryDirectory(prefix="waveclip_benchmark_") as folder:
        clip_folder, wave_folder = Path(folder, "clip"), Path(folder, "waveclip")
        clip.save_pretrained(clip_folder)
        CLIPImageProcessor(size={"shortest_edge": settings.image_size},
                           crop_size={"height": settings.image_size, "width": settings.image_size}
                           ).save_pretrained(clip_folder)
        tokenizer.save_pretrained(clip_folder)
        waveclip.save_pretrained(wave_folder)
        WaveCLIPImageProcessor(image_size=settings.image_size, levels=settings.levels).save_pretrained(wave_folder)
        tokenizer.save_pretrained(wave_folder)
        text_config, vision_config = clip.config.text_config, clip.config.vision_config
        del clip, waveclip
        gc.collect()
        stock = pipeline("zero-shot-image-classification", model=str(clip_folder))
        wave = pipeline("zero-shot-image-classification", model=str(wave_folder), trust_remote_code=True)
    for pipe in (stock, wave):
        pipe.model.set_attn_implementation(settings.attn_implementation)

    start = time.perf_counter()
    cpu = torch.device("cpu")
    memo: dict = {}
    outputs: dict[str, Any] = {}
    with torch.inference_mode():
        stock(images[:1], candidate_labels=["warm", "up"])
        wave(images[:1], candidate_labels=["warm", "up"], margin_threshold=0.0)
        with memoized_text_tower(stock.model, memo):
            stock(images[:1], candidate_labels=labels)  # fills the memo
        tokenize = run_interleaved(
            {"tokenize": lambda watch: stock.tokenizer(prompts, padding=True, return_tensors="pt")}, 1, 5, cpu
        )["tokenize"]["total"]

        # The cold call happens once by definition: it is not retried, only recorded with its contention.
        wait_if_asked(settings, log)
        first_contention: dict = {}
        first_seconds = run_interleaved(
            {"first": lambda watch: outputs.__setitem__(
                "waveclip_theta0_first", wave(images, candidate_labels=labels, margin_threshold=0.0))},
            0, 1, cpu, None, first_contention,
        )["first"]["total"]

        # Middle threshold: the median stage-0 margin of these very images (untimed, text cache warm).
        text_embeds = wave.label_embeddings(labels, template)
        pixel_values = wave.image_processor(images=images, return_tensors="pt")["pixel_values"]
        stage0 = wave.model.get_image_features(pixel_values, num_stages=1).pooler_output
        probs = zero_shot_logits(stage0, text_embeds, wave.model.logit_scale.exp()).softmax(-1)
        thresholds = {"waveclip_theta0": 0.0, "waveclip_theta_middle": float(probability_margin(probs).median()),
                      "waveclip_theta_high": settings.high_threshold}

        def stock_image_side(watch):
            with memoized_text_tower(stock.model, memo):
                stock(images, candidate_labels=labels)

        def waveclip_run(key, threshold, batch_size):
            return lambda watch: outputs.__setitem__(
                key, wave(images, candidate_labels=labels, margin_threshold=threshold, batch_size=batch_size))

        # (images per call, batch_size) of every interleaved run. At batch_size > 1 the stock pipeline encodes the
        # prompts once per batch (its `_forward` takes the first image's text inputs), so it gets every image.
        specs: dict[str, tuple[int, int]] = {}
        cases: dict[str, Callable[[Stopwatch], None]] = {}
        for batch_size in settings.pipeline_batch_sizes:
            suffix = "" if batch_size == 1 else f"@batch{batch_size}"
            stock_batch = stock_images if batch_size == 1 else images
            cases["stock" + suffix] = (lambda batch, size: lambda watch: stock(
                batch, candidate_labels=labels, batch_size=size))(stock_batch, batch_size)
            specs["stock" + suffix] = (len(stock_batch), batch_size)
            if batch_size == 1:
                cases["stock_image_side"] = stock_image_side
                specs["stock_image_side"] = (len(images), 1)
            for key, threshold in thresholds.items():
                cases[key + suffix] = waveclip_run(key + suffix, threshold, batch_size)
                specs[key + suffix] = (len(images), batch_size)
        contention: dict = {}
        times = run_interleaved(cases, 0, settings.pipeline_rounds, cpu, quiet_policy(settings), contention)

    # GFLOPs per image: image side analytic; the stock pipeline also runs the text tower on every prompt, once per
    # batch of images.
    per_prompt = text_tower_flops(text_config, sequence_length, settings.projection_dim)
    text_projection = 2 * text_config.hidden_size * settings.projection_dim
    clip_image = clip_vit_flops(vision_config, settings.projection_dim)
    num_labels = len(labels)
    runs: dict[str, dict[str, Any]] = {
        "waveclip_theta0_first": {**summarize(first_seconds), "images": len(images), "batch_size": 1,
                                  "threshold": 0.0},
    }
    for key, (count, batch_size) in specs.items():
        base = key.split("@")[0]
        run = runs[key] = {**summarize(times[key]["total"]), "images": count, "batch_size": batch_size}
        if base == "stock":
            text_passes = math.ceil(count / batch_size)
            run["gflops_per_image"] = gflops(clip_image + text_passes * num_labels * per_prompt / count)
        elif base == "stock_image_side":
            run["gflops_per_image"] = gflops(clip_image + num_labels * text_projection)
        else:
            run["threshold"] = thresholds[base]
    for key, run in runs.items():
        if key.startswith("waveclip"):
            results = outputs[key]
            stages = [per_image[0]["stage"] for per_image in results]
            run["gflops_per_image"] = float(np.mean([per_image[0]["gflops"] for per_image in results]))
            if key.endswith("_first"):
                run["gflops_per_image"] += gflops(num_labels * per_prompt) / len(results)
            run["exit_fraction_stage0"] = float(np.mean([stage == 0 for stage in stages]))
            run["stages"] = stages
        run["images_per_second"] = run["images"] / run["median"]
        run["ms_per_image"] = 1e3 * run["median"] / run["images"]
    log("  pipelines (images/s): " + ", ".join(f"{k} {r['images_per_second']:.2f}" for k, r in runs.items()))
    return {
        "num_labels": num_labels,
        "hypothesis_template": template,
        "prompt_tokens": int(sequence_length),
        "tokenize_prompts_seconds": summarize(tokenize),
        "text_tower": {"layers": text_config.num_hidden_layers, "hidden_size": text_config.hidden_size,
                       "heads": text_config.num_attention_heads, "intermediate_size": text_config.intermediate_size},
        "text_gflops_per_label_set": gflops(num_labels * per_prompt),
        "stock_pipeline_class": type(stock).__name__,
        "stock_image_processor": type(stock.image_processor).__name__,
        "waveclip_pipeline_class": type(wave).__name__,
        "batch_sizes": list(settings.pipeline_batch_sizes),
        "rounds": settings.pipeline_rounds,
        "runs": runs,
        "contention": contention,
        "first_call_contention": first_contention,
        "wall_seconds": time.perf_counter() - start,
        "load_average_end": _load_average(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------------


def _target(name: str, value: float, bound: float, kind: str, detail: str) -> dict[str, Any]:
    passed = value <= bound if kind == "<=" else value >= bound
    return {"target": name, "measured": value, "bound": bound, "kind": kind, "passed": bool(passed), "detail": detail}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as measured ratios with pass / fail, from one run's results."""
    targets = []
    cpu = results.get("encoder", {}).get("cpu", {}).get("float32", {})
    for batch, entry in cpu.items():
        rows = entry["configs"]
        clip, cached = rows["clip_full"]["median"], rows["waveclip_cached_full"]["median"]
        targets.append(_target(f"stage 0 / CLIP full pass, CPU batch {batch}", rows["waveclip_stage0"]["median"] / clip,
                               0.35, "<=", "median seconds per batch call"))
        targets.append(_target(f"cached full pass / CLIP full pass, CPU batch {batch}", cached / clip, 1.10, "<=",
                               "stage 0 with cache + later stages from it"))
        targets.append(_target(f"naive re-run / cached full pass, CPU batch {batch}",
                               rows["waveclip_naive"]["median"] / cached, 1.20, ">=",
                               "stage 0, then a full forward without cache"))
    pre = results.get("preprocessing")
    if pre and cpu:
        largest = max(cpu, key=int)
        encoder_per_image = cpu[largest]["configs"]["waveclip_cached_full"]["ms_per_image"] / 1e3
        batch1 = cpu.get("1", {}).get("configs", {}).get("waveclip_cached_full")
        batched = pre["batched_seconds_per_image"]
        targets.append(_target(
            f"WaveCLIP preprocessing / encoder full pass, per image (processor batch {pre['batch']['batch_size']}, "
            f"encoder batch {largest})", batched["waveclip"] / encoder_per_image, 0.05, "<=",
            "WaveCLIP cached full pass per image"))
        if batch1 is not None:
            targets.append(_target(
                "WaveCLIP preprocessing / encoder full pass, one image (processor and encoder batch 1)",
                pre["mean_single_seconds"]["waveclip"] / batch1["median"], 0.05, "<=",
                "mean over the sample images of the single-image call"))
    if pre:
        targets.append(_target(
            f"WaveCLIP / {pre['processors']['clip']} preprocessing, batch of {pre['batch']['batch_size']}",
            pre["batched_seconds_per_image"]["waveclip"] / pre["batched_seconds_per_image"]["clip"], 1.5, "<=", ""))
        targets.append(_target(
            f"WaveCLIP / {pre['processors']['clip']} preprocessing, one image per call",
            pre["mean_single_seconds"]["waveclip"] / pre["mean_single_seconds"]["clip"], 1.5, "<=",
            "mean over the sample images"))
    early = results.get("early_exit", {}).get("cpu")
    if early:
        worst = max(early["rows"], key=lambda row: abs(row["deviation_percent"]))
        targets.append(_target(
            f"early exit: max |deviation| from the GFLOPs-scaled line, CPU batch {early['batch_size']} (%)",
            abs(worst["deviation_percent"]), 15.0, "<=", f"worst at exit fraction {worst['exit_fraction']:g}"))
    pipe = results.get("pipeline")
    if pipe:
        runs = pipe["runs"]
        comparisons = [("stock", "waveclip_theta0", "as shipped (re-encodes the prompts per image), batch_size=1"),
                       ("stock_image_side", "waveclip_theta0", "image side only (text tower memoised), batch_size=1")]
        comparisons += [(f"stock@batch{b}", f"waveclip_theta0@batch{b}", f"as shipped, batch_size={b} (prompts "
                         "encoded once per batch)") for b in pipe["batch_sizes"] if b != 1]
        for stock_key, wave_key, label in comparisons:
            if stock_key not in runs or wave_key not in runs:
                continue
            speedup = runs[wave_key]["images_per_second"] / runs[stock_key]["images_per_second"]
            ratio = runs[stock_key]["gflops_per_image"] / runs[wave_key]["gflops_per_image"]
            targets.append(_target(
                f"pipeline: (WaveCLIP theta=0 speed-up over stock CLIP) / GFLOPs ratio, {label}", speedup / ratio,
                0.85, ">=", f"speed-up {speedup:.2f}x, GFLOPs ratio {ratio:.2f}x"))
    return targets


# ---------------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------------


def run_benchmarks(settings: BenchmarkSettings, command: str = "", log=print) -> dict[str, Any]:
    """Run the selected sections in this process and return the results (see `write_reports`)."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    results: dict[str, Any] = {"meta": machine_info(), "settings": _jsonable(asdict(settings))}
    results["meta"].update(command=command, flops_convention=FLOPS_CONVENTION,
                           attn_implementation=settings.attn_implementation, geometry=geometry_label(settings))
    gpu = settings.use_gpu and torch.cuda.is_available()
    gpu_note = None if gpu else (
        "skipped: torch.cuda.is_available() is False" if settings.use_gpu else "skipped: disabled (--no-gpu)"
    )
    needs_models = {"encoder", "profile", "early_exit"} & set(settings.sections)
    clip_vision = waveclip = None
    if needs_models:
        clip_vision, _, waveclip = build_models(settings)
    contention = results["meta"]["contention"] = {}

    @contextlib.contextmanager
    def section(name: str, inference: bool = True):
        # The pipeline section builds and loads models, which must not happen under inference mode; it enters
        # inference mode itself around the timed calls.
        log(name)
        before = wait_for_idle(settings.wait_for_idle_seconds, settings.idle_busy_cores, log) \
            if settings.wait_for_idle_seconds > 0 else {}
        with CpuMonitor() as monitor, torch.inference_mode(inference):
            yield
        contention[name] = {"during": monitor.result, **({"before": before} if before else {})}

    if "encoder" in settings.sections:
        with section("encoder"):
            results["encoder"] = {"cpu": {"float32": benchmark_encoder(
                clip_vision, waveclip, settings.cpu_schedules, "cpu", torch.float32, settings, log)}}
            if gpu:
                results["encoder"]["cuda"] = {
                    name: benchmark_encoder(clip_vision, waveclip, settings.gpu_schedules, "cuda",
                                            getattr(torch, name), settings, log)
                    for name in settings.gpu_dtypes
                }
            else:
                results["encoder"]["cuda"] = {"skipped": gpu_note}
    if "profile" in settings.sections:
        with section("profile"):
            results["encoder_profile"] = profile_encoder(
                clip_vision.to("cpu", torch.float32), waveclip.to("cpu", torch.float32), settings.profile_batch_size,
                settings)
    if "early_exit" in settings.sections:
        with section("early_exit"):
            results["early_exit"] = {"cpu": benchmark_early_exit(
                waveclip.to("cpu", torch.float32), settings.cpu_early_exit, settings.exit_fractions, "cpu",
                torch.float32, settings, log)}
            if gpu:
                results["early_exit"]["cuda"] = {
                    name: benchmark_early_exit(waveclip, settings.gpu_early_exit, settings.exit_fractions, "cuda",
                                               getattr(torch, name), settings, log)
                    for name in settings.gpu_dtypes
                }
            else:
                results["early_exit"]["cuda"] = {"skipped": gpu_note}
    del clip_vision, waveclip
    gc.collect()
    if "preprocessing" in settings.sections:
        with section("preprocessing"):
            results["preprocessing"] = benchmark_preprocessing(settings, log)
    if "pipeline" in settings.sections:
        with section("pipeline", inference=False):
            results["pipeline"] = benchmark_pipelines(settings, log)
    results["targets"] = evaluate_targets(results)
    results["meta"]["wall_seconds"] = time.perf_counter() - started
    results["meta"]["load_average_end"] = _load_average()
    return results


def geometry_label(settings: BenchmarkSettings) -> str:
    vit = "ViT-B/16" if settings.is_vit_b16 else (
        f"ViT width {settings.hidden_size}, {settings.num_hidden_layers} layers, patch {settings.patch_size}")
    return (f"{vit} ({settings.image_size} px, projection {settings.projection_dim}) vs WaveCLIP at the same width, "
            f"cell {settings.cell_size}, L={settings.levels}; random weights")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "benchmarks.json", "benchmarks.md", "benchmark_time_vs_gflops.png"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}" if seconds < 10 else f"{seconds:.2f} s"


def _spread(entry: dict) -> str:
    return f"{_ms(entry['q1'])}–{_ms(entry['q3'])}"


def _minmax(entry: dict) -> str:
    return f"{_ms(entry['min'])}–{_ms(entry['max'])}"


def _contention_note(stats: dict | None) -> str:
    """'others' CPU max 0.05 cores; 1 round retried' for a section's `run_interleaved` stats."""
    if not stats:
        return ""
    busy = [b for b in stats.get("rounds_busy_cores", []) if b is not None]
    note = f"other processes ≤ {max(busy):.2f} cores during the kept rounds" if busy else ""
    if stats.get("discarded_rounds"):
        note += f"; {stats['discarded_rounds']} contended round(s) discarded and re-run"
    if stats.get("contended_rounds_kept"):
        note += f"; **{stats['contended_rounds_kept']} contended round(s) kept** after the retries ran out"
    return note


def markdown_report(results: dict[str, Any], notes: str | None = None) -> str:
    """The Markdown report: machine, every section's table, the targets with pass / fail, notes."""
    meta = results["meta"]
    lines = ["# Benchmarks: WaveCLIP vs a plain CLIP ViT", ""]
    lines += [
        "| | |", "|---|---|",
        f"| machine | {meta['cpu_model']}, {meta['cpu_cores']} cores ({meta['usable_cores']} usable, "
        f"torch threads {meta['torch_threads']}){'; GPU ' + meta['gpu'] if meta.get('gpu') else ''} |",
        f"| torch / transformers / python | {meta['torch']} / {meta['transformers']} / {meta['python']} |",
        f"| date | {meta['date_utc']} |",
        f"| command | `{meta['command']}` |",
        f"| models | {meta['geometry']} |",
        f"| attention | `{meta['attn_implementation']}` (timing); GFLOPs count attention as eager computes it |",
        f"| FLOPs convention | {meta['flops_convention']} |",
        f"| load average (1, 5, 15 min) | start {meta['load_average_start']}, end {meta.get('load_average_end')} "
        "(other processes share this machine: a load above the core count slows every configuration) |",
        f"| wall time | {meta.get('wall_seconds', 0):.0f} s |",
    ]
    contention = meta.get("contention") or {}
    if contention:
        cells = []
        for name, entry in contention.items():
            during = entry.get("during") or {}
            before = entry.get("before") or {}
            cell = f"{name} {during.get('others_busy_cores', '?')}"
            if during.get("steal_cores"):
                cell += f" (+{during['steal_cores']} steal)"
            if before.get("waited_seconds"):
                cell += f" after waiting {before['waited_seconds']:.0f} s"
            cells.append(cell)
        lines.append("| other processes' CPU use during each section (cores busy, of "
                     f"{meta['cpu_cores']}) | {'; '.join(cells)} |")
    lines += [
        "",
        "Times: `time.perf_counter` around each call under `torch.inference_mode()`, warm-up rounds first, then "
        "trials interleaved round-robin across configurations; median, inter-quartile range (q1–q3) and min–max "
        "over the trials. ms unless marked s.",
        "",
    ]
    targets = results.get("targets", [])
    if targets:
        lines += ["## Targets", "", "| target | measured | bound | result | note |", "|---|---:|---:|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['measured']:.3f} | {t['kind']} {t['bound']:g} | "
                         f"{'pass' if t['passed'] else '**FAIL**'} | {t['detail']} |")
        lines.append("")

    encoder = results.get("encoder")
    if encoder:
        lines += ["## 1. Image encoder", ""]
        lines.append(
            "Random pixel values (WaveCLIP reads them as packed coefficients). \"Stage 0 only\" and the \"single "
            "full forward\" are the two calls inside the naive re-run, each timed on its own."
        )
        lines.append("")
        for device, per_dtype in encoder.items():
            if "skipped" in per_dtype:
                lines += [f"**{device.upper()}**: {per_dtype['skipped']}; the code path (batch sizes "
                          f"{', '.join(str(s['batch_size']) for s in results['settings']['gpu_schedules'])}, "
                          f"{' and '.join(results['settings']['gpu_dtypes'])}, sdpa) is in `benchmark_encoder`.", ""]
                continue
            for dtype, per_batch in per_dtype.items():
                for batch, entry in per_batch.items():
                    note = _contention_note(entry.get("contention"))
                    lines += [f"**{device.upper()} {dtype}, batch {batch}** (warm-up {entry['warmup']}, "
                              f"{entry['trials']} trials{'; ' + note if note else ''})", "",
                              "| configuration | GFLOPs / image | median / batch | IQR | min–max | ms / image | "
                              "GFLOP/s | × CLIP |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
                    rows = entry["configs"]
                    clip = rows["clip_full"]["median"]
                    for name, row in rows.items():
                        lines.append(
                            f"| {ENCODER_CONFIGS[name]} | {row['gflops_per_image']:.2f} | {_ms(row['median'])} | "
                            f"{_spread(row)} | {_minmax(row)} | {row['ms_per_image']:.2f} | "
                            f"{row['gflops_per_second']:.1f} | {row['median'] / clip:.3f} |")
                    parts = rows["waveclip_cached_full"]["parts"]
                    lines += ["", "Cached full pass by call: " + ", ".join(
                        f"{part} {_ms(p['median'])}" for part, p in parts.items()) + ".", ""]

    prof = results.get("encoder_profile")
    if prof:
        lines += [f"### Where the encoder time goes ({prof['device'].upper()}, batch {prof['batch_size']}, "
                  "`torch.profiler`, one call each)", "",
                  "| call | self-time total | top operators (self time, calls, share) |", "|---|---:|---|"]
        for name, call in prof["calls"].items():
            ops = "; ".join(f"`{op['op']}` {_ms(op['self_ms'] / 1e3)} ({op['calls']}×, {100 * op['share']:.0f}%)"
                            for op in call["ops"])
            busy = call.get("others_busy_cores")
            busy = f" (others {busy:.2f} cores)" if busy is not None else ""
            lines.append(f"| {name}{busy} | {_ms(call['self_time_total_ms'] / 1e3)} | {ops} |")
        lines.append("")

    early = results.get("early_exit")
    if early:
        lines += ["## 4. Early exit (batched `refine` path)", ""]
        for device, entry in early.items():
            if "skipped" in entry:
                lines += [f"**{device.upper()}**: {entry['skipped']}.", ""]
                continue
            entries = entry.items() if "rows" not in entry else [("float32", entry)]
            for dtype, e in entries:
                lines += [
                    f"**{device.upper()} {dtype}, batch {e['batch_size']}**, {e['num_labels']} labels (warm-up "
                    f"{e['warmup']}, {e['trials']} trials; {_contention_note(e.get('contention')) or '-'}). "
                    "The first round(f × batch) images are forced to stop after stage 0; the rest continue from "
                    "the cache after `batch_select_indices`, as in `refine`. "
                    "Stage 0 (with scoring) is shared by all fractions of a round. Predicted = t(stage 0) + (1 − f) "
                    "× t(later stages, whole batch), the GFLOPs-scaled line; the last column compares with time ∝ "
                    "GFLOPs at the no-exit rate.", "",
                    "| exit fraction | GFLOPs / image | median / batch | IQR | ms / image | predicted | deviation | "
                    "vs time ∝ GFLOPs |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
                for row in e["rows"]:
                    lines.append(
                        f"| {100 * row['exit_fraction']:.0f}% | {row['gflops_per_image']:.2f} | {_ms(row['median'])} "
                        f"| {_spread(row)} | {row['ms_per_image']:.2f} | {_ms(row['predicted_seconds'])} | "
                        f"{row['deviation_percent']:+.1f}% | {row['gflops_line_deviation_percent']:+.1f}% |")
                lines.append("")

    pre = results.get("preprocessing")
    if pre:
        procs = pre["processors"]
        lines += ["## 2. Preprocessing", "",
                  f"`WaveCLIPImageProcessor` (YCbCr + Haar DWT) vs `CLIPImageProcessor()`, which gives "
                  f"`{procs['clip']}` here (torchvision is not installed). Same RGB PIL images, "
                  "`return_tensors=\"pt\"`.",
                  "", "| image | size | WaveCLIP median | IQR | CLIP median | IQR | ratio | WaveCLIP on 1 thread |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        b = pre["batch"]
        rows = [(name, row["size"], row) for name, row in pre["single"].items()]
        rows.append((f"batch of {b['batch_size']} (images cycled), per call", "", b))
        for name, size, row in rows:
            one_thread = _ms(row["waveclip_1_thread"]["median"]) if "waveclip_1_thread" in row else "—"
            lines.append(f"| {name} | {size} | {_ms(row['waveclip']['median'])} | {_spread(row['waveclip'])} | "
                         f"{_ms(row['clip']['median'])} | {_spread(row['clip'])} | "
                         f"{row['waveclip']['median'] / row['clip']['median']:.2f} | {one_thread} |")
        lines += ["", f"Single image: warm-up {pre['single_schedule']['warmup']}, {pre['single_schedule']['trials']} "
                  f"trials per image; batch: warm-up {b['warmup']}, {b['trials']} trials "
                  f"({_contention_note(b.get('contention')) or '-'}).", ""]

    pipe = results.get("pipeline")
    if pipe:
        tt = pipe["text_tower"]
        clip_text = "CLIP ViT-B/16's text tower size; " if (tt["layers"], tt["hidden_size"]) == (12, 512) else (
            "smaller than CLIP ViT-B/16's 12 x 512 text tower; ")
        lines += [
            "## 3. Zero-shot pipeline end to end", "",
            f"{pipe['num_labels']} labels (\"object 0\" … ), template \"{pipe['hypothesis_template']}\" "
            f"({pipe['prompt_tokens']} tokens with padding), word-level tokenizer. Text tower: {tt['layers']} layers, "
            f"width {tt['hidden_size']}, {tt['heads']} heads ({clip_text}random weights, shared by both "
            f"models via `convert_clip_to_waveclip`); one label set costs {pipe['text_gflops_per_label_set']:.0f} GFLOPs of text. "
            "Stock: `pipeline(\"zero-shot-image-classification\", model=clip_folder)` → "
            f"`{pipe['stock_pipeline_class']}` "
            f"with `{pipe['stock_image_processor']}`; WaveCLIP: `trust_remote_code=True` → "
            f"`{pipe['waveclip_pipeline_class']}`. PIL images (the preprocessing sample photos, cycled), default "
            f"`batch_size=1` unless marked. {pipe['rounds']} interleaved rounds per run (median call time; IQR as ms / "
            "image). At `batch_size` > 1 the stock pipeline encodes the prompts once per batch, not per image.",
            "", "| run | images / call | images / s | ms / image | IQR ms / image | GFLOPs / image | "
            "answered at stage 0 |", "|---|---:|---:|---:|---:|---:|---:|"]
        for key, run in pipe["runs"].items():
            label = PIPELINE_RUNS[key.split("@")[0]].format(threshold=run.get("threshold", 0))
            if run["batch_size"] != 1:
                label += f", **batch_size={run['batch_size']}**"
            share = f"{100 * run['exit_fraction_stage0']:.0f}%" if "exit_fraction_stage0" in run else "—"
            n = run["images"]
            lines.append(f"| {label} | {n} | {run['images_per_second']:.3f} | {run['ms_per_image']:.1f} | "
                         f"{1e3 * run['q1'] / n:.1f}–{1e3 * run['q3'] / n:.1f} | {run['gflops_per_image']:.2f} | "
                         f"{share} |")
        tokenize = pipe["tokenize_prompts_seconds"]
        note = _contention_note(pipe.get("contention"))
        if note:
            lines += ["", f"Rounds: {note}."]
        lines += ["", f"Tokenising the {pipe['num_labels']} prompts (which the stock pipeline does for every image, "
                  f"memoised or not): median {_ms(tokenize['median'])} ms."]
        lines += ["", "GFLOPs / image: the image encoder (analytic, `flops.py`) plus, for the stock pipeline, the "
                  "text tower on every prompt (same per-layer formula); the first WaveCLIP call carries one label "
                  "set's text cost spread over its images.", ""]
    if notes:
        lines += ["## Profiling notes", "", notes.strip(), ""]
    return "\n".join(lines)


SHORT_NAMES = {"clip_full": "CLIP full", "waveclip_stage0": "stage 0", "waveclip_cached_full": "cached full",
               "waveclip_naive": "naive re-run", "waveclip_full_forward": "one full forward"}


def plot_time_vs_gflops(results: dict[str, Any], path) -> Path | None:
    """Measured ms per image against analytic GFLOPs per image, per configuration, one panel per batch size (with
    the line of CLIP's achieved GFLOP/s through the origin), and the early-exit sweep against its predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoder = results.get("encoder", {})
    rows = [(dev, dt, per_batch) for dev, per_dtype in encoder.items() if "skipped" not in per_dtype
            for dt, per_batch in per_dtype.items()]
    early = []
    for dev, entry in results.get("early_exit", {}).items():
        if "skipped" not in entry:
            early += [(dev, "float32", entry)] if "rows" in entry else [(dev, dt, e) for dt, e in entry.items()]
    pipe = results.get("pipeline")
    last_row = len(early) + (1 if pipe else 0)
    columns = max([len(per_batch) for *_, per_batch in rows] + [last_row, 1])
    count = len(rows) + (1 if last_row else 0)
    if count == 0:
        return None
    figure, axes = plt.subplots(count, columns, figsize=(4.6 * columns, 4.0 * count), squeeze=False)
    markers = {"clip_full": "s", "waveclip_stage0": "o", "waveclip_cached_full": "D", "waveclip_naive": "^",
               "waveclip_full_forward": "v"}
    for row_axes, (device, dtype, per_batch) in zip(axes, rows):
        for ax, (batch, entry) in zip(row_axes, per_batch.items()):
            configs = entry["configs"]
            top = 0.0
            for index, (name, row) in enumerate(configs.items()):
                scale = 1e3 / row["batch_size"]
                ax.errorbar(row["gflops_per_image"], row["ms_per_image"],
                            yerr=[[scale * (row["median"] - row["q1"])], [scale * (row["q3"] - row["median"])]],
                            marker=markers[name], linestyle="none", markersize=7, capsize=3, color=f"C{index}",
                            label=SHORT_NAMES[name])
                top = max(top, row["ms_per_image"])
            clip = configs["clip_full"]
            rate = clip["ms_per_image"] / clip["gflops_per_image"]
            right = 1.1 * max(row["gflops_per_image"] for row in configs.values())
            ax.plot([0, right], [0, rate * right], "k:", linewidth=1, label="CLIP's GFLOP/s")
            ax.set_xlim(0, right)
            ax.set_ylim(0, 1.15 * max(top, rate * right))
            ax.set_title(f"{device} {dtype}, batch {batch}", fontsize=10)
            ax.set_xlabel("analytic GFLOPs / image")
            ax.set_ylabel("median ms / image (IQR bars)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
        for ax in row_axes[len(per_batch):]:
            ax.set_axis_off()
    if last_row:
        for ax, (device, dtype, e) in zip(axes[-1], early):
            points = e["rows"]
            x = [r["gflops_per_image"] for r in points]
            ax.plot(x, [r["ms_per_image"] for r in points], "o-", label="measured")
            ax.plot(x, [1e3 * r["predicted_seconds"] / e["batch_size"] for r in points], "--",
                    label="t(stage 0) + (1 − f) t(later)")
            ax.plot(x, [1e3 * r["gflops_line_seconds"] / e["batch_size"] for r in points], ":", label="time ∝ GFLOPs")
            for r in points:
                ax.annotate(f"{100 * r['exit_fraction']:.0f}%", (r["gflops_per_image"], r["ms_per_image"]),
                            textcoords="offset points", xytext=(4, -12), fontsize=8)
            ax.set_xlabel("analytic GFLOPs / image")
            ax.set_ylabel("median ms / image")
            ax.set_title(f"early exit, {device} {dtype}, batch {e['batch_size']} (label: exit fraction)", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
        if pipe:
            ax = axes[-1][len(early)]
            short = {"stock": "stock", "stock_image_side": "stock, image side", "waveclip_theta0_first": "θ=0 cold",
                     "waveclip_theta0": "θ=0", "waveclip_theta_middle": "θ mid", "waveclip_theta_high": "θ>1"}
            for key, run in pipe["runs"].items():
                base = key.split("@")[0]
                colour = "C3" if base.startswith("stock") else "C0"
                marker = "s" if run["batch_size"] == 1 else "o"
                ax.plot(run["gflops_per_image"], run["ms_per_image"], marker=marker, color=colour, linestyle="none")
                label = short[base] + ("" if run["batch_size"] == 1 else f" (bs {run['batch_size']})")
                ax.annotate(label, (run["gflops_per_image"], run["ms_per_image"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("GFLOPs / image (image encoder + text where run)")
            ax.set_ylabel("ms / image")
            ax.set_title(f"zero-shot pipelines, {pipe['num_labels']} labels (red: stock CLIP, blue: WaveCLIP)",
                         fontsize=10)
            ax.grid(alpha=0.3, which="both")
        for ax in axes[-1][last_row:]:
            ax.set_axis_off()
    meta = results["meta"]
    figure.suptitle(f"Time vs GFLOPs per configuration — {meta['cpu_model']}, {meta['cpu_cores']} cores, torch "
                    f"{meta['torch']}; {FLOPS_CONVENTION.split(';')[0]}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# Everything after this line in an existing benchmarks.md is written by hand (analysis of a run) and is kept when
# the report is regenerated.
HAND_WRITTEN_MARKER = "<!-- hand-written below: kept when scripts/benchmark.py regenerates this file -->"


def hand_written_part(path) -> str | None:
    """The hand-written tail of an existing report (from `HAND_WRITTEN_MARKER` on), or None."""
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text()
    index = text.find(HAND_WRITTEN_MARKER)
    return text[index:].rstrip() + "\n" if index >= 0 else None


def write_reports(results: dict[str, Any], output_dir, notes: str | None = None) -> dict[str, Path]:
    """Write `benchmarks.json`, `benchmarks.md` and `benchmark_time_vs_gflops.png` into `output_dir`.

    A hand-written tail of an existing `benchmarks.md` (see `HAND_WRITTEN_MARKER`) is carried over.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / JSON_NAME, "markdown": output_dir / MARKDOWN_NAME}
    kept = hand_written_part(paths["markdown"])
    paths["json"].write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    markdown = markdown_report(results, notes) + "\n"
    if kept:
        markdown += "\n" + kept
    paths["markdown"].write_text(markdown)
    plot = plot_time_vs_gflops(results, output_dir / PLOT_NAME)
    if plot is not None:
        paths["plot"] = plot
    return paths


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process, as a shell line (interpreter path relative to the cwd)."""
    argv = sys.argv if argv is None else argv
    executable = os.path.relpath(sys.executable) if sys.executable else "python"
    return shlex.join([executable, *argv])


__all__ = [
    "BenchmarkSettings",
    "ENCODER_CONFIGS",
    "Schedule",
    "Stopwatch",
    "benchmark_early_exit",
    "benchmark_encoder",
    "benchmark_pipelines",
    "benchmark_preprocessing",
    "build_models",
    "evaluate_targets",
    "machine_info",
    "markdown_report",
    "memoized_text_tower",
    "plot_time_vs_gflops",
    "profile_calls",
    "profile_encoder",
    "quick_settings",
    "run_benchmarks",
    "run_interleaved",
    "summarize",
    "text_tower_flops",
    "write_reports",
]
