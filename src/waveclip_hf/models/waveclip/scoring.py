"""Zero-shot scoring: label prompts to embeddings, and how an image embedding answers against them, written once.

CLIP's zero-shot logits are `logit_scale * cos(image, label)`: both embeddings are L2-normalised and their dot
product is multiplied by the model's logit scale (`CLIPModel.logit_scale.exp()`, 100 for OpenAI's checkpoints).
The softmax over the candidate labels gives the scores that the gate (`gating.py`) reads. Every place that scores
(the model's `refine`, the pipeline, calibration, evaluation, distillation metrics, benchmarks) calls this, and
every place that embeds label prompts calls `embed_prompts` / `label_embeddings`.

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


# Prompts embedded per text-tower forward. Bounds activation memory for large label sets: 10,000 prompts through
# CLIP ViT-B's text tower in one batch need ~6 GB for one fp32 MLP activation (10,000 x 77 x 2048), 1,024 need ~0.6 GB.
PROMPT_BATCH_SIZE = 1024


@torch.no_grad()
def embed_prompts(
    model,
    tokenizer,
    prompts,
    tokenizer_kwargs: dict | None = None,
    batch_size: int = PROMPT_BATCH_SIZE,
    inspect_tokens=None,
) -> torch.Tensor:
    """Text-tower embeddings of prompts, in batches of `batch_size`.

    Args:
        model: anything with CLIP's `get_text_features(input_ids, attention_mask)` and `config.text_config` (a
            `WaveCLIPModel`, or the `CLIPModel` teacher).
        tokenizer: the model's tokenizer; `tokenizer_kwargs` go to it (e.g. `{"truncation": True}`).
        inspect_tokens: called as `inspect_tokens(prompts, text_inputs, special_tokens_mask)` for each batch (the
            pipeline warns about unknown words there).

    Returns:
        (len(prompts), projection_dim) projected embeddings (not normalised), on the model's device.
    """
    max_positions = model.config.text_config.max_position_embeddings
    device = next(model.parameters()).device
    prompts, chunks = list(prompts), []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        text_inputs = tokenizer(
            chunk, return_tensors="pt", padding=True, return_special_tokens_mask=True, **(tokenizer_kwargs or {})
        )
        special = text_inputs.pop("special_tokens_mask")
        if text_inputs["input_ids"].shape[-1] > max_positions:
            lengths = text_inputs["attention_mask"].sum(-1) if "attention_mask" in text_inputs else None
            longest = int(lengths.argmax()) if lengths is not None else 0
            raise ValueError(
                f"The prompt {chunk[longest]!r} is {text_inputs['input_ids'].shape[-1]} tokens long, more than "
                f"the text tower's {max_positions} positions. Shorten the label or the template, or pass "
                "`tokenizer_kwargs={'truncation': True}`."
            )
        if inspect_tokens is not None:
            inspect_tokens(chunk, text_inputs, special)
        attention_mask = text_inputs.get("attention_mask")
        features = model.get_text_features(
            input_ids=text_inputs["input_ids"].to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
        )
        chunks.append(getattr(features, "pooler_output", features))
    return torch.cat(chunks)


def label_embeddings(
    model, tokenizer, labels, hypothesis_template, tokenizer_kwargs: dict | None = None, inspect_tokens=None
) -> torch.Tensor:
    """(num_labels, projection_dim) embeddings of the labels' prompts: `hypothesis_template.format(label)`.

    A list of templates gives each label the mean of its normalised per-template embeddings (CLIP's prompt
    ensembles); a single template gives the text tower's embedding as is (not normalised).
    """
    if isinstance(hypothesis_template, str):
        prompts = [hypothesis_template.format(label) for label in labels]
        return embed_prompts(model, tokenizer, prompts, tokenizer_kwargs, inspect_tokens=inspect_tokens)
    per_template = [
        nn.functional.normalize(
            embed_prompts(
                model,
                tokenizer,
                [template.format(label) for label in labels],
                tokenizer_kwargs,
                inspect_tokens=inspect_tokens,
            ),
            dim=-1,
        )
        for template in hypothesis_template
    ]
    return torch.stack(per_template).mean(0)


__all__ = ["PROMPT_BATCH_SIZE", "embed_prompts", "label_embeddings", "zero_shot_logits"]
