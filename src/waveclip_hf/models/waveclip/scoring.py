"""Zero-shot scoring: how an image embedding answers against label embeddings, written once.

CLIP's zero-shot logits are `logit_scale * cos(image, label)`: both embeddings are L2-normalised and their dot
product is multiplied by the model's logit scale (`CLIPModel.logit_scale.exp()`, 100 for OpenAI's checkpoints).
The softmax over the candidate labels gives the scores that the gate (`gating.py`) reads. Every place that scores
(the model's `refine`, the pipeline, calibration, evaluation, distillation metrics, benchmarks) calls this.

This file is shipped as remote code with saved checkpoints.
"""

import torch
from torch import nn


def zero_shot_logits(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float | torch.Tensor | None = None
) -> torch.Tensor:
    """`logit_scale * cos(image, label)` for every image and label.

    Args:
        image_embeds: (..., projection_dim) image embeddings, e.g. (batch, P) or (batch, stages, P); any scale.
        text_embeds: (num_labels, projection_dim) label embeddings; any scale.
        logit_scale: the multiplier (`model.logit_scale.exp()`), or `None` for plain cosine similarity (enough for
            an argmax).

    Returns:
        (..., num_labels) logits in the labels' dtype, on the images' device.
    """
    text = nn.functional.normalize(text_embeds.to(image_embeds.device), dim=-1)
    image = nn.functional.normalize(image_embeds, dim=-1).to(text.dtype)
    if logit_scale is not None:
        image = logit_scale * image
    return image @ text.transpose(-1, -2)
