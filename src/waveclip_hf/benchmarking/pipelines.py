"""Section `pipeline`: the stock zero-shot pipeline around a `CLIPModel` against the WaveCLIP pipeline, end to end.

Both pipelines are loaded from folders (WaveCLIP's through `trust_remote_code`) and share the text tower
(`convert_clip_to_waveclip`), the labels, the tokenizer (word level, built over the prompts) and the images. The
stock pipeline re-encodes every prompt for every image (that is its behaviour); a second, "image side only"
measurement memoises its text tower so the comparison isolates the image side. Results are in images per second.

To add a run: add its case in `pipeline_cases`, and its label in `PIPELINE_RUNS` and `PIPELINE_SHORT_NAMES` (keyed
by the part of the run key before "@").
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.waveclip.flops import clip_vit_flops, gflops
from ..models.waveclip.gating import probability_margin
from ..models.waveclip.scoring import zero_shot_logits
from .contention import load_average, quiet_policy, wait_if_asked
from .models import build_models, label_names
from .preprocessing import sample_images
from .settings import BenchmarkSettings
from .timing import Case, run_interleaved, summarize


HYPOTHESIS_TEMPLATE = "This is a photo of {}."

# Run key (before any "@batch<N>" suffix) -> the report's label; `{threshold}` is the run's margin threshold.
PIPELINE_RUNS = {
    "stock": "stock CLIP pipeline, as shipped (re-encodes all prompts for every image)",
    "stock_image_side": "stock CLIP pipeline, image side only (text transformer memoised; prompts still tokenised "
    "and projected per image)",
    "waveclip_theta0_first": "WaveCLIP θ = 0, first call (text cache cold; measured once)",
    "waveclip_theta0": "WaveCLIP θ = 0, text cache warm",
    "waveclip_theta_middle": "WaveCLIP θ = {threshold:.3g} (median stage-0 margin), cache warm",
    "waveclip_theta_high": "WaveCLIP θ = {threshold:g} (every stage), cache warm",
    "bare_waveclip_theta0": "WaveCLIP θ = 0 without the pipeline (per image: its image processor, then `refine` "
    "with the cached text embeddings and one kept stage cache)",
    "stock_image_side_int8": "stock CLIP pipeline, image side only, **image side in dynamic int8**",
    "waveclip_theta0_int8": "WaveCLIP θ = 0, text cache warm, **image side in dynamic int8**",
}
# Run key (before any "@batch<N>" suffix) -> the plot's label.
PIPELINE_SHORT_NAMES = {
    "stock": "stock",
    "stock_image_side": "stock, image side",
    "waveclip_theta0_first": "θ=0 cold",
    "waveclip_theta0": "θ=0",
    "waveclip_theta_middle": "θ mid",
    "waveclip_theta_high": "θ>1",
    "bare_waveclip_theta0": "θ=0, no pipeline",
    "stock_image_side_int8": "stock, image side, int8",
    "waveclip_theta0_int8": "θ=0, int8",
}


def text_tower_flops(text_config, sequence_length: int, projection_dim: int) -> int:
    """FLOPs of one prompt through a CLIP text tower (`FLOPS_CONVENTION`), text projection of the pooled token
    included: per layer 8 T D^2 + 4 T D I + 4 T^2 D, as `flops.py` counts a vision layer."""
    hidden, intermediate, tokens = text_config.hidden_size, text_config.intermediate_size, sequence_length
    layer = 8 * tokens * hidden**2 + 4 * tokens * hidden * intermediate + 4 * tokens * tokens * hidden
    return text_config.num_hidden_layers * layer + 2 * hidden * projection_dim


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
            memo[key] = original(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )
        # A fresh output object: `CLIPModel.get_text_features` overwrites `pooler_output` with its projection.
        stored = memo[key]
        return type(stored)(**dict(stored.items()))

    text_model.forward = forward
    try:
        yield memo
    finally:
        del text_model.forward  # back to the class's method


@dataclass
class PipelineSetup:
    """What both pipelines classify, the two pipelines, and the configs their GFLOPs are counted from."""

    labels: list[str]
    prompts: list[str]
    sequence_length: int  # tokens per prompt, with padding
    images: list  # PIL images, the preprocessing sample photos cycled
    stock_images: list  # the first `stock_pipeline_images` of them (the stock pipeline re-encodes every prompt)
    stock: Any  # `ZeroShotImageClassificationPipeline` around a `CLIPModel`
    wave: Any  # `WaveCLIPZeroShotImageClassificationPipeline`
    text_config: Any  # the shared text tower's `CLIPTextConfig`
    vision_config: Any  # the CLIP vision tower's `CLIPVisionConfig`
    stock_int8: Any = None  # the two pipelines again, image sides in dynamic int8 (`int8_pipelines`)
    wave_int8: Any = None


def load_pipelines(settings: BenchmarkSettings, tokenizer) -> tuple[Any, Any, Any, Any]:
    """Random-weight CLIP and WaveCLIP saved to folders with their processors and `tokenizer`, then loaded with
    `pipeline("zero-shot-image-classification", ...)` as a user would.

    Returns:
        (stock pipeline, WaveCLIP pipeline, text config, CLIP vision config).
    """
    from transformers import CLIPImageProcessor, pipeline

    from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor

    _, clip, waveclip = build_models(settings, tokenizer)
    with tempfile.TemporaryDirectory(prefix="waveclip_benchmark_") as folder:
        clip_folder, wave_folder = Path(folder, "clip"), Path(folder, "waveclip")
        clip.save_pretrained(clip_folder)
        CLIPImageProcessor(
            size={"shortest_edge": settings.image_size},
            crop_size={"height": settings.image_size, "width": settings.image_size},
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
    return stock, wave, text_config, vision_config


def int8_pipelines(stock, wave) -> tuple[Any, Any]:
    """The two pipelines again around copies of their models whose image side's linear layers are dynamic int8
    (`export.quantization.quantize_linear_layers`; text towers stay float32), with the same tokenizer and image
    processor: the same question asked of both in the mode where a pass costs least on a CPU."""
    from transformers import pipeline

    from ..export.quantization import quantize_linear_layers

    built = [
        pipeline(
            "zero-shot-image-classification",
            model=quantize_linear_layers(pipe.model),
            tokenizer=pipe.tokenizer,
            image_processor=pipe.image_processor,
        )
        for pipe in (stock, wave)
    ]
    # By name: the folder's pipeline class comes from its remote code, the int8 one from the model object's module.
    for pipe, int8 in zip((stock, wave), built):
        if type(int8).__name__ != type(pipe).__name__:
            raise RuntimeError(f"The int8 copy of {type(pipe).__name__} was built as {type(int8).__name__}.")
    return built[0], built[1]


def prepare_pipelines(settings: BenchmarkSettings) -> PipelineSetup:
    """Labels, prompts and a word-level tokenizer over them, the images, and both pipelines (`load_pipelines`)."""
    from ..data.text_tokenizer import build_word_level_tokenizer

    labels = label_names(settings.num_labels)
    prompts = [HYPOTHESIS_TEMPLATE.format(label) for label in labels]
    tokenizer = build_word_level_tokenizer(prompts + ["warm up"], max_length=settings.text_max_length)
    sequence_length = tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"].shape[1]
    stock, wave, text_config, vision_config = load_pipelines(settings, tokenizer)
    photos = list(sample_images(settings.seed).values())
    images = [photos[i % len(photos)] for i in range(settings.pipeline_images)]
    stock_int8, wave_int8 = int8_pipelines(stock, wave) if settings.pipeline_int8 else (None, None)
    return PipelineSetup(
        labels,
        prompts,
        int(sequence_length),
        images,
        images[: settings.stock_pipeline_images],
        stock,
        wave,
        text_config,
        vision_config,
        stock_int8,
        wave_int8,
    )


def middle_threshold(setup: PipelineSetup) -> float:
    """The median stage-0 margin of the benchmark images (untimed, text cache warm): about half stop at stage 0."""
    wave = setup.wave
    text_embeds = wave.label_embeddings(setup.labels, HYPOTHESIS_TEMPLATE)
    pixel_values = wave.image_processor(images=setup.images, return_tensors="pt")["pixel_values"]
    stage0 = wave.model.get_image_features(pixel_values, num_stages=1).pooler_output
    probs = zero_shot_logits(stage0, text_embeds, wave.model.logit_scale.exp()).softmax(-1)
    return float(probability_margin(probs).median())


def pipeline_cases(setup: PipelineSetup, thresholds: dict[str, float], batch_sizes, memo: dict, outputs: dict):
    """The interleaved runs: the stock pipeline as shipped and (at batch_size 1) image side only, and WaveCLIP at
    every threshold, at each of `batch_sizes` (keys get "@batch<N>" for N > 1); at batch_size 1 also both image
    sides in int8 (stock image side only, WaveCLIP at θ = 0) when `setup` has the int8 pipelines. `memo` holds
    each stock pipeline's memoised text tower outputs, by the pipeline's id.

    At batch_size > 1 the stock pipeline encodes the prompts once per batch (its `_forward` takes the first image's
    text inputs), so it gets every image. WaveCLIP's cases store their pipeline outputs in `outputs[key]`.

    Returns:
        (key -> case, key -> (images per call, batch_size)).
    """
    stock, wave, labels, images = setup.stock, setup.wave, setup.labels, setup.images

    def stock_run(batch: list, batch_size: int) -> Case:
        return lambda watch: stock(batch, candidate_labels=labels, batch_size=batch_size)

    def image_side(pipe) -> Case:
        def run(watch) -> None:
            with memoized_text_tower(pipe.model, memo.setdefault(id(pipe), {})):
                pipe(images, candidate_labels=labels)

        return run

    def bare_theta0(watch) -> None:
        """What the θ = 0 pipeline computes for each image, called directly: the pipeline's own cost per image is
        the difference between the two runs."""
        text_embeds, cache = wave.label_embeddings(labels, HYPOTHESIS_TEMPLATE), wave.model.new_stage_cache()
        for image in images:
            pixel_values = wave.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            wave.model.refine(pixel_values, text_embeds, 0.0, cache=cache)

    def waveclip_run(key: str, threshold: float, batch_size: int, pipe=wave) -> Case:
        return lambda watch: outputs.__setitem__(
            key, pipe(images, candidate_labels=labels, margin_threshold=threshold, batch_size=batch_size)
        )

    cases: dict[str, Case] = {}
    specs: dict[str, tuple[int, int]] = {}
    for batch_size in batch_sizes:
        suffix = "" if batch_size == 1 else f"@batch{batch_size}"
        stock_batch = setup.stock_images if batch_size == 1 else images
        cases["stock" + suffix] = stock_run(stock_batch, batch_size)
        specs["stock" + suffix] = (len(stock_batch), batch_size)
        if batch_size == 1:
            cases["stock_image_side"] = image_side(stock)
            cases["bare_waveclip_theta0"] = bare_theta0
            if setup.stock_int8 is not None:
                cases["stock_image_side_int8"] = image_side(setup.stock_int8)
                cases["waveclip_theta0_int8"] = waveclip_run("waveclip_theta0_int8", 0.0, 1, setup.wave_int8)
            for key in ("stock_image_side", "bare_waveclip_theta0", "stock_image_side_int8", "waveclip_theta0_int8"):
                if key in cases:
                    specs[key] = (len(images), 1)
        for key, threshold in thresholds.items():
            cases[key + suffix] = waveclip_run(key + suffix, threshold, batch_size)
            specs[key + suffix] = (len(images), batch_size)
    return cases, specs


def _warm_up(setup: PipelineSetup, memo: dict) -> None:
    """Each pipeline classifies one image against two unrelated labels, which warms its kernels without touching
    the label-set text cache; then the stock text towers' memos are filled (one per pipeline, by its id)."""
    stocks = [pipe for pipe in (setup.stock, setup.stock_int8) if pipe is not None]
    for pipe in stocks:
        pipe(setup.images[:1], candidate_labels=["warm", "up"])
    for pipe in (setup.wave, setup.wave_int8):
        if pipe is not None:
            pipe(setup.images[:1], candidate_labels=["warm", "up"], margin_threshold=0.0)
    for pipe in stocks:
        with memoized_text_tower(pipe.model, memo.setdefault(id(pipe), {})):
            pipe(setup.images[:1], candidate_labels=setup.labels)


@dataclass
class PipelineTimings:
    """Every timed call of the section (seconds), and what the analysis of them needs."""

    tokenize_seconds: list[float]  # tokenising every prompt, per trial
    first_call_seconds: list[float]  # WaveCLIP's cold first call (text cache empty), measured once
    first_call_contention: dict  # `run_interleaved` stats of that call
    thresholds: dict[str, float]  # WaveCLIP run key -> margin threshold
    run_specs: dict[str, tuple[int, int]]  # run key -> (images per call, batch_size)
    run_times: dict[str, dict[str, list[float]]]  # `run_interleaved` of `pipeline_cases`
    contention: dict  # `run_interleaved` stats of those rounds
    outputs: dict[str, Any]  # WaveCLIP run key -> its pipeline output (the stage each image was answered at)


def time_pipelines(setup: PipelineSetup, settings: BenchmarkSettings, log=print) -> PipelineTimings:
    """Every timed call of the section, under `torch.inference_mode()`, after `_warm_up`."""
    cpu = torch.device("cpu")
    memo: dict = {}
    outputs: dict[str, Any] = {}
    first_contention: dict = {}
    contention: dict = {}
    with torch.inference_mode():
        _warm_up(setup, memo)
        tokenize = {"tokenize": lambda watch: setup.stock.tokenizer(setup.prompts, padding=True, return_tensors="pt")}
        tokenize_seconds = run_interleaved(tokenize, 1, 5, cpu)["tokenize"]["total"]
        # The cold call happens once by definition: it is not retried, only recorded with its contention.
        wait_if_asked(settings, log)
        first = {
            "first": lambda watch: outputs.__setitem__(
                "waveclip_theta0_first", setup.wave(setup.images, candidate_labels=setup.labels, margin_threshold=0.0)
            )
        }
        first_seconds = run_interleaved(first, 0, 1, cpu, None, first_contention)["first"]["total"]
        thresholds = {
            "waveclip_theta0": 0.0,
            "waveclip_theta_middle": middle_threshold(setup),
            "waveclip_theta_high": settings.high_threshold,
        }
        cases, specs = pipeline_cases(setup, thresholds, settings.pipeline_batch_sizes, memo, outputs)
        times = run_interleaved(cases, 0, settings.pipeline_rounds, cpu, quiet_policy(settings), contention)
    return PipelineTimings(
        tokenize_seconds, first_seconds, first_contention, thresholds, specs, times, contention, outputs
    )


def pipeline_runs(setup: PipelineSetup, timed: PipelineTimings, projection_dim: int) -> dict[str, dict[str, Any]]:
    """run key -> `summarize` of its call time, images, batch_size, threshold, GFLOPs per image, images / s and ms
    per image; WaveCLIP's runs also carry the stage each image was answered at.

    GFLOPs per image: the image side analytic; the stock pipeline also runs the text tower on every prompt, once per
    batch of images; WaveCLIP's first call carries one label set's text cost spread over its images.
    """
    text_config, num_labels = setup.text_config, len(setup.labels)
    per_prompt = text_tower_flops(text_config, setup.sequence_length, projection_dim)
    text_projection = 2 * text_config.hidden_size * projection_dim
    clip_image = clip_vit_flops(setup.vision_config, projection_dim)
    runs = {
        "waveclip_theta0_first": {
            **summarize(timed.first_call_seconds),
            "images": len(setup.images),
            "batch_size": 1,
            "threshold": 0.0,
        }
    }
    for key, (count, batch_size) in timed.run_specs.items():
        base = key.split("@")[0].removesuffix("_int8")  # int8 changes the arithmetic, not the GFLOPs
        run = runs[key] = {**summarize(timed.run_times[key]["total"]), "images": count, "batch_size": batch_size}
        if base == "stock":
            text_passes = math.ceil(count / batch_size)
            run["gflops_per_image"] = gflops(clip_image + text_passes * num_labels * per_prompt / count)
        elif base == "stock_image_side":
            run["gflops_per_image"] = gflops(clip_image + num_labels * text_projection)
        elif base == "bare_waveclip_theta0":
            run["threshold"] = 0.0
            run["gflops_per_image"] = float(setup.wave.model.answer_gflops()[0])
        else:
            run["threshold"] = timed.thresholds[base]
    for key, run in runs.items():
        if key.startswith("waveclip"):
            answers = timed.outputs[key]
            stages = [per_image[0]["stage"] for per_image in answers]
            run["gflops_per_image"] = float(np.mean([per_image[0]["gflops"] for per_image in answers]))
            if key.endswith("_first"):
                run["gflops_per_image"] += gflops(num_labels * per_prompt) / len(answers)
            run["exit_fraction_stage0"] = float(np.mean([stage == 0 for stage in stages]))
            run["stages"] = stages
        run["images_per_second"] = run["images"] / run["median"]
        run["ms_per_image"] = 1e3 * run["median"] / run["images"]
    return runs


def benchmark_pipelines(settings: BenchmarkSettings, log=print) -> dict[str, Any]:
    """The stock zero-shot pipeline around a `CLIPModel` against the WaveCLIP pipeline, both loaded from folders.

    After a warm-up (`_warm_up`), at the default `batch_size=1`:
    - WaveCLIP at theta = 0, first call: the text cache is cold, so the 1,000 prompts are encoded once (one
      measurement: after it the cache is warm);
    - `pipeline_rounds` interleaved rounds of: the stock pipeline as shipped (every image re-encodes the 1,000
      prompts; `stock_pipeline_images` images), the stock pipeline "image side only" (its text transformer
      memoised, warm), and WaveCLIP with a warm cache at theta = 0, at a middle theta (the median stage-0 margin of
      these images, so about half stop at stage 0) and at theta > 1 (every image through every stage);
      and the same at every other `pipeline_batch_sizes`.
    Also times the tokenisation of the prompts, which the stock pipeline repeats per image.
    """
    setup = prepare_pipelines(settings)
    start = time.perf_counter()
    timed = time_pipelines(setup, settings, log)
    runs = pipeline_runs(setup, timed, settings.projection_dim)
    log("  pipelines (images/s): " + ", ".join(f"{k} {r['images_per_second']:.2f}" for k, r in runs.items()))
    text_config, num_labels = setup.text_config, len(setup.labels)
    return {
        "num_labels": num_labels,
        "hypothesis_template": HYPOTHESIS_TEMPLATE,
        "prompt_tokens": setup.sequence_length,
        "tokenize_prompts_seconds": summarize(timed.tokenize_seconds),
        "text_tower": {
            "layers": text_config.num_hidden_layers,
            "hidden_size": text_config.hidden_size,
            "heads": text_config.num_attention_heads,
            "intermediate_size": text_config.intermediate_size,
        },
        "text_gflops_per_label_set": gflops(
            num_labels * text_tower_flops(text_config, setup.sequence_length, settings.projection_dim)
        ),
        "stock_pipeline_class": type(setup.stock).__name__,
        "stock_image_processor": type(setup.stock.image_processor).__name__,
        "waveclip_pipeline_class": type(setup.wave).__name__,
        "batch_sizes": list(settings.pipeline_batch_sizes),
        "rounds": settings.pipeline_rounds,
        "runs": runs,
        "contention": timed.contention,
        "first_call_contention": timed.first_call_contention,
        "wall_seconds": time.perf_counter() - start,
        "load_average_end": load_average(),
    }


def pipeline_section(settings: BenchmarkSettings, models=None, log=print) -> dict[str, Any]:
    """`benchmark_pipelines` (the section builds its own models; it takes no encoder models)."""
    return benchmark_pipelines(settings, log)
