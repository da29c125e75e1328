"""Section `encoder`: a transformers CLIP ViT full pass against WaveCLIP's image encoder, per batch size.

WaveCLIP (`WaveCLIPModel.get_image_features`) runs four ways: stage 0 only, the cached full pass (stage 0 with a
KV cache, then the later stages from it), the naive re-run (stage 0, then every stage again without a cache) and
the single block-causal full forward. Random weights; pixel values are random too (WaveCLIP reads them as packed
coefficients).

To add a configuration (e.g. a compiled variant): add its case to `encoder_cases` and a row to
`ENCODER_CONFIGURATIONS` naming the case (and part) that times it; the report, the plot and the JSON follow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models.waveclip.flops import clip_vit_flops, cumulative_flops, full_forward_flops, gflops, stage_flops
from .contention import load_average, quiet_policy
from .machine import for_each_gpu_dtype
from .models import EncoderModels, random_pixel_values
from .settings import BenchmarkSettings, Schedule
from .timing import Case, CaseTimes, Stopwatch, rate_summary, run_interleaved, summarize_parts


@dataclass(frozen=True)
class EncoderConfiguration:
    """One row of the encoder table.

    `timed_by` names the case of `encoder_cases` and the part of it ("total" for the whole case) whose seconds
    are this configuration's; `{last_stage}` in the part name stands for the index of WaveCLIP's last stage.
    `flops(clip_vision_config, waveclip_config)` is its analytic FLOPs per image (`FLOPS_CONVENTION`).
    """

    label: str  # the report's row
    short_name: str  # the plot's legend
    marker: str  # the plot's marker
    timed_by: tuple[str, str]
    flops: Callable[[Any, Any], float]


ENCODER_CONFIGURATIONS = {
    "clip_full": EncoderConfiguration(
        "CLIP ViT full pass", "CLIP full", "s", ("clip_full", "total"),
        lambda clip_config, waveclip_config: clip_vit_flops(clip_config)),
    "waveclip_stage0": EncoderConfiguration(
        "WaveCLIP stage 0 only", "stage 0", "o", ("waveclip_naive", "stages_0-0"),
        lambda clip_config, waveclip_config: stage_flops(waveclip_config)[0]),
    "waveclip_cached_full": EncoderConfiguration(
        "WaveCLIP cached full pass (stage 0 with cache, then later stages from it)", "cached full", "D",
        ("waveclip_cached_full", "total"),
        lambda clip_config, waveclip_config: sum(stage_flops(waveclip_config))),
    "waveclip_naive": EncoderConfiguration(
        "WaveCLIP naive re-run (stage 0, then all stages again without cache)", "naive re-run", "^",
        ("waveclip_naive", "total"),
        lambda clip_config, waveclip_config: cumulative_flops(waveclip_config, mode="naive")[-1]),
    "waveclip_full_forward": EncoderConfiguration(
        "WaveCLIP single block-causal full forward (all stages, one call)", "one full forward", "v",
        ("waveclip_naive", "stages_0-{last_stage}"),
        lambda clip_config, waveclip_config: full_forward_flops(waveclip_config)),
}
# Configuration name -> the report's label.
ENCODER_CONFIGS = {name: configuration.label for name, configuration in ENCODER_CONFIGURATIONS.items()}


def encoder_gflops(clip_vision, waveclip) -> dict[str, float]:
    """Analytic GFLOPs per image of every encoder configuration (`FLOPS_CONVENTION`)."""
    return {name: gflops(configuration.flops(clip_vision.config, waveclip.config))
            for name, configuration in ENCODER_CONFIGURATIONS.items()}


def encoder_cases(clip_vision, waveclip, pixel_values: torch.Tensor) -> dict[str, Case]:
    """The timed units of a round; "stage 0 only" and the single full forward are parts of the naive re-run.

    - `clip_full`: one `CLIPVisionModelWithProjection` call.
    - `waveclip_cached_full`: stage 0 with `use_cache=True`, then stages 1..L, each from the cache (parts
      `stage0_cached`, `stage1`, ...).
    - `waveclip_naive`: stages 0..s from scratch for every s (parts `stages_0-0`, ..., `stages_0-L`); for L = 1 that is
      stage 0, then the full forward. Its first part is "stage 0 only" and its last the single full forward, each
      timed on its own, so neither is run twice.

    Args:
        pixel_values: (batch, 3, image_size, image_size).
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
                    pixel_values, num_stages=stage + 1, cache=out.cache, use_cache=stage + 1 < num_stages,
                )

    def naive(watch: Stopwatch) -> None:
        for stage in range(num_stages):
            with watch.part(f"stages_0-{stage}"):
                waveclip.get_image_features(pixel_values, num_stages=stage + 1)

    return {"clip_full": clip_full, "waveclip_cached_full": cached_full, "waveclip_naive": naive}


def encoder_rows(times: CaseTimes, batch_size: int, gflops_per_image: dict[str, float], num_stages: int) -> dict:
    """configuration -> `rate_summary` of its seconds per batch call; a configuration timed by a whole case that
    has parts also gets `parts` (part -> `summarize`)."""
    rows = {}
    for name, configuration in ENCODER_CONFIGURATIONS.items():
        case, part = configuration.timed_by
        samples = times[case][part.format(last_stage=num_stages - 1)]
        rows[name] = rate_summary(samples, batch_size, gflops_per_image[name])
        if part == "total" and len(times[case]) > 1:
            rows[name]["parts"] = summarize_parts(times[case])
    return rows


def benchmark_encoder(clip_vision, waveclip, schedules: Sequence[Schedule], device, dtype: torch.dtype,
                      settings: BenchmarkSettings, log=print) -> dict[str, Any]:
    """All encoder configurations at each batch size: seconds per batch call, ms per image, GFLOP/s.

    Returns:
        str(batch size) -> {"warmup", "trials", "configs": `encoder_rows`, "contention", "wall_seconds",
        "load_average_end"}. Moves both models to `device` and `dtype` (in place).
    """
    device = torch.device(device)
    clip_vision = clip_vision.to(device=device, dtype=dtype)
    waveclip = waveclip.to(device=device, dtype=dtype)
    per_image = encoder_gflops(clip_vision, waveclip)
    out: dict[str, Any] = {}
    for schedule in schedules:
        generator = torch.Generator().manual_seed(settings.seed)
        pixel_values = random_pixel_values(settings, schedule.batch_size, generator).to(device)
        start, contention = time.perf_counter(), {}
        times = run_interleaved(encoder_cases(clip_vision, waveclip, pixel_values), schedule.warmup,
                                schedule.trials, device, quiet_policy(settings), contention)
        rows = encoder_rows(times, schedule.batch_size, per_image, waveclip.num_stages)
        out[str(schedule.batch_size)] = {
            "warmup": schedule.warmup, "trials": schedule.trials, "configs": rows, "contention": contention,
            "wall_seconds": time.perf_counter() - start, "load_average_end": load_average(),
        }
        log(f"  encoder {device.type} {str(dtype).removeprefix('torch.')} batch {schedule.batch_size}: "
            + ", ".join(f"{name} {1e3 * row['median']:.1f} ms" for name, row in rows.items()))
    return out


def encoder_section(settings: BenchmarkSettings, models: EncoderModels, log=print) -> dict[str, Any]:
    """{"cpu": {"float32": `benchmark_encoder`}, "cuda": {dtype: `benchmark_encoder`} or {"skipped": why}}."""
    cpu = {"float32": benchmark_encoder(*models, settings.cpu_schedules, "cpu", torch.float32, settings, log)}
    cuda = for_each_gpu_dtype(settings, lambda dtype: benchmark_encoder(
        *models, settings.gpu_schedules, "cuda", dtype, settings, log))
    return {"cpu": cpu, "cuda": cuda}
