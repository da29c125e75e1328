"""Distil a frozen CLIP teacher into a WaveCLIP student with `accelerate` (docs/distillation.md).

This module is the method: the loss (`distillation_loss`) and the training loop (`distill`), which reads top to
bottom like nanoGPT's. Each production concern has a module of its own:

    config.py         `DistillationConfig`: every knob (one CLI flag each)
    data.py           image folders and `datasets`, unreadable files skipped, the collator, the seeded epoch order
    models.py         the frozen teacher and the student converted from it
    teacher_cache.py  the teacher's image embeddings, per batch or cached once
    optimization.py   AdamW parameter groups and the learning-rate schedule
    checkpoints.py    atomic checkpoints that all processes agree on, exact resume
    signals.py        SIGTERM: finish the step, checkpoint, exit with 143
    metrics.py        loss, per-stage cosine, images/s and MFU per logging window; log.jsonl
    validation.py     held-out cosine of every stage to the teacher
    outputs.py        `DistillationResult`, summary.json and the Hub-ready `final/` folder

The student is ``convert_clip_to_waveclip(teacher)``: text tower, text projection and logit scale are the
teacher's and stay frozen (so student text embeddings equal the teacher's bit for bit); only the vision side
trains. One student forward gives the projected embedding after every stage (block-causal mask), so the
per-stage loss costs one forward and one backward:

    loss = sum_s w_s * mean_i (1 - cos(student_s(x_i), teacher(x_i)))
         + kl_weight * sum_s w_s * T^2 * KL(p_teacher(x_i) / T || p_student_s(x_i) / T)   (optional)

where p are zero-shot distributions over a label vocabulary (logit_scale x cosine to the teacher's text
embeddings of the prompts, computed once).
"""

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import CLIPModel

from ..models.waveclip.flops import FLOPS_CONVENTION
from ..models.waveclip.modeling_waveclip import WaveCLIPModel
from .checkpoints import Checkpointer, TrainerState, resume_from_latest
from .config import DistillationConfig
from .data import DistillationCollator, epochs_of_batches, load_distillation_data, record_skipped, training_loader
from .exit_head import distillation_exit_head
from .metrics import (
    TrainingMeter,
    log_main_process,
    peak_tflops,
    start_trackers,
    train_flops_per_image,
    truncate_log,
)
from .models import StudentStages, freeze_text_side, load_teacher, student_from_teacher, teacher_text_embeddings
from .optimization import lr_at, optimizer_groups, set_learning_rate
from .outputs import DistillationResult, gather_skipped, push_folder_to_hub, save_final, summary_line, write_summary
from .signals import SigtermFlag
from .streaming import load_streaming_data, stream_of_batches, streaming_loader
from .teacher_cache import TeacherEmbeddings
from .validation import RunEvaluation


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------


def distillation_loss(
    student_embeds: torch.Tensor,
    teacher_embeds: torch.Tensor,
    stage_weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    text_embeds: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor | None = None,
    kl_weight: float = 0.0,
    kl_temperature: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Stage-weighted cosine distance to the teacher, plus an optional zero-shot KL.

    Args:
        student_embeds: (B, stages, P) projected student embeddings, one per stage (not normalised).
        teacher_embeds: (B, P) projected teacher image embeddings.
        stage_weights: (stages,) weights, summing to 1.
        valid: (B,) bool; invalid rows (unreadable images) do not count. Default: all valid.
        text_embeds: (C, P) L2-normalised label embeddings for the KL (None: no KL).
        logit_scale: exp of the CLIP logit scale (the teacher's; the student's is the same).
        kl_weight, kl_temperature: weight and temperature T of the KL term (scaled by T^2, as Hinton et al.).

    Returns:
        (scalar loss, {"cosine": (stages,) mean cosine per stage, "kl": (stages,) or None}), metrics detached.
    """
    student = F.normalize(student_embeds.float(), dim=-1)
    teacher = F.normalize(teacher_embeds.float(), dim=-1)
    weights = stage_weights.to(student.device)
    if valid is None:
        valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    mask = valid.to(student.dtype)
    count = mask.sum().clamp(min=1.0)

    cosine = (student * teacher[:, None]).sum(-1)  # (B, stages)
    cosine_mean = (cosine * mask[:, None]).sum(0) / count  # (stages,)
    loss = (weights * (1.0 - cosine_mean)).sum()

    kl_mean = None
    if text_embeds is not None and kl_weight > 0:
        scale = float(logit_scale) / kl_temperature
        student_logp = F.log_softmax(scale * student @ text_embeds.T, dim=-1)  # (B, stages, C)
        teacher_logp = F.log_softmax(scale * teacher @ text_embeds.T, dim=-1)[:, None]  # (B, 1, C)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # (B, stages)
        kl_mean = (kl * mask[:, None]).sum(0) / count * kl_temperature**2
        loss = loss + kl_weight * (weights * kl_mean).sum()
    return loss, {"cosine": cosine_mean.detach(), "kl": None if kl_mean is None else kl_mean.detach()}


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def distill(
    config: DistillationConfig,
    evaluate: Callable[[WaveCLIPModel, int], dict] | None = None,
    accelerator: Accelerator | None = None,
) -> DistillationResult:
    """Run (or resume) a distillation and write the Hub-ready folder `output_dir/final`.

    Args:
        config: the run.
        evaluate: `evaluate(student, step) -> metrics`, called on the main process (student unwrapped, eval mode,
            no grad) every `eval_every` steps, at step 0 and at the end. Default: [`StageCosineEvaluation`] on the
            held-out images.
        accelerator: an `Accelerator` to use (default: one built from `config`).

    Returns:
        [`DistillationResult`]; `interrupted=True` when SIGTERM stopped the run after a checkpoint.
    """
    run = prepare_distillation(config, evaluate, accelerator or _make_accelerator(config))
    accelerator, module, optimizer, state = run.accelerator, run.module, run.optimizer, run.state
    progress = tqdm(
        total=run.total_steps,
        initial=state.step,
        desc="distill",
        dynamic_ncols=True,
        disable=not (accelerator.is_main_process and config.progress_bar),
    )
    if config.eval_every and state.step == 0:
        run.evaluate(0)  # the starting point
    meter = TrainingMeter(accelerator, run.flops["total"], run.peak[0], run.log_path, progress)
    # Both resume mid-epoch where the checkpoint left off.
    batches = (stream_of_batches if config.streaming else epochs_of_batches)(accelerator, run.loader, state)
    interrupted = False
    with SigtermFlag() as sigterm:
        while state.step < run.total_steps:
            batch = next(batches)
            lr = lr_at(state.step, config, run.total_steps)
            set_learning_rate(optimizer, lr)
            with accelerator.accumulate(module):
                with accelerator.autocast():
                    student_embeds = module(batch["pixel_values"])  # (B, stages, P)
                teacher_embeds = run.teacher_embeddings(batch)  # (B, P)
                loss, parts = distillation_loss(
                    student_embeds,
                    teacher_embeds,
                    run.stage_weights,
                    batch["valid"],
                    run.text_embeds,
                    run.logit_scale,
                    config.kl_weight,
                    config.kl_temperature,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            record_skipped(state.skipped, batch["skipped"])
            meter.add(loss, parts["cosine"], len(batch["valid"]))
            if not accelerator.sync_gradients:
                continue  # accumulating gradients: not an optimizer step yet
            state.step += 1
            state.images_seen += run.global_batch
            progress.update(1)
            if state.step % config.log_every == 0 or state.step == run.total_steps:
                meter.log(state.step, state.epoch, lr, len(state.skipped))
            with meter.paused():  # evaluation and checkpoints are not training time
                if _due(state.step, config.eval_every, run.total_steps):
                    run.evaluate(state.step)
                if _due(state.step, config.checkpoint_every, run.total_steps):
                    run.checkpointer.save(state, config)
                if sigterm.agreed(accelerator) and state.step < run.total_steps:
                    run.checkpointer.save_unless_saved(state, config)
                    interrupted = True
                    break
    progress.close()
    return finish_distillation(run, meter, interrupted)


def _due(step: int, every: int, total_steps: int) -> bool:
    """A periodic action (`every` 0: never) at `step`; the last step has its own, unconditional one."""
    return bool(every) and step % every == 0 and step < total_steps


def _make_accelerator(config: DistillationConfig) -> Accelerator:
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # The sampler is already seeded per epoch; accelerate need not re-seed it.
        rng_types=[],
        # Trackers (TensorBoard, W&B, ...) beside log.jsonl; TensorBoard writes under output_dir/distill.
        log_with=config.report_to or None,
        project_dir=config.output_dir,
    )


# ----------------------------------------------------------------------------------------------------------------
# Before step 0 and after the last step
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DistillationRun:
    """Everything `distill` builds before step 0 (`prepare_distillation`) and reads in the loop."""

    config: DistillationConfig
    accelerator: Accelerator
    teacher: CLIPModel
    tokenizer: object
    student: WaveCLIPModel
    student_processor: object
    module: torch.nn.Module  # `StudentStages(student)`, prepared (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    teacher_embeddings: TeacherEmbeddings
    text_embeds: torch.Tensor | None  # (C, P) normalised label embeddings for the optional KL
    evaluate: RunEvaluation
    state: TrainerState
    checkpointer: Checkpointer
    num_train_images: int | None  # None: streamed
    num_eval_images: int
    peak: tuple[float, str]  # per-device TFLOPS MFU is measured against, and where the figure comes from
    teacher_processor: object = None  # the teacher's image processor (for `--eval-labelled-data`)

    def __post_init__(self):
        config, accelerator = self.config, self.accelerator
        self.trainable = [p for p in accelerator.unwrap_model(self.module).parameters() if p.requires_grad]
        self.stage_weights = config.resolved_stage_weights(self.student.num_stages)  # (stages,)
        self.logit_scale = float(self.teacher.logit_scale.exp())
        # A stream has no length; the config guarantees max_steps then.
        self.total_steps = config.max_steps or (
            math.ceil(len(self.loader) / config.gradient_accumulation_steps) * config.num_epochs
        )
        self.global_batch = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        self.flops = train_flops_per_image(self.student.config, self.teacher.config, self.teacher_embeddings.cached)

    @property
    def log_path(self) -> Path:
        return Path(self.config.output_dir) / "log.jsonl"


def prepare_distillation(config: DistillationConfig, evaluate, accelerator: Accelerator) -> DistillationRun:
    """Teacher, student, data, optimizer, the teacher-embedding cache, the evaluation, then resume (in this order:
    the student's fresh parameters are drawn from the seeded global RNG, and resume restores every RNG)."""
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    teacher, teacher_processor, tokenizer = load_teacher(config.teacher)
    teacher.to(accelerator.device)
    student, student_processor = student_from_teacher(
        teacher,
        teacher_processor,
        config.levels,
        config.wavelet,
        config.cell_size,
        attention=config.attention,
        band_order=config.band_order,
    )
    text_embeds = None
    if config.label_vocabulary:
        text_embeds = teacher_text_embeddings(teacher, tokenizer, config.label_vocabulary, accelerator.device)
    train_set, eval_set = (load_streaming_data if config.streaming else load_distillation_data)(config)
    module, optimizer, loader = _prepare_training(
        config, accelerator, student, student_processor, teacher_processor, train_set
    )

    eval_batch_size = config.eval_batch_size or config.batch_size
    teacher_embeddings = TeacherEmbeddings(teacher, accelerator)
    if config.cache_teacher_embeddings:
        teacher_embeddings = TeacherEmbeddings.precompute(
            teacher,
            train_set,
            teacher_processor,
            eval_batch_size,
            accelerator,
            config.num_workers,
            config.progress_bar,
        )
    evaluation = RunEvaluation.build(
        accelerator,
        module,
        evaluate,
        eval_set,
        DistillationCollator(student_processor, teacher_processor),
        teacher,
        eval_batch_size,
        text_embeds,
        Path(config.output_dir) / "log.jsonl",
    )
    state, checkpoint = TrainerState(), None
    if config.resume:
        state, checkpoint = resume_from_latest(accelerator, config.output_dir, config)
        if checkpoint is not None and accelerator.is_main_process:
            truncate_log(Path(config.output_dir) / "log.jsonl", state.step)
    run = DistillationRun(
        config,
        accelerator,
        teacher,
        tokenizer,
        student,
        student_processor,
        module,
        optimizer,
        loader,
        teacher_embeddings,
        text_embeds,
        evaluation,
        state,
        Checkpointer(accelerator, config.output_dir, config.keep_checkpoints, checkpoint),
        num_train_images=None if config.streaming else len(train_set),
        num_eval_images=len(eval_set) if eval_set is not None else 0,
        peak=peak_tflops(config, accelerator.device),
        teacher_processor=teacher_processor,
    )
    _log_start(run, None if config.streaming else len(loader))
    start_trackers(accelerator, "distill", dataclasses.asdict(config))
    module.train()
    freeze_text_side(student)
    return run


def _prepare_training(config, accelerator, student, student_processor, teacher_processor, train_set):
    """(module, optimizer, loader) prepared by accelerate: `StudentStages(student)`, AdamW over the student's
    trainable parameters, and the loader of training batches (teacher pixels only when not cached)."""
    collator = DistillationCollator(student_processor, None if config.cache_teacher_embeddings else teacher_processor)
    optimizer = torch.optim.AdamW(optimizer_groups(student, config), lr=config.learning_rate, betas=config.adam_betas)
    if config.streaming:  # each process reads its own part of the stream (`streaming.py`): accelerate must not split
        module, optimizer = accelerator.prepare(StudentStages(student), optimizer)
        return (
            module,
            optimizer,
            streaming_loader(train_set, collator, config.batch_size, config.num_workers, accelerator),
        )
    loader = training_loader(
        train_set,
        collator,
        config.batch_size,
        config.num_workers,
        config.seed,
        pin_memory=accelerator.device.type == "cuda",
    )
    return accelerator.prepare(StudentStages(student), optimizer, loader)


def _log_start(run: DistillationRun, batches_per_epoch: int | None) -> None:
    config, accelerator, flops = run.config, run.accelerator, run.flops
    data = f"a stream of {config.train_data}" if batches_per_epoch is None else f"{run.num_train_images} images"
    epoch = "" if batches_per_epoch is None else f", {batches_per_epoch} batches per epoch per process"
    log_main_process(
        accelerator,
        f"Distilling {config.teacher} into WaveCLIP (levels={config.levels}, cell={config.cell_size}, "
        f"{run.student.num_stages} stages) on {data} ({accelerator.num_processes} "
        f"process(es), global batch {run.global_batch}, {run.total_steps} steps{epoch}). "
        f"Train FLOPs/image {flops['total'] / 1e9:.2f} G ({FLOPS_CONVENTION}); peak "
        f"{run.peak[0]:.3g} TFLOPS per device ({run.peak[1]}).",
    )


def _attach_exit_head(run: DistillationRun) -> None:
    """With a label vocabulary and held-out images, fit the learned exit head and keep it in the student's config,
    so the final folder ships it (`exit_signal="learned"`)."""
    evaluation = getattr(run.evaluate, "evaluate", None)
    if run.text_embeds is None or not hasattr(evaluation, "stage_embeddings"):
        return
    student = run.student
    was_training = student.training
    student.eval()
    head = distillation_exit_head(student, evaluation.stage_embeddings(student), run.text_embeds)
    student.train(was_training)
    if head is not None:
        student.config.exit_head = head
        log_main_process(
            run.accelerator, f"Exit head fitted on {head['examples']} (image, stage, label set) examples."
        )


def finish_distillation(run: DistillationRun, meter: TrainingMeter, interrupted: bool) -> DistillationResult:
    """After the loop: the result and summary.json; unless SIGTERM stopped the run, also the final checkpoint, the
    final evaluation, the Hub-ready folder and the optional upload."""
    config, accelerator, state = run.config, run.accelerator, run.state
    images_per_second, mfu = meter.overall()
    if mfu is not None and mfu > 1.0:
        log_main_process(
            accelerator,
            f"MFU above 100% ({100 * mfu:.0f}%): the peak ({run.peak[0]:.3f} TFLOPS, "
            f"{run.peak[1]}) is too low, e.g. measured while other processes shared "
            "the machine. Pass --peak-tflops.",
            level=logging.WARNING,
        )
    skipped = dict(gather_skipped(accelerator, state.skipped))
    for name, error in run.evaluate.skipped:
        skipped.setdefault(name, error)
    last = run.checkpointer.last
    result = DistillationResult(
        step=state.step,
        total_steps=run.total_steps,
        interrupted=interrupted,
        final_dir=None,
        checkpoint=str(last) if last else None,
        metrics=run.evaluate.metrics,
        train_metrics=meter.last,
        images_per_second=images_per_second,
        mfu=mfu,
        peak_tflops=run.peak[0],
        peak_source=run.peak[1],
        train_flops_per_image=run.flops,
        num_train_images=run.num_train_images,
        num_eval_images=run.num_eval_images,
        global_batch_size=run.global_batch,
        num_processes=accelerator.num_processes,
        skipped_count=len(skipped),
        skipped_examples=[f"{n} ({e})" for n, e in list(skipped.items())[:20]],
    )
    output_dir = Path(config.output_dir)
    if interrupted:
        log_main_process(
            accelerator,
            f"Stopped by SIGTERM after step {state.step}/{run.total_steps}; checkpoint "
            f"saved to {last}. Run again with --resume to continue.",
        )
        write_summary(accelerator, output_dir, result, config)
        accelerator.end_training()
        return result

    # Always, also with checkpoint_every=0: a failure while writing the final folder must not lose the run.
    result.checkpoint = str(run.checkpointer.save_unless_saved(state, config))
    result.metrics = run.evaluate(state.step)
    result.student = run.student
    if accelerator.is_main_process:
        result.zero_shot = labelled_evaluation(run)
        _attach_exit_head(run)
        result.final_dir = str(
            save_final(run.student, run.student_processor, run.tokenizer, config, result, run.teacher.config)
        )
    accelerator.wait_for_everyone()
    log_main_process(accelerator, summary_line(result))
    write_summary(accelerator, output_dir, result, config)
    if config.push_to_hub and accelerator.is_main_process:
        push_folder_to_hub(result.final_dir, config.push_to_hub, private=config.hub_private)
    accelerator.end_training()
    return result


def labelled_evaluation(run: DistillationRun) -> list:
    """`--eval-labelled-data`: zero-shot accuracy of the final student after each stage, and of the teacher, on a
    folder with one subfolder per class (main process; [] without the flag). The card publishes it."""
    config, accelerator = run.config, run.accelerator
    if not config.eval_labelled_data:
        return []
    from ..evaluation.zero_shot import evaluate_labelled_folder

    run.student.eval()
    with torch.no_grad(), accelerator.autocast():
        result = evaluate_labelled_folder(
            run.student,
            run.student_processor,
            run.tokenizer,
            config.eval_labelled_data,
            config.eval_prompt_template,
            config.eval_batch_size or config.batch_size,
            run.teacher,
            run.teacher_processor,
            config.num_workers,
            config.progress_bar,
        )
    log_main_process(
        accelerator,
        f"Zero-shot accuracy on {result.dataset_name} ({result.num_images} images): "
        + ", ".join(f"stage {s} {100 * a:.1f}%" for s, a in enumerate(result.stage_accuracy))
        + f", teacher {100 * result.teacher_accuracy:.1f}%.",
    )
    return [result]


__all__ = [
    "DistillationConfig",
    "DistillationResult",
    "DistillationRun",
    "distill",
    "distillation_loss",
    "finish_distillation",
    "prepare_distillation",
]
