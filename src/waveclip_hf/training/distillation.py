"""Distil a frozen CLIP teacher into a WaveCLIP student with `accelerate` (DESIGN.md §5, docs/distillation.md).

Read top to bottom: config -> data -> teacher and student -> loss -> checkpoints -> FLOPs/MFU -> evaluation ->
the training loop (`distill`) -> the final Hub-ready folder.

The student is ``convert_clip_to_waveclip(teacher)``: text tower, text projection and logit scale are the
teacher's and stay frozen (so student text embeddings equal the teacher's bit for bit); only the vision side
trains. One student forward gives the projected embedding after every stage (block-causal mask), so the
per-stage loss costs one forward and one backward:

    loss = sum_s w_s * mean_i (1 - cos(student_s(x_i), teacher(x_i)))
         + kl_weight * sum_s w_s * T^2 * KL(p_teacher(x_i) / T || p_student_s(x_i) / T)   (optional)

where p are zero-shot distributions over a label vocabulary (logit_scale x cosine to the teacher's text
embeddings of the prompts, computed once).

Checkpoints are `accelerator.save_state` folders written atomically (tmp-step-N, fsync, rename to step-N) plus
`trainer_state.json` (step, epoch, batches consumed in the epoch). The data order is a seeded permutation per
epoch and a resumed run skips the consumed batches with `accelerator.skip_first_batches`, so on CPU in fp32 a
resumed run ends with the same weights, bit for bit, as an uninterrupted one.
"""

import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel

from ..conversion.clip_to_waveclip import convert_clip_to_waveclip
from ..models.waveclip.flops import FLOPS_CONVENTION, clip_vit_flops, full_forward_flops
from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor
from ..models.waveclip.modeling_waveclip import WaveCLIPModel
from ..models.waveclip.scoring import zero_shot_logits


logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: the shell's convention for "stopped by SIGTERM"
_SHOW_SKIPPED = 5  # skipped files named in logs and summaries


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DistillationConfig:
    """Every knob of a distillation run; the CLI (`python -m waveclip_hf.cli.distill`) maps one flag to each field.

    Stage weights: `None` means equal weights, normalised to sum to 1. Every stage is an exit the margin gate can
    take at inference, so each must answer like the teacher on its own; nothing in the method says one exit
    matters more. Equal weights also do not need a ramp to be tuned: the coarse stage has the largest loss
    (it sees a 2^L-times smaller image), so it already pulls hardest on the shared blocks where it lags most,
    while the finest stage, which sees everything the teacher sees, is not starved. Pass e.g. `(1, 2)` to favour
    the full-detail answer instead.

    Optional KL: with a `label_vocabulary` (a list of prompts, e.g. "a photo of a {class}.") and `kl_weight > 0`,
    each stage's zero-shot distribution over the prompts is also matched to the teacher's at `kl_temperature`.
    Off by default: the cosine loss already matches the whole embedding, the quantity every zero-shot label set
    reads, while a KL ties the student to one vocabulary.
    """

    # What to distil, from what, to where.
    teacher: str = "openai/clip-vit-base-patch16"  # hub id or folder of a `CLIPModel`
    train_data: str = ""  # image folder (recursive), `datasets` name/path, or `save_to_disk` folder
    output_dir: str = "waveclip-distilled"
    data_format: str = "auto"  # "auto" | "folder" | "datasets"
    data_split: str = "train"  # split of a `datasets` dataset
    image_column: str = "image"  # column of a `datasets` dataset holding the images
    eval_data: str | None = None  # held-out images (same formats); None: hold out `eval_holdout` training images
    eval_split: str = "validation"
    eval_holdout: int = 128  # images held out of `train_data` when `eval_data` is None (at most 10%; 0: none)
    num_workers: int = 4  # data-loading processes (decode + both image processors run there)

    # Student geometry (see `WaveCLIPVisionConfig`).
    levels: int = 1
    wavelet: str = "haar"
    cell_size: int = 32

    # Optimisation. One "step" is one optimizer update of `batch_size * gradient_accumulation_steps * processes`.
    max_steps: int | None = None  # None: `num_epochs` passes over the data
    num_epochs: int = 1
    batch_size: int = 64  # per device and micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.05  # on matrices and embeddings only (dim >= 2), as nanoGPT
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # The detail projections and band embeddings start at random while everything else starts at the teacher;
    # a larger step for them lets the detail path catch up without shaking the copied blocks.
    fresh_lr_multiplier: float = 10.0
    warmup_steps: int | None = None  # None: `warmup_ratio` of the run
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to `min_lr_ratio * learning_rate`
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    seed: int = 0

    # Loss.
    stage_weights: Sequence[float] | None = None  # None: equal (see the class docstring)
    label_vocabulary: Sequence[str] | None = None  # prompts for the optional zero-shot KL
    kl_weight: float = 1.0  # used only with a label vocabulary
    kl_temperature: float = 1.0
    cache_teacher_embeddings: bool = False  # embed every training image with the teacher once, before step 0

    # Bookkeeping.
    log_every: int = 10
    eval_every: int = 500  # 0: only at the end
    eval_batch_size: int | None = None  # default: `batch_size`
    checkpoint_every: int = 1000  # 0: only at the end (and on SIGTERM)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the last complete checkpoint in `output_dir` (fresh start if none)
    peak_tflops: float | None = None  # per device, for MFU; None: spec sheet (known GPUs) or a measured matmul
    push_to_hub: str | None = None  # repo id to upload the final folder to (opt-in)
    model_card_template: str | None = None  # default: hub_card/README.md.template
    progress_bar: bool = True

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"`mixed_precision` must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        if self.data_format not in ("auto", "folder", "datasets"):
            raise ValueError(f"`data_format` must be 'auto', 'folder' or 'datasets', got {self.data_format!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"`max_steps` must be at least 1, got {self.max_steps}.")
        if self.fresh_lr_multiplier <= 0:
            raise ValueError(f"`fresh_lr_multiplier` must be positive, got {self.fresh_lr_multiplier}.")
        if self.kl_temperature <= 0:
            raise ValueError(f"`kl_temperature` must be positive, got {self.kl_temperature}.")
        self.adam_betas = tuple(self.adam_betas)
        if self.stage_weights is not None:
            self.stage_weights = [float(w) for w in self.stage_weights]
        if self.label_vocabulary is not None:
            self.label_vocabulary = [str(p) for p in self.label_vocabulary]

    def resolved_stage_weights(self, num_stages: int) -> torch.Tensor:
        """(num_stages,) weights summing to 1."""
        weights = [1.0] * num_stages if self.stage_weights is None else list(self.stage_weights)
        if len(weights) != num_stages or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"`stage_weights` must be {num_stages} non-negative numbers (levels={self.levels} gives "
                f"{num_stages} stages) with a positive sum, got {weights}."
            )
        weights = torch.tensor(weights, dtype=torch.float32)
        return weights / weights.sum()


# ----------------------------------------------------------------------------------------------------------------
# Data: image folders or `datasets`, unreadable images skipped and counted
# ----------------------------------------------------------------------------------------------------------------


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """Every file under `root` (recursively) with a common image extension, in a stable (sorted) order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _decode(source) -> PIL.Image.Image:
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
            return {"index": index, "name": name, "image": _decode(path), "error": None}
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
                image = _decode(value["bytes"] if value.get("bytes") is not None else value["path"])
            elif isinstance(value, PIL.Image.Image):
                image = _decode_pil(value)
            elif isinstance(value, str | os.PathLike | bytes):
                image = _decode(value)
            else:
                raise TypeError(f"cannot read an image from a {type(value).__name__}")
            return {"index": index, "name": name, "image": image, "error": None}
        except Exception as error:  # noqa: BLE001
            return {"index": index, "name": name, "image": None, "error": f"{type(error).__name__}: {error}"}


def _decode_pil(image: PIL.Image.Image) -> PIL.Image.Image:
    image.load()
    return PIL.ImageOps.exif_transpose(image).convert("RGB")


def _subset(dataset, indices: Sequence[int]):
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

    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source!r} has splits {list(dataset)}, not {split!r}. Pass --data-split.")
            dataset = dataset[split]
    else:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as error:
            raise ValueError(
                f"Could not load training data {source!r}: it is not a folder with images, and "
                f"`datasets.load_dataset({source!r}, split={split!r})` failed: {error}"
            ) from error
    return HFImageDataset(dataset, image_column, f"{source}[{split}]")


class DistillationCollator:
    """Decoded items -> a batch for both towers; unreadable images become placeholders with `valid=False`.

    Placeholders keep every batch the same size, so a bad file never changes tensor shapes, never leaves a
    batch empty, and never desynchronises processes under DDP; the loss ignores them.

    Returns `{"pixel_values": (B, 3, S, S) student coefficients, "teacher_pixel_values": (B, 3, St, St) or
    absent when teacher embeddings are cached, "valid": (B,) bool, "index": (B,) long, "skipped": [(name,
    error), ...]}`.
    """

    def __init__(self, student_processor, teacher_processor=None):
        self.student_processor = student_processor
        self.teacher_processor = teacher_processor
        size = student_processor.image_size
        self.placeholder = PIL.Image.new("RGB", (size, size), (128, 128, 128))

    def _process(self, processor, images: list) -> torch.Tensor:
        try:
            return processor(images=images, return_tensors="pt")["pixel_values"]
        except Exception:  # noqa: BLE001 - find the culprit(s) one by one below
            return None

    def __call__(self, items: list[dict]) -> dict:
        skipped = [(item["name"], item["error"]) for item in items if item["image"] is None]
        images = [item["image"] if item["image"] is not None else self.placeholder for item in items]
        valid = [item["image"] is not None for item in items]
        processors = [("pixel_values", self.student_processor)]
        if self.teacher_processor is not None:
            processors.append(("teacher_pixel_values", self.teacher_processor))
        batch = {}
        for key, processor in processors:
            pixels = self._process(processor, images)
            if pixels is None:  # a decodable image a processor rejects (e.g. 1x1): isolate it
                rows = []
                for i, image in enumerate(images):
                    row = self._process(processor, [image])
                    if row is None:
                        skipped.append((items[i]["name"], f"{type(processor).__name__} rejected it"))
                        valid[i], images[i] = False, self.placeholder
                        row = processor(images=[self.placeholder], return_tensors="pt")["pixel_values"]
                    rows.append(row)
                pixels = torch.cat(rows)
                # Earlier keys may have been built with the now-invalid images: redo them with placeholders.
                for done_key, done_processor in processors:
                    if done_key in batch:
                        batch[done_key] = done_processor(images=images, return_tensors="pt")["pixel_values"]
            batch[key] = pixels
        batch["valid"] = torch.tensor(valid)
        batch["index"] = torch.tensor([item["index"] for item in items])
        batch["skipped"] = skipped
        return batch


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


# ----------------------------------------------------------------------------------------------------------------
# Teacher and student
# ----------------------------------------------------------------------------------------------------------------


def load_teacher(name_or_path: str, torch_dtype=torch.float32):
    """The frozen teacher, its image processor and tokenizer. Raises a `ValueError` naming anything that is not CLIP.

    Returns:
        (teacher `CLIPModel` in eval mode with `requires_grad=False`, `CLIPImageProcessor`, tokenizer)
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as error:
        raise ValueError(
            f"Could not load a model config from teacher {name_or_path!r}: {error}. Pass the hub id or folder of a "
            "CLIP checkpoint, e.g. --teacher openai/clip-vit-base-patch16."
        ) from error
    if config.model_type != "clip":
        hint = (
            " It is a WaveCLIP student: pass the CLIP checkpoint it was distilled from (its model card names it)."
            if config.model_type.startswith("waveclip") else ""
        )
        raise ValueError(
            f"Teacher {name_or_path!r} is a {config.model_type!r} model ({type(config).__name__}), not a CLIP model: "
            "the distillation needs a transformers `CLIPModel` checkpoint (model_type 'clip'), e.g. "
            f"openai/clip-vit-base-patch16.{hint}"
        )
    try:
        teacher = CLIPModel.from_pretrained(name_or_path, dtype=torch_dtype)
    except Exception as error:  # truncated safetensors, weights from another model, missing weights file, ...
        raise ValueError(
            f"Could not load the CLIP teacher's weights from {name_or_path!r} ({type(error).__name__}: {error}). "
            "Check that its model.safetensors is complete and belongs to its config.json (download it again, or "
            "save the teacher with `CLIPModel.save_pretrained`)."
        ) from error
    teacher.eval().requires_grad_(False)
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:
        raise ValueError(
            f"Teacher {name_or_path!r} has weights but not a loadable image processor and tokenizer "
            f"({type(error).__name__}: {error}). A teacher folder needs preprocessor_config.json and the tokenizer "
            "files: save them with `CLIPProcessor.save_pretrained(folder)` (or the image processor and tokenizer "
            "separately)."
        ) from error
    # Without tokenizer files transformers builds an empty CLIPTokenizer (only special tokens) instead of failing:
    # every prompt would tokenise to the same ids and the student's card would ship a useless tokenizer.
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(
            f"Teacher {name_or_path!r} has no tokenizer vocabulary (the tokenizer files are missing: tokenizer.json, "
            "or vocab.json + merges.txt). Save the teacher's tokenizer into the folder with "
            "`tokenizer.save_pretrained(folder)`."
        )
    return teacher, processor, tokenizer


def build_student(teacher: CLIPModel, teacher_processor, levels: int, wavelet: str, cell_size: int):
    """``convert_clip_to_waveclip(teacher)`` and its `WaveCLIPImageProcessor`; only the vision side trains.

    Returns:
        (student `WaveCLIPModel`, `WaveCLIPImageProcessor`)
    """
    image_size = teacher.config.vision_config.image_size
    processor = WaveCLIPImageProcessor(image_size=image_size, wavelet=wavelet, levels=levels)
    student = convert_clip_to_waveclip(
        teacher,
        teacher_image_mean=list(getattr(teacher_processor, "image_mean", None) or []) or None,
        teacher_image_std=list(getattr(teacher_processor, "image_std", None) or []) or None,
        image_processor=processor,
        levels=levels,
        wavelet=wavelet,
        cell_size=cell_size,
    )
    freeze_text_side(student)
    return student, processor


def freeze_text_side(student: WaveCLIPModel) -> None:
    """Text tower, text projection and logit scale stay the teacher's: no gradient, no weight decay, eval mode."""
    for module in (student.text_model, student.text_projection):
        module.requires_grad_(False)
    student.logit_scale.requires_grad_(False)
    student.text_model.eval()


class StudentStages(nn.Module):
    """The student's vision side as one module, so DDP sees a forward: (B, 3, S, S) -> (B, stages, projection)."""

    def __init__(self, student: WaveCLIPModel):
        super().__init__()
        self.student = student

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.student.get_image_features(pixel_values=pixel_values).stage_pooler_outputs


@torch.no_grad()
def teacher_text_embeddings(teacher: CLIPModel, tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    """L2-normalised teacher text embeddings of `prompts`, (num_prompts, projection_dim) float32."""
    inputs = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
    embeds = teacher.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return F.normalize(embeds.pooler_output.float(), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Loss
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


def fresh_parameter_names(student: WaveCLIPModel) -> list[str]:
    """Names of the student parameters `convert_clip_to_waveclip` initialises at random (the teacher has no counterpart):
    the detail stages' patch projections and the band embeddings."""
    embeddings = student.vision_model.embeddings
    modules = (*embeddings.patch_embeddings[1:], embeddings.band_embedding)
    fresh = {id(parameter) for module in modules for parameter in module.parameters()}
    return [name for name, parameter in student.named_parameters() if id(parameter) in fresh]


def optimizer_groups(student: WaveCLIPModel, config: DistillationConfig) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices and embeddings only (dim >= 2); the fresh parameters
    (`fresh_parameter_names`) at `fresh_lr_multiplier` times the learning rate. Each group carries `lr_scale`,
    which the schedule multiplies in."""
    fresh = set(fresh_parameter_names(student))
    groups = {}
    for name, parameter in student.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = parameter.dim() >= 2
        scale = config.fresh_lr_multiplier if name in fresh else 1.0
        group = groups.setdefault((decay, scale), {"params": [], "lr_scale": scale,
                                                   "weight_decay": config.weight_decay if decay else 0.0})
        group["params"].append(parameter)
    return list(groups.values())


def lr_at(step: int, config: DistillationConfig, total_steps: int) -> float:
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio * learning_rate` at `total_steps`."""
    warmup = warmup_steps(config, total_steps)
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def warmup_steps(config: DistillationConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return config.warmup_steps
    return int(config.warmup_ratio * total_steps)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: tmp-step-N -> fsync -> rename to step-N; resume from the last complete one
# ----------------------------------------------------------------------------------------------------------------


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-") :])
    except ValueError:
        return None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`step-N` folders with a trainer state), oldest first. `tmp-*` are never complete."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return [p for step, p in sorted(found) if (p / TRAINER_STATE_NAME).is_file()]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The last complete checkpoint under `output_dir/checkpoints`, or None."""
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so a rename after it publishes complete data."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Delete a folder without ever leaving a half-deleted `step-N`: rename it to tmp-* first."""
    if not path.exists():
        return
    doomed = path.with_name(f"tmp-delete-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, step: int, trainer_state: dict,
                    keep: int) -> Path:
    """Write `checkpoints/step-<step>` atomically and keep the last `keep` complete checkpoints.

    `accelerator.save_state` (model, optimizer, grad scaler, RNG states) and `trainer_state.json` go to
    `tmp-step-<step>`; once every file is fsync'ed the folder is renamed to `step-<step>` (`os.replace`, atomic on
    POSIX). A crash or a full disk at any point leaves at worst a `tmp-*` folder, which resume ignores and the next
    save deletes. On an `OSError` the temporary folder is removed and the error re-raised.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    tmp, final = root / f"tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("tmp-*"):  # left by a crash or a full disk
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            with open(tmp / TRAINER_STATE_NAME, "w") as f:
                json.dump(trainer_state, f, indent=2)
            _fsync_tree(tmp)
    except OSError as caught:
        error = caught
    # Every process must learn about a failure anywhere before anyone renames.
    failed = torch.tensor(float(error is not None), device=accelerator.device)
    failed = accelerator.reduce(failed, reduction="sum") if accelerator.num_processes > 1 else failed
    if failed.item() > 0:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if error is None:
            error = OSError(f"writing checkpoint {final} failed on another process")
        previous = latest_checkpoint(output_dir)
        raise OSError(
            f"Could not write checkpoint {final} ({error}); nothing was published and earlier checkpoints are intact "
            f"(the last complete one is {previous or 'none: this was the first'}). Free disk space and resume with "
            "--resume."
        ) from error
    if accelerator.is_main_process:
        _remove_tree(final)  # only when re-saving a step, e.g. the end of a run resumed at its last checkpoint
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(output_dir)[:-keep]:
            _remove_tree(old)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------------------
# Throughput: FLOPs per image and the peak they are compared with
# ----------------------------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (TFLOPS, no sparsity) from the vendors' spec sheets; first match wins.
_GPU_BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def train_flops_per_image(student_config, teacher_config, teacher_cached: bool) -> dict:
    """Model FLOPs per training image: 3 x the student's full forward (forward + backward ~ 2 x forward) plus one
    teacher image forward (none when teacher embeddings are cached). Convention: `flops.FLOPS_CONVENTION`."""
    student_forward = full_forward_flops(student_config)
    teacher_forward = 0 if teacher_cached else clip_vit_flops(teacher_config.vision_config, teacher_config.projection_dim)
    return {
        "student_forward": student_forward,
        "teacher_forward": teacher_forward,
        "total": 3 * student_forward + teacher_forward,
    }


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                          seconds: float = 0.5) -> float:
    """Best achieved TFLOPS of a square matmul on `device`: a quick, honest stand-in for an unknown peak."""
    repeats = 4 if device.type == "cuda" else 1  # many short rounds on a CPU: the best one is the least disturbed
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):  # warm-up (kernel selection, thread pools)
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:  # at least one timed round
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, repeats * 2 * size**3 / (time.perf_counter() - start) / 1e12)
    return best


def peak_tflops(config: DistillationConfig, device: torch.device) -> tuple[float, str]:
    """The per-device peak MFU is measured against, and where it comes from."""
    if config.peak_tflops:
        return config.peak_tflops, "given (--peak-tflops)"
    if device.type == "cuda" and config.mixed_precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_BF16_PEAK_TFLOPS:
            if key in name:
                return value, f"{name} dense bf16/fp16 spec sheet"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    if device.type == "cpu":
        dtype = torch.float32  # CPU autocast runs matmuls in bf16 only where supported; fp32 is the honest peak
    size = 4096 if device.type == "cuda" else 2048  # 1024 on CPU reads ~25% lower than 2048 (cache effects)
    measured = measure_matmul_tflops(device, dtype, size=size, seconds=2.0)
    return measured, f"measured {size}x{size} {str(dtype).removeprefix('torch.')} matmul on {device.type}"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


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
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
        batches, skipped = [], []
        for batch in loader:
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                teacher_embeds = teacher.get_image_features(
                    pixel_values=batch["teacher_pixel_values"].to(device)
                ).pooler_output.float()
            batches.append({"pixel_values": batch["pixel_values"], "teacher": teacher_embeds.cpu(),
                            "valid": batch["valid"]})
            skipped += batch["skipped"]
        return cls(batches, text_embeds), skipped

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
                same = zero_shot_logits(stages, self.text_embeds).argmax(-1) == zero_shot_logits(
                    teacher, self.text_embeds).argmax(-1)[:, None]
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


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM: finish the step, checkpoint, exit
# ----------------------------------------------------------------------------------------------------------------


def _guard_worker_from_sigterm(worker_id: int) -> None:
    """Data-loader workers survive a SIGTERM sent to the whole process group, but obey their own parent's.

    Schedulers (Slurm, `kill -TERM -<pgid>`, `docker stop` of a shell) signal every process of the group; a worker
    dying would crash the main process before it can checkpoint. Simply ignoring SIGTERM is not enough: when the
    main process exits on an exception, `multiprocessing` terminates its daemonic workers with SIGTERM and joins
    them, which would then wait forever. So SIGTERM is blocked here and a thread reads it with `sigwaitinfo`: from
    the parent (or once orphaned) the worker exits, from anyone else it is ignored. Where `sigwaitinfo` does not
    exist (macOS, Windows) the default behaviour is kept.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait_for_parent():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait_for_parent, name="sigterm-guard", daemon=True).start()


class _StopFlag:
    """Set by SIGTERM; the loop checks it after each optimizer step."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("SIGTERM received: finishing the current step, then saving a checkpoint.")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DistillationResult:
    """What `distill` returns (also written to `output_dir/summary.json`)."""

    step: int
    total_steps: int
    interrupted: bool  # stopped by SIGTERM after saving a checkpoint
    final_dir: str | None  # the Hub-ready folder (None when interrupted)
    checkpoint: str | None  # the last checkpoint written
    metrics: dict  # last evaluation
    train_metrics: dict  # last logged training metrics
    images_per_second: float | None
    mfu: float | None
    peak_tflops: float
    peak_source: str
    train_flops_per_image: dict
    num_train_images: int
    num_eval_images: int
    global_batch_size: int
    num_processes: int
    skipped_count: int
    skipped_examples: list
    student: WaveCLIPModel | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "student"}


def _make_accelerator(config: DistillationConfig) -> Accelerator:
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # The sampler below is already seeded per epoch; accelerate need not re-seed it.
        rng_types=[],
    )


def distill(config: DistillationConfig, evaluate: Callable[[WaveCLIPModel, int], dict] | None = None,
            accelerator: Accelerator | None = None) -> DistillationResult:
    """Run (or resume) a distillation and write the Hub-ready folder `output_dir/final`.

    Args:
        config: the run.
        evaluate: `evaluate(student, step) -> metrics`, called on the main process (student unwrapped, eval mode,
            no grad) every `eval_every` steps and at the end. Default: [`StageCosineEvaluation`] on the held-out
            images.
        accelerator: an `Accelerator` to use (default: one built from `config`).

    Returns:
        [`DistillationResult`]; `interrupted=True` when SIGTERM stopped the run after a checkpoint.
    """
    accelerator = accelerator or _make_accelerator(config)
    main = accelerator.is_main_process
    output_dir = Path(config.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    device = accelerator.device
    set_seed(config.seed)

    # -- models ---------------------------------------------------------------------------------------------
    teacher, teacher_processor, tokenizer = load_teacher(config.teacher)
    teacher.to(device)
    student, student_processor = build_student(teacher, teacher_processor, config.levels, config.wavelet,
                                               config.cell_size)
    stage_weights = config.resolved_stage_weights(student.num_stages)
    text_embeds = None
    if config.label_vocabulary:
        text_embeds = teacher_text_embeddings(teacher, tokenizer, config.label_vocabulary, device)
    logit_scale = float(teacher.logit_scale.exp())

    # -- data -----------------------------------------------------------------------------------------------
    train_set = load_image_dataset(config.train_data, config.data_format, config.data_split, config.image_column)
    if config.eval_data:
        eval_set = load_image_dataset(config.eval_data, config.data_format, config.eval_split, config.image_column)
    else:
        holdout = min(config.eval_holdout, len(train_set) // 10)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed)).tolist()
        eval_set = _subset(train_set, sorted(order[:holdout])) if holdout else None
        train_set = _subset(train_set, sorted(order[holdout:])) if holdout else train_set
    if len(train_set) == 0:
        raise ValueError(f"No training images in {config.train_data!r}.")
    eval_batch_size = config.eval_batch_size or config.batch_size

    collator = DistillationCollator(student_processor, None if config.cache_teacher_embeddings else teacher_processor)
    sampler = EpochPermutationSampler(len(train_set), config.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=collator,
        num_workers=config.num_workers, pin_memory=device.type == "cuda", drop_last=False,
        persistent_workers=config.num_workers > 0, worker_init_fn=_guard_worker_from_sigterm,
        generator=torch.Generator().manual_seed(config.seed),  # workers' base seed; keeps global RNG untouched
    )

    optimizer = torch.optim.AdamW(optimizer_groups(student, config), lr=config.learning_rate, betas=config.adam_betas)
    module = StudentStages(student)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)

    batches_per_epoch = len(loader)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    global_batch = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes

    # -- teacher embeddings, cached once (optional) ---------------------------------------------------------
    teacher_cache = None
    if config.cache_teacher_embeddings:
        teacher_cache = _embed_all(teacher, train_set, teacher_processor, student_processor, eval_batch_size,
                                   accelerator, config.num_workers, config.progress_bar)

    # -- evaluation (runs on the main process; `do_eval` is the same everywhere, so the barriers match) --------
    do_eval = evaluate is not None or eval_set is not None
    eval_skipped = []
    if evaluate is None and eval_set is not None and main:
        eval_collator = DistillationCollator(student_processor, teacher_processor)
        evaluate, eval_skipped = StageCosineEvaluation.build(
            eval_set, eval_collator, teacher, eval_batch_size, device, text_embeds, accelerator.autocast
        )

    # -- resume ---------------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "images_seen": 0, "skipped": {}}
    checkpoint = None
    if config.resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            _log(accelerator, f"--resume: no complete checkpoint in {output_dir / CHECKPOINTS_DIR}; starting fresh.")
        else:
            accelerator.load_state(str(checkpoint))
            saved = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
            _warn_config_changes(accelerator, saved.get("config", {}), config)
            state.update({k: saved[k] for k in state})
            _log(accelerator, f"Resumed from {checkpoint} at step {state['step']} (epoch {state['epoch']}, "
                              f"{state['batches_in_epoch']} batches into it).")
            if main:
                _truncate_log(output_dir / "log.jsonl", state["step"])

    # -- throughput yardsticks ------------------------------------------------------------------------------
    flops = train_flops_per_image(student.config, teacher.config, teacher_cache is not None)
    peak, peak_source = peak_tflops(config, device)
    _log(accelerator,
         f"Distilling {config.teacher} into WaveCLIP (levels={config.levels}, cell={config.cell_size}, "
         f"{student.num_stages} stages) on {len(train_set)} images ({accelerator.num_processes} process(es), "
         f"global batch {global_batch}, {total_steps} steps, {batches_per_epoch} batches per epoch per process). "
         f"Train FLOPs/image {flops['total'] / 1e9:.2f} G ({FLOPS_CONVENTION}); peak {peak:.3g} TFLOPS per "
         f"device ({peak_source}).")

    # -- the loop -------------------------------------------------------------------------------------------
    module.train()
    freeze_text_side(student)
    trainable = [p for p in accelerator.unwrap_model(module).parameters() if p.requires_grad]
    progress = tqdm(total=total_steps, initial=state["step"], disable=not (main and config.progress_bar),
                    desc="distill", dynamic_ncols=True)
    window = {"loss": 0.0, "cosine": 0.0, "micro": 0, "images": 0, "time": 0.0}
    throughput, train_metrics, eval_metrics, last_saved = [], {}, {}, None
    interrupted = False
    step = state["step"]

    if do_eval and config.eval_every and step == 0:
        eval_metrics = _run_evaluation(accelerator, module, evaluate, 0, output_dir)  # the starting point

    with _StopFlag() as stop:
        clock = time.perf_counter()
        while step < total_steps:
            loader.set_epoch(state["epoch"])
            batches = loader
            if state["batches_in_epoch"]:
                batches = accelerator.skip_first_batches(loader, state["batches_in_epoch"])
                batches.set_epoch(state["epoch"])
            for batch in batches:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, config, total_steps) * group["lr_scale"]
                with accelerator.accumulate(module):
                    with accelerator.autocast():
                        student_embeds = module(batch["pixel_values"])
                    teacher_embeds = _teacher_embeds(teacher, batch, teacher_cache, accelerator)
                    loss, parts = distillation_loss(
                        student_embeds, teacher_embeds, stage_weights, batch["valid"], text_embeds, logit_scale,
                        config.kl_weight, config.kl_temperature,
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state["batches_in_epoch"] += 1
                for name, error in batch["skipped"]:
                    if name not in state["skipped"]:
                        state["skipped"][name] = error
                        if len(state["skipped"]) <= _SHOW_SKIPPED:
                            logger.warning("Skipping unreadable image %s (%s)", name, error)
                window["loss"] += loss.detach()
                window["cosine"] += parts["cosine"]
                window["micro"] += 1
                window["images"] += int(batch["valid"].shape[0]) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue

                step += 1
                state["step"] = step
                state["images_seen"] += global_batch
                progress.update(1)

                if step % config.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    window["time"] = now - clock
                    train_metrics = _log_window(accelerator, window, state, step, flops, peak, config, progress,
                                                output_dir)
                    throughput.append((window["images"], window["time"]))
                    window = {"loss": 0.0, "cosine": 0.0, "micro": 0, "images": 0, "time": 0.0}
                    clock = time.perf_counter()

                paused = time.perf_counter()
                if do_eval and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                    eval_metrics = _run_evaluation(accelerator, module, evaluate, step, output_dir) or eval_metrics
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                    checkpoint = save_checkpoint(accelerator, output_dir, step, _state_json(state, config),
                                                 config.keep_checkpoints)
                    last_saved = step
                if _stop_requested(accelerator, stop.requested) and step < total_steps:
                    if last_saved != step:
                        checkpoint = save_checkpoint(accelerator, output_dir, step, _state_json(state, config),
                                                     config.keep_checkpoints)
                    interrupted = True
                    break
                clock += time.perf_counter() - paused  # evaluation and checkpoints are not training time
                if step >= total_steps:
                    break
            else:
                state["epoch"] += 1
                state["batches_in_epoch"] = 0
                continue
            break
    progress.close()

    images_per_second, mfu = _overall_throughput(throughput, flops, peak, accelerator.num_processes)
    if mfu is not None and mfu > 1.0:
        _log(accelerator, f"MFU above 100% ({100 * mfu:.0f}%): the peak ({peak:.3f} TFLOPS, {peak_source}) is too low, "
                          "e.g. measured while other processes shared the machine. Pass --peak-tflops.",
             level=logging.WARNING)
    skipped = _gather_skipped(accelerator, state["skipped"])
    all_skipped = dict(skipped)
    for name, error in eval_skipped:
        all_skipped.setdefault(name, error)
    result = DistillationResult(
        step=step, total_steps=total_steps, interrupted=interrupted, final_dir=None,
        checkpoint=str(checkpoint) if checkpoint else None, metrics=eval_metrics, train_metrics=train_metrics,
        images_per_second=images_per_second, mfu=mfu, peak_tflops=peak, peak_source=peak_source,
        train_flops_per_image=flops, num_train_images=len(train_set),
        num_eval_images=len(eval_set) if eval_set is not None else 0,
        global_batch_size=global_batch, num_processes=accelerator.num_processes,
        skipped_count=len(all_skipped), skipped_examples=[f"{n} ({e})" for n, e in list(all_skipped.items())[:20]],
    )
    if interrupted:
        _log(accelerator, f"Stopped by SIGTERM after step {step}/{total_steps}; checkpoint saved to {checkpoint}. "
                          "Run again with --resume to continue.")
        _write_summary(accelerator, output_dir, result)
        return result

    # -- the end: final checkpoint, evaluation, Hub-ready folder --------------------------------------------
    # Always, also with checkpoint_every=0: a failure while writing the final folder must not lose the run.
    if last_saved != step:
        result.checkpoint = str(save_checkpoint(accelerator, output_dir, step, _state_json(state, config),
                                                config.keep_checkpoints))
    if do_eval:
        result.metrics = _run_evaluation(accelerator, module, evaluate, step, output_dir) or eval_metrics
    student = accelerator.unwrap_model(module).student
    result.student = student
    if main:
        result.final_dir = str(save_final(student, student_processor, tokenizer, config, result, teacher.config))
    accelerator.wait_for_everyone()
    _log(accelerator, _summary_line(result))
    _write_summary(accelerator, output_dir, result)
    if config.push_to_hub and main:
        push_folder_to_hub(result.final_dir, config.push_to_hub)
    return result


def _teacher_embeds(teacher, batch, cache, accelerator) -> torch.Tensor:
    if cache is not None:
        return cache[batch["index"].cpu()].to(accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        return teacher.get_image_features(pixel_values=batch["teacher_pixel_values"]).pooler_output.float()


@torch.no_grad()
def _embed_all(teacher, dataset, teacher_processor, student_processor, batch_size, accelerator, num_workers,
               progress_bar: bool = True):
    """Teacher embeddings of every training image, (N, P) float32 on CPU, computed once in a fixed order.

    Each process embeds a shard; `gather_for_metrics` reassembles them (dropping the padding of the last batch).
    The order and batch composition never depend on the training position, so a resumed run gets the same values.
    """
    collator = DistillationCollator(student_processor, teacher_processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator,
                                         num_workers=num_workers, worker_init_fn=_guard_worker_from_sigterm)
    loader = accelerator.prepare_data_loader(loader)
    cache = None
    for batch in tqdm(loader, desc="teacher embeddings", disable=not (accelerator.is_main_process and progress_bar)):
        with accelerator.autocast():
            embeds = teacher.get_image_features(pixel_values=batch["teacher_pixel_values"]).pooler_output.float()
        embeds, index = accelerator.gather_for_metrics((embeds, batch["index"]))
        if cache is None:
            cache = torch.zeros(len(dataset), embeds.shape[-1])
        cache[index.cpu()] = embeds.cpu()
    return cache


def _stop_requested(accelerator: Accelerator, local: bool) -> bool:
    """True on every process when any process got SIGTERM (so they all checkpoint and stop together)."""
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor(float(local), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _state_json(state: dict, config: DistillationConfig) -> dict:
    return {**state, "config": dataclasses.asdict(config)}


_RESUME_SENSITIVE = ("train_data", "batch_size", "gradient_accumulation_steps", "seed", "levels", "wavelet",
                     "cell_size", "teacher", "max_steps", "num_epochs", "learning_rate", "fresh_lr_multiplier")


def _warn_config_changes(accelerator, saved: dict, config: DistillationConfig) -> None:
    changed = [f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in _RESUME_SENSITIVE
               if k in saved and saved[k] != getattr(config, k)]
    if changed:
        _log(accelerator, "Resuming with changed settings (the run will not equal an uninterrupted one): "
                          + "; ".join(changed), level=logging.WARNING)


def _log(accelerator, message: str, level=logging.INFO) -> None:
    if accelerator.is_main_process:
        logger.log(level, message)
        if level >= logging.WARNING or not logger.isEnabledFor(level):
            tqdm.write(message)


def _log_window(accelerator, window, state, step, flops, peak, config, progress, output_dir) -> dict:
    """Reduce a logging window over processes, update the progress bar, append to log.jsonl."""
    loss = torch.as_tensor(window["loss"], device=accelerator.device, dtype=torch.float32) / window["micro"]
    cosine = torch.as_tensor(window["cosine"], device=accelerator.device, dtype=torch.float32) / window["micro"]
    if accelerator.num_processes > 1:
        loss, cosine = accelerator.reduce(loss, "mean"), accelerator.reduce(cosine, "mean")
    images_per_second = window["images"] / max(window["time"], 1e-9)
    mfu = images_per_second * flops["total"] / (peak * 1e12 * accelerator.num_processes)
    metrics = {"step": step, "epoch": state["epoch"], "loss": float(loss),
               "lr": lr_at(step - 1, config, progress.total),
               **{f"cosine_stage{s}": float(c) for s, c in enumerate(cosine.reshape(-1))},
               "images_per_second": images_per_second, "mfu": mfu, "skipped": len(state["skipped"])}
    if accelerator.is_main_process:
        postfix = {"loss": f"{metrics['loss']:.4f}"}
        postfix.update({f"c{s}": f"{float(c):.3f}" for s, c in enumerate(cosine.reshape(-1))})
        postfix.update({"img/s": f"{images_per_second:.3g}", "mfu": f"{100 * mfu:.3g}%"})
        if state["skipped"]:
            postfix["skipped"] = len(state["skipped"])
        progress.set_postfix(postfix, refresh=False)
        with open(output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    return metrics


def _run_evaluation(accelerator, module, evaluate, step, output_dir) -> dict:
    """Evaluate on the main process while the others wait; call it on every process."""
    metrics = {}
    if accelerator.is_main_process and evaluate is not None:
        student = accelerator.unwrap_model(module).student
        student.eval()
        with torch.no_grad(), accelerator.autocast():
            metrics = evaluate(student, step) or {}
        student.train()
        freeze_text_side(student)
        if metrics:
            tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            with open(output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
    accelerator.wait_for_everyone()
    return metrics


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run's tail)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _overall_throughput(windows, flops, peak, processes) -> tuple[float | None, float | None]:
    """Images/s over all logging windows but the first (start-up: worker spin-up, allocator warm-up)."""
    if not windows:
        return None, None
    steady = windows[1:] or windows
    images = sum(w[0] for w in steady)
    seconds = sum(w[1] for w in steady)
    images_per_second = images / max(seconds, 1e-9)
    return images_per_second, images_per_second * flops["total"] / (peak * 1e12 * processes)


def _gather_skipped(accelerator, skipped: dict) -> dict:
    if accelerator.num_processes == 1:
        return skipped
    merged = {}
    for part in gather_object([skipped]):
        for name, error in part.items():
            merged.setdefault(name, error)
    return merged


def _summary_line(result: DistillationResult) -> str:
    cos = ", ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in result.metrics.items())
    speed = (f"{result.images_per_second:.3g} images/s, MFU {100 * result.mfu:.3g}% of {result.peak_tflops:.3g} "
             f"TFLOPS ({result.peak_source})" if result.images_per_second else "no throughput measured")
    skipped = f"{result.skipped_count} unreadable image(s) skipped"
    if result.skipped_count:
        skipped += ": " + "; ".join(result.skipped_examples[:_SHOW_SKIPPED])
    return f"Done: {result.step} steps. {cos or 'no evaluation'}. {speed}. {skipped}. Final model: {result.final_dir}"


def _write_summary(accelerator, output_dir: Path, result: DistillationResult) -> None:
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(result.to_json(), indent=2))


# ----------------------------------------------------------------------------------------------------------------
# The Hub-ready folder
# ----------------------------------------------------------------------------------------------------------------


def save_final(student: WaveCLIPModel, processor, tokenizer, config: DistillationConfig,
               result: DistillationResult, teacher_config=None) -> Path:
    """`output_dir/final`: weights + remote code (`save_pretrained`), image processor, the teacher's tokenizer and
    a model card rendered from real figures of this run. Written to `final.tmp` and renamed, like checkpoints."""
    from ..hub.model_card import card_fields, render_model_card

    output_dir = Path(config.output_dir)
    final, tmp = output_dir / "final", output_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    fields = card_fields(config, result, student.config, teacher_config)
    (tmp / "README.md").write_text(render_model_card(fields, config.model_card_template))
    _fsync_tree(tmp)
    _remove_tree(final)
    os.replace(tmp, final)
    return final


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message="Upload WaveCLIP distilled with waveclip_hf.cli.distill")
    logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)
    return str(info)


__all__ = [
    "DistillationCollator",
    "DistillationConfig",
    "DistillationResult",
    "EpochPermutationSampler",
    "HFImageDataset",
    "ImageFolderDataset",
    "StageCosineEvaluation",
    "build_student",
    "complete_checkpoints",
    "distill",
    "distillation_loss",
    "fresh_parameter_names",
    "latest_checkpoint",
    "list_image_files",
    "load_image_dataset",
    "load_teacher",
    "lr_at",
    "measure_matmul_tflops",
    "optimizer_groups",
    "peak_tflops",
    "push_folder_to_hub",
    "save_checkpoint",
    "save_final",
    "train_flops_per_image",
]
