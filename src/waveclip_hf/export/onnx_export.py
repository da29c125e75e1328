"""Export a WaveCLIP checkpoint to ONNX, stage by stage, for serving without torch.

    python -m waveclip_hf.export.onnx_export --model runs/waveclip-offline --output-dir runs/waveclip-onnx

writes, into the output folder:

- `stage_0.onnx`: `pixel_values` (batch, 3, S, S) -> `image_embeds` (batch, projection_dim, projected, not
  normalised), `keys` and `values` (layers, batch, heads, tokens of stage 0, head_dim): the cache after stage 0;
- `stage_<k>.onnx` for k >= 1: `pixel_values` and the cache after stage k - 1 (`past_keys`, `past_values`) ->
  `image_embeds` after stage k and the cache after stage k. The cache is plain tensors in and out: the runner
  keeps it, and drops the rows of the images that answered;
- `text.onnx`: `input_ids`, `attention_mask` (labels, length) -> `text_embeds` (labels, projection_dim);
- `waveclip_onnx.json`: the geometry and everything the runner needs (stage GFLOPs, logit scale, the processor's
  settings, the exit signal's calibrations), and the tokenizer files.

With `--int8` the stage graphs are dynamically quantised (`quantization.py`: int8 weights, activations quantised
per call); the runner reads either folder the same way.

The batch is dynamic in every graph. `onnx_runner.py` answers the pipeline's question from these files with
onnxruntime, numpy and the tokenizer only. Needs the `onnx` extra (`pip install waveclip-hf[onnx]`): onnx,
onnxscript (torch's exporter) and onnxruntime.
"""

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..hub.loading import load_waveclip
from ..models.waveclip.folder_io import written_atomically


ONNX_CONFIG_NAME = "waveclip_onnx.json"
OPSET = 18


class ExplicitCache(Cache):
    """A cache built from the keys and values of the stages run so far, given as tensors, that concatenates the new
    stage's onto them: what an exported stage takes in and gives back."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, num_layers: int):
        super().__init__(layers=[DynamicLayer() for _ in range(num_layers)])
        if keys is not None:
            for layer, layer_keys, layer_values in zip(self.layers, keys, values):
                layer.lazy_initialization(layer_keys, layer_values)
                layer.keys, layer.values = layer_keys, layer_values

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, batch, heads, tokens, head_dim) keys and values."""
        return torch.stack([layer.keys for layer in self.layers]), torch.stack([layer.values for layer in self.layers])


class StageGraph(nn.Module):
    """One stage of a `WaveCLIPModel` as a function of tensors: (pixel_values[, past keys, past values]) ->
    (projected image embedding after the stage, keys, values after the stage)."""

    def __init__(self, model, stage: int):
        super().__init__()
        self.model, self.stage = model, stage
        self.num_layers = model.config.vision_config.num_hidden_layers

    def forward(self, pixel_values, past_keys=None, past_values=None):
        cache = ExplicitCache(past_keys, past_values, self.num_layers)
        outputs = self.model.get_image_features(pixel_values, num_stages=self.stage + 1, cache=cache, use_cache=True)
        keys, values = cache.stacked()
        return outputs.pooler_output, keys, values


class TextGraph(nn.Module):
    """The text tower: (input_ids, attention_mask) -> projected label embeddings."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], dynamic: dict, path: Path) -> Path:
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=names,
        output_names=outputs,
        dynamic_shapes=dynamic,
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
    )
    return path


def export_stages(model, folder: Path, example_batch: int = 2) -> list[Path]:
    """`stage_<k>.onnx` for every stage of `model` (block-causal), with a dynamic batch."""
    config = model.config.vision_config
    if config.attention == "bidirectional":
        raise ValueError("A bidirectional WaveCLIP has no stages to answer from: export needs the block-causal model.")
    pixel_values = torch.randn(example_batch, config.num_channels, config.image_size, config.image_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    paths, keys, values = [], None, None
    for stage in range(config.num_stages):
        graph = StageGraph(model, stage).eval()
        if stage == 0:
            args, names, dynamic = (pixel_values,), ["pixel_values"], {"pixel_values": {0: batch}}
        else:
            args, names = (pixel_values, keys, values), ["pixel_values", "past_keys", "past_values"]
            dynamic = {"pixel_values": {0: batch}, "past_keys": {1: batch}, "past_values": {1: batch}}
        path = folder / f"stage_{stage}.onnx"
        paths.append(_export(graph, args, names, ["image_embeds", "keys", "values"], dynamic, path))
        with torch.no_grad():
            _, keys, values = graph(*args)
    return paths


def export_text(model, folder: Path) -> Path:
    input_ids = torch.ones(3, 8, dtype=torch.long)
    dynamic = {
        "input_ids": {0: torch.export.Dim("labels", min=1, max=100_000), 1: torch.export.Dim("length", max=512)},
        "attention_mask": {0: torch.export.Dim("labels", min=1, max=100_000), 1: torch.export.Dim("length", max=512)},
    }
    return _export(
        TextGraph(model).eval(),
        (input_ids, torch.ones_like(input_ids)),
        ["input_ids", "attention_mask"],
        ["text_embeds"],
        dynamic,
        folder / "text.onnx",
    )


def onnx_config(model, processor) -> dict:
    """What the runner needs besides the graphs: geometry, costs, logit scale, processor settings, calibrations."""
    vision = model.config.vision_config
    return {
        "format": 1,
        "num_stages": vision.num_stages,
        "num_layers": vision.num_hidden_layers,
        "stage_gflops": model.answer_gflops().tolist(),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "image_size": vision.image_size,
        "levels": vision.levels,
        "wavelet": vision.wavelet,
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
        "gate_calibrations": getattr(model.config, "gate_calibrations", None) or [],
        "exit_head": getattr(model.config, "exit_head", None),
    }


def export_checkpoint(model_path: str, output_dir: str, int8: bool = False) -> Path:
    """Export every stage, the text tower, the tokenizer and `waveclip_onnx.json` of a checkpoint, atomically; with
    `int8`, the stage graphs dynamically quantised (`quantization.quantize_onnx_stages`)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    model = load_waveclip(model_path).float()
    processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with written_atomically(output_dir) as tmp:
        tmp = Path(tmp)
        export_stages(model, tmp)
        export_text(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ONNX_CONFIG_NAME).write_text(json.dumps(onnx_config(model, processor), indent=1) + "\n")
        if int8:
            from .quantization import quantize_onnx_stages

            quantize_onnx_stages(tmp)
    return Path(output_dir)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/waveclip-offline", help="a saved WaveCLIP folder or Hub id")
    parser.add_argument("--output-dir", default="runs/waveclip-onnx", help="where the ONNX files go")
    parser.add_argument(
        "--int8", action="store_true", help="quantise the stage graphs' weights to int8 (dynamic; text stays float)"
    )
    args = parser.parse_args(argv)
    folder = export_checkpoint(args.model, args.output_dir, args.int8)
    print(f"wrote {sorted(path.name for path in folder.iterdir())} to {folder}")
    return folder


if __name__ == "__main__":
    main()
