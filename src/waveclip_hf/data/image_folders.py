"""Image files and image datasets, read so that an unreadable image is a reported item, never a crash.

`list_image_files` finds the images of a folder (recursively, sorted); `ImageFolderDataset` and `HFImageDataset`
give items `{"index", "name", "image": PIL RGB or None, "error"}`, so that a trainer or an evaluation can skip and
count what it cannot decode. Used by distillation (`training.data`), evaluation and the calibration command line.
"""

import io
import os
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import PIL.ImageOps
import torch


IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """Every file under `root` (recursively) with a common image extension, in a stable (sorted) order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def decode_image(source) -> PIL.Image.Image:
    """Open a path or bytes, decode fully (so truncated files fail here), apply EXIF orientation, return RGB."""
    image = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # first frame of a GIF / multi-page TIFF
    image = PIL.ImageOps.exif_transpose(image)
    if image.width == 0 or image.height == 0:
        raise ValueError("zero-size image")
    return image.convert("RGB")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder, recursively. Item i: `{"index", "name", "image": PIL RGB or None, "error"}`."""

    def __init__(self, paths: Sequence[Path], root: str | os.PathLike):
        self.paths, self.root = list(paths), Path(root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        name = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        try:
            return {"index": index, "name": name, "image": decode_image(path), "error": None}
        except Exception as error:  # noqa: BLE001 - any undecodable file is skipped, never fatal
            return {"index": index, "name": name, "image": None, "error": f"{type(error).__name__}: {error}"}


class HFImageDataset(torch.utils.data.Dataset):
    """One image column of a `datasets.Dataset`, decoded here (not by `datasets`) so that bad images are caught."""

    def __init__(self, dataset, image_column: str, description: str, indices: Sequence[int] | None = None):
        import datasets

        if image_column not in dataset.column_names:
            raise ValueError(
                f"{description} has no column {image_column!r}; its columns are {dataset.column_names}. "
                "Pass the image column with --image-column."
            )
        dataset = dataset.select_columns([image_column])
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.column, self.description = dataset, image_column, description
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        row = self.indices[index]
        name = f"{self.description}[{row}]"
        try:
            value = self.dataset[row][self.column]
            if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes", "path"}
                name = value.get("path") or name
                image = decode_image(value["bytes"] if value.get("bytes") is not None else value["path"])
            elif isinstance(value, PIL.Image.Image):
                image = _decode_pil(value)
            elif isinstance(value, str | os.PathLike | bytes):
                image = decode_image(value)
            else:
                raise TypeError(f"cannot read an image from a {type(value).__name__}")
            return {"index": index, "name": name, "image": image, "error": None}
        except Exception as error:  # noqa: BLE001
            return {"index": index, "name": name, "image": None, "error": f"{type(error).__name__}: {error}"}


def _decode_pil(image: PIL.Image.Image) -> PIL.Image.Image:
    """An image `datasets` already decoded: load it fully, apply EXIF orientation, return RGB."""
    image.load()
    return PIL.ImageOps.exif_transpose(image).convert("RGB")


__all__ = ["IMAGE_EXTENSIONS", "HFImageDataset", "ImageFolderDataset", "decode_image", "list_image_files"]
