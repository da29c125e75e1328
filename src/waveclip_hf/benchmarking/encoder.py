"""Section `encoder`: a transformers CLIP ViT full pass against WaveCLIP's image encoder, per batch size.

WaveCLIP (`WaveCLIPModel.get_image_features`) runs these ways: stage 0 only; the cached full pass (stage 0 into a
KV cache, then the later stages from it) with a new `WaveCLIPStageCache` per call (what `use_cache=True` gives),
with one kept stage cache reset before each call (what the pipeline does) and with a transformers `DynamicCache`
(the cache before the stage cache); the naive re-run (stage 0, then every stage again without a cache) and the
single block-causal full forward. With `settings.compile_backend` set, compiled copies of both encoders
(`WaveCLIPModel.compile_stages()`; CLIP's embeddings and encoder compiled the same way) run CLIP, the kept-cache
pass and the naive re-run (hence stage 0 and the full forward) too, in the same interleaved rounds. Random weights;
pixel values are random too (WaveCLIP reads them as packed coefficients).

To add a configuration: add its case to `encoder_cases` and a row to `ENCODER_CONFIGURATIONS` naming the case
(and part) that times it; the report, the plot and the JSON follow.
"""

from __future__ import annotations

import copy
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


def _total(clip_config, waveclip_config) -> float:
    return sum(stage_flops(waveclip_config))


def _eager_and_compiled(
    name: str, label: str, short_name: str, marker: str, timed_by: tuple[str, str], flops: Callable[[Any, Any], float]
) -> dict[str, EncoderConfiguration]:
    """The configuration, and its compiled twin (`<name>_compiled`, timed by the compiled copy's case)."""
    case, part = timed_by
    return {
        name: EncoderConfiguration(label, short_name, marker, timed_by, flops),
        f"{name}_compiled": EncoderConfiguration(
            f"{label}, compiled", f"{short_name}, compiled", marker, (f"{case}_compiled", part), flops
        ),
    }


_CLIP_FULL = (
    "clip_full",
    "CLIP ViT full pass",
    "CLIP full",
    "s",
    ("clip_full", "total"),
    lambda clip_config, waveclip_config: clip_vit_flops(clip_config),
)
_STAGE0 = (
    "waveclip_stage0",
    "WaveCLIP stage 0 only",
    "stage 0",
    "o",
    ("waveclip_naive", "stages_0-0"),
    lambda clip_config, waveclip_config: stage_flops(waveclip_config)[0],
)
_CACHED_KEPT = (
    "waveclip_cached_kept",
    "WaveCLIP cached full pass, one stage cache kept across calls (reset before each, as the pipeline does)",
    "cached, kept cache",
    "P",
    ("waveclip_cached_kept", "total"),
    _total,
)
_NAIVE = (
    "waveclip_naive",
    "WaveCLIP naive re-run (stage 0, then all stages again without cache)",
    "naive re-run",
    "^",
    ("waveclip_naive", "total"),
    lambda clip_config, waveclip_config: cumulative_flops(waveclip_config, mode="naive")[-1],
)
_FULL_FORWARD = (
    "waveclip_full_forward",
    "WaveCLIP single block-causal full forward (all stages, one call)",
    "one full forward",
    "v",
    ("waveclip_naive", "stages_0-{last_stage}"),
    lambda clip_config, waveclip_config: full_forward_flops(waveclip_config),
)

# Eager configurations first (in the report's order), then the compiled twins of five of them.
_EAGER_AND_COMPILED = [
    _eager_and_compiled(*spec) for spec in (_CLIP_FULL, _STAGE0, _CACHED_KEPT, _NAIVE, _FULL_FORWARD)
]
ENCODER_CONFIGURATIONS = {
    **{name: pair[name] for pair, name in zip(_EAGER_AND_COMPILED, ("clip_full", "waveclip_stage0"))},
    "waveclip_cached_full": EncoderConfiguration(
        "WaveCLIP cached full pass, a new stage cache per call (`use_cache=True`)",
        "cached, new cache",
        "D",
        ("waveclip_cached_full", "total"),
        _total,
    ),
    "waveclip_cached_kept": _EAGER_AND_COMPILED[2]["waveclip_cached_kept"],
    "waveclip_cached_dynamic": EncoderConfiguration(
        "WaveCLIP cached full pass with a transformers DynamicCache (grows by torch.cat)",
        "cached, DynamicCache",
        "X",
        ("waveclip_cached_dynamic", "total"),
        _total,
    ),
    **{name: pair[name] for pair, name in zip(_EAGER_AND_COMPILED[3:], ("waveclip_naive", "waveclip_full_forward"))},
    **{
        name: configuration
        for pair in _EAGER_AND_COMPILED
        for name, configuration in pair.items()
        if name.endswith("_compiled")
    },
}
# Configuration name -> the report's label.
ENCODER_CONFIGS = {name: configuration.label for name, configuration in ENCODER_CONFIGURATIONS.items()}


def encoder_gflops(clip_vision, waveclip) -> dict[str, float]:
    """Analytic GFLOPs per image of every encoder configuration (`FLOPS_CONVENTION`)."""
    return {
        name: gflops(configuration.flops(clip_vision.config, waveclip.config))
        for name, configuration in ENCODER_CONFIGURATIONS.items()
    }


def encoder_cases(clip_vision, waveclip, pixel_values: torch.Tensor, compiled=None) -> dict[str, Case]:
    """The timed units of a round; "stage 0 only" and the single full forward are parts of the naive re-run.

    - `clip_full`: one `CLIPVisionModelWithProjection` call.
    - `waveclip_cached_full` / `waveclip_cached_kept` / `waveclip_cached_dynamic`: stage 0 into a cache, then
      stages 1..L, each from the cache (parts `stage0_cached`, `stage1`, ...); the cache is a new
      `WaveCLIPStageCache` per call (`use_cache=True`), one kept stage cache reset first, or a new `DynamicCache`.
    - `waveclip_naive`: stages 0..s from scratch for every s (parts `stages_0-0`, ..., `stages_0-L`); for L = 1 that is
      stage 0, then the full forward. Its first part is "stage 0 only" and its last the single full forward, each
      timed on its own, so neither is run twice.
    - with `compiled` = (compiled CLIP, compiled WaveCLIP): `clip_full_compiled`, `waveclip_cached_kept_compiled`
      and `waveclip_naive_compiled`, the same calls on those.

    Args:
        pixel_values: (batch, 3, image_size, image_size).
    """
    from transformers.cache_utils import DynamicCache

    num_stages = waveclip.num_stages

    def clip_case(model) -> Case:
        return lambda watch: model(pixel_values=pixel_values)

    def cached_case(model, new_cache: Callable[[], Any]) -> Case:
        def run(watch: Stopwatch) -> None:
            cache = new_cache()
            with watch.part("stage0_cached"):
                cache = model.get_image_features(pixel_values, num_stages=1, cache=cache, use_cache=True).cache
            for stage in range(1, num_stages):
                with watch.part(f"stage{stage}"):
                    model.get_image_features(pixel_values, num_stages=stage + 1, cache=cache)

        return run

    def kept_case(model) -> Case:
        kept = model.new_stage_cache()

        def reset():
            kept.reset()
            return kept

        return cached_case(model, reset)

    def naive_case(model) -> Case:
        def run(watch: Stopwatch) -> None:
            for stage in range(num_stages):
                with watch.part(f"stages_0-{stage}"):
                    model.get_image_features(pixel_values, num_stages=stage + 1)

        return run

    cases = {
        "clip_full": clip_case(clip_vision),
        "waveclip_cached_full": cached_case(waveclip, lambda: None),
        "waveclip_cached_kept": kept_case(waveclip),
        "waveclip_cached_dynamic": cached_case(waveclip, DynamicCache),
        "waveclip_naive": naive_case(waveclip),
    }
    if compiled is not None:
        clip_compiled, waveclip_compiled = compiled
        cases.update(
            clip_full_compiled=clip_case(clip_compiled),
            waveclip_cached_kept_compiled=kept_case(waveclip_compiled),
            waveclip_naive_compiled=naive_case(waveclip_compiled),
        )
    return cases


def compile_encoders(clip_vision, waveclip, backend: str):
    """Compiled copies (the originals stay eager): WaveCLIP through `compile_stages`, CLIP with the same scope, its
    embeddings and encoder compiled and its layer norms and projection left eager."""
    clip_compiled, waveclip_compiled = copy.deepcopy(clip_vision), copy.deepcopy(waveclip)
    for module in (clip_compiled.vision_model.embeddings, clip_compiled.vision_model.encoder):
        module.compile(backend=backend)
    waveclip_compiled.compile_stages(backend=backend)
    return clip_compiled, waveclip_compiled


def first_calls(cases: dict[str, Case], names: Sequence[str], device) -> dict[str, float]:
    """Seconds of one call of each named case: for a compiled one, tracing and code generation included."""
    seconds = {}
    for name in names:
        watch = Stopwatch(torch.device(device))
        start = time.perf_counter()
        cases[name](watch)
        seconds[name] = time.perf_counter() - start
    return seconds


def encoder_rows(times: CaseTimes, batch_size: int, gflops_per_image: dict[str, float], num_stages: int) -> dict:
    """configuration -> `rate_summary` of its seconds per batch call, for every configuration whose case ran; a
    configuration timed by a whole case that has parts also gets `parts` (part -> `summarize`)."""
    rows = {}
    for name, configuration in ENCODER_CONFIGURATIONS.items():
        case, part = configuration.timed_by
        if case not in times:  # e.g. the compiled configurations of a run without compilation
            continue
        samples = times[case][part.format(last_stage=num_stages - 1)]
        rows[name] = rate_summary(samples, batch_size, gflops_per_image[name])
        if part == "total" and len(times[case]) > 1:
            rows[name]["parts"] = summarize_parts(times[case])
    return rows


def benchmark_encoder(
    clip_vision,
    waveclip,
    schedules: Sequence[Schedule],
    device,
    dtype: torch.dtype,
    settings: BenchmarkSettings,
    log=print,
) -> dict[str, Any]:
    """All encoder configurations at each batch size: seconds per batch call, ms per image, GFLOP/s.

    Returns:
        str(batch size) -> {"warmup", "trials", "configs": `encoder_rows`, "contention", "first_call_seconds" (of
        each compiled case, compilation included: `first_calls`), "wall_seconds", "load_average_end"}. Moves both
        models to `device` and `dtype` (in place); compiled copies (`compile_encoders`) when
        `settings.compile_backend` is set.
    """
    device = torch.device(device)
    clip_vision = clip_vision.to(device=device, dtype=dtype)
    waveclip = waveclip.to(device=device, dtype=dtype)
    per_image = encoder_gflops(clip_vision, waveclip)
    backend = settings.compile_backend
    compiled = compile_encoders(clip_vision, waveclip, backend) if backend else None
    out: dict[str, Any] = {}
    for schedule in schedules:
        generator = torch.Generator().manual_seed(settings.seed)
        pixel_values = random_pixel_values(settings, schedule.batch_size, generator).to(device)
        if compiled is not None and schedule.batch_size > 1:
            # As `compile_stages` does for WaveCLIP: one graph for every batch size of 2 or more, for CLIP too.
            torch._dynamo.maybe_mark_dynamic(pixel_values, 0)
        start, contention = time.perf_counter(), {}
        cases = encoder_cases(clip_vision, waveclip, pixel_values, compiled)
        first = first_calls(cases, [name for name in cases if name.endswith("_compiled")], device)
        times = run_interleaved(cases, schedule.warmup, schedule.trials, device, quiet_policy(settings), contention)
        rows = encoder_rows(times, schedule.batch_size, per_image, waveclip.num_stages)
        out[str(schedule.batch_size)] = {
            "warmup": schedule.warmup,
            "trials": schedule.trials,
            "configs": rows,
            "contention": contention,
            "first_call_seconds": first,
            "wall_seconds": time.perf_counter() - start,
            "load_average_end": load_average(),
        }
        log(
            f"  encoder {device.type} {str(dtype).removeprefix('torch.')} batch {schedule.batch_size}: "
            + ", ".join(f"{name} {1e3 * row['median']:.1f} ms" for name, row in rows.items())
        )
    return out


def encoder_section(settings: BenchmarkSettings, models: EncoderModels, log=print) -> dict[str, Any]:
    """{"cpu": {"float32": `benchmark_encoder`}, "cuda": {dtype: `benchmark_encoder`} or {"skipped": why}}."""
    cpu = {"float32": benchmark_encoder(*models, settings.cpu_schedules, "cpu", torch.float32, settings, log)}
    cuda = for_each_gpu_dtype(
        settings, lambda dtype: benchmark_encoder(*models, settings.gpu_schedules, "cuda", dtype, settings, log)
    )
    return {"cpu": cpu, "cuda": cuda}
