"""The ONNX export: every stage (taking and returning the cached keys and values) and the text tower equal eager
PyTorch within 1e-4 at any batch size, and the torch-free runner gives the pipeline's gated answers.

Exporting a tiny three-stage model takes about 30 s on a 2-core CPU (torch's dynamo exporter), once per module.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_hub_loading import LABELS, save_tiny_folder
from transformers import AutoTokenizer, pipeline

from waveclip_hf.export import onnx_runner
from waveclip_hf.export.onnx_export import export_checkpoint
from waveclip_hf.export.onnx_runner import OnnxWaveCLIP
from waveclip_hf.hub.loading import load_waveclip
from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    save_tiny_folder(root / "model", levels=2)
    export_checkpoint(str(root / "model"), str(root / "onnx"))
    return root


def photos(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (60 + 7 * i, 80, 3), dtype=np.uint8) for i in range(count)]


@pytest.mark.parametrize("batch", [1, 3])
def test_every_exported_stage_equals_eager(exported, batch):
    model = load_waveclip(exported / "model")
    runner = OnnxWaveCLIP(exported / "onnx")
    pixel_values = WaveCLIPImageProcessor(image_size=64, levels=2)(images=photos(batch), return_tensors="pt")
    pixel_values = pixel_values["pixel_values"]
    cache = model.new_stage_cache()
    keys = values = None
    for stage in range(3):
        with torch.no_grad():
            eager = model.get_image_features(pixel_values, num_stages=stage + 1, cache=cache, use_cache=True)
        embeds, keys, values = runner.stage_outputs(stage, pixel_values.numpy(), keys, values)
        assert np.abs(embeds - eager.pooler_output.numpy()).max() <= 1e-4, stage
        eager_keys = torch.stack([layer.keys for layer in cache.layers]).numpy()
        assert keys.shape == eager_keys.shape and np.abs(keys - eager_keys).max() <= 1e-4, stage


def test_the_exported_text_tower_equals_eager(exported):
    model = load_waveclip(exported / "model")
    tokens = AutoTokenizer.from_pretrained(exported / "model")(
        [f"a photo of {x}" for x in LABELS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        eager = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1).numpy()
    ours = OnnxWaveCLIP(exported / "onnx").label_embeddings(LABELS, "a photo of {}")
    assert np.abs(ours - eager).max() <= 1e-4


@pytest.mark.parametrize("threshold", [None, 0.0, 0.2])
def test_the_runner_gives_the_pipelines_gated_answers(exported, threshold):
    images = photos(5, seed=1)
    classifier = pipeline("zero-shot-image-classification", model=str(exported / "model"), trust_remote_code=True)
    expected = classifier(images, candidate_labels=LABELS, margin_threshold=threshold)
    from PIL import Image

    ours = OnnxWaveCLIP(exported / "onnx").classify(
        [Image.fromarray(i) for i in images], LABELS, margin_threshold=threshold
    )
    for mine, theirs in zip(ours, expected):
        assert [a["label"] for a in mine] == [a["label"] for a in theirs]
        assert [a["stage"] for a in mine] == [a["stage"] for a in theirs]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(mine, theirs)) <= 1e-4
        assert mine[0]["gflops"] == pytest.approx(theirs[0]["gflops"])


def test_the_runner_imports_no_torch(exported, tmp_path):
    """The runner runs where torch cannot be imported (a serving image with onnxruntime only)."""
    from PIL import Image

    Image.fromarray(photos(1)[0]).save(tmp_path / "image.png")
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.') or name == 'transformers':\n"
        "            raise ImportError(name + ' is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import runpy\n"
        f"sys.argv = ['runner', {str(exported / 'onnx')!r}, {str(tmp_path / 'image.png')!r}, '--labels', "
        f"{','.join(LABELS)!r}, '--threshold', '0.2']\n"
        f"runpy.run_path({onnx_runner.__file__!r}, run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", blocker],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    answer = json.loads(run.stdout.splitlines()[0])
    assert answer["label"] in LABELS and answer["stage"] in (0, 1, 2)


def test_int8_stage_graphs_stay_close_to_float_and_the_runner_reads_them(exported, tmp_path):
    """`quantize_onnx_stages` swaps each stage graph for its int8 twin (text stays float) and marks the folder."""
    import shutil

    import onnx
    from PIL import Image

    from waveclip_hf.export.quantization import quantize_onnx_stages

    shutil.copytree(exported / "onnx", tmp_path / "int8")
    paths = quantize_onnx_stages(tmp_path / "int8")
    assert [path.name for path in paths] == ["stage_0.onnx", "stage_1.onnx", "stage_2.onnx"]
    assert json.loads((tmp_path / "int8" / "waveclip_onnx.json").read_text())["int8"] is True
    assert (tmp_path / "int8" / "text.onnx").read_bytes() == (exported / "onnx" / "text.onnx").read_bytes()
    float_runner, int8_runner = OnnxWaveCLIP(exported / "onnx"), OnnxWaveCLIP(tmp_path / "int8")

    quantized_ops = {node.op_type for node in onnx.load(str(paths[0])).graph.node}
    assert "DynamicQuantizeLinear" in quantized_ops and "MatMulInteger" in quantized_ops
    pixel_values = float_runner.pixel_values([Image.fromarray(p) for p in photos(4, seed=2)])
    keys = values = int8_keys = int8_values = None
    for stage in range(3):
        embeds, keys, values = float_runner.stage_outputs(stage, pixel_values, keys, values)
        int8_embeds, int8_keys, int8_values = int8_runner.stage_outputs(stage, pixel_values, int8_keys, int8_values)
        norms = np.linalg.norm(embeds, axis=-1) * np.linalg.norm(int8_embeds, axis=-1)
        cosine = (embeds * int8_embeds).sum(-1) / norms
        # Close, not equal: the weights did change. (A tiny random model quantises worse than a trained one:
        # docs/int8.md measures the trained student's accuracy.)
        assert cosine.min() > 0.95, (stage, cosine)
        assert np.abs(embeds - int8_embeds).max() > 1e-5
    answers = int8_runner.classify([Image.fromarray(p) for p in photos(3)], LABELS)
    assert len(answers) == 3 and all(a[0]["label"] in LABELS for a in answers)


def test_torch_int8_quantises_the_image_side_only(exported):
    from waveclip_hf.export.quantization import quantize_linear_layers

    model = load_waveclip(exported / "model")
    quantized = quantize_linear_layers(model)
    # q, k and v are one per-row int8 product in WaveCLIP's attention (`fuse_qkv`); three with fuse_qkv=False.
    attention = quantized.vision_model.encoder.layers[0].self_attn
    assert not hasattr(attention, "q_proj") and attention.qkv_proj.weight().qscheme() == torch.per_channel_affine
    assert "quantized" in type(attention.out_proj).__module__
    separate = quantize_linear_layers(model, fuse_qkv=False).vision_model.encoder.layers[0].self_attn
    assert type(separate.q_proj).__name__ == "Linear" and "quantized" in type(separate.q_proj).__module__
    assert "quantized" in type(quantized.visual_projection).__module__
    assert type(quantized.text_model.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.vision_model.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear  # the original is kept
    pixel_values = WaveCLIPImageProcessor(image_size=64, levels=2)(images=photos(3), return_tensors="pt")
    with torch.no_grad():
        ours = quantized.get_image_features(pixel_values["pixel_values"]).stage_pooler_outputs
        theirs = model.get_image_features(pixel_values["pixel_values"]).stage_pooler_outputs
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min() > 0.95 and (ours - theirs).abs().max() > 1e-5
    with pytest.raises(ValueError, match="no `vision_model` or `visual_projection`"):
        quantize_linear_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_fused_qkv_attention_gives_the_separate_projections_answer(exported):
    """In float32 the fused q/k/v layer is the three projections stacked: every stage's embedding, and stage by
    stage through the cache, equal the original model's (≤ 1e-5); the original keeps its three layers."""
    import copy

    from waveclip_hf.export.quantization import FusedQKVAttention, fuse_qkv_projections

    model = load_waveclip(exported / "model").eval()
    fused = copy.deepcopy(model)
    names = fuse_qkv_projections(fused.vision_model)
    layers = fused.config.vision_config.num_hidden_layers
    assert names == [f"encoder.layers.{i}.self_attn.qkv_proj" for i in range(layers)]
    assert type(fused.vision_model.encoder.layers[0].self_attn) is FusedQKVAttention
    assert hasattr(model.vision_model.encoder.layers[0].self_attn, "q_proj")
    pixel_values = WaveCLIPImageProcessor(image_size=64, levels=2)(images=photos(3), return_tensors="pt")
    pixel_values = pixel_values["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixel_values).stage_pooler_outputs
        torch.testing.assert_close(
            fused.get_image_features(pixel_values).stage_pooler_outputs, expected, atol=1e-5, rtol=0
        )
        cache = fused.new_stage_cache()
        for stage in range(1, fused.num_stages + 1):
            step = fused.get_image_features(pixel_values, num_stages=stage, cache=cache).pooler_output
            torch.testing.assert_close(step, expected[:, stage - 1], atol=1e-5, rtol=0)
