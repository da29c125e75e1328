"""Robustness of the model, `refine` and the zero-shot pipeline against inputs a user can get wrong.

Each case either works (and gives the right numbers) or raises a `ValueError` naming the problem and the fix;
never an error from deep inside torch. Cases already covered elsewhere are not repeated here:
`test_modeling_waveclip.py::test_bad_pixel_values_name_the_problem` (wrong size / rank / channels),
`::test_num_stages_out_of_range_and_cache_mismatches_are_clear_errors` (num_stages 0 / too many, cache with too
many stages, cache for another batch size, cache with another layer count, token count that is not a stage),
`::test_half_precision_weights_run_and_stay_close` (fp32 pixel values into a bf16 / fp16 model),
`test_refinement.py::test_max_stages_caps_the_refinement` and `::test_class_count_scaled_gate`, and
`test_hub_loading.py::test_bad_candidate_labels_are_clear_errors` (empty, duplicate, blank labels).
"""

import time

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_config, tiny_model
from test_hub_loading import LABELS, save_tiny_folder
from transformers import pipeline
from transformers.cache_utils import DynamicCache

from waveclip_hf import WaveCLIPModel
from waveclip_hf.data.text_tokenizer import build_word_level_tokenizer, clip_text_config_kwargs
from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor


def random_pixels(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def stage0_cache(model, pixel_values):
    with torch.no_grad():
        return model.get_image_features(pixel_values, num_stages=1, use_cache=True).cache


# ---------------------------------------------------------------------------------------------------------------
# pixel_values and num_stages
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: random_pixels(2).numpy(), r"must be a torch tensor, got ndarray"),
        (lambda: random_pixels(1).tolist(), r"must be a torch tensor, got list"),
        (
            lambda: (random_pixels(2) * 40 + 128).clamp(0, 255).to(torch.uint8),
            r"must be floating point .*torch\.uint8: these look like raw pixels",
        ),
        (lambda: random_pixels(2).long(), r"must be floating point .*torch\.int64"),
        (lambda: random_pixels(2) > 0, r"must be floating point .*torch\.bool"),
        (lambda: random_pixels(2)[:0], r"holds no images \(batch size 0\)"),
        (lambda: torch.zeros(1, 3, 60, 60), r"must have shape \(batch, 3, 64, 64\)"),  # not a multiple of cell_size
        (lambda: torch.zeros(1, 3, 64, 48), r"must have shape \(batch, 3, 64, 64\)"),
        (lambda: None, r"You have to specify `pixel_values`"),
    ],
    ids=["numpy", "list", "uint8", "int64", "bool", "empty batch", "size 60", "not square", "None"],
)
def test_pixel_values_that_are_not_packed_coefficients(make, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.get_image_features(make())
    if make() is not None:  # refine checks them before it spends anything
        with pytest.raises(ValueError, match=message):
            model.refine(make(), torch.randn(3, 16), margin_threshold=0.5)


@pytest.mark.parametrize("num_stages", [1.5, 2.0, "2", True, [2]])
def test_num_stages_must_be_an_integer(num_stages):
    with pytest.raises(ValueError, match=r"`num_stages` must be an integer in 1\.\.2"):
        tiny_model().get_image_features(random_pixels(1), num_stages=num_stages)


def test_integer_like_num_stages_work():
    model = tiny_model(levels=2)
    pixel_values = random_pixels(2)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values, num_stages=2).pooler_output
        for num_stages in (np.int64(2), torch.tensor(2)):
            assert torch.equal(model.get_image_features(pixel_values, num_stages=num_stages).pooler_output, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_pixel_values_into_an_fp32_model(dtype):
    """The patch projections cast the coefficients to the model's dtype: half-precision inputs cost only their own
    rounding (~1e-3 relative for fp16, ~1e-2 for bf16)."""
    model = tiny_model(levels=2)
    pixel_values = random_pixels(2)
    with torch.no_grad():
        reference = model.get_image_features(pixel_values).pooler_output
        other = model.get_image_features(pixel_values.to(dtype)).pooler_output
    assert other.dtype == torch.float32
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 5e-2, torch.float64: 1e-6}[dtype]
    assert (other - reference).abs().max() < tolerance * reference.abs().max()


def test_refine_in_bf16_agrees_with_fp32():
    model = tiny_model(levels=2)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    pixel_values, text = random_pixels(4), torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    reference = model.refine(pixel_values, text, margin_threshold=2.0)
    half = model.to(torch.bfloat16).refine(pixel_values, text, margin_threshold=2.0)  # fp32 pixels into bf16
    assert torch.isfinite(half.scores.float()).all()
    assert (half.scores.float() - reference.scores).abs().max() < 0.1
    assert half.exit_stage.tolist() == reference.exit_stage.tolist() == [2] * 4


# ---------------------------------------------------------------------------------------------------------------
# Caches that cannot continue these images on this model
# ---------------------------------------------------------------------------------------------------------------


def test_caches_from_another_model_are_refused():
    model = tiny_model(levels=1)
    pixel_values = random_pixels(2)
    cache = stage0_cache(model, pixel_values)
    # Another width, another head count: the shapes say so.
    for other in (tiny_model(levels=1, hidden_size=48), tiny_model(levels=1, num_attention_heads=2)):
        with pytest.raises(ValueError, match=r"The cache has 2 layers of 4 heads x 8 but .* comes from another model"):
            other.get_image_features(pixel_values, cache=cache)
    # Same shapes, other weights or another number of levels: only the cache's owner tells.
    for other in (tiny_model(levels=1, seed=5), tiny_model(levels=2)):
        with pytest.raises(ValueError, match=r"filled by another WaveCLIP model instance .* comes from another model"):
            other.get_image_features(pixel_values, cache=cache)
    # The cache itself is untouched by the refusals and still continues its own model exactly.
    with torch.no_grad():
        continued = model.get_image_features(pixel_values, cache=cache).pooler_output
        full = model.get_image_features(pixel_values).pooler_output
    assert (continued - full).abs().max() < 1e-4


def test_a_cache_rebuilt_from_tensors_is_accepted():
    """`DynamicCache(ddp_cache_data=...)` (what the benchmarks use to reuse a stage-0 cache) carries no owner."""
    model = tiny_model(levels=2)
    pixel_values = random_pixels(2)
    cache = stage0_cache(model, pixel_values)
    rebuilt = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])
    with torch.no_grad():
        continued = model.get_image_features(pixel_values, cache=rebuilt).pooler_output
        full = model.get_image_features(pixel_values).pooler_output
    assert (continued - full).abs().max() < 1e-4


def test_cache_in_another_dtype_and_legacy_tuples_are_refused():
    model = tiny_model(levels=1)
    pixel_values = random_pixels(2)
    cache = stage0_cache(model, pixel_values)
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    with pytest.raises(ValueError, match=r"must be a transformers `Cache` .* got tuple"):
        model.get_image_features(pixel_values, cache=legacy)
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"cache holds torch.float32 keys but the model runs in torch.bfloat16"):
        model.get_image_features(pixel_values, cache=cache)


def test_a_cache_filled_under_autocast_continues_under_autocast():
    model = tiny_model(levels=2)
    pixel_values = random_pixels(2)
    with torch.no_grad():
        full = model.get_image_features(pixel_values).pooler_output
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache = model.get_image_features(pixel_values, num_stages=1, use_cache=True).cache
            assert cache.layers[0].keys.dtype == torch.bfloat16  # != the fp32 weights, and that is fine here
            continued = model.get_image_features(pixel_values, cache=cache).pooler_output
    assert (continued.float() - full).abs().max() < 0.05 * full.abs().max()


def test_batch_select_indices_with_the_wrong_count():
    model = tiny_model(levels=2)
    pixel_values = random_pixels(4)
    cache = stage0_cache(model, pixel_values)
    cache.batch_select_indices(torch.tensor([0, 2, 3]))  # three continue ...
    with pytest.raises(ValueError, match=r"cache holds 3 images but `pixel_values` has 2\. .*batch_select_indices"):
        model.get_image_features(pixel_values[[0, 2]], cache=cache)  # ... but two are passed


# ---------------------------------------------------------------------------------------------------------------
# refine's arguments
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(margin_threshold="0.5"), r"`margin_threshold` must be a number >= 0, got '0\.5'"),
        (dict(margin_threshold=[0.5]), r"`margin_threshold` must be a number >= 0, got list"),
        (dict(margin_threshold=float("nan")), r"`margin_threshold` must be a number >= 0, got nan"),
        # Before: accepted silently, since one label or one stage never reaches the gate.
        (dict(margin_threshold=-1.0, labels=1), r"`margin_threshold` must be a number >= 0, got -1\.0"),
        (dict(margin_threshold=-1.0, max_stages=1), r"`margin_threshold` must be a number >= 0, got -1\.0"),
        (dict(max_stages=1.5), r"`max_stages` must be an integer in 1\.\.3, got 1\.5"),
        (dict(max_stages="2"), r"`max_stages` must be an integer in 1\.\.3, got '2'"),
        (dict(max_stages=0), r"`max_stages` must be an integer in 1\.\.3, got 0"),
        (dict(margin_scaling="per_label", max_stages=1), r"`margin_scaling` must be one of \('none', 'num_labels'\)"),
        (dict(text_dim=8), r"`text_embeds` have 8 dimensions but this model projects to 16"),
        (dict(labels=0), r"`text_embeds` must be a \(num_labels >= 1, projection_dim\) tensor, got \(0, 16\)"),
    ],
)
def test_refine_arguments_are_checked_before_any_work(kwargs, message):
    model = tiny_model(levels=2)
    text = torch.randn(kwargs.pop("labels", 4), kwargs.pop("text_dim", 16))
    kwargs.setdefault("margin_threshold", 0.5)
    calls = []
    model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        model.refine(random_pixels(2), text, **kwargs)
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# The zero-shot pipeline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    save_tiny_folder(folder, levels=2)
    return pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def photo():
    return np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(margin_threshold=-0.1), r"`margin_threshold` must be a number >= 0, got -0\.1"),
        (dict(margin_threshold=float("nan")), r"`margin_threshold` must be a number >= 0, got nan"),
        (dict(margin_threshold="0.5"), r"`margin_threshold` must be a number >= 0, got '0\.5'"),
        (dict(margin_threshold="high"), r"`margin_threshold` must be a number >= 0, got 'high'"),
        (dict(margin_threshold=-1, candidate_labels=["cat"]), r"`margin_threshold` must be a number >= 0"),
        (dict(max_stages=0), r"`max_stages` must be an integer in 1\.\.3 \(or None for all\), got 0"),
        (dict(max_stages=4), r"`max_stages` must be an integer in 1\.\.3 \(or None for all\), got 4"),
        (dict(max_stages=-1), r"`max_stages` must be an integer in 1\.\.3"),
        (dict(max_stages=1.5), r"`max_stages` must be an integer in 1\.\.3 \(or None for all\), got 1\.5"),
        (dict(max_stages="2"), r"`max_stages` must be an integer in 1\.\.3 \(or None for all\), got '2'"),
        (dict(max_stages=True), r"`max_stages` must be an integer in 1\.\.3"),
        (dict(margin_scaling="per_label"), r"`margin_scaling` must be one of"),
        (dict(hypothesis_template="A photo."), r"`hypothesis_template` 'A photo\.' has no '\{\}' slot"),
        (dict(hypothesis_template="A {label}."), r"cannot be filled with a label \(KeyError: 'label'\)"),
        (dict(hypothesis_template="A {} or {}."), r"cannot be filled with a label \(IndexError"),
        (dict(hypothesis_template=None), r"`hypothesis_template` must be a string"),
        (dict(candidate_labels=None), r"`candidate_labels` is empty"),
        (dict(candidate_labels=["cat", 3]), r"`candidate_labels` must be non-empty strings; got \[3\]"),
        (
            dict(candidate_labels=["cat " * 40, "dog"]),
            r"The prompt 'This is a photo of cat cat .* is 48 tokens long, "
            r"more than the text tower's 32 positions",
        ),
    ],
)
def test_pipeline_parameters_are_clear_errors(classifier, photo, kwargs, message):
    kwargs.setdefault("candidate_labels", LABELS)
    with pytest.raises(ValueError, match=message):
        classifier(photo, **kwargs)


def test_pipeline_parameters_that_work(classifier, photo):
    # max_stages as a numpy integer, a single label as a string, a template that is only the slot.
    result = classifier(photo, candidate_labels=LABELS, max_stages=np.int64(1), margin_threshold=np.float32(0.9))
    assert {entry["stage"] for entry in result} == {0}
    assert classifier(photo, candidate_labels="cat")[0]["label"] == "cat"
    assert len(classifier(photo, candidate_labels=LABELS, hypothesis_template="{}")) == len(LABELS)
    # Long prompts: truncation is the caller's choice, made through tokenizer_kwargs.
    long = classifier(photo, candidate_labels=["cat " * 40, "dog"], tokenizer_kwargs={"truncation": True})
    assert abs(sum(entry["score"] for entry in long) - 1) < 1e-5
    # No images in, no results out (the stock pipeline raised IndexError); the labels are still checked.
    assert classifier([], candidate_labels=LABELS) == []
    with pytest.raises(ValueError, match="is empty"):
        classifier([], candidate_labels=[])


def test_mixed_image_kinds_and_sizes_in_one_batch_equal_running_each_alone(classifier, tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "photo.png"
    PIL.Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(path)
    images = [
        np.zeros((1, 1, 3), np.uint8),  # 1 x 1
        PIL.Image.frombytes("CMYK", (300, 4096), rng.integers(0, 256, (4096, 300, 4), np.uint8).tobytes()),
        PIL.Image.fromarray(rng.integers(0, 256, (50, 80, 4), dtype=np.uint8)),  # RGBA
        PIL.Image.fromarray(rng.integers(0, 65536, (300, 4096), dtype=np.uint16)),  # I;16, 4096 x 300
        torch.rand(3, 500, 7, generator=torch.Generator().manual_seed(0)),  # float tensor, 7 x 500
        str(path),
    ]
    batched = classifier(images, candidate_labels=LABELS, batch_size=4, margin_threshold=0.3)
    alone = [classifier(image, candidate_labels=LABELS, margin_threshold=0.3) for image in images]
    assert len(batched) == len(images)
    for got, expected in zip(batched, alone):
        assert [entry["label"] for entry in got] == [entry["label"] for entry in expected]
        assert [entry["stage"] for entry in got] == [entry["stage"] for entry in expected]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(got, expected)) < 1e-5


def test_one_image_at_a_time_equals_the_batched_path_for_lists_and_generators(classifier):
    """At batch_size=1 the pipeline runs each image straight through (no DataLoader); the answers, ranks and stages
    equal the batched DataLoader path's, for a list and for a generator, with and without `top_k`."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(5)]
    kwargs = dict(candidate_labels=LABELS, margin_threshold=0.3, return_all_stages=True)
    batched = classifier(images, batch_size=4, **kwargs)
    for one_by_one in (classifier(images, **kwargs), list(classifier((image for image in images), **kwargs))):
        assert len(one_by_one) == len(images)
        for got, expected in zip(one_by_one, batched):
            assert [(e["label"], e["stage"]) for e in got] == [(e["label"], e["stage"]) for e in expected]
            assert max(abs(a["score"] - b["score"]) for a, b in zip(got, expected)) < 1e-5
            assert (
                max(abs(x - y) for a, b in zip(got, expected) for x, y in zip(a["stage_scores"], b["stage_scores"]))
                < 1e-5
            )
    top = classifier(images, top_k=2, **kwargs)
    assert [[e["label"] for e in r] for r in top] == [[e["label"] for e in r[:2]] for r in batched]
    # Scores are ranked (ties would keep the labels' order, as the stock pipeline's stable sort does).
    assert all(r[i]["score"] >= r[i + 1]["score"] for r in batched for i in range(len(r) - 1))


def test_the_labels_travel_as_one_reference_per_image(classifier, photo):
    """transformers walks every list and tuple of the model inputs and outputs (device moves, batching): the label
    list must not be one of them, or a 1,000-label call walks 1,000 strings per image."""
    inputs = classifier.preprocess(photo, candidate_labels=LABELS)
    outputs = classifier.forward(inputs)
    for values in (inputs.values(), outputs.values()):
        assert not any(isinstance(value, (list, tuple)) for value in values)
    assert [entry["label"] for entry in classifier.postprocess(outputs)] == [
        entry["label"] for entry in classifier(photo, candidate_labels=LABELS)
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_matches_fp32(classifier, photo, dtype):
    """fp32 `pixel_values` from the processor go into a half-precision model (the stock pipeline would cast them
    first; WaveCLIP keeps the DWT in fp32 and casts inside the patch projections)."""
    half = pipeline(
        "zero-shot-image-classification", model=classifier.model.name_or_path, trust_remote_code=True, dtype=dtype
    )
    assert half.model.dtype == dtype
    reference = {e["label"]: e["score"] for e in classifier(photo, candidate_labels=LABELS)}
    result = half(photo, candidate_labels=LABELS)
    assert max(abs(entry["score"] - reference[entry["label"]]) for entry in result) < 0.05


def save_folder_with_vocabulary(folder, words):
    """A tiny WaveCLIP folder whose tokenizer knows every word in `words` (one token each)."""
    tokenizer = build_word_level_tokenizer([f"This is a photo of {word}." for word in words])
    config = tiny_config(levels=1)
    text_config = {**config.text_config.to_dict(), **clip_text_config_kwargs(tokenizer)}
    config.text_config = type(config.text_config)(**text_config)
    torch.manual_seed(0)
    model = WaveCLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.0)  # spread the 10,000 scores so that "equal to the reference" means something
    model.save_pretrained(folder)
    WaveCLIPImageProcessor(image_size=64, levels=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_ten_thousand_labels(tmp_path, photo):
    """A 10,000-label vocabulary (an ImageNet-21k-sized use case) runs in seconds, equals one big forward, and is
    embedded once: the text tower runs in chunks of 1,024 prompts to bound memory, then the embeddings are cached."""
    labels = [f"class{i:05d}" for i in range(10_000)]
    model, tokenizer = save_folder_with_vocabulary(tmp_path, labels)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    text_calls = []
    classifier.model.text_model.register_forward_hook(
        lambda module, args, kwargs, output: text_calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )

    start = time.perf_counter()
    result = classifier(photo, candidate_labels=labels)
    first = time.perf_counter() - start
    assert text_calls == [1024] * 9 + [784]
    assert len(result) == 10_000 and sorted(entry["label"] for entry in result) == labels
    scores = [entry["score"] for entry in result]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
    assert scores[0] > 10 * scores[-1]  # distinct labels get distinct scores

    # The reference: one forward of the full model over all 10,000 prompts at once.
    text = tokenizer([f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt")
    pixel_values = classifier.image_processor(images=photo, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(**text, pixel_values=pixel_values).logits_per_image.softmax(-1)[0]
    by_label = {entry["label"]: entry["score"] for entry in result}
    got = torch.tensor([by_label[label] for label in labels])
    assert (got - expected).abs().max() < 1e-6

    start = time.perf_counter()
    again = classifier([photo, photo[::-1]], candidate_labels=labels, batch_size=2, margin_threshold=0.0)
    second = time.perf_counter() - start
    assert len(text_calls) == 10  # cached: the text tower did not run again
    assert len(again) == 2 and all(entry["stage"] == 0 for entry in again[0])
    print(f"10,000 labels: first call {first:.2f} s (text tower + image), cached call for 2 images {second:.2f} s")
    assert first < 30 and second < first


def test_a_cache_outliving_its_model_is_refused_by_a_new_one():
    """The owner is held by weak reference: a new model that happens to get the freed model's `id` is still
    another model."""
    import gc

    pixel_values = random_pixels(2)
    model = tiny_model(levels=1)
    cache = stage0_cache(model, pixel_values)
    del model
    gc.collect()
    assert cache._waveclip_owner() is None
    newcomer = tiny_model(levels=1)
    with pytest.raises(ValueError, match=r"filled by another WaveCLIP model instance"):
        newcomer.get_image_features(pixel_values, cache=cache)
