"""Fitting the learned exit head: from what a stage's answer looks like, predict whether it already equals the full
model's.

The block-causal forward gives every stage's image embedding in one pass, and the full model's answer is its last
stage's, so the head needs no labels: on images the student was distilled on (never the images a gate is later
calibrated on), draw label sets at random from a vocabulary of prompts, score every stage against them, and fit a
logistic regression from the stage's features (`exit_signals.EXIT_HEAD_FEATURES`: margin, top-1 probability,
entropy, number of labels, the cosine between the top-2 labels' text embeddings, saturation, stability) to "this
stage's top-1 is the last stage's". Label sets of every size from 2 up teach it how the number of labels and
their similarity change what a margin means. The head is a few floats, kept in the config (`config.exit_head`), so
a checkpoint ships it in config.json; `exit_signal="learned"` reads it, with its own calibrated threshold.
"""

import numpy as np
import torch

from ..models.waveclip.exit_signals import EXIT_HEAD_FEATURES, EXIT_HEAD_FORMAT, stage_features
from ..models.waveclip.scoring import zero_shot_logits


def exit_head_examples(
    stage_embeds: torch.Tensor,
    prompt_groups: list[torch.Tensor],
    logit_scale: float,
    num_label_sets: int = 400,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and targets for the exit head, from random label sets.

    Args:
        stage_embeds: (N, S, P) image embeddings after every stage.
        prompt_groups: label embeddings (C_g, P) of groups a label set is drawn from (e.g. one per label axis; a
            single group for a flat vocabulary). A set takes 2 to C_g labels of one group.
        logit_scale: the model's `logit_scale.exp()`.

    Returns:
        (M, F) float32 features of every image at every stage but the last, and (M,) float32 targets (1: the stage's
        top-1 equals the last stage's).
    """
    generator = np.random.default_rng(seed)
    features, targets = [], []
    for _ in range(num_label_sets):
        group = prompt_groups[generator.integers(len(prompt_groups))]
        size = int(generator.integers(2, len(group) + 1))
        text = group[torch.as_tensor(generator.choice(len(group), size=size, replace=False))]
        probs = zero_shot_logits(stage_embeds, text, logit_scale).float().softmax(-1)  # (N, S, size)
        answers = probs.argmax(-1)
        features.append(stage_features(probs, stage_embeds, text)[:, :-1].reshape(-1, len(EXIT_HEAD_FEATURES)))
        targets.append((answers[:, :-1] == answers[:, -1:]).float().reshape(-1))
    return torch.cat(features), torch.cat(targets)


def fit_exit_head(features: torch.Tensor, targets: torch.Tensor, l2: float = 1e-3, max_iterations: int = 200) -> dict:
    """A logistic regression on standardised features, by L-BFGS on the mean cross-entropy plus `l2` * |w|^2.

    Returns:
        The head as `config.exit_head` keeps it: format, feature names, mean, std, weight, bias, and the number of
        examples and their share of positives.
    """
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = targets.double()
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def loss_fn():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(loss_fn)
    return {
        "format": EXIT_HEAD_FORMAT,
        "features": list(EXIT_HEAD_FEATURES),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "weight": weight.detach().tolist(),
        "bias": float(bias.detach()),
        "examples": len(y),
        "positive_share": float(y.mean()),
    }


def distillation_exit_head(student, held_out_embeds: torch.Tensor, prompt_embeds: torch.Tensor) -> dict | None:
    """The head a distillation run ships: fitted on its held-out images with label sets drawn from its label
    vocabulary (`--label-vocabulary`), or `None` without enough of either."""
    if held_out_embeds is None or len(held_out_embeds) < 2 or prompt_embeds is None or len(prompt_embeds) < 2:
        return None
    logit_scale = float(student.logit_scale.exp())
    features, targets = exit_head_examples(held_out_embeds, [prompt_embeds.float().cpu()], logit_scale)
    return fit_exit_head(features, targets)


__all__ = ["distillation_exit_head", "exit_head_examples", "fit_exit_head"]
