"""Saved folders load anywhere with `trust_remote_code=True`, and the zero-shot pipelines run on them.

The fresh-process tests run Python with `HF_HUB_OFFLINE=1` and an import blocker that makes `import waveclip_hf`
fail, so everything they use comes from the remote-code files inside the saved folder.
"""

import json
import os
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import skimage.data
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import ZeroShotImageClassificationPipeline, pipeline

from waveclip_hf import WaveCLIPModel, WaveCLIPProcessor
from waveclip_hf.data.text_tokenizer import build_word_level_tokenizer, clip_text_config_kwargs
from waveclip_hf.hub.loading import load_waveclip
from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor


LABELS = ["cat", "astronaut", "coffee cup", "rocket"]
PHOTOS = {"cat": skimage.data.chelsea, "astronaut": skimage.data.astronaut, "coffee cup": skimage.data.coffee}

BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "waveclip_hf" or name.startswith("waveclip_hf."):
                raise ImportError("waveclip_hf must not be imported here: only the folder's remote code")
    sys.meta_path.insert(0, _Block())
    """
)


def save_tiny_folder(folder, levels: int = 1):
    """A complete tiny checkpoint: weights, config, remote code, image processor and an offline tokenizer."""
    tokenizer = build_word_level_tokenizer([f"This is a photo of {label}." for label in LABELS] + ["a photo of {}"])
    config = tiny_config(levels)
    config.text_config = type(config.text_config)(
        **{**config.text_config.to_dict(), **clip_text_config_kwargs(tokenizer)}
    )
    torch.manual_seed(0)
    model = WaveCLIPModel(config).eval()
    model.save_pretrained(folder)
    image_processor = WaveCLIPImageProcessor(image_size=64, levels=levels)
    image_processor.save_pretrained(folder)  # preprocessor_config.json, as the distiller's final folder has it
    WaveCLIPProcessor(image_processor, tokenizer).save_pretrained(folder)
    return model


def run_fresh_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_saved_folder_has_weights_remote_code_and_auto_map(tmp_path):
    save_tiny_folder(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "modeling_waveclip.py",
        "configuration_waveclip.py",
        "image_processing_waveclip.py",
        "pipeline_waveclip.py",
        "gating.py",
        "flops.py",
        "wavelet_layout.py",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_waveclip.WaveCLIPModel"
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_waveclip.WaveCLIPModel"
    assert config["custom_pipelines"]["zero-shot-image-classification"]["impl"].startswith("pipeline_waveclip.")


def test_fresh_process_loads_with_trust_remote_code_and_gives_identical_outputs(tmp_path):
    folder = tmp_path / "model"
    model = save_tiny_folder(folder, levels=2)
    processor = WaveCLIPImageProcessor(image_size=64, levels=2)
    pixel_values = processor(images=[skimage.data.astronaut(), skimage.data.coffee()], return_tensors="pt")[
        "pixel_values"
    ]
    save_file({"pixel_values": pixel_values.contiguous()}, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        expected = model.get_image_features(pixel_values).stage_pooler_outputs
    run_fresh_python(
        f"""
        import torch, skimage.data
        from safetensors.torch import load_file, save_file
        from transformers import AutoImageProcessor, AutoModel, AutoModelForZeroShotImageClassification
        folder = {str(folder)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__ == "WaveCLIPModel", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        zero_shot = AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True)
        assert type(zero_shot).__name__ == "WaveCLIPModel"
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend="pil")
        assert type(processor).__name__ == "WaveCLIPImageProcessor", type(processor)
        # The fast (torchvision-backend) class, from the same file, by either spelling transformers accepts.
        for kwargs in ({{"backend": "torchvision"}}, {{"use_fast": True}}):
            fast = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, **kwargs)
            assert type(fast).__name__ == "WaveCLIPImageProcessorFast", type(fast)
        pixel_values = load_file({str(tmp_path / "inputs.safetensors")!r})["pixel_values"]
        photos = [skimage.data.astronaut(), skimage.data.coffee()]
        again = processor(images=photos, return_tensors="pt")["pixel_values"]
        fast_again = fast(images=photos, return_tensors="pt", device="cpu")["pixel_values"]
        assert (fast_again - again).abs().max() <= 1e-5
        with torch.no_grad():
            stages = model.get_image_features(pixel_values).stage_pooler_outputs
        save_file({{"stages": stages, "pixel_values": again}}, {str(tmp_path / "outputs.safetensors")!r})
        assert "waveclip_hf" not in __import__("sys").modules
        """,
        tmp_path,
    )
    outputs = load_file(tmp_path / "outputs.safetensors")
    assert torch.equal(outputs["stages"], expected)
    assert torch.equal(outputs["pixel_values"], pixel_values)


def test_weights_that_do_not_fit_the_config_fail_clearly(tmp_path):
    save_tiny_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the shapes its config.json asks for"):
        load_waveclip(tmp_path, WaveCLIPModel)


def test_stock_pipeline_runs_on_a_saved_folder(tmp_path):
    save_tiny_folder(tmp_path)
    classifier = pipeline(
        "zero-shot-image-classification",
        model=str(tmp_path),
        trust_remote_code=True,
        pipeline_class=ZeroShotImageClassificationPipeline,
    )
    assert type(classifier) is ZeroShotImageClassificationPipeline
    result = classifier(PIL.Image.fromarray(skimage.data.chelsea()), candidate_labels=LABELS)
    scores = [entry["score"] for entry in result]
    assert sorted(entry["label"] for entry in result) == sorted(LABELS)
    assert abs(sum(scores) - 1) < 1e-5
    assert scores == sorted(scores, reverse=True)


def test_custom_pipeline_in_a_fresh_process_matches_the_full_model(tmp_path):
    folder = tmp_path / "model"
    model = save_tiny_folder(folder)
    process = run_fresh_python(
        f"""
        import json, skimage.data
        from transformers import pipeline
        classifier = pipeline("zero-shot-image-classification", model={str(folder)!r}, trust_remote_code=True)
        photos = [skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee()]
        full = classifier(photos, candidate_labels={LABELS!r})
        early = classifier(photos, candidate_labels={LABELS!r}, margin_threshold=0.0, batch_size=2)
        json.dump({{"class": type(classifier).__name__, "full": full, "early": early}},
                  open({str(tmp_path / "result.json")!r}, "w"))
        """,
        tmp_path,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["class"] == "WaveCLIPZeroShotImageClassificationPipeline"
    # No "The model 'WaveCLIPModel' is not supported for zero-shot-image-classification" error on the way.
    assert "is not supported" not in process.stderr, process.stderr[-2000:]
    for per_image in result["full"] + result["early"]:
        assert [entry["score"] for entry in per_image] == sorted((e["score"] for e in per_image), reverse=True)
        assert abs(sum(entry["score"] for entry in per_image) - 1) < 1e-5
        assert sorted(entry["label"] for entry in per_image) == sorted(LABELS)
    assert {entry["stage"] for per_image in result["full"] for entry in per_image} == {1}
    assert {entry["stage"] for per_image in result["early"] for entry in per_image} == {0}
    stage0_gflops = result["early"][0][0]["gflops"]
    assert 0 < stage0_gflops < result["full"][0][0]["gflops"]

    # The full-model answer equals WaveCLIPModel.forward on the same inputs.
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    inputs = classifier.image_processor(images=[skimage.data.chelsea()], return_tensors="pt")
    text = classifier.tokenizer(
        [f"This is a photo of {label}." for label in LABELS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        probs = model(**text, **inputs).logits_per_image.softmax(-1)[0]
    by_label = {entry["label"]: entry["score"] for entry in result["full"][0]}
    assert max(abs(by_label[label] - float(p)) for label, p in zip(LABELS, probs)) < 1e-4


def test_label_embeddings_are_computed_once_per_label_set(tmp_path):
    save_tiny_folder(tmp_path)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    calls = []
    classifier.model.text_model.register_forward_hook(lambda *args: calls.append(1))
    first = classifier(skimage.data.chelsea(), candidate_labels=LABELS)
    second = classifier(skimage.data.chelsea(), candidate_labels=LABELS)
    assert len(calls) == 1 and first == second
    classifier(skimage.data.chelsea(), candidate_labels=LABELS, hypothesis_template="a photo of {}")
    assert len(calls) == 2
    # Other tokenizer settings give other token ids: a new entry, not the stale embeddings of the first call.
    truncated = classifier(
        skimage.data.chelsea(), candidate_labels=LABELS, tokenizer_kwargs={"max_length": 4, "truncation": True}
    )
    assert len(calls) == 3 and truncated != first


@pytest.mark.parametrize(
    "labels, message",
    [([], "is empty"), (["cat", "cat"], "contains duplicates"), (["cat", ""], "non-empty strings")],
)
def test_bad_candidate_labels_are_clear_errors(tmp_path, labels, message):
    save_tiny_folder(tmp_path)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        classifier(skimage.data.chelsea(), candidate_labels=labels)


def test_a_single_label_answers_at_stage_zero(tmp_path):
    save_tiny_folder(tmp_path, levels=2)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    result = classifier(skimage.data.chelsea(), candidate_labels=["cat"], margin_threshold=0.99)
    assert result == [{"score": 1.0, "label": "cat", "stage": 0, "gflops": pytest.approx(result[0]["gflops"])}]
