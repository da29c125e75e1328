"""Grow a level, measured (docs/adaptive_resolution.md, "Growing a level"): how closely a 448-px / L=2 student grown
from a 224-px / L=1 one (`conversion.grow_level`) answers like its source after stages 0-1, and what one training
step costs when only the new stage trains, against one step that trains all three stages.

    python -m waveclip_hf.experiments.grow_level_measurement --student <224-px student> --teacher <its teacher>

`--student` is a saved student folder (`final/`) or a distillation checkpoint folder (`model.safetensors` with the
trainer's "student." prefix; then the student is rebuilt from `--teacher` at 224 px / L=1 / cell 32).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPModel

from ..conversion.clip_to_waveclip import convert_clip_to_waveclip
from ..conversion.grow_level import freeze_all_but_last_stage, grow_level
from ..data import synthetic
from ..evaluation.zero_shot import text_embeddings_per_axis
from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor
from ..models.waveclip.modeling_waveclip import WaveCLIPModel


def load_source(student: Path, teacher: Path) -> WaveCLIPModel:
    """The 224-px / L=1 student from a saved folder, or from a distillation checkpoint and its teacher."""
    if (student / "config.json").is_file():
        return WaveCLIPModel.from_pretrained(student).eval()
    model = convert_clip_to_waveclip(CLIPModel.from_pretrained(teacher), levels=1, cell_size=32)
    state = {k.removeprefix("student."): v for k, v in load_file(student / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def _stages(model: WaveCLIPModel, processor, images, batch_size: int = 50) -> torch.Tensor:
    """(N, stages, P) L2-normalised embeddings after every stage."""
    out = [
        model.get_image_features(
            processor(images[a : a + batch_size], return_tensors="pt")["pixel_values"]
        ).stage_pooler_outputs
        for a in range(0, len(images), batch_size)
    ]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def compare(source: torch.Tensor, grown: torch.Tensor, text: dict) -> dict:
    """Per shared stage: largest |difference| and smallest cosine of the embeddings, and the share of images whose
    zero-shot answer is the same on every axis."""
    result = {}
    for stage in range(source.shape[1]):
        a, b = source[:, stage], grown[:, stage]
        result[f"stage{stage}"] = {
            "max_abs_diff": float((a - b).abs().max()),
            "min_cosine": float((a * b).sum(-1).min()),
            "answer_agreement": {
                n: float(((a @ t.T).argmax(-1) == (b @ t.T).argmax(-1)).double().mean()) for n, t in text.items()
            },
        }
    return result


def _photos() -> list[np.ndarray]:
    """Eight scikit-image photos, centre-cropped square, RGB uint8."""
    photos = []
    for photo in (
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.rocket(),
        skimage.data.cat(),
        skimage.data.colorwheel(),
        skimage.data.camera(),
        skimage.data.brick(),
    ):
        photo = photo if photo.ndim == 3 else np.stack([photo] * 3, -1)
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        photos.append(np.ascontiguousarray(photo[top : top + side, left : left + side, :3]))
    return photos


def agreement(source: WaveCLIPModel, grown: WaveCLIPModel, tokenizer, num_images: int) -> dict:
    """Source vs grown on three-scale test scenes (448-px image vs its exact 2x2 mean, and vs the 224-px scene it
    was drawn from) and on photos (each processor's own resize)."""
    p224, p448 = WaveCLIPImageProcessor(image_size=224, levels=1), WaveCLIPImageProcessor(image_size=448, levels=2)
    text = text_embeddings_per_axis(source, tokenizer, {n: a.prompts() for n, a in synthetic.AXES.items()})
    params = [synthetic.three_scale_image_params(0, "test", i) for i in range(num_images)]
    big = [synthetic.render_three_scale_image(p) for p in params]
    box = [image.astype(np.float32).reshape(224, 2, 224, 2, 3).mean(axis=(1, 3)) / 255 for image in big]
    scenes = [synthetic.render_image(p.scene, 224) for p in params]
    grown_big = _stages(grown, p448, big)
    photos = _photos()
    return {
        "num_images": num_images,
        "benchmark_448_vs_its_2x2_mean": compare(_stages(source, p224, box), grown_big[:, :2], text),
        "benchmark_448_vs_its_224_scene": compare(_stages(source, p224, scenes), grown_big[:, :2], text),
        "photos_each_processor": compare(_stages(source, p224, photos), _stages(grown, p448, photos)[:, :2], text),
        "num_photos": len(photos),
    }


def _new_stage_embeddings(model: WaveCLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, P) the last stage's embedding, the earlier stages run without autograd and read from the cache: their
    parameters are frozen, and block-causal attention lets no later token change them, so the gradient is the same."""
    stages = model.config.vision_config.levels + 1
    with torch.no_grad():
        cache = model.get_image_features(pixels, num_stages=stages - 1, use_cache=True).cache
    return model.get_image_features(pixels, num_stages=stages, cache=cache, use_cache=True).pooler_output[:, None]


def step_seconds(model: WaveCLIPModel, mode: str, steps: int, batch_size: int) -> float:
    """Median seconds of one AdamW step of a cosine loss on the stage embeddings (random 448-px inputs) of a
    freshly grown `model`. `mode`: "all_stages" (everything but the text side trains, loss on every stage),
    "new_stage_only" (`freeze_all_but_last_stage`, one forward of all stages) or "new_stage_only_cached" (the same
    gradient, the old stages run once without autograd: `_new_stage_embeddings`). The model's parameters change."""
    new_stage_only = mode != "all_stages"
    restore = freeze_all_but_last_stage(model) if new_stage_only else None
    if not new_stage_only:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not name.startswith(("text_model", "text_projection", "logit_scale")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    pixels = torch.randn(batch_size, 3, 448, 448)
    targets = torch.nn.functional.normalize(torch.randn(batch_size, model.config.projection_dim), dim=-1)
    times = []
    model.train()
    for _ in range(steps + 1):  # the first step warms up
        begin = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if mode == "new_stage_only_cached":
                embeds = _new_stage_embeddings(model, pixels).float()  # (B, 1, P)
            else:
                embeds = model.get_image_features(pixels).stage_pooler_outputs.float()  # (B, stages, P)
        loss = (1 - torch.nn.functional.cosine_similarity(embeds, targets[:, None], dim=-1)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if restore is not None:
            restore()
        times.append(time.perf_counter() - begin)
    model.eval()
    return float(np.median(times[1:]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="a 224-px / L=1 student: saved folder or checkpoint folder")
    parser.add_argument("--teacher", required=True, help="its teacher folder (tokenizer; rebuilds a checkpoint)")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--timing-steps", type=int, default=4)
    parser.add_argument("--timing-batch", type=int, default=16)
    parser.add_argument("--output", default="docs/adaptive_grow_level.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    source = load_source(Path(args.student), Path(args.teacher))
    grown = grow_level(source).eval()
    result = {
        "student": args.student,
        "teacher": args.teacher,
        "agreement": agreement(source, grown, AutoTokenizer.from_pretrained(args.teacher), args.num_images),
    }
    seconds = {
        mode: step_seconds(grow_level(source), mode, args.timing_steps, args.timing_batch)
        for mode in ("all_stages", "new_stage_only", "new_stage_only_cached")
    }
    result["step_seconds"] = {
        **seconds,
        "batch_size": args.timing_batch,
        "threads": torch.get_num_threads(),
        "ratio_to_all_stages": {m: seconds[m] / seconds["all_stages"] for m in seconds},
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


__all__ = ["agreement", "compare", "load_source", "main", "step_seconds"]


if __name__ == "__main__":
    main()
