"""Evaluation during distillation: by default the mean cosine of each student stage to the teacher on held-out
images (and, with a label vocabulary, how often each stage's zero-shot top-1 equals the teacher's)."""

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..models.waveclip.modeling_waveclip import WaveCLIPModel
from ..models.waveclip.scoring import zero_shot_logits
from .metrics import append_log
from .models import freeze_text_side


class StageCosineEvaluation:
    """Default evaluation: mean cosine of each student stage to the teacher on held-out images.

    The held-out images are preprocessed and embedded by the teacher once; each call runs one student forward per
    batch. With a label vocabulary it also reports how often each stage's zero-shot top-1 label equals the
    teacher's (`eval/top1_agreement_stage{s}`).

    Call: `evaluation(student: WaveCLIPModel, step: int) -> {"eval/cosine_stage0": ..., "eval/cosine_mean": ...}`.
    """

    def __init__(self, batches: list[dict], text_embeds: torch.Tensor | None = None):
        self.batches, self.text_embeds = batches, text_embeds
        self.num_images = int(sum(b["valid"].sum() for b in batches))

    @classmethod
    @torch.no_grad()
    def build(cls, dataset, collator, teacher, batch_size: int, device, text_embeds=None, autocast=None):
        """Preprocess `dataset` with `collator` (both towers) and embed it with `teacher`, once.

        Returns:
            (the evaluation, [(name, error)] of the held-out images that could not be read)
        """
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
        batches, skipped = [], []
        for batch in loader:
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                teacher_embeds = teacher.get_image_features(
                    pixel_values=batch["teacher_pixel_values"].to(device)
                ).pooler_output.float()
            batches.append(
                {"pixel_values": batch["pixel_values"], "teacher": teacher_embeds.cpu(), "valid": batch["valid"]}
            )
            skipped += batch["skipped"]
        return cls(batches, text_embeds), skipped

    @torch.no_grad()
    def stage_embeddings(self, student: WaveCLIPModel) -> torch.Tensor:
        """(held-out images, S, projection_dim) the student's normalised embeddings after every stage."""
        device = next(student.parameters()).device
        embeds = [
            student.get_image_features(pixel_values=batch["pixel_values"].to(device)).stage_pooler_outputs.float()[
                batch["valid"].to(device)
            ]
            for batch in self.batches
        ]
        return F.normalize(torch.cat(embeds), dim=-1).cpu()

    @torch.no_grad()
    def __call__(self, student: WaveCLIPModel, step: int) -> dict:
        device = next(student.parameters()).device
        sums, agree, count = None, None, 0
        for batch in self.batches:
            valid = batch["valid"].to(device)
            if not valid.any():
                continue
            stages = student.get_image_features(pixel_values=batch["pixel_values"].to(device)).stage_pooler_outputs
            stages = F.normalize(stages.float()[valid], dim=-1)
            teacher = F.normalize(batch["teacher"].to(device)[valid], dim=-1)
            cosine = (stages * teacher[:, None]).sum(-1).sum(0)
            sums = cosine if sums is None else sums + cosine
            if self.text_embeds is not None:
                same = (
                    zero_shot_logits(stages, self.text_embeds).argmax(-1)
                    == zero_shot_logits(teacher, self.text_embeds).argmax(-1)[:, None]
                )
                same = same.sum(0)
                agree = same if agree is None else agree + same
            count += int(valid.sum())
        if count == 0:
            return {}
        metrics = {f"eval/cosine_stage{s}": float(v) / count for s, v in enumerate(sums)}
        metrics["eval/cosine_mean"] = float(sums.mean()) / count
        if agree is not None:
            metrics.update({f"eval/top1_agreement_stage{s}": float(v) / count for s, v in enumerate(agree)})
        return metrics


class RunEvaluation:
    """A run's evaluation: `evaluation(step)` calls `evaluate(student, step)` on the main process (student
    unwrapped, eval mode, no grad, autocast) while the others wait, logs the metrics to the console and
    `log.jsonl`, and keeps the last ones in `metrics`. Call it on every process: `enabled` is the same everywhere,
    so the barriers match."""

    def __init__(
        self,
        accelerator: Accelerator,
        module,
        evaluate: Callable[[WaveCLIPModel, int], dict] | None,
        enabled: bool,
        log_path: Path,
        skipped: list | None = None,
    ):
        self.accelerator, self.module, self.evaluate, self.enabled = accelerator, module, evaluate, enabled
        self.log_path = log_path
        self.skipped = skipped or []  # [(name, error)] of unreadable held-out images
        self.metrics = {}

    @classmethod
    def build(
        cls,
        accelerator: Accelerator,
        module,
        evaluate,
        eval_set,
        collator,
        teacher,
        batch_size: int,
        text_embeds: torch.Tensor | None,
        log_path: Path,
    ) -> "RunEvaluation":
        """`evaluate` if given, else [`StageCosineEvaluation`] on `eval_set` (built on the main process only);
        disabled when there is neither."""
        skipped = []
        if evaluate is None and eval_set is not None and accelerator.is_main_process:
            evaluate, skipped = StageCosineEvaluation.build(
                eval_set, collator, teacher, batch_size, accelerator.device, text_embeds, accelerator.autocast
            )
        enabled = evaluate is not None or eval_set is not None
        return cls(accelerator, module, evaluate, enabled, log_path, skipped)

    def __call__(self, step: int) -> dict:
        if self.enabled:
            self.metrics = self._run(step) or self.metrics
        return self.metrics

    def _run(self, step: int) -> dict:
        accelerator, metrics = self.accelerator, {}
        if accelerator.is_main_process and self.evaluate is not None:
            student = accelerator.unwrap_model(self.module).student
            student.eval()
            with torch.no_grad(), accelerator.autocast():
                metrics = self.evaluate(student, step) or {}
            student.train()
            freeze_text_side(student)
            if metrics:
                tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                append_log(self.log_path, {"step": step, **metrics})
                accelerator.log(metrics, step=step)
        accelerator.wait_for_everyone()
        return metrics


__all__ = ["RunEvaluation", "StageCosineEvaluation"]
