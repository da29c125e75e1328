"""Training images: image folders and `datasets` datasets, unreadable files skipped and counted, the collator that
preprocesses for both towers, and the seeded per-epoch order that makes resume exact."""

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import PIL.Image
import PIL.ImageOps
import torch
from accelerate import Accelerator

from ..data.image_folders import IMAGE_EXTENSIONS, HFImageDataset, ImageFolderDataset, list_image_files
from .signals import guard_worker_from_sigterm


logger = logging.getLogger(__name__)

SHOW_SKIPPED = 5  # skipped files named in logs and summaries


def subset(dataset, indices: Sequence[int]):
    """The items `indices` of an [`ImageFolderDataset`] or [`HFImageDataset`], as the same kind of dataset."""
    if isinstance(dataset, ImageFolderDataset):
        return ImageFolderDataset([dataset.paths[i] for i in indices], dataset.root)
    return HFImageDataset(dataset.dataset, dataset.column, dataset.description, [dataset.indices[i] for i in indices])


def load_image_dataset(source: str, data_format: str = "auto", split: str = "train", image_column: str = "image"):
    """An [`ImageFolderDataset`] or [`HFImageDataset`] for `source`.

    `data_format="auto"`: a folder saved with `Dataset.save_to_disk` is loaded with `datasets.load_from_disk`; any
    other folder holding image files is an image folder; everything else (a Hub dataset name, a folder of
    parquet/csv files) goes to `datasets.load_dataset(source, split=split)`.
    """
    path = Path(source).expanduser()
    if data_format in ("auto", "folder") and path.is_dir():
        saved = (path / "state.json").exists() or (path / "dataset_dict.json").exists()
        if not (data_format == "auto" and saved):
            paths = list_image_files(path)
            if paths:
                return ImageFolderDataset(paths, path)
            if data_format == "folder":
                raise ValueError(
                    f"No image files under {str(path)!r} (looked recursively for {sorted(IMAGE_EXTENSIONS)})."
                )
    elif data_format == "folder":
        raise ValueError(f"--data-format folder: {str(path)!r} is not a folder.")

    import datasets

    dataset = load_saved_split(path, source, split)
    if dataset is None:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as error:
            raise ValueError(
                f"Could not load training data {source!r}: it is not a folder with images, and "
                f"`datasets.load_dataset({source!r}, split={split!r})` failed: {error}"
            ) from error
    return HFImageDataset(dataset, image_column, f"{source}[{split}]")


def load_saved_split(path: Path, source: str, split: str):
    """The `split` of a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (a plain `Dataset`
    is its own split); `None` when `path` is not such a folder."""
    if not (path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())):
        return None
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{source!r} has splits {list(dataset)}, not {split!r}. Pass --data-split.")
        dataset = dataset[split]
    return dataset


class DistillationCollator:
    """Decoded items -> a batch for the student, the teacher or both; unreadable images become placeholders with
    `valid=False`.

    Placeholders keep every batch the same size, so a bad file never changes tensor shapes, never leaves a
    batch empty, and never desynchronises processes under DDP; the loss ignores them.

    Returns `{"pixel_values": (B, 3, S, S) student coefficients (absent without a student processor),
    "teacher_pixel_values": (B, 3, St, St) (absent without a teacher processor, e.g. when teacher embeddings are
    cached), "valid": (B,) bool, "index": (B,) long, "skipped": [(name, error), ...]}`.
    """

    def __init__(self, student_processor=None, teacher_processor=None):
        named = (("pixel_values", student_processor), ("teacher_pixel_values", teacher_processor))
        self.processors = [(key, processor) for key, processor in named if processor is not None]
        if not self.processors:
            raise ValueError("DistillationCollator needs a student processor, a teacher processor or both.")
        size = getattr(student_processor, "image_size", 224)
        self.placeholder = PIL.Image.new("RGB", (size, size), (128, 128, 128))

    def __call__(self, items: list[dict]) -> dict:
        skipped = [(item["name"], item["error"]) for item in items if item["image"] is None]
        images = [item["image"] if item["image"] is not None else self.placeholder for item in items]
        valid = [item["image"] is not None for item in items]
        batch = {}
        for key, processor in self.processors:
            pixels = _process(processor, images)
            if pixels is None:  # a decodable image a processor rejects (e.g. 1x1): isolate it
                pixels = self._process_one_by_one(processor, items, images, valid, skipped)
                # Earlier keys may have been built with the now-invalid images: redo them with placeholders.
                for done_key, done_processor in self.processors:
                    if done_key in batch:
                        batch[done_key] = done_processor(images=images, return_tensors="pt")["pixel_values"]
            batch[key] = pixels
        batch["valid"] = torch.tensor(valid)
        batch["index"] = torch.tensor([item["index"] for item in items])
        batch["skipped"] = skipped
        return batch

    def _process_one_by_one(self, processor, items, images, valid, skipped) -> torch.Tensor:
        """(B, 3, S, S): every image the processor rejects is replaced (in `images`, in place) by the placeholder,
        marked invalid in `valid` and named in `skipped`."""
        rows = []
        for i, image in enumerate(images):
            row = _process(processor, [image])
            if row is None:
                skipped.append((items[i]["name"], f"{type(processor).__name__} rejected it"))
                valid[i], images[i] = False, self.placeholder
                row = processor(images=[self.placeholder], return_tensors="pt")["pixel_values"]
            rows.append(row)
        return torch.cat(rows)


def _process(processor, images: list) -> torch.Tensor | None:
    try:
        return processor(images=images, return_tensors="pt")["pixel_values"]
    except Exception:  # noqa: BLE001 - the caller finds the culprit(s) one by one
        return None


class EpochPermutationSampler(torch.utils.data.Sampler):
    """A fresh seeded permutation per epoch: `randperm(n, generator=seed + epoch)`.

    The order depends only on (seed, epoch), never on global RNG state, so a resumed run sees the same batches.
    The epoch is set by the data loader's `set_epoch` (accelerate forwards it here).
    """

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())


def split_holdout(train_set, holdout: int, seed: int):
    """(train, held-out) with `min(holdout, 10%)` images held out, chosen by a seeded permutation (each part keeps
    the source order); held-out is None when nothing is held out."""
    holdout = min(holdout, len(train_set) // 10)
    if not holdout:
        return train_set, None
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    return subset(train_set, sorted(order[holdout:])), subset(train_set, sorted(order[:holdout]))


def load_distillation_data(config):
    """(training set, evaluation set or None) for a `DistillationConfig`: `eval_data` if given, else
    `eval_holdout` images held out of `train_data`. Raises a `ValueError` when no training image is left."""
    train_set = load_image_dataset(config.train_data, config.data_format, config.data_split, config.image_column)
    if config.eval_data:
        eval_set = load_image_dataset(config.eval_data, config.data_format, config.eval_split, config.image_column)
    else:
        train_set, eval_set = split_holdout(train_set, config.eval_holdout, config.seed)
    if len(train_set) == 0:
        raise ValueError(f"No training images in {config.train_data!r}.")
    return train_set, eval_set


def training_loader(dataset, collator, batch_size: int, num_workers: int, seed: int, pin_memory: bool):
    """A `DataLoader` over `dataset` in the order of an [`EpochPermutationSampler`]; its workers survive a SIGTERM
    to the process group (so the main process can checkpoint) and never touch the global RNG."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochPermutationSampler(len(dataset), seed),
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=num_workers > 0,
        worker_init_fn=guard_worker_from_sigterm,
        generator=torch.Generator().manual_seed(seed),  # workers' base seed; keeps global RNG untouched
    )


def epochs_of_batches(accelerator: Accelerator, loader, position) -> Iterator[dict]:
    """Micro-batches, epoch after epoch without end, from where `position` says the run is.

    `position` has `epoch` and `batches_in_epoch` (a `TrainerState`); both are advanced here as batches are
    handed out, so a checkpoint written between two batches records exactly what was consumed. A resumed run
    skips the consumed batches of its epoch with `accelerator.skip_first_batches`.
    """
    while True:
        loader.set_epoch(position.epoch)
        batches = loader
        if position.batches_in_epoch:
            batches = accelerator.skip_first_batches(loader, position.batches_in_epoch)
            batches.set_epoch(position.epoch)
        for batch in batches:
            position.batches_in_epoch += 1
            yield batch
        position.epoch += 1
        position.batches_in_epoch = 0


def record_skipped(skipped: dict, batch_skipped: Sequence[tuple[str, str]]) -> None:
    """Add a batch's unreadable files to `skipped` (name -> error), logging the first `SHOW_SKIPPED` of the run."""
    for name, error in batch_skipped:
        if name not in skipped:
            skipped[name] = error
            if len(skipped) <= SHOW_SKIPPED:
                logger.warning("Skipping unreadable image %s (%s)", name, error)


__all__ = [
    "DistillationCollator",
    "EpochPermutationSampler",
    "epochs_of_batches",
    "load_distillation_data",
    "load_image_dataset",
    "record_skipped",
    "split_holdout",
    "subset",
    "training_loader",
]
