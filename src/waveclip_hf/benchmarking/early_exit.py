"""Section `early_exit`: the batched early-exit path of `WaveCLIPModel.refine` at forced exit fractions.

The fraction of images that stop at stage 0 is forced to each of `settings.exit_fractions`, and the time per image
is compared with the line the GFLOPs count predicts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..models.waveclip.flops import gflops, stage_flops
from ..models.waveclip.gating import probability_margin
from ..models.waveclip.scoring import zero_shot_logits
from .contention import load_average, quiet_policy
from .machine import for_each_gpu_dtype
from .models import EncoderModels, random_pixel_values
from .settings import BenchmarkSettings
from .timing import Case, rate_summary, run_interleaved, summarize


def forced_exit_counts(batch_size: int, fractions: Sequence[float]) -> list[int]:
    """How many images of the batch are forced to stop at stage 0, per exit fraction."""
    return [int(round(f * batch_size)) for f in fractions]


def early_exit_case(
    waveclip, pixel_values: torch.Tensor, text_embeds: torch.Tensor, fractions: Sequence[float]
) -> Case:
    """One round of `refine`'s batched early-exit path at every forced exit fraction.

    Mirrors `WaveCLIPModel.refine` step by step: stage 0 with a cache, scores against the labels and the gate's
    margin (part `stage0`), then - with the first `round(f * batch)` images forced to stop - the cache and the
    inputs cut down to the continuing images with `batch_select_indices` (part `select@f`) and the later stages
    from the cache with their scores (part `later@f`). The stage-0 work does not depend on f, so it runs once per
    round and every fraction's time is `stage0 + select@f + later@f`; each fraction starts from its own copy of
    the stage-0 cache (the copy is not timed: `refine` has no such step). The cache is a `WaveCLIPStageCache`, new
    per call, as `refine` makes one when none is passed.

    Args:
        pixel_values: (batch, 3, image_size, image_size).
        text_embeds: (num_labels, projection_dim), in the model's dtype.
    """
    batch_size = pixel_values.shape[0]
    num_stages = waveclip.num_stages
    scale = waveclip.logit_scale.exp()

    def score(outputs):
        return zero_shot_logits(outputs.pooler_output, text_embeds, scale).softmax(-1)

    def later_stages(inputs, cache) -> None:
        for stage in range(1, num_stages):
            score(waveclip.get_image_features(inputs, num_stages=stage + 1, cache=cache))

    def stage0_copy(stage0_cache):
        """A stage cache holding the same stage 0 (filled through `update`, as the model fills one)."""
        cache = waveclip.new_stage_cache()
        for index, layer in enumerate(stage0_cache.layers):
            cache.update(layer.keys, layer.values, index)
        return cache

    def run(watch) -> None:
        with watch.part("stage0"):
            out0 = waveclip.get_image_features(pixel_values, num_stages=1, cache=waveclip.new_stage_cache())
            probability_margin(score(out0))  # the gate's statistic; the decision itself is forced below
        for fraction, stopped in zip(fractions, forced_exit_counts(batch_size, fractions)):
            if stopped == batch_size:
                continue
            cache = stage0_copy(out0.cache)
            with watch.part(f"select@{fraction:g}"):
                inputs = pixel_values
                if stopped:
                    continuing = torch.arange(stopped, batch_size, device=pixel_values.device)
                    cache.batch_select_indices(continuing)
                    inputs = pixel_values[continuing]
            with watch.part(f"later@{fraction:g}"):
                later_stages(inputs, cache)

    return run


def early_exit_rows(
    times: dict[str, list[float]], fractions: Sequence[float], stage_costs: list[int], batch_size: int
) -> list[dict[str, Any]]:
    """One row per exit fraction: the measured time per batch against two predictions.

    - `predicted_seconds` (the target): t(stage 0) + (1 - f) x t(later stages on the whole batch), i.e. the later
      stages' time scaled by their GFLOPs, which fall linearly with the continuing fraction.
    - `gflops_line_seconds`: time proportional to the GFLOPs per image, at the rate of the no-exit point (f = 0).

    Args:
        times: `early_exit_case`'s parts -> seconds per trial.
        stage_costs: analytic FLOPs per image of each stage (cached), `stage_flops`.
    """
    stage0 = np.asarray(times["stage0"])
    totals = {
        f"{fraction:g}": stage0
        + np.asarray(times.get(f"select@{fraction:g}", 0.0))
        + np.asarray(times.get(f"later@{fraction:g}", 0.0))
        for fraction in fractions
    }
    full_later = np.median(np.asarray(times["later@0"]) + np.asarray(times["select@0"]))
    stage0_median, no_exit = float(np.median(stage0)), float(np.median(totals["0"]))
    gflops_no_exit = gflops(sum(stage_costs))
    rows = []
    for fraction, exited in zip(fractions, forced_exit_counts(batch_size, fractions)):
        key = f"{fraction:g}"
        per_image_gflops = gflops(stage_costs[0] + (1 - fraction) * sum(stage_costs[1:]))
        row = {
            "exit_fraction": fraction,
            "exited_images": exited,
            **rate_summary(totals[key], batch_size, per_image_gflops),
        }
        predicted = stage0_median + (1 - fraction) * full_later
        gflops_line = no_exit * per_image_gflops / gflops_no_exit
        rows.append(
            {
                **row,
                "predicted_seconds": predicted,
                "deviation_percent": 100 * (row["median"] - predicted) / predicted,
                "gflops_line_seconds": gflops_line,
                "gflops_line_deviation_percent": 100 * (row["median"] - gflops_line) / gflops_line,
                "parts": {
                    part: summarize(samples)
                    for part, samples in times.items()
                    if part == "stage0" or part.endswith(f"@{key}")
                },
            }
        )
    return rows


def benchmark_early_exit(
    waveclip, settings: BenchmarkSettings, device, dtype: torch.dtype, log=print
) -> dict[str, Any]:
    """Time per image at each forced exit fraction against the two predictions of `early_exit_rows`.

    Returns:
        {"batch_size", "warmup", "trials", "num_labels", "rows": `early_exit_rows`, "contention", "wall_seconds",
        "load_average_end"}. Moves the model to `device` and `dtype` (in place).
    """
    device = torch.device(device)
    waveclip = waveclip.to(device=device, dtype=dtype)
    # `device.type`: a torch.device never equals the string "cpu" (the GPU schedule, batch 512, would run on the CPU)
    schedule = settings.cpu_early_exit if device.type == "cpu" else settings.gpu_early_exit
    fractions = settings.exit_fractions
    batch_size = schedule.batch_size
    generator = torch.Generator().manual_seed(settings.seed + 1)
    pixel_values = random_pixel_values(settings, batch_size, generator).to(device)
    text_embeds = torch.randn(settings.num_labels, waveclip.projection_dim, generator=generator)
    text_embeds = text_embeds.to(device=device, dtype=dtype)
    start, contention = time.perf_counter(), {}
    times = run_interleaved(
        {"early_exit": early_exit_case(waveclip, pixel_values, text_embeds, fractions)},
        schedule.warmup,
        schedule.trials,
        device,
        quiet_policy(settings),
        contention,
    )["early_exit"]
    rows = early_exit_rows(times, fractions, stage_flops(waveclip.config), batch_size)
    log(
        f"  early exit {device.type} batch {batch_size}: "
        + ", ".join(
            f"{100 * r['exit_fraction']:.0f}% {1e3 * r['median']:.0f} ms ({r['deviation_percent']:+.1f}%)"
            for r in rows
        )
    )
    return {
        "batch_size": batch_size,
        "warmup": schedule.warmup,
        "trials": schedule.trials,
        "num_labels": settings.num_labels,
        "rows": rows,
        "contention": contention,
        "wall_seconds": time.perf_counter() - start,
        "load_average_end": load_average(),
    }


def early_exit_entries(device_entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(dtype, sweep)] of one device's early-exit results (the CPU entry is a single float32 sweep)."""
    return [("float32", device_entry)] if "rows" in device_entry else list(device_entry.items())


def early_exit_section(settings: BenchmarkSettings, models: EncoderModels, log=print) -> dict[str, Any]:
    """{"cpu": `benchmark_early_exit` in float32, "cuda": {dtype: `benchmark_early_exit`} or {"skipped": why}}.

    The CPU entry is a single sweep, not keyed by dtype; `early_exit_entries` reads both shapes.
    """
    waveclip = models.waveclip.to("cpu", torch.float32)
    cpu = benchmark_early_exit(waveclip, settings, "cpu", torch.float32, log)
    cuda = for_each_gpu_dtype(settings, lambda dtype: benchmark_early_exit(waveclip, settings, "cuda", dtype, log))
    return {"cpu": cpu, "cuda": cuda}
