"""Section `preprocessing`: `WaveCLIPImageProcessor` (YCbCr + DWT) and its fast (batched, device-side) variant
`WaveCLIPImageProcessorFast` against `transformers.CLIPImageProcessor()`.

Same RGB PIL images for both (scikit-image photos of various sizes and a random 1024 x 1024 image), one image per
call and a batch per call. Without torchvision, `CLIPImageProcessor()` returns `CLIPImageProcessorPil`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from .contention import load_average, quiet_policy, wait_if_asked
from .settings import BenchmarkSettings
from .timing import Case, run_interleaved, summarize


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


def build_processors(settings: BenchmarkSettings) -> dict[str, Any]:
    """{"waveclip": `WaveCLIPImageProcessor`, "waveclip_fast": `WaveCLIPImageProcessorFast` (on the CPU), "clip":
    what `CLIPImageProcessor()` gives}, all at `image_size`."""
    from transformers import CLIPImageProcessor

    from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor, WaveCLIPImageProcessorFast

    return {
        "waveclip": WaveCLIPImageProcessor(image_size=settings.image_size, levels=settings.levels),
        "waveclip_fast": WaveCLIPImageProcessorFast(image_size=settings.image_size, levels=settings.levels),
        "clip": CLIPImageProcessor(
            size={"shortest_edge": settings.image_size},
            crop_size={"height": settings.image_size, "width": settings.image_size},
        ),
    }


def _processor_call(processor, images: list, threads: int | None = None) -> Case:
    """A case that runs `processor` on `images` (on `threads` torch threads if given, restored after)."""

    def run(watch) -> None:
        if threads is None:
            processor(images=images, return_tensors="pt")
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            processor(images=images, return_tensors="pt")
        finally:
            torch.set_num_threads(previous)

    return run


def preprocessing_cases(processors: dict[str, Any], images: list) -> dict[str, Case]:
    """Every processor on `images`, plus the WaveCLIP processor on one thread (`waveclip_1_thread`).

    The WaveCLIP processor runs torch operators, which use every core torch is given; it is also timed on one
    thread, because its operators are small and a busy core stalls each parallel region.
    """
    return {
        **{name: _processor_call(processor, images) for name, processor in processors.items()},
        "waveclip_1_thread": _processor_call(processors["waveclip"], images, threads=1),
    }


def time_single_images(processors: dict[str, Any], images: dict[str, Any], settings: BenchmarkSettings) -> dict:
    """image name -> {"size": "WxH", case: `summarize` of one call on that image alone}."""
    schedule = settings.preprocessing_single
    single: dict[str, dict[str, Any]] = {}
    for name, image in images.items():
        wait_if_asked(settings, log=lambda *_: None)  # single-image rounds are too short to judge one by one
        times = run_interleaved(
            preprocessing_cases(processors, [image]), schedule.warmup, schedule.trials, torch.device("cpu")
        )
        single[name] = {
            "size": f"{image.width}x{image.height}",
            **{case: summarize(case_times["total"]) for case, case_times in times.items()},
        }
    return single


def time_batch(processors: dict[str, Any], images: dict[str, Any], settings: BenchmarkSettings) -> dict:
    """{"batch_size", "warmup", "trials", "images", "contention", case: `summarize` of one call on the batch}; the
    batch cycles through `images`."""
    schedule = settings.preprocessing_batch
    names = list(images)
    batch = [images[names[i % len(names)]] for i in range(schedule.batch_size)]
    contention: dict = {}
    times = run_interleaved(
        preprocessing_cases(processors, batch),
        schedule.warmup,
        schedule.trials,
        torch.device("cpu"),
        quiet_policy(settings),
        contention,
    )
    return {
        "batch_size": schedule.batch_size,
        "warmup": schedule.warmup,
        "trials": schedule.trials,
        "images": names,
        "contention": contention,
        **{case: summarize(case_times["total"]) for case, case_times in times.items()},
    }


def time_resize_strategies(images: dict[str, Any], settings: BenchmarkSettings) -> dict:
    """The resize the fast processor runs (uint8 → float, then antialiased bicubic) on `batch_size` copies of the
    512 x 512 photo, in one call against one call per image: what batching buys on the CPU. {"images",
    "image_size", case: `summarize`}."""
    import torch.nn.functional as F

    from ..models.waveclip.image_decoding_waveclip import decode_image, decoded_to_rgb, stack_decoded

    schedule = settings.preprocessing_batch
    decoded = [decode_image(images["astronaut"], index) for index in range(schedule.batch_size)]
    size = (settings.image_size, settings.image_size)

    def resize(batch) -> None:
        F.interpolate(decoded_to_rgb(batch), size=size, mode="bicubic", antialias=True, align_corners=False)

    cases = {
        "one_call": lambda watch: resize(stack_decoded(decoded)),
        "one_call_per_image": lambda watch: [resize(stack_decoded([image])) for image in decoded],
    }
    times = run_interleaved(cases, schedule.warmup, schedule.trials, torch.device("cpu"))
    return {
        "images": f"{schedule.batch_size} x astronaut (512x512)",
        "image_size": settings.image_size,
        **{case: summarize(case_times["total"]) for case, case_times in times.items()},
    }


def benchmark_preprocessing(settings: BenchmarkSettings, log=print) -> dict[str, Any]:
    """`WaveCLIPImageProcessor` and its fast variant against `CLIPImageProcessor()` per image and per batch, on the
    same PIL images.

    Returns:
        {"processors", "single": `time_single_images`, "single_schedule", "batch": `time_batch`,
        "resize_strategies": `time_resize_strategies`, "mean_single_seconds" and "batched_seconds_per_image"
        (case -> seconds per image), "wall_seconds", "load_average_end"}.
    """
    processors = build_processors(settings)
    images = sample_images(settings.seed)
    start = time.perf_counter()
    single = time_single_images(processors, images, settings)
    batch = time_batch(processors, images, settings)
    resize_strategies = time_resize_strategies(images, settings)
    cases = list(preprocessing_cases(processors, []))
    mean_single = {case: float(np.mean([single[name][case]["median"] for name in images])) for case in cases}
    per_image_batched = {case: batch[case]["median"] / batch["batch_size"] for case in cases}
    log(
        "  preprocessing per image (single call, mean over images): "
        + ", ".join(f"{p} {1e3 * t:.1f} ms" for p, t in mean_single.items())
        + "; in a batch of "
        + str(batch["batch_size"])
        + ": "
        + ", ".join(f"{p} {1e3 * t:.1f} ms" for p, t in per_image_batched.items())
    )
    return {
        "processors": {name: type(processor).__name__ for name, processor in processors.items()},
        "single": single,
        "single_schedule": asdict(settings.preprocessing_single),
        "batch": batch,
        "resize_strategies": resize_strategies,
        "mean_single_seconds": mean_single,
        "batched_seconds_per_image": per_image_batched,
        "wall_seconds": time.perf_counter() - start,
        "load_average_end": load_average(),
    }


def preprocessing_section(settings: BenchmarkSettings, models=None, log=print) -> dict[str, Any]:
    """`benchmark_preprocessing` (the section builds its own processors; it takes no encoder models)."""
    return benchmark_preprocessing(settings, log)
