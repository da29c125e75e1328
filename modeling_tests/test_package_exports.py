"""The package exports what the docs name, registers WaveCLIP with transformers' Auto classes in-process, and leaves
transformers' stock zero-shot pipeline alone for every other model."""

import re
from pathlib import Path

import PIL.Image
import skimage.data
import torch
from test_hub_loading import LABELS, save_tiny_folder
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    ZeroShotImageClassificationPipeline,
    pipeline,
)
from transformers.pipelines import PIPELINE_REGISTRY

import waveclip_hf
from waveclip_hf.data.text_tokenizer import build_word_level_tokenizer, clip_text_config_kwargs


REPO = Path(__file__).resolve().parent.parent


def test_every_public_name_and_every_name_the_docs_import_resolves():
    for name in waveclip_hf.__all__:
        assert getattr(waveclip_hf, name) is not None, name
    documented = set()
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "hub_card" / "README.md.template"]:
        for names in re.findall(r"^from waveclip_hf import ([\w, ]+)$", path.read_text(), re.MULTILINE):
            documented.update(name.strip() for name in names.split(","))
    assert {"WaveCLIPModel"} <= documented
    assert documented <= set(waveclip_hf.__all__)
    from waveclip_hf import DistillationConfig, WaveCLIPImageProcessor, WaveCLIPZeroShotImageClassificationPipeline

    assert DistillationConfig.__module__ == "waveclip_hf.training.config"
    assert issubclass(WaveCLIPZeroShotImageClassificationPipeline, ZeroShotImageClassificationPipeline)
    assert WaveCLIPImageProcessor().levels >= 1


def test_a_saved_folder_loads_in_process_without_trust_remote_code(tmp_path):
    model = save_tiny_folder(tmp_path, levels=2)
    assert type(AutoConfig.from_pretrained(tmp_path)) is waveclip_hf.WaveCLIPConfig
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is waveclip_hf.WaveCLIPModel
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path)) is waveclip_hf.WaveCLIPModel
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is waveclip_hf.WaveCLIPImageProcessor
    pixel_values = processor(images=[skimage.data.astronaut()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(
            loaded.get_image_features(pixel_values).pooler_output, model.get_image_features(pixel_values).pooler_output
        )


def test_the_gated_pipeline_in_process_is_asked_for_by_class(tmp_path):
    save_tiny_folder(tmp_path, levels=2)
    classifier = pipeline(
        "zero-shot-image-classification",
        model=str(tmp_path),
        pipeline_class=waveclip_hf.WaveCLIPZeroShotImageClassificationPipeline,
    )
    assert type(classifier) is waveclip_hf.WaveCLIPZeroShotImageClassificationPipeline
    results = classifier(
        [skimage.data.chelsea(), skimage.data.coffee()], candidate_labels=LABELS, margin_threshold=0.0, batch_size=2
    )
    assert [{entry["stage"] for entry in per_image} for per_image in results] == [{0}, {0}]
    assert all(abs(sum(entry["score"] for entry in per_image) - 1) < 1e-5 for per_image in results)


def save_tiny_clip_folder(folder) -> CLIPModel:
    tokenizer = build_word_level_tokenizer([f"This is a photo of {label}." for label in LABELS])
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            **clip_text_config_kwargs(tokenizer),
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=30,
            patch_size=6,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_importing_the_package_leaves_the_stock_zero_shot_pipeline_for_clip(tmp_path):
    model = save_tiny_clip_folder(tmp_path)
    # The registry's entry builds the gated pipeline for WaveCLIP models only; for every other model it falls back to
    # the pipeline transformers registered, with its default model and model classes unchanged.
    entry = PIPELINE_REGISTRY.check_task("zero-shot-image-classification")[1]
    assert entry["impl"].fallback_class is ZeroShotImageClassificationPipeline
    assert entry["default"]["model"][0] == "openai/clip-vit-base-patch32"
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    assert type(classifier) is ZeroShotImageClassificationPipeline and type(classifier.model) is CLIPModel
    image = PIL.Image.fromarray(skimage.data.chelsea())
    result = classifier(image, candidate_labels=LABELS)
    assert set(result[0]) == {"score", "label"}  # no "stage" / "gflops": the stock pipeline, not ours
    inputs = classifier.image_processor(images=[image], return_tensors="pt")
    text = classifier.tokenizer(
        [f"This is a photo of {label}." for label in LABELS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        probs = model(**text, **inputs).logits_per_image.softmax(-1)[0]
    by_label = {entry["label"]: entry["score"] for entry in result}
    assert max(abs(by_label[label] - float(p)) for label, p in zip(LABELS, probs)) < 1e-5
