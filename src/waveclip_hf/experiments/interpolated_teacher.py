"""What a 224-px CLIP teacher loses when it reads 448-px images (docs/adaptive_resolution.md, "A 224-px teacher at
448 px").

    python -m waveclip_hf.experiments.interpolated_teacher --teacher <teacher folder> --data <two-scale benchmark>

Zero-shot accuracy per axis on the same test images (the two-scale benchmark at 224 px), read three ways:

- "native_224": the teacher as trained, on the 224-px image;
- "interpolated_448": the image upsampled 2x (bicubic, as an image processor at 448 px would) and read with
  transformers' `interpolate_pos_encoding=True`: a 2G x 2G grid of patches of the same pixel size, so every token
  sees a quarter of the area it saw in training, at positions the teacher never saw;
- "patch_scaled_448": the same 448-px image read with the patch doubled (the kernel upsampled 2x nearest and divided
  by 4): the G x G grid of training, each token the 2x2 box mean's view of its cell. On a 2x nearest-upsampled
  image this is exactly the teacher at 224 px; on a bicubic upsample it differs only by the resampling.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel

from ..data.synthetic import AXES, label_ids, load_benchmark_split
from ..evaluation.zero_shot import image_embeddings, text_embeddings_per_axis, zero_shot_accuracy_per_axis
from ..training.teacher_data import build_image_processor


@torch.no_grad()
def patch_scaled_copy(teacher: CLIPModel, factor: int = 2) -> CLIPModel:
    """A copy of `teacher` that reads `factor`x larger images on the same patch grid: patch size and image size
    times `factor`, patch kernel upsampled (nearest) and divided by factor^2, so that a patch of a `factor`x
    nearest-upsampled image gives the token the teacher gives the original patch."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.vision_config.patch_size *= factor
    config.vision_config.image_size *= factor
    scaled = CLIPModel(config).eval()
    state = teacher.state_dict()
    kernel = state["vision_model.embeddings.patch_embedding.weight"]
    state["vision_model.embeddings.patch_embedding.weight"] = (
        kernel.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) / factor**2
    )
    scaled.load_state_dict(state, strict=False)  # position_ids buffers are rebuilt by the config
    return scaled


def _pixels(paths, processor, size: int) -> torch.Tensor:
    """(B, 3, size, size) normalised pixel values of the images at `paths`, resized (bicubic) to `size`."""
    images = [Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC) for path in paths]
    return processor(images, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def measure(
    teacher_dir: Path, data_root: Path, split: str = "test", num_images: int = 1000, batch_size: int = 100
) -> dict:
    """Per-axis zero-shot accuracy of the teacher in the three readings of the module docstring."""
    teacher = CLIPModel.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    size = teacher.config.vision_config.image_size
    rows = load_benchmark_split(data_root, split)[:num_images]
    paths = [data_root / split / row["file_name"] for row in rows]
    text = text_embeddings_per_axis(teacher, tokenizer, {name: axis.prompts() for name, axis in AXES.items()})
    labels = {name: torch.from_numpy(label_ids(rows, name)) for name in AXES}
    scaled = patch_scaled_copy(teacher)
    readings = {
        "native_224": (size, lambda x: teacher.get_image_features(pixel_values=x)),
        "interpolated_448": (
            2 * size,
            lambda x: teacher.get_image_features(pixel_values=x, interpolate_pos_encoding=True),
        ),
        "patch_scaled_448": (2 * size, lambda x: scaled.get_image_features(pixel_values=x)),
    }
    results = {}
    for name, (image_size, embed) in readings.items():
        processor = build_image_processor(image_size)
        batches = (_pixels(paths[a : a + batch_size], processor, image_size) for a in range(0, len(paths), batch_size))
        embeds = image_embeddings(embed, batches, total=len(paths), progress=False, desc=name)
        results[name] = zero_shot_accuracy_per_axis(embeds, labels, text)
    return {
        "teacher": str(teacher_dir),
        "data": str(data_root),
        "split": split,
        "num_images": len(rows),
        "patch_size": teacher.config.vision_config.patch_size,
        "image_size": size,
        "accuracy": results,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a CLIP teacher folder trained at 224 px (the main job's)")
    parser.add_argument("--data", required=True, help="the two-scale benchmark it was trained on")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--output", default="docs/adaptive_interpolated_teacher.json")
    args = parser.parse_args(argv)
    result = measure(Path(args.teacher), Path(args.data), args.split, args.num_images)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["accuracy"], indent=2))
    return result


__all__ = ["main", "measure", "patch_scaled_copy"]


if __name__ == "__main__":
    main()
