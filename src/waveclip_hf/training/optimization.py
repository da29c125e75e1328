"""Optimisation of the student: AdamW parameter groups and the learning-rate schedule."""

import math

from ..models.waveclip.modeling_waveclip import WaveCLIPModel


def fresh_parameter_names(student: WaveCLIPModel) -> list[str]:
    """Names of the student parameters `convert_clip_to_waveclip` initialises at random (the teacher has no counterpart):
    the detail stages' patch projections and the band embeddings."""
    embeddings = student.vision_model.embeddings
    modules = (*embeddings.patch_embeddings[1:], embeddings.band_embedding)
    fresh = {id(parameter) for module in modules for parameter in module.parameters()}
    return [name for name, parameter in student.named_parameters() if id(parameter) in fresh]


def optimizer_groups(student: WaveCLIPModel, config) -> list[dict]:
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


def lr_at(step: int, config, total_steps: int) -> float:
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio * learning_rate` at `total_steps`."""
    warmup = warmup_steps(config, total_steps)
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def warmup_steps(config, total_steps: int) -> int:
    """`config.warmup_steps`, or `warmup_ratio` of the run."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return int(config.warmup_ratio * total_steps)


def set_learning_rate(optimizer, lr: float) -> None:
    """Set every group's learning rate to `lr` times the group's `lr_scale` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


__all__ = ["fresh_parameter_names", "lr_at", "optimizer_groups", "set_learning_rate", "warmup_steps"]
