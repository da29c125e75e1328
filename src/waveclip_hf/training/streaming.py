"""`--streaming`: a `datasets` collection read as a stream (never listed or downloaded whole), in a seeded order,
with exact resume.

Order: the stream is shuffled by `datasets` (`IterableDataset.shuffle(seed, buffer_size)`, re-seeded each epoch by
`set_epoch`), then split into `processes x workers` parts with `split_dataset_by_node`: data-loader worker w of
process p reads part `p * workers + w`, forms batches of its own rows, and the loader takes the workers' batches in
turn. The order therefore depends on the seed, the epoch, the number of processes and `--num-workers`, and on
nothing else.

Resume: every batch says which worker made it and how many that worker has made. The trainer state keeps, for
each worker, the batches consumed, and which worker made the last one. A resumed epoch starts every worker after
its consumed batches (their rows are read but not decoded) and lets the worker after the last one go first, so
the batches that follow are exactly those an uninterrupted run would have seen.

Held-out images: without `--eval-data`, the first `eval_holdout` rows of the unshuffled stream are the evaluation
set and are left out of training wherever they appear (recognised by a hash of their bytes).
"""

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from ..data.image_folders import HFImageDataset, decode_image
from .data import load_image_dataset, load_saved_split
from .signals import guard_worker_from_sigterm


logger = logging.getLogger(__name__)

# A `save_to_disk` folder becomes a stream of this many shards at most (more than any processes x workers).
SAVED_DATASET_SHARDS = 1024


def open_stream(source: str, split: str, image_column: str):
    """`source` as a `datasets.IterableDataset` of undecoded images (`{"bytes", "path"}`) in its `image_column`: a
    `save_to_disk` folder via `to_iterable_dataset`, anything else via `load_dataset(source, split=split,
    streaming=True)` (a Hub dataset, a folder of data files, an image folder)."""
    import datasets

    path = Path(source).expanduser()
    dataset = load_saved_split(path, source, split)
    if dataset is not None:
        stream = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), SAVED_DATASET_SHARDS)))
    else:
        try:
            stream = datasets.load_dataset(source, split=split, streaming=True)
        except Exception as error:
            raise ValueError(
                f"Could not stream training data {source!r}: `datasets.load_dataset({source!r}, "
                f"split={split!r}, streaming=True)` failed: {error}"
            ) from error
    # Some streams only know their columns once read (column_names None): then a wrong column fails at step 0.
    if stream.column_names is not None and image_column not in stream.column_names:
        raise ValueError(
            f"The stream {source!r} has no column {image_column!r}; its columns are "
            f"{stream.column_names}. Pass the image column with --image-column."
        )
    stream = stream.select_columns([image_column])
    if stream.features is not None and isinstance(stream.features[image_column], datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    return stream


def row_key(value) -> str:
    """A stable identity of an undecoded image: the hash of its bytes (else of its path)."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    data = value if isinstance(value, bytes) else str(value).encode()
    return hashlib.sha1(data).hexdigest()


def load_streaming_data(config):
    """(training stream, evaluation set or None) for a `DistillationConfig` with `streaming=True`: `eval_data` if
    given (read as usual), else the first `eval_holdout` rows of the stream."""
    stream = open_stream(config.train_data, config.data_split, config.image_column)
    if config.eval_data:
        eval_set = load_image_dataset(config.eval_data, config.data_format, config.eval_split, config.image_column)
        return StreamingImages(stream, config.image_column, config.seed, config.shuffle_buffer), eval_set
    held_out = list(stream.take(config.eval_holdout)) if config.eval_holdout else []
    eval_set = None
    if held_out:
        import datasets

        rows = datasets.Dataset.from_list(held_out, features=stream.features)
        eval_set = HFImageDataset(rows, config.image_column, f"{config.train_data}[{config.data_split}][held out]")
    excluded = frozenset(row_key(row[config.image_column]) for row in held_out)
    return StreamingImages(stream, config.image_column, config.seed, config.shuffle_buffer, excluded), eval_set


class StreamingImages(torch.utils.data.IterableDataset):
    """Batches of decoded items (`{"index", "name", "image", "error"}`, as `ImageFolderDataset` gives them) from a
    shuffled stream; see the module docstring for the order and for resume.

    Yields `(items, (worker, batches made by that worker so far))`; `StreamCollator` turns it into a batch.
    Set `epoch`, `consumed` and `first_worker` before iterating (the workers copy them when they start).
    """

    def __init__(self, stream, image_column: str, seed: int, buffer_size: int, excluded: frozenset = frozenset()):
        self.stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
        self.image_column, self.excluded = image_column, excluded
        self.batch_size, self.rank, self.num_processes = 1, 0, 1
        self.epoch, self.consumed, self.first_worker = 0, {}, 0

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        info = torch.utils.data.get_worker_info()
        worker_id, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker_id + self.first_worker) % workers
        part = split_dataset_by_node(
            self.stream, rank=self.rank * workers + worker, world_size=self.num_processes * workers
        )
        part.set_epoch(self.epoch)
        skip = self.consumed.get(str(worker), 0)
        for made, rows in enumerate(self._batches(part), start=1):
            if made > skip:  # consumed batches are read, not decoded
                yield [self._item(row, made, i) for i, row in enumerate(rows)], (worker, made)

    def _batches(self, part) -> Iterator[list]:
        batch = []
        for chunk in part.iter(batch_size=256):
            for value in chunk[self.image_column]:
                if self.excluded and row_key(value) in self.excluded:
                    continue
                batch.append(value)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _item(self, value, batch_number: int, position: int) -> dict:
        name = value.get("path") if isinstance(value, dict) else None
        name = name or f"stream[batch {batch_number}, row {position}]"
        try:
            source = value["bytes"] if isinstance(value, dict) and value.get("bytes") is not None else value
            source = source["path"] if isinstance(source, dict) else source
            return {"index": position, "name": name, "image": decode_image(source), "error": None}
        except Exception as error:  # noqa: BLE001 - any undecodable row is skipped, never fatal
            return {"index": position, "name": name, "image": None, "error": f"{type(error).__name__}: {error}"}


class StreamCollator:
    """`(items, (worker, made))` -> the `DistillationCollator` batch plus `"stream": (worker, made)`."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, batch) -> dict:
        items, position = batch
        return {**self.collator(items), "stream": position}


def streaming_loader(images: StreamingImages, collator, batch_size: int, num_workers: int, accelerator: Accelerator):
    """The `DataLoader` of a stream: batches are made in the workers (`batch_size=None`), this process's part only.
    Workers are not persistent: each epoch's workers copy that epoch's `epoch`, `consumed` and `first_worker`."""
    images.batch_size = batch_size
    images.rank, images.num_processes = accelerator.process_index, accelerator.num_processes
    return torch.utils.data.DataLoader(
        images,
        batch_size=None,
        collate_fn=StreamCollator(collator),
        num_workers=num_workers,
        pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=guard_worker_from_sigterm,
    )


def stream_of_batches(accelerator: Accelerator, loader, position) -> Iterator[dict]:
    """Micro-batches on the device, epoch after epoch without end, from where `position` (a `TrainerState`) says the
    run is; `position.stream` (`{"consumed": {worker: batches}, "last_worker": w}`), `epoch` and
    `batches_in_epoch` are advanced as batches are handed out."""
    images = loader.dataset
    while True:
        stream = position.stream.setdefault("consumed", {})
        images.epoch, images.consumed = position.epoch, dict(stream)
        workers = max(1, loader.num_workers)
        last = position.stream.get("last_worker")
        images.first_worker = 0 if last is None else (last + 1) % workers
        for batch in loader:
            worker, made = batch.pop("stream")
            position.stream["consumed"][str(worker)] = made
            position.stream["last_worker"] = worker
            position.batches_in_epoch += 1
            yield send_to_device(batch, accelerator.device)
        position.epoch += 1
        position.batches_in_epoch = 0
        position.stream = {}


__all__ = [
    "StreamCollator",
    "StreamingImages",
    "load_streaming_data",
    "open_stream",
    "row_key",
    "stream_of_batches",
    "streaming_loader",
]
