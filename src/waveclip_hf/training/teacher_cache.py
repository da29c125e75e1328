"""The teacher's image embeddings of the training batches: computed per batch by the frozen teacher, or read from a
cache built once before step 0 (`--cache-teacher-embeddings`, worth it from the second epoch on)."""

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import CLIPModel

from .data import DistillationCollator
from .signals import guard_worker_from_sigterm


class TeacherEmbeddings:
    """`teacher_embeddings(batch) -> (B, P)` float32 projected teacher image embeddings of a training batch.

    Without a cache the teacher runs on `batch["teacher_pixel_values"]` (no grad, autocast); with one, rows are
    looked up by `batch["index"]` and the batch needs no teacher pixels.
    """

    def __init__(self, teacher: CLIPModel, accelerator: Accelerator, cache: torch.Tensor | None = None):
        self.teacher, self.accelerator, self.cache = teacher, accelerator, cache

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[batch["index"].cpu()].to(self.accelerator.device)
        with torch.no_grad(), self.accelerator.autocast():
            pixels = batch["teacher_pixel_values"]
            return self.teacher.get_image_features(pixel_values=pixels).pooler_output.float()

    @classmethod
    @torch.no_grad()
    def precompute(
        cls,
        teacher: CLIPModel,
        dataset,
        teacher_processor,
        batch_size: int,
        accelerator: Accelerator,
        num_workers: int,
        progress_bar: bool = True,
    ) -> "TeacherEmbeddings":
        """Embed every image of `dataset` once, in a fixed order, into an (N, P) float32 CPU cache.

        Each process embeds a shard; `gather_for_metrics` reassembles them (dropping the padding of the last batch).
        The order and batch composition never depend on the training position, so a resumed run gets the same
        values. Only the teacher's preprocessing runs: the student's wavelet transform is not needed here.
        """
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=DistillationCollator(None, teacher_processor),
            num_workers=num_workers,
            worker_init_fn=guard_worker_from_sigterm,
        )
        loader = accelerator.prepare_data_loader(loader)
        cache = None
        show = accelerator.is_main_process and progress_bar
        for batch in tqdm(loader, desc="teacher embeddings", disable=not show):
            embeds = cls(teacher, accelerator)(batch)
            embeds, index = accelerator.gather_for_metrics((embeds, batch["index"]))
            if cache is None:
                cache = torch.zeros(len(dataset), embeds.shape[-1])
            cache[index.cpu()] = embeds.cpu()
        return cls(teacher, accelerator, cache)


__all__ = ["TeacherEmbeddings"]
