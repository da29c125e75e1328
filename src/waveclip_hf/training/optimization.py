"""One learning-rate schedule and one weight-decay rule, shared by both trainers (the distiller and the CLIP
teacher).

Schedule: transformers' `get_cosine_with_min_lr_schedule_with_warmup`, written as a pure function of the step so
that a resumed run needs no scheduler state and the schedule follows optimizer steps under any number of
processes: a linear warmup from 0 (`step / warmup_steps`), then a half cosine from the peak down to
`min_lr_rate` x the peak at `total_steps`. With `min_lr_rate=0` it is `get_cosine_schedule_with_warmup`.

Weight decay: CLIP's rule. The weight matrices of the attention, MLP and output projections decay; biases, norms
and the logit scale (fewer than 2 dimensions) and everything in the embeddings (patch projections, class tokens,
position, token and band embeddings: every parameter whose name contains "embedding") do not, since shrinking
them towards 0 is not a prior anyone wants for them.
"""

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..models.waveclip.modeling_waveclip import WaveCLIPModel


# Bumped whenever these rules change what a distillation run produces, so that cached students made under other
# rules are not reused (experiments/cached_steps.py keys on it). 1: the distiller's own warmup ((step + 1) / w) and
# decay on every matrix; 2: the schedule and weight-decay rule shared with the teacher (this module).
OPTIMIZATION_RULES_VERSION = 2


def cosine_schedule_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_rate: float = 0.0) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based: the number of updates made before it).

    Equal, bit for bit, to transformers' `get_cosine_with_min_lr_schedule_with_warmup(..., min_lr_rate=...)` for
    every step up to `total_steps` (past it, the multiplier stays at `min_lr_rate`).
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = min(1.0, float(step - warmup_steps) / float(max(1, total_steps - warmup_steps)))
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to `lr` times the group's `lr_scale` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def decays(name: str, parameter: torch.Tensor) -> bool:
    """CLIP's weight-decay rule (see the module docstring): True for weight matrices outside the embeddings."""
    return parameter.ndim >= 2 and "embedding" not in name


def parameter_groups(
    model: nn.Module, weight_decay: float, lr_scales: Mapping[str, float] | None = None
) -> list[dict]:
    """AdamW parameter groups of `model`'s trainable parameters.

    Weight decay follows `decays`; `lr_scales` maps parameter names to a learning-rate factor (default 1), kept
    in each group as `lr_scale` for `set_learning_rate`. Frozen parameters (`requires_grad=False`) are left out.
    """
    lr_scales = lr_scales or {}
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay, scale = decays(name, parameter), lr_scales.get(name, 1.0)
        group = groups.setdefault(
            (decay, scale), {"params": [], "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0}
        )
        group["params"].append(parameter)
    return list(groups.values())


def fresh_parameter_names(student: WaveCLIPModel) -> list[str]:
    """Names of the student parameters `convert_clip_to_waveclip` initialises at random (the teacher has no
    counterpart):
    the detail stages' patch projections and the band embeddings."""
    embeddings = student.vision_model.embeddings
    modules = (*embeddings.patch_embeddings[1:], embeddings.band_embedding)
    fresh = {id(parameter) for module in modules for parameter in module.parameters()}
    return [name for name, parameter in student.named_parameters() if id(parameter) in fresh]


def optimizer_groups(student: WaveCLIPModel, config) -> list[dict]:
    """The distiller's AdamW groups (`parameter_groups`): `config.weight_decay` by CLIP's rule, and the fresh
    parameters (`fresh_parameter_names`) at `config.fresh_lr_multiplier` times the learning rate."""
    fresh = dict.fromkeys(fresh_parameter_names(student), config.fresh_lr_multiplier)
    return parameter_groups(student, config.weight_decay, fresh)


def lr_at(step: int, config, total_steps: int) -> float:
    """The distiller's learning rate at optimizer step `step`: `config.learning_rate` x the cosine schedule, with
    `warmup_steps(config, total_steps)` of warmup and a floor of `config.min_lr_ratio`."""
    warmup = warmup_steps(config, total_steps)
    return config.learning_rate * cosine_schedule_with_warmup(step, warmup, total_steps, config.min_lr_ratio)


def warmup_steps(config, total_steps: int) -> int:
    """`config.warmup_steps`, or `warmup_ratio` of the run."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return int(config.warmup_ratio * total_steps)


__all__ = [
    "cosine_schedule_with_warmup",
    "decays",
    "fresh_parameter_names",
    "lr_at",
    "optimizer_groups",
    "parameter_groups",
    "set_learning_rate",
    "warmup_steps",
]
