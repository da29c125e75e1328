"""The frozen CLIP teacher and the WaveCLIP student made from it (only the student's vision side trains)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel

from ..conversion.clip_to_waveclip import convert_clip_to_waveclip
from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor
from ..models.waveclip.modeling_waveclip import WaveCLIPModel
from ..models.waveclip.scoring import embed_prompts


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
            if config.model_type.startswith("waveclip")
            else ""
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
        # Pillow's backend, as OpenAI's CLIP preprocessed its training images and as the offline teacher is trained:
        # the default would be torchvision's where it is installed, which resizes differently.
        processor = AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
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


def student_from_teacher(
    teacher: CLIPModel, teacher_processor, levels: int, wavelet: str, cell_size: int, **vision_options
):
    """The untrained student: ``convert_clip_to_waveclip(teacher)`` with its text side frozen, and its
    `WaveCLIPImageProcessor`. Its fresh parameters are drawn from the global RNG (seed it first).
    `vision_options` go to the student's `WaveCLIPVisionConfig` (the ablations' `attention`, `band_order`).

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
        **vision_options,
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


def teacher_text_embeddings(teacher: CLIPModel, tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    """L2-normalised teacher text embeddings of `prompts` (truncated to the text tower's length), (num_prompts,
    projection_dim) float32, on the teacher's device."""
    embeds = embed_prompts(teacher, tokenizer, prompts, {"truncation": True})
    return F.normalize(embeds.float(), dim=-1)


__all__ = ["StudentStages", "freeze_text_side", "load_teacher", "student_from_teacher", "teacher_text_embeddings"]
