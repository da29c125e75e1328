"""The gated pipeline as a user meets it in the first hour: a saved folder, a fresh Python process without this
package, `pipeline("zero-shot-image-classification", trust_remote_code=True)` and `AutoProcessor`.

One script makes every call (`first_hour`, once per module): in this process by default, and in a fresh process
that cannot import this package (the folder's remote code only) with `-m slow`. Each test checks one feature
against the model computed here, in-process, from the same weights.
"""

import contextlib
import dataclasses
import io
import json
import logging

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from test_hub_loading import LABELS, run_fresh_python, save_tiny_folder
from transformers import pipeline

from waveclip_hf import WaveCLIPZeroShotImageClassificationPipeline
from waveclip_hf.models.waveclip.gating import probability_margin
from waveclip_hf.models.waveclip.scoring import zero_shot_logits


TEMPLATES = ["This is a photo of {}.", "a photo of {}"]


def write_images(folder, count: int, seed: int) -> list[str]:
    """`count` PNGs cut at random from scikit-image's sample photos, rotated and flipped."""
    folder.mkdir(parents=True)
    photos = [skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        size = int(rng.integers(96, min(photo.shape[:2])))
        top, left = (int(rng.integers(0, photo.shape[axis] - size + 1)) for axis in (0, 1))
        crop = np.rot90(photo[top : top + size, left : left + size], k=int(rng.integers(4)))
        path = folder / f"{index:03d}.png"
        PIL.Image.fromarray(np.ascontiguousarray(crop)).save(path)
        paths.append(str(path))
    return paths


FIRST_HOUR = """
import dataclasses, json, sys
from transformers import AutoModel, AutoProcessor, pipeline
import torch

folder, calibration_images, test_images, labels, templates, out = {args!r}
classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
results = {{"pipeline": type(classifier).__name__}}

# 1. Label-free calibration for one label set, then margin_threshold="auto".
calibration = classifier.calibrate(calibration_images, candidate_labels=labels, target_agreement=0.9)
results["calibration"] = dataclasses.asdict(calibration)
results["auto"] = classifier(calibration_images, candidate_labels=labels, margin_threshold="auto", batch_size=8)
results["full"] = classifier(calibration_images, candidate_labels=labels, batch_size=8)
try:
    classifier(test_images[0], candidate_labels=labels[:3], margin_threshold="auto")
except ValueError as error:
    results["auto_without_calibration"] = str(error)

# 2 and 3. A GFLOPs budget for the call, with every stage's scores.
# What stage 0 and the full model cost per image, as each result reports it.
stage0 = classifier(test_images[0], candidate_labels=labels, margin_threshold=0.0)[0]["gflops"]
full = classifier(test_images[0], candidate_labels=labels)[0]["gflops"]
results["costs"] = [stage0, full]
results["budget"] = classifier(test_images, candidate_labels=labels, gflops_budget=(stage0 + full) / 2,
                               return_all_stages=True)

# 4. A prompt ensemble, then the same call again (the label embeddings are cached).
results["ensemble"] = classifier(test_images[0], candidate_labels=labels, hypothesis_template=templates)

# 5. top_k, a typo, and labels the tokenizer does not know.
results["top_2"] = classifier(test_images[0], candidate_labels=labels, top_k=2)
results["all_labels"] = classifier(test_images[0], candidate_labels=labels)
try:
    classifier(test_images[0], candidate_labels=labels, margin_treshold=0.2)
except TypeError as error:
    results["typo"] = str(error)
print("--- unknown words ---", file=sys.stderr)
results["unknown_words"] = classifier(test_images[0], candidate_labels=["cat", "dog", "car"])

# 6 and 7. AutoProcessor feeds the model, and refine takes its output directly.
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
inputs = processor(text=[templates[0].format(label) for label in labels], images=[
    __import__("PIL.Image").Image.open(path) for path in test_images[:2]], return_tensors="pt", padding=True)
results["processor"] = {{"class": type(processor).__name__, "keys": sorted(inputs.keys())}}
with torch.no_grad():
    results["processor"]["logits_per_image"] = model(**inputs).logits_per_image.tolist()
    refined = model.refine(**inputs, margin_threshold=0.0)
results["processor"]["refine_scores"] = refined.scores.tolist()
results["processor"]["refine_stages"] = refined.exit_stage.tolist()
json.dump(results, open(out, "w"))
"""


def run_in_this_process(code: str) -> str:
    """Run `code` here and return what it logged at WARNING and above (the remote code's loggers are not under
    transformers' root logger, so a handler on the root logger sees them)."""
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stderr(logged):
            exec(compile(code, "first_hour", "exec"), {"__name__": "first_hour"})
    finally:
        root.removeHandler(handler)
    return logged.getvalue()


@pytest.fixture(scope="module", params=["in_process", pytest.param("fresh_process", marks=pytest.mark.slow)])
def first_hour(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("first_hour")
    folder = tmp_path / "model"
    model = save_tiny_folder(folder, levels=1)
    calibration_images = write_images(tmp_path / "unlabelled", 24, seed=0)
    test_images = write_images(tmp_path / "test", 8, seed=1)
    out = tmp_path / "results.json"
    args = (str(folder), calibration_images, test_images, LABELS, TEMPLATES, str(out))
    code = FIRST_HOUR.format(args=args)
    if request.param == "fresh_process":
        stderr = run_fresh_python(code, tmp_path).stderr
    else:
        stderr = run_in_this_process(code)
    return {
        "results": json.loads(out.read_text()),
        "stderr": stderr,
        "model": model,
        "folder": folder,
        "calibration_images": calibration_images,
        "test_images": test_images,
    }


def reference_pipeline(folder):
    """The same folder in this process (for the model's own answers to compare with)."""
    return pipeline(
        "zero-shot-image-classification", model=str(folder), pipeline_class=WaveCLIPZeroShotImageClassificationPipeline
    )


def stage_probabilities(classifier, paths, labels, template=TEMPLATES[0]) -> torch.Tensor:
    """(N, stages, labels) probabilities of the in-process model after every stage."""
    embeds = classifier.image_stage_embeddings(paths, batch_size=8)
    return zero_shot_logits(
        embeds, classifier.label_embeddings(labels, template), classifier.model.logit_scale.exp()
    ).softmax(-1)


def test_label_free_calibration_keeps_its_promise_with_margin_threshold_auto(first_hour):
    results = first_hour["results"]
    assert results["pipeline"] == "WaveCLIPZeroShotImageClassificationPipeline"
    calibration = results["calibration"]
    assert calibration["num_images"] == 24 and calibration["target"] == "agreement with the full model >= 0.9"
    assert 0.9 <= calibration["agreement"] <= 1.0 and calibration["threshold"] is not None
    # "auto" runs the calibrated threshold: on the calibration images it agrees with the full model and costs
    # exactly what calibrate reported.
    auto, full = results["auto"], results["full"]
    agreement = np.mean([a[0]["label"] == f[0]["label"] for a, f in zip(auto, full)])
    assert agreement == pytest.approx(calibration["agreement"])
    assert np.mean([a[0]["gflops"] for a in auto]) == pytest.approx(calibration["mean_gflops"], rel=1e-6)
    assert {a[0]["stage"] for a in auto} == {0, 1} and {f[0]["stage"] for f in full} == {1}
    # The threshold is the cheapest that keeps the target: the model, run here, agrees.
    classifier = reference_pipeline(first_hour["folder"])
    chosen = classifier.calibrate(first_hour["calibration_images"], candidate_labels=LABELS, target_agreement=0.9)
    here = dataclasses.asdict(chosen)
    assert here.pop("threshold") == pytest.approx(calibration.pop("threshold"), abs=1e-6)
    assert here.pop("stage_share") == pytest.approx(calibration.pop("stage_share"))
    label_set = ("labels", "hypothesis_template", "tokenizer_kwargs", "signal", "target")
    assert {name: here.pop(name) for name in label_set} == {name: calibration.pop(name) for name in label_set}
    assert here == pytest.approx(calibration)
    # Several label sets on the same images: embed them once, then calibrate each set from the embeddings.
    embeds = classifier.image_stage_embeddings(first_hour["calibration_images"], batch_size=5)
    assert embeds.shape == (24, 2, classifier.model.projection_dim)
    again = classifier.calibrate(image_embeddings=embeds, candidate_labels=LABELS, target_agreement=0.9)
    again, chosen = dataclasses.asdict(again), dataclasses.asdict(chosen)
    assert again.pop("threshold") == pytest.approx(chosen.pop("threshold"), abs=1e-6)  # other batches, other roundings
    assert again == chosen
    with pytest.raises(ValueError, match="Pass the calibration images once"):
        classifier.calibrate(first_hour["calibration_images"], LABELS, image_embeddings=embeds)
    with pytest.raises(ValueError, match=r"must be \(num_images, 2 stages, 16\) .* got \(24, 1, 16\)"):
        classifier.calibrate(image_embeddings=embeds[:, :1], candidate_labels=LABELS)
    assert "needs a calibration for these labels and template" in results["auto_without_calibration"]
    assert "classifier.calibrate(images, candidate_labels=" in results["auto_without_calibration"]


def test_a_gflops_budget_refines_the_least_sure_images_of_the_call(first_hour):
    results = first_hour["results"]
    budgeted = results["budget"]
    stage0, full = results["costs"]
    assert full == pytest.approx(results["calibration"]["full_gflops"]) and stage0 < full
    assert np.mean([image[0]["gflops"] for image in budgeted]) <= (stage0 + full) / 2 + 1e-9
    refined = [index for index, image in enumerate(budgeted) if image[0]["stage"] == 1]
    assert len(refined) == 4  # half of the 8 images: the budget is halfway between stage 0 and the full model
    # The four with the smallest stage-0 margins, read from every entry's stage scores.
    stage0_scores = torch.tensor([[entry["stage_scores"][0] for entry in image] for image in budgeted])
    assert sorted(refined) == sorted(probability_margin(stage0_scores).argsort()[:4].tolist())


def test_return_all_stages_gives_the_scores_of_every_stage_run(first_hour):
    budgeted = first_hour["results"]["budget"]
    classifier = reference_pipeline(first_hour["folder"])
    expected = stage_probabilities(classifier, first_hour["test_images"], LABELS)
    for index, image in enumerate(budgeted):
        stage = image[0]["stage"]
        for entry in image:
            scores = entry["stage_scores"]
            assert len(scores) == stage + 1 and scores[-1] == pytest.approx(entry["score"], abs=1e-6)
            label = LABELS.index(entry["label"])
            assert scores == pytest.approx(expected[index, : stage + 1, label].tolist(), abs=1e-4)


def test_a_list_of_templates_is_a_prompt_ensemble(first_hour):
    model = first_hour["model"]
    classifier = reference_pipeline(first_hour["folder"])
    tokenizer = classifier.tokenizer
    with torch.no_grad():
        per_template = [
            torch.nn.functional.normalize(
                model.get_text_features(
                    **tokenizer([template.format(label) for label in LABELS], padding=True, return_tensors="pt")
                ).pooler_output,
                dim=-1,
            )
            for template in TEMPLATES
        ]
        ensemble = torch.stack(per_template).mean(0)
        pixel_values = classifier.image_processor(
            images=[PIL.Image.open(first_hour["test_images"][0])], return_tensors="pt"
        )["pixel_values"]
        expected = model.refine(pixel_values, ensemble).scores[0]
    result = {entry["label"]: entry["score"] for entry in first_hour["results"]["ensemble"]}
    assert [result[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)
    single = {entry["label"]: entry["score"] for entry in first_hour["results"]["all_labels"]}
    assert result != pytest.approx(single, abs=1e-4)  # the second template changes the answer's scores
    # Cached per (labels, templates): a second call runs no text tower.
    calls = []
    classifier.model.text_model.register_forward_hook(lambda *args: calls.append(1))
    first = classifier(first_hour["test_images"][0], candidate_labels=LABELS, hypothesis_template=TEMPLATES)
    assert len(calls) == 2  # one forward per template
    assert classifier(first_hour["test_images"][0], candidate_labels=LABELS, hypothesis_template=TEMPLATES) == first
    assert len(calls) == 2
    with pytest.raises(ValueError, match="empty list"):
        classifier(first_hour["test_images"][0], candidate_labels=LABELS, hypothesis_template=[])
    with pytest.raises(ValueError, match="has no '{}' slot"):
        classifier(first_hour["test_images"][0], candidate_labels=LABELS, hypothesis_template=[TEMPLATES[0], "x"])


def test_top_k_typos_and_unknown_words(first_hour):
    results = first_hour["results"]
    assert results["top_2"] == results["all_labels"][:2]
    assert (
        "`margin_treshold` is not a parameter of the WaveCLIP zero-shot pipeline. Did you mean "
        "`margin_threshold`? Accepted: candidate_labels, hypothesis_template," in results["typo"]
    )
    # The tokenizer knows "cat" but not "dog" or "car": the warning names them.
    warning = first_hour["stderr"].split("--- unknown words ---", 1)[1]
    assert (
        "The tokenizer does not know 'dog' in 'This is a photo of dog.'; 'car' in 'This is a photo of car.'" in warning
    )
    assert "'cat'" not in warning.split(":")[0]
    assert len(results["unknown_words"]) == 3


def test_top_k_and_unknown_keywords_are_checked_before_any_image(tmp_path, caplog):
    save_tiny_folder(tmp_path)
    classifier = reference_pipeline(tmp_path)
    for top_k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`top_k` must be a positive integer"):
            classifier("no-such-file.png", candidate_labels=LABELS, top_k=top_k)
    with pytest.raises(TypeError, match="`candidate_label` is not a parameter.*Did you mean `candidate_labels`"):
        classifier("no-such-file.png", candidate_label=LABELS)
    with pytest.raises(ValueError, match="`return_all_stages` must be True or False"):
        classifier("no-such-file.png", candidate_labels=LABELS, return_all_stages="yes")
    with pytest.raises(ValueError, match="takes no `margin_scaling`"):
        classifier("no-such-file.png", candidate_labels=LABELS, margin_threshold="auto", margin_scaling="num_labels")
    assert len(classifier(skimage.data.chelsea(), candidate_labels=LABELS, top_k=10)) == len(LABELS)
    with caplog.at_level(logging.WARNING):
        classifier(skimage.data.chelsea(), candidate_labels=LABELS)
    assert "does not know" not in caplog.text  # known words: no warning


def test_auto_processor_feeds_the_model_and_refine(first_hour):
    processor = first_hour["results"]["processor"]
    assert processor["class"] == "WaveCLIPProcessor"
    assert processor["keys"] == ["attention_mask", "input_ids", "pixel_values"]
    model, classifier = first_hour["model"], reference_pipeline(first_hour["folder"])
    images = [PIL.Image.open(path) for path in first_hour["test_images"][:2]]
    pixel_values = classifier.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = classifier.tokenizer([TEMPLATES[0].format(label) for label in LABELS], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**text, pixel_values=pixel_values).logits_per_image
        stage0 = model.refine(pixel_values, model.get_text_features(**text).pooler_output, 0.0)
    assert torch.tensor(processor["logits_per_image"]) == pytest.approx(expected, abs=1e-5)
    assert torch.tensor(processor["refine_scores"]) == pytest.approx(stage0.scores, abs=1e-5)
    assert processor["refine_stages"] == [0, 0]
