"""Section `profile`: where the encoder time goes, from `torch.profiler` of one call per configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .contention import CpuMonitor, wait_if_asked
from .models import EncoderModels, random_pixel_values
from .settings import BenchmarkSettings


def profile_calls(
    calls: dict[str, Callable[[], Any]], device, row_limit: int = 8, before: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """`torch.profiler` of one call each (after one untimed call): total and the top operators by self time.

    `before` runs ahead of each profiled call (e.g. waiting for a quiet machine); the other processes' CPU use
    during the call is recorded as `others_busy_cores`.

    Returns:
        name -> {"self_time_total_ms", "others_busy_cores", "ops": [{"op", "self_ms", "calls", "share"}, ...]}.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = {}
    for name, call in calls.items():
        call()
        if before is not None:
            before()
        with CpuMonitor() as monitor, profile(activities=activities) as profiler:
            call()
        events = list(profiler.key_averages())
        total = sum(getattr(event, key) for event in events)
        top = sorted(events, key=lambda event: getattr(event, key), reverse=True)[:row_limit]
        out[name] = {
            "self_time_total_ms": total / 1e3,
            "others_busy_cores": (monitor.result or {}).get("others_busy_cores"),
            "ops": [
                {
                    "op": event.key,
                    "self_ms": getattr(event, key) / 1e3,
                    "calls": event.count,
                    "share": getattr(event, key) / total if total else 0.0,
                }
                for event in top
            ],
        }
    return out


def stage_calls(clip_vision, waveclip, pixel_values: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The calls whose time the profiles split, as closures over one batch, with one stage cache kept across calls
    as the pipeline keeps it: "clip" (CLIP's full pass), "stage0" (stage 0 into the reset cache), "stage1" (stage 1
    from that cache) and "cached" (the two in a row). Stage 0 has run once when this returns."""
    cache = waveclip.new_stage_cache()
    stage0_tokens = waveclip.config.vision_config.stage_offsets[1]

    def clip():
        clip_vision(pixel_values=pixel_values)

    def stage0():
        cache.reset()
        waveclip.get_image_features(pixel_values, num_stages=1, cache=cache)

    def stage1():
        # Back to stage 0 alone (the buffers stay), so every call of stage 1 starts from the same cache.
        cache.crop(stage0_tokens)
        waveclip.get_image_features(pixel_values, num_stages=2, cache=cache)

    def cached():
        stage0()
        waveclip.get_image_features(pixel_values, num_stages=2, cache=cache)

    stage0()
    return {"clip": clip, "stage0": stage0, "stage1": stage1, "cached": cached}


def profile_encoder(clip_vision, waveclip, batch_size: int, settings: BenchmarkSettings, device="cpu") -> dict:
    """Top operators of the CLIP full pass, WaveCLIP's stage 0 (into a kept stage cache), stage 1 from that cache,
    and the single block-causal full forward, one call each at `batch_size`: where the time of the encoder targets
    goes.

    Returns:
        {"batch_size", "device", "calls": `profile_calls`}.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(settings.seed)
    pixel_values = random_pixel_values(settings, batch_size, generator).to(device)
    stages = stage_calls(clip_vision, waveclip, pixel_values)
    calls = {"clip_full": stages["clip"], "waveclip_stage0_cached": stages["stage0"]}
    if waveclip.num_stages == 2:
        calls["waveclip_stage1_from_cache"] = stages["stage1"]
    calls["waveclip_full_forward"] = lambda: waveclip.get_image_features(pixel_values)
    before = (lambda: wait_if_asked(settings, log=lambda *_: None)) if settings.wait_for_idle_seconds > 0 else None
    return {"batch_size": batch_size, "device": device.type, "calls": profile_calls(calls, device, before=before)}


def profile_section(settings: BenchmarkSettings, models: EncoderModels, log=print) -> dict[str, Any]:
    """`profile_encoder` on the CPU in float32 at `settings.profile_batch_size`."""
    return profile_encoder(*models.to("cpu", torch.float32), settings.profile_batch_size, settings)
