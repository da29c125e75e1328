"""The stage cache as the default: `use_cache=True`, `refine(cache=...)`, the pipeline's kept cache, and compiled
stages that agree with the eager model."""

import logging
import threading

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_hub_loading import save_tiny_folder
from transformers import pipeline
from transformers.cache_utils import DynamicCache

from waveclip_hf.models.waveclip.gating import probability_margin
from waveclip_hf.models.waveclip.scoring import zero_shot_logits
from waveclip_hf.models.waveclip.stage_cache import WaveCLIPStageCache


def refine_inputs(levels: int = 2, batch: int = 8, labels: int = 5, seed: int = 3):
    model = tiny_model(levels)
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, 64, 64, generator=generator)
    text_embeds = torch.randn(labels, 16, generator=generator)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # spreads the random tiny model's margins over (0, 1)
    return model, pixel_values, text_embeds


@torch.no_grad()
def median_stage0_margin(model, pixel_values, text_embeds) -> float:
    image = model.get_image_features(pixel_values, num_stages=1).pooler_output
    probs = zero_shot_logits(image, text_embeds, model.logit_scale.exp()).softmax(-1)
    return float(probability_margin(probs).median())


def test_use_cache_returns_a_stage_cache_and_a_dynamic_cache_still_works():
    model, pixel_values, _ = refine_inputs(levels=2, batch=3)
    with torch.no_grad():
        first = model.get_image_features(pixel_values, num_stages=1, use_cache=True)
        assert isinstance(first.cache, WaveCLIPStageCache) and first.cache.get_seq_length() == 17
        staged = model.get_image_features(pixel_values, cache=first.cache).pooler_output
        dynamic = DynamicCache()
        model.get_image_features(pixel_values, num_stages=1, cache=dynamic)
        assert isinstance(dynamic, DynamicCache) and dynamic.get_seq_length() == 17
        from_dynamic = model.get_image_features(pixel_values, cache=dynamic).pooler_output
        alone = model.get_image_features(pixel_values).pooler_output
    assert (staged - alone).abs().max() < 1e-5 and (from_dynamic - alone).abs().max() < 1e-5


@pytest.mark.parametrize("threshold", [None, "middle", 0.0])
def test_refine_with_a_kept_cache_equals_refine_without_and_reuses_its_buffers(threshold):
    model, pixel_values, text_embeds = refine_inputs()
    if threshold == "middle":
        threshold = median_stage0_margin(model, pixel_values, text_embeds)
    cache = WaveCLIPStageCache(model.config)
    fresh = model.refine(pixel_values, text_embeds, margin_threshold=threshold)
    kept = model.refine(pixel_values, text_embeds, margin_threshold=threshold, cache=cache)
    again = model.refine(pixel_values, text_embeds, margin_threshold=threshold, cache=cache)
    for out in (kept, again):
        assert torch.equal(out.exit_stage, fresh.exit_stage)
        assert (out.scores - fresh.scores).abs().max() < 1e-6
    if threshold is None:  # nobody leaves early: the second call writes into the first call's buffers
        assert cache.layers[0].key_buffer.shape[0] == 8 and cache.get_seq_length() == 115
        pointer = cache.layers[0].key_buffer.data_ptr()
        model.refine(pixel_values, text_embeds, cache=cache)
        assert cache.layers[0].key_buffer.data_ptr() == pointer
    if threshold == 0.0:  # every image answers at stage 0, which needs no cache: the kept one is not touched
        assert cache.layers[0].key_buffer is None
        assert fresh.exit_stage.tolist() == [0] * 8


def test_refine_refuses_a_cache_it_cannot_use():
    model, pixel_values, text_embeds = refine_inputs(levels=2, batch=2)
    with pytest.raises(
        ValueError, match=r"reuses this model.s `WaveCLIPStageCache`, got transformers.cache_utils.DynamicCache"
    ):
        model.refine(pixel_values, text_embeds, margin_threshold=0.5, cache=DynamicCache())
    with pytest.raises(ValueError, match=r"WaveCLIPStageCache for 2 stages of 2 layers, but runs 3 stages"):
        model.refine(pixel_values, text_embeds, margin_threshold=0.5, cache=WaveCLIPStageCache(model.config, 2))
    # Built for fewer stages than exist is fine when `max_stages` asks for no more.
    capped = model.refine(
        pixel_values, text_embeds, margin_threshold=1.5, max_stages=2, cache=WaveCLIPStageCache(model.config, 2)
    )
    assert capped.exit_stage.tolist() == [1, 1]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    save_tiny_folder(folder, levels=2)
    return pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)


def test_the_pipeline_keeps_one_stage_cache_across_calls(classifier):
    photos = [np.random.default_rng(seed).integers(0, 256, (50, 80, 3), dtype=np.uint8) for seed in range(3)]
    labels = ["cat", "dog", "car"]
    first = classifier(photos, candidate_labels=labels, margin_threshold=1.5)
    cache = classifier._per_thread.stage_cache
    assert type(cache).__name__ == "WaveCLIPStageCache" and cache.layers[0].key_buffer.shape[0] == 1
    pointer = cache.layers[0].key_buffer.data_ptr()
    second = classifier(photos, candidate_labels=labels, margin_threshold=1.5)
    assert classifier._per_thread.stage_cache is cache and cache.layers[0].key_buffer.data_ptr() == pointer
    # Another thread gets a cache of its own: two calls at once never write into the same buffers.
    other = {}

    def call_from_another_thread():
        other["answers"] = classifier(photos, candidate_labels=labels, margin_threshold=1.5)
        other["cache"] = classifier._per_thread.stage_cache

    thread = threading.Thread(target=call_from_another_thread)
    thread.start()
    thread.join()
    assert other["cache"] is not cache and other["answers"] == first
    assert first == second and all(answer[0]["stage"] == 2 for answer in first)
    # The same answers as refine on the processed images, without a kept cache.
    model = classifier.model
    pixel_values = classifier.image_processor(photos, return_tensors="pt")["pixel_values"]
    reference = model.refine(pixel_values, classifier.label_embeddings(labels, "This is a photo of {}."), 1.5)
    scores = [sorted(answer, key=lambda entry: labels.index(entry["label"])) for answer in first]
    got = torch.tensor([[entry["score"] for entry in answer] for answer in scores])
    assert (got - reference.scores).abs().max() < 1e-5


@torch.no_grad()
def threshold_between_margins(model, pixel_values, text_embeds, index: int) -> float:
    """Halfway between the `index`-th and the next smallest stage-0 margin: no image sits on the threshold, where a
    rounding difference (compiled vs eager) could flip the gate."""
    image = model.get_image_features(pixel_values, num_stages=1).pooler_output
    probs = zero_shot_logits(image, text_embeds, model.logit_scale.exp()).softmax(-1)
    margins = probability_margin(probs).sort().values
    return float(margins[index] + margins[index + 1]) / 2


def compiled_and_eager_refine(backend: str):
    """refine on a compiled copy and on the eager model, at a threshold where half the images exit at stage 0 (so the
    continuing batch is smaller than the first one)."""
    model, pixel_values, text_embeds = refine_inputs(levels=2, batch=6)
    threshold = threshold_between_margins(model, pixel_values, text_embeds, 2)
    compiled = tiny_model(2)
    compiled.load_state_dict(model.state_dict())
    compiled.compile_stages(backend=backend, fullgraph=True)
    torch._dynamo.reset()
    eager = model.refine(pixel_values, text_embeds, margin_threshold=threshold)
    cache = WaveCLIPStageCache(compiled.config)
    outputs = [
        compiled.refine(images, text_embeds, margin_threshold=threshold, cache=cache)
        for images in (pixel_values, pixel_values[:4], pixel_values)
    ]
    return eager, outputs


def assert_compiled_agrees(eager, outputs, tolerance: float) -> None:
    first, smaller, again = outputs
    assert int((eager.exit_stage == 0).sum()) == 3  # half continue from the cache
    for out in (first, again):
        assert torch.equal(out.exit_stage, eager.exit_stage)
        assert (out.scores - eager.scores).abs().max() < tolerance
    assert (smaller.scores - eager.scores[:4]).abs().max() < tolerance


@pytest.mark.slow
def test_compiled_stages_trace_into_whole_graphs_and_agree_with_eager():
    """`backend="eager"` runs torch.compile's graph capture without code generation (fast): `fullgraph=True` fails
    on any graph break, and the answers equal the eager model's. Slow: tracing takes ~10 s on a busy 2-core CPU."""
    from torch._dynamo.utils import counters

    counters.clear()
    eager, outputs = compiled_and_eager_refine("eager")
    assert_compiled_agrees(eager, outputs, 1e-6)
    assert not counters["graph_break"]


@pytest.mark.slow
def test_inductor_compiled_stages_agree_with_eager():
    eager, outputs = compiled_and_eager_refine("inductor")
    assert_compiled_agrees(eager, outputs, 1e-4)


@pytest.mark.slow
def test_compiled_stages_keep_a_graph_for_every_stage_pair(caplog):
    """Four stages give 7 (first stage, end stage) pairs for the full forwards and the cached steps, each for one
    image and for larger batches: more graphs than dynamo keeps per function by default (8). None may fall back
    to eager ("hit config.recompile_limit"), and the process's own limit is left as it was. Slow: ~15 s of
    tracing on a 2-core CPU."""
    model = tiny_model(3).eval()
    limit = torch._dynamo.config.recompile_limit
    model.vision_model.compile_stages(backend="eager")
    torch._dynamo.reset()
    dynamo_logger = logging.getLogger("torch._dynamo")
    dynamo_logger.addHandler(caplog.handler)
    try:
        with torch.no_grad():
            for batch in (1, 2):
                pixel_values = torch.randn(batch, 3, 64, 64)
                for end in range(1, 5):
                    model.vision_model(pixel_values, num_stages=end)
                out = None
                for end in range(1, 5):
                    cache = None if out is None else out.cache
                    out = model.vision_model(pixel_values, cache=cache, num_stages=end, use_cache=True)
    finally:
        dynamo_logger.removeHandler(caplog.handler)
    assert model.config.vision_config.num_stages == 4
    assert not [record for record in caplog.records if "recompile_limit" in record.getMessage()]
    assert torch._dynamo.config.recompile_limit == limit
