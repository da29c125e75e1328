"""Dynamic int8 quantisation of the image tower's linear layers, for serving on a CPU.

Two routes to the same idea (weights stored as int8, activations quantised on the fly per call, accumulation in
int32, everything else in float32):

- `quantize_linear_layers(model)`: torch's dynamic quantisation of every `nn.Linear` of the vision tower and the
  visual projection of a `WaveCLIPModel` (or of a transformers CLIP vision model), on a copy. In WaveCLIP's
  attention the query, key and value projections become one int8 product (`fuse_qkv`): they read the same input, so
  one call quantises it once instead of three times (batch 1, ViT-B/16, 2-core CPU: 12 layers' q/k/v in 9.7 ms
  instead of 12.3 at stage 0's 50 tokens). transformers' CLIP attention calls three projections, so a CLIP model
  keeps them separate;
- `quantize_onnx_stages(folder)`: onnxruntime's dynamic quantisation of the stage graphs of a folder that
  `onnx_export` wrote (`python -m waveclip_hf.export.onnx_export --int8` does both steps). Only the matrix products
  with a constant weight are quantised (`MatMulConstBOnly`): the attention products of two activations stay float.

The text tower stays float32 in both: it runs once per label set, not once per image, so its speed does not matter
to a zero-shot service, and its embeddings are what every answer is measured against. docs/benchmarks.md measures
both routes (speed at batch 1 and 8, against CLIP quantised the same way); docs/int8.md the accuracy change.
"""

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..models.waveclip.modeling_waveclip import WaveCLIPAttention
from .onnx_export import ONNX_CONFIG_NAME


class FusedQKVAttention(WaveCLIPAttention):
    """WaveCLIP's attention with its query, key and value projections as one `qkv_proj` (hidden -> 3 x hidden):
    the three rows of weights stacked, so the answer is the same and the input is read (and, in int8, quantised)
    once."""

    @classmethod
    def from_attention(cls, attention: WaveCLIPAttention) -> "FusedQKVAttention":
        with torch.device("meta"):  # the projections built here are replaced below: allocate nothing for them
            fused = cls(attention.config, attention.layer_idx)
        del fused.q_proj, fused.k_proj, fused.v_proj
        fused.out_proj = attention.out_proj
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        weight = attention.q_proj.weight
        fused.qkv_proj = nn.Linear(
            attention.embed_dim, 3 * attention.embed_dim, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            fused.qkv_proj.weight.copy_(torch.cat([projection.weight for projection in projections]))
            fused.qkv_proj.bias.copy_(torch.cat([projection.bias for projection in projections]))
        return fused.train(attention.training)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv_proj(hidden_states).chunk(3, dim=-1)


def fuse_qkv_projections(model: nn.Module) -> list[str]:
    """Replace, in place, every `WaveCLIPAttention` of `model` by its `FusedQKVAttention`; the fused layers' names."""
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is WaveCLIPAttention:
                setattr(module, child_name, FusedQKVAttention.from_attention(child))
                names.append(f"{name}.{child_name}.qkv_proj" if name else f"{child_name}.qkv_proj")
    return names


def quantize_linear_layers(model: nn.Module, fuse_qkv: bool = True) -> nn.Module:
    """A copy of `model` whose image-side `nn.Linear` layers are dynamically quantised to int8 (torch, CPU only).

    `model` is a `WaveCLIPModel`, a `WaveCLIPVisionModel` or a transformers `CLIPVisionModelWithProjection` /
    `CLIPModel`; the text tower, if any, is left in float32. The copy runs on the CPU in float32 (the quantised
    kernels exist for the CPU only) and answers through the same methods as the original.

    Args:
        fuse_qkv: in WaveCLIP's attention, quantise q, k and v as one product (`FusedQKVAttention`), with one scale
            per output row so that each projection keeps its own range. No effect on a CLIP model.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    quantized = copy.deepcopy(model).float().cpu().eval()
    image_side = [
        name for name in ("vision_model", "visual_projection") if isinstance(getattr(quantized, name, None), nn.Module)
    ]
    if not image_side:
        raise ValueError(
            f"{type(model).__name__} has no `vision_model` or `visual_projection` to quantise: pass a WaveCLIPModel, "
            "a WaveCLIPVisionModel or a CLIP vision model."
        )
    fused = fuse_qkv_projections(quantized.vision_model) if fuse_qkv and "vision_model" in image_side else []
    # Keyed by submodule name, so the text tower keeps its float weights (and a bare projection is swapped too);
    # the mapping swaps linear layers only (not the embeddings the qconfig also reaches). A fused q/k/v layer gets
    # per-row scales: one scale for the stacked rows would be set by the widest of the three.
    qconfigs = dict.fromkeys(image_side, default_dynamic_qconfig)
    qconfigs.update(dict.fromkeys((f"vision_model.{name}" for name in fused), per_channel_dynamic_qconfig))
    quantize_dynamic(quantized, qconfigs, dtype=torch.qint8, mapping={nn.Linear: DynamicQuantizedLinear}, inplace=True)
    return quantized


def quantize_onnx_graph(source: Path, target: Path) -> Path:
    """onnxruntime's dynamic int8 quantisation of one graph (int8 weights per output channel, uint8 activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    return target


def quantize_onnx_stages(folder: str | Path) -> list[Path]:
    """Quantise every `stage_<k>.onnx` of an exported folder in place (each file replaced whole, so a crash leaves
    the float graph, never half a file) and mark the folder's config `"int8": true`."""
    folder = Path(folder)
    config_path = folder / ONNX_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no {ONNX_CONFIG_NAME}: export the checkpoint first "
            "(`python -m waveclip_hf.export.onnx_export --model <folder> --output-dir <onnx folder>`)."
        )
    config = json.loads(config_path.read_text())
    paths = []
    for stage in range(config["num_stages"]):
        path = folder / f"stage_{stage}.onnx"
        partial = path.with_suffix(".int8-partial.onnx")
        quantize_onnx_graph(path, partial)
        os.replace(partial, path)
        paths.append(path)
    config["int8"] = True
    config_path.write_text(json.dumps(config, indent=1) + "\n")
    return paths
