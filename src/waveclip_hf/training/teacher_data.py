"""The teacher's data: the benchmark's train split decoded and resized once into a uint8 pixel cache, and batches
of (normalised pixels, a freshly drawn caption per image, which captions are true of which image).

Throughput on a 2-core CPU is the constraint, so every epoch after the first build only reads memory.
"""

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPImageProcessorPil

from ..data.synthetic import AXES, label_ids, labels_of_row, load_benchmark_split, read_benchmark_info, sample_caption


# OpenAI CLIP's statistics, so the teacher preprocesses exactly like the checkpoints it
# stands in for (the benchmark's own statistics are close enough not to matter).
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def build_image_processor(image_size: int = 224) -> CLIPImageProcessorPil:
    """The teacher's image processor, built without the Hub: shortest side -> `image_size`
    (bicubic), centre crop, rescale to [0, 1], normalise with OpenAI CLIP's mean/std.

    Pillow's backend by name: `CLIPImageProcessor` is the torchvision backend where torchvision is installed and
    Pillow's elsewhere, and the two resize differently, so the teacher's pixels (and every cached step after them)
    would depend on whether torchvision happens to be there. It saves as a `CLIPImageProcessor` all the same."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=int(Image.Resampling.BICUBIC),  # an int, as it reads back from JSON
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
        do_convert_rgb=True,
    )


# --------------------------------------------------------------------- pixel cache


def _preprocess_chunk(job) -> None:
    """Worker: decode PNGs [start, stop) and write their uint8 crops into the memmap."""
    paths, cache_path, start, image_processor = job
    cache = np.load(cache_path, mmap_mode="r+")
    images = [Image.open(path) for path in paths]
    # Resize and crop only: normalisation happens per batch in float (`normalize_pixels`),
    # so the cache stays uint8 (4x smaller than float32).
    pixels = image_processor(images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    cache[start : start + len(paths)] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    cache.flush()


def pixel_cache(
    data_root: str | os.PathLike,
    split: str,
    image_processor: CLIPImageProcessorPil,
    num_workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """The whole split, resized and cropped by `image_processor`, as a uint8 memmap.

    Built once into ``<data_root>/<split>/pixels-<key>.npy`` (the key hashes the
    processor's geometry and the benchmark's info) and reused afterwards; written to a
    temporary file and renamed, so an interrupted build leaves no broken cache.

    Returns:
        (N, 3, S, S) uint8 read-only memmap, rows in `metadata.jsonl` order.
    """
    split_dir = Path(data_root) / split
    rows = load_benchmark_split(data_root, split)
    geometry = {
        k: image_processor.to_dict().get(k) for k in ("size", "crop_size", "resample", "do_resize", "do_center_crop")
    }
    key = hashlib.sha256(
        json.dumps([geometry, read_benchmark_info(data_root), len(rows)], sort_keys=True).encode()
    ).hexdigest()[:12]
    path = split_dir / f"pixels-{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")

    crop = image_processor.crop_size
    tmp = split_dir / f".pixels-{key}.tmp-{os.getpid()}.npy"
    np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(rows), 3, crop["height"], crop["width"])
    ).flush()
    chunk = 256
    jobs = [
        ([split_dir / row["file_name"] for row in rows[a : a + chunk]], tmp, a, image_processor)
        for a in range(0, len(rows), chunk)
    ]
    try:
        with tqdm(total=len(rows), desc=f"caching {split} pixels", unit="img", disable=not progress) as bar:
            if num_workers > 1:
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                with multiprocessing.get_context(method).Pool(num_workers) as pool:
                    for job, _ in zip(jobs, pool.imap(_preprocess_chunk, jobs)):
                        bar.update(len(job[0]))
            else:
                for job in jobs:
                    _preprocess_chunk(job)
                    bar.update(len(job[0]))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def normalize_pixels(pixels: torch.Tensor, image_processor: CLIPImageProcessorPil) -> torch.Tensor:
    """(B, 3, S, S) uint8 from `pixel_cache` -> (B, 3, S, S) float32 `pixel_values`,
    identical to what `image_processor(images)` returns for the same images."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.float() * image_processor.rescale_factor - mean) / std


class CachedImages(torch.utils.data.Dataset):
    """Index -> (3, S, S) uint8 pixels from the cache, plus the index (for the labels)."""

    def __init__(self, pixels: np.ndarray, num_images: int):
        self.pixels = pixels
        self.num_images = num_images

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.pixels[index])), index


class CaptionCollator:
    """Stacks and normalises pixels, and draws a fresh random caption for each image.

    Besides the model inputs it returns `caption_matches`, (B, B) bool: whether caption
    j is true of image i (it names no label that image i lacks), for
    `multi_positive_clip_loss`.
    """

    def __init__(
        self,
        rows,
        tokenizer,
        image_processor,
        full_caption_probability: float,
        seed: int,
        axes=tuple(AXES),
        single_axis: bool = False,
    ):
        self.axes = tuple(axes)  # the benchmark's axes (`benchmark_axes` of its info.json)
        self.single_axis = single_axis
        self.labels = [labels_of_row(row, self.axes) for row in rows]
        self.label_ids = torch.stack([torch.from_numpy(label_ids(rows, axis)) for axis in self.axes], dim=1)  # (N, A)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.full_caption_probability = full_caption_probability
        self.rng = np.random.default_rng(seed)

    def __call__(self, items) -> dict[str, torch.Tensor]:
        pixels = torch.stack([pixels for pixels, _ in items])
        indices = torch.tensor([i for _, i in items])
        captions, named = [], []
        for i in indices.tolist():
            caption, axes = sample_caption(
                self.labels[i],
                self.rng,
                self.full_caption_probability,
                return_axes=True,
                axes=self.axes,
                single_axis=self.single_axis,
            )
            captions.append(caption)
            named.append([axis in axes for axis in self.axes])
        text = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        labels = self.label_ids[indices]  # (B, A)
        named = torch.tensor(named)  # (B, A): axes caption j names
        same = labels[:, None, :] == labels[None, :, :]  # (B_image, B_caption, A)
        return {
            "pixel_values": normalize_pixels(pixels, self.image_processor),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "caption_matches": (same | ~named[None, :, :]).all(dim=-1),
        }


def caption_loader(
    pixels: np.ndarray,
    num_images: int,
    rows,
    tokenizer,
    image_processor,
    batch_size: int,
    full_caption_probability: float,
    seed: int,
    process_index: int = 0,
    axes=tuple(AXES),
    single_axis: bool = False,
):
    """Shuffled, full batches of the first `num_images` cached images with captions drawn per batch
    ([`CaptionCollator`] over `axes`, seeded per process); the order comes from its own seeded generator."""
    collator = CaptionCollator(
        rows,
        tokenizer,
        image_processor,
        full_caption_probability,
        seed=seed + process_index,
        axes=axes,
        single_axis=single_axis,
    )
    return torch.utils.data.DataLoader(
        CachedImages(pixels, num_images),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(seed),
    )


__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "CachedImages",
    "CaptionCollator",
    "build_image_processor",
    "caption_loader",
    "normalize_pixels",
    "pixel_cache",
]
