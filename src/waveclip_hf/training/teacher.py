"""Train a small CLIP teacher on the generated benchmark, contrastively, with `accelerate`.

The real teacher would be `openai/clip-vit-base-patch16`, which cannot be downloaded here
(docs/distillation.md). This module trains a stand-in with the same interface: the output
folder holds a `CLIPModel`, its tokenizer and a `CLIPImageProcessor`, and loads with
`CLIPModel.from_pretrained` / `AutoTokenizer` / `AutoImageProcessor` like the Hub
checkpoint does.

Read top to bottom: config -> model -> loss -> the training loop (`train_clip_teacher`,
nanoGPT-style: data, model, AdamW + warmup/cosine (the schedule and weight-decay rule of
`optimization.py`, shared with the distiller), the loop, save). The data (a uint8
pixel cache and captions drawn per batch) is `teacher_data.py`.
"""

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from ..data.synthetic import benchmark_axes, label_ids, load_benchmark_split, read_benchmark_info
from ..data.text_tokenizer import build_word_level_tokenizer, clip_text_config_kwargs
from ..evaluation.zero_shot import image_embeddings, text_embeddings_per_axis, zero_shot_accuracy_per_axis
from ..models.waveclip.folder_io import written_atomically
from .config import auto_mixed_precision
from .metrics import start_trackers
from .optimization import cosine_schedule_with_warmup, parameter_groups, set_learning_rate
from .teacher_data import build_image_processor, caption_loader, normalize_pixels, pixel_cache
from .teacher_init import init_from_smaller_teacher


TRAINING_INFO_NAME = "training_info.json"


# Fields added after teachers were first cached: hashed only when they differ from their defaults.
_HASHED_ONLY_WHEN_SET = ("single_axis_captions", "dct_patch_rows", "init_from")
# Knobs that change how a run is watched, not the teacher it trains: never in the hash.
_NOT_HASHED = ("report_to",)


@dataclass
class TeacherTrainingConfig:
    """Every knob of the teacher and its training run.

    The defaults are a ViT with 32-px patches (7x7 = 49 tokens at 224), small enough to
    train on the default benchmark's train split in minutes on a 2-core CPU, yet able to
    read 1-px textures and digits drawn in 2x2 checker blocks (its patch projection sees
    full-resolution pixels).
    """

    # Vision tower.
    image_size: int = 224
    patch_size: int = 32
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 512
    vision_num_layers: int = 4
    vision_num_heads: int = 2
    # Text tower; captions are at most ~16 word-level tokens.
    text_hidden_size: int = 128
    text_intermediate_size: int = 512
    text_num_layers: int = 2
    text_num_heads: int = 2
    max_text_length: int = 24
    projection_dim: int = 64
    # Optimisation.
    # Small batches, many steps: shape is learned step by step, late (it needs the layout
    # of several patches), and 1e-3 or more learned glyphs and shapes slower than 7e-4.
    batch_size: int = 64
    num_epochs: float = 4.0
    learning_rate: float = 7e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    # "no", "bf16" or "fp16", as `accelerate` takes it, or "auto": bf16 where the hardware runs it natively, float32
    # elsewhere (`auto_mixed_precision`, resolved when the config is made, so the cache key holds what ran). bf16
    # autocast is ~1.6x faster than fp32 on a CPU with avx512_bf16 and on any recent GPU, but a CPU without it
    # emulates bf16: about 8x slower than float32 on an AVX2 CPU (9 s a step against 0.64 s for the 448-px teacher).
    mixed_precision: str = "auto"
    # Probability that a training caption names every axis; otherwise it names a random
    # subset (see `sample_caption`), which is what teaches single-axis prompts.
    full_caption_probability: float = 0.25
    # The text tower stays at its random initialisation for this fraction of the steps.
    # Trained jointly from the start, it learns within a few hundred steps to ignore the
    # words the image tower cannot see yet (shape, glyph: slower to learn than colour and
    # texture), which removes the image tower's only gradient towards them; the two then
    # sit at that saddle for good (measured: shape and glyph at chance without the
    # freeze, 60% and 100% with it). A fixed random text tower still tells every word
    # apart, so the image tower learns all axes first; then both towers align.
    text_freeze_fraction: float = 0.3
    # Name exactly one axis in every caption that is not a full one (instead of a random subset): each caption is
    # then a single-axis prompt, so every axis gets an equal share of the contrastive gradient.
    single_axis_captions: bool = False
    # Initialise the first `dct_patch_rows` rows of the patch projection as the lowest-frequency 2-D DCT basis
    # functions of one colour channel each (unit norm; 0: all rows random, as CLIP). They hand the transformer the
    # coarse layout of every patch (edges and their positions) from step 0; shape is learned from that layout.
    dct_patch_rows: int = 0
    # A trained teacher folder at a lower resolution to start from (`teacher_init.init_from_smaller_teacher`: same
    # patch grid, patch kernel upsampled, text embeddings copied word by word); None: a fresh CLIP.
    init_from: str | None = None
    num_train_images: int | None = None  # None: the whole train split.
    seed: int = 0
    # Experiment trackers for accelerate to log the loss and learning rate to (e.g. ["tensorboard"]).
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.mixed_precision == "auto":
            self.mixed_precision = auto_mixed_precision()
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                f"`mixed_precision` must be 'auto', 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}."
            )

    def config_hash(self, data_info: dict | None = None) -> str:
        """Short hash of this config (and of the benchmark's info): equal hashes, same teacher."""
        config = asdict(self)
        for name in _HASHED_ONLY_WHEN_SET:  # so that adding a knob keeps every cached teacher valid
            if config[name] == TeacherTrainingConfig.__dataclass_fields__[name].default:
                del config[name]
        for name in _NOT_HASHED:
            del config[name]
        payload = json.dumps({"config": config, "data": data_info}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_clip_config(config: TeacherTrainingConfig, tokenizer) -> CLIPConfig:
    """A small `CLIPConfig` from the training config and the tokenizer's vocabulary."""
    text_config = {
        "hidden_size": config.text_hidden_size,
        "intermediate_size": config.text_intermediate_size,
        "num_hidden_layers": config.text_num_layers,
        "num_attention_heads": config.text_num_heads,
        "projection_dim": config.projection_dim,
        **clip_text_config_kwargs(tokenizer),
    }
    vision_config = {
        "hidden_size": config.vision_hidden_size,
        "intermediate_size": config.vision_intermediate_size,
        "num_hidden_layers": config.vision_num_layers,
        "num_attention_heads": config.vision_num_heads,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "projection_dim": config.projection_dim,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=config.projection_dim)


@torch.no_grad()
def init_patch_projection_dct(weight: torch.Tensor, num_rows: int) -> None:
    """Overwrite rows [0, num_rows) of a (hidden, C, P, P) patch projection, in place, with unit-norm 2-D DCT-II
    basis functions of one channel each, lowest frequency (u + v) first, channels interleaved."""
    hidden, channels, patch, _ = weight.shape
    if not 0 < num_rows <= min(hidden, channels * patch * patch):
        raise ValueError(f"`dct_patch_rows` must be in 1..{min(hidden, channels * patch * patch)}, got {num_rows}.")
    frequencies = sorted(((u, v) for u in range(patch) for v in range(patch)), key=lambda f: (f[0] + f[1], f))
    x = torch.arange(patch, dtype=torch.float64)
    rows = torch.zeros(num_rows, channels, patch, patch, dtype=torch.float64)
    for row in range(num_rows):
        (u, v), channel = frequencies[row // channels], row % channels
        basis = torch.outer(
            torch.cos(math.pi * (2 * x + 1) * u / (2 * patch)), torch.cos(math.pi * (2 * x + 1) * v / (2 * patch))
        )
        rows[row, channel] = basis / basis.norm()
    weight[:num_rows] = rows.to(weight.dtype)


def multi_positive_clip_loss(logits_per_image: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss, with every true caption counted as a positive.

    CLIP's loss takes caption i as the only match of image i. With captions that name
    only some axes ("a star"), the other star images in the batch are matches too, and
    CLIP's loss would push them away from the caption. Here the target of each row
    (and column) is uniform over its matches, as in UniCL (Yang et al., 2022). With
    full, distinct captions it is exactly CLIP's loss.

    Args:
        logits_per_image: (B, B) scaled cosine similarities, image i x caption j.
        matches: (B, B) bool, caption j is true of image i; the diagonal must be True.

    Returns:
        Scalar loss.
    """
    targets = matches.to(logits_per_image.dtype)
    image_loss = -(targets / targets.sum(1, keepdim=True) * logits_per_image.log_softmax(dim=1)).sum(1).mean()
    text_loss = -(targets / targets.sum(0, keepdim=True) * logits_per_image.log_softmax(dim=0)).sum(0).mean()
    return (image_loss + text_loss) / 2


@dataclass
class TeacherTrainingResult:
    """What `train_clip_teacher` did: where the teacher is and how training went."""

    output_dir: Path
    skipped: bool  # True when a finished teacher with the same config hash was reused
    info: dict  # the contents of training_info.json


def read_training_info(output_dir: str | os.PathLike) -> dict | None:
    """`training_info.json` of a finished teacher folder, or None."""
    path = Path(output_dir) / TRAINING_INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def train_clip_teacher(
    data_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: TeacherTrainingConfig | None = None,
    num_workers: int = 2,
    progress: bool = True,
    evaluate_split: str | None = "validation",
) -> TeacherTrainingResult:
    """Train a CLIP teacher on (image, caption) pairs of the benchmark's train split.

    Idempotent: if `output_dir` holds a finished teacher whose config hash (config +
    benchmark info) matches, nothing is trained. The folder is written under a temporary
    name and renamed at the end, so it is either complete or absent.

    Args:
        data_root: a folder made by `generate_benchmark`.
        output_dir: where the `save_pretrained` folder goes (model, tokenizer, image
            processor, and `training_info.json` with config, losses and timings).
        config: model and optimisation settings; default `TeacherTrainingConfig()`.
        num_workers: processes used to build the pixel cache.
        progress: show tqdm progress bars.
        evaluate_split: split to score zero-shot at the end (stored in the info), or None.

    Returns:
        A `TeacherTrainingResult`.
    """
    config = config or TeacherTrainingConfig()
    data_root, output_dir = Path(data_root), Path(output_dir)
    finished = _finished_teacher(config, data_root, output_dir)
    if finished is not None:
        return finished

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # Trackers (TensorBoard, W&B, ...) beside the folder, which is replaced whole when the teacher is saved:
        # TensorBoard writes under <output_dir>-logs/teacher.
        log_with=list(config.report_to) or None,
        project_dir=output_dir.with_name(output_dir.name + "-logs"),
    )
    start_trackers(accelerator, "teacher", asdict(config))
    set_seed(config.seed)
    data = _TeacherData.load(config, data_root, accelerator, num_workers, progress)
    model = CLIPModel(build_clip_config(config, data.tokenizer))
    if config.dct_patch_rows:
        init_patch_projection_dct(model.vision_model.embeddings.patch_embedding.weight, config.dct_patch_rows)
    if config.init_from:
        init_from_smaller_teacher(model, data.tokenizer, config.init_from)
    # CLIP's betas and eps; weight decay and schedule as every trainer here (`optimization.py`), decaying to 0.
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.learning_rate, betas=(0.9, 0.98), eps=1e-6
    )
    total_steps = _total_steps(config, data.num_images, accelerator.num_processes)
    warmup_steps = round(config.warmup_fraction * total_steps)
    text_params = [*model.text_model.parameters(), *model.text_projection.parameters()]
    text_frozen_steps = round(config.text_freeze_fraction * total_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, data.loader)

    losses, step = [], 0
    images_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    batches = _epochs(loader)
    model.train()
    start = time.perf_counter()
    bar = tqdm(
        total=total_steps, desc="training teacher", unit="step", disable=not (progress and accelerator.is_main_process)
    )
    while step < total_steps:
        batch = next(batches)
        set_learning_rate(
            optimizer, config.learning_rate * cosine_schedule_with_warmup(step, warmup_steps, total_steps)
        )
        with accelerator.accumulate(model):
            matches = batch.pop("caption_matches")  # (B, B): caption j is true of image i
            with accelerator.autocast():
                logits = model(**batch).logits_per_image.float()  # (B, B)
            loss = multi_positive_clip_loss(logits, matches)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if step < text_frozen_steps:
                    for p in text_params:
                        p.grad = None  # AdamW skips parameters without a gradient
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue  # accumulating gradients: not an optimizer step yet
        with torch.no_grad():  # CLIP clamps the learned temperature at 100 to keep the loss stable.
            accelerator.unwrap_model(model).logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(accelerator.gather(loss.detach()).mean().item())
        accelerator.log({"loss": losses[-1], "lr": optimizer.param_groups[0]["lr"]}, step=step)
        bar.set_postfix(
            loss=f"{losses[-1]:.3f}", img_s=f"{step * images_per_step / (time.perf_counter() - start):.0f}"
        )
        bar.update()
    bar.close()
    accelerator.end_training()
    timing = {"images_seen": step * images_per_step, "train_seconds": time.perf_counter() - start}
    return _save_trained_teacher(
        accelerator, model, data, config, data_root, output_dir, losses, timing, evaluate_split, num_workers, progress
    )


def _finished_teacher(
    config: TeacherTrainingConfig, data_root: Path, output_dir: Path
) -> "TeacherTrainingResult | None":
    """The teacher already in `output_dir` when its config hash (config + benchmark info) matches, else None."""
    data_info = read_benchmark_info(data_root)
    if data_info is None:
        raise FileNotFoundError(
            f"{data_root} holds no generated benchmark (no info.json); run generate_benchmark first"
        )
    existing = read_training_info(output_dir)
    if existing is not None and existing.get("config_hash") == config.config_hash(data_info):
        return TeacherTrainingResult(output_dir, skipped=True, info=existing)
    return None


def _save_trained_teacher(
    accelerator, model, data, config, data_root, output_dir, losses, timing, evaluate_split, num_workers, progress
) -> TeacherTrainingResult:
    """On the main process: the training info (plus zero-shot accuracy on `evaluate_split`) and the folder."""
    accelerator.wait_for_everyone()
    info = {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model).eval()
        info = _training_info(config, data_root, data.num_images, losses, **timing)
        if evaluate_split is not None:
            info[f"zero_shot_{evaluate_split}"] = evaluate_clip_zero_shot(
                model,
                data.tokenizer,
                data.image_processor,
                data_root,
                evaluate_split,
                num_workers=num_workers,
                progress=progress,
            )
        _save_teacher(output_dir, model, data.tokenizer, data.image_processor, info)
    accelerator.wait_for_everyone()
    return TeacherTrainingResult(output_dir, skipped=False, info=info)


@dataclass
class _TeacherData:
    """The training data of one teacher run: rows of the train split, the tokenizer built from their captions, the
    image processor and the caption loader."""

    rows: list
    num_images: int
    tokenizer: object
    image_processor: CLIPImageProcessorPil
    loader: torch.utils.data.DataLoader

    @classmethod
    def load(
        cls, config: TeacherTrainingConfig, data_root: Path, accelerator: Accelerator, num_workers: int, progress: bool
    ) -> "_TeacherData":
        rows = load_benchmark_split(data_root, "train")
        num_images = len(rows) if config.num_train_images is None else min(config.num_train_images, len(rows))
        image_processor = build_image_processor(config.image_size)
        with accelerator.main_process_first():
            pixels = pixel_cache(
                data_root, "train", image_processor, num_workers, progress and accelerator.is_main_process
            )
        # The vocabulary: every caption word plus the words of the zero-shot prompts of the benchmark's own axes.
        axes = benchmark_axes(read_benchmark_info(data_root))
        tokenizer = build_word_level_tokenizer(
            [row["caption"] for row in rows] + [p for axis in axes.values() for p in axis.prompts()],
            max_length=config.max_text_length,
        )
        loader = caption_loader(
            pixels,
            num_images,
            rows,
            tokenizer,
            image_processor,
            config.batch_size,
            config.full_caption_probability,
            config.seed,
            accelerator.process_index,
            axes=tuple(axes),
            single_axis=config.single_axis_captions,
        )
        if len(loader) == 0:
            raise ValueError(
                f"{num_images} training images make no full batch of {config.batch_size}: lower "
                "`batch_size` or raise `num_train_images`."
            )
        return cls(rows, num_images, tokenizer, image_processor, loader)


def _total_steps(config: TeacherTrainingConfig, num_images: int, num_processes: int) -> int:
    """Optimizer steps for `config.num_epochs` passes over `num_images` (full batches only)."""
    batches_per_epoch = num_images // config.batch_size // num_processes
    return max(1, math.ceil(config.num_epochs * batches_per_epoch / config.gradient_accumulation_steps))


def _epochs(loader):
    """The loader's batches, epoch after epoch (a fresh shuffle each), without end."""
    while True:
        yield from loader


def _training_info(config, data_root, num_images, losses, images_seen, train_seconds) -> dict:
    """The contents of `training_info.json`: config and its hash, data, steps, timings and losses."""
    data_info = read_benchmark_info(data_root)
    return {
        "config_hash": config.config_hash(data_info),
        "config": asdict(config),
        "data": {"root": str(data_root), "info": data_info, "num_train_images": num_images},
        "steps": len(losses),
        "images_seen": images_seen,
        "train_seconds": round(train_seconds, 1),
        "images_per_second": round(images_seen / train_seconds, 1),
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-10:])),
        "losses": [round(v, 4) for v in losses],
    }


def _save_teacher(output_dir: Path, model, tokenizer, image_processor, info: dict) -> None:
    """Write the `save_pretrained` folder under a temporary name, then swap it in."""
    with written_atomically(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        (tmp / TRAINING_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")


@torch.no_grad()
def evaluate_clip_zero_shot(
    model: CLIPModel,
    tokenizer,
    image_processor: CLIPImageProcessorPil,
    data_root: str | os.PathLike,
    split: str = "test",
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
) -> dict[str, float]:
    """Zero-shot top-1 accuracy of a CLIP model on every axis of a benchmark split.

    Each axis of the benchmark (`benchmark_axes` of its info.json) is a separate classification over its class
    prompts (`axis.prompts()`).

    Returns:
        axis name -> accuracy in [0, 1].
    """
    model.eval()
    device = next(model.parameters()).device
    rows = load_benchmark_split(data_root, split)
    axes = benchmark_axes(read_benchmark_info(data_root))
    pixels = pixel_cache(data_root, split, image_processor, num_workers, progress)
    text_embeds = text_embeddings_per_axis(model, tokenizer, {name: axis.prompts() for name, axis in axes.items()})
    batches = (
        normalize_pixels(torch.from_numpy(np.array(pixels[a : a + batch_size])), image_processor)
        for a in range(0, len(rows), batch_size)
    )
    image_embeds = image_embeddings(
        lambda x: model.get_image_features(pixel_values=x.to(device)),
        batches,
        total=len(rows),
        progress=progress,
        desc=f"zero-shot {split}",
    )
    labels = {axis: torch.from_numpy(label_ids(rows, axis)) for axis in axes}
    return zero_shot_accuracy_per_axis(image_embeds, labels, text_embeds)


__all__ = [
    "TeacherTrainingConfig",
    "TeacherTrainingResult",
    "build_clip_config",
    "evaluate_clip_zero_shot",
    "init_patch_projection_dct",
    "multi_positive_clip_loss",
    "read_training_info",
    "train_clip_teacher",
]
