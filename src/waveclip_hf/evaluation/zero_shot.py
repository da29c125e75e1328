"""Zero-shot classification accuracy from embeddings, one label axis at a time.

Everything here is a function of embeddings, so the same code scores the CLIP teacher
and any other image encoder with the same projection space (the WaveCLIP student after
each stage): compute text embeddings of the prompts once, compute image embeddings
with whatever encoder, then call `zero_shot_accuracy_per_axis`.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..models.waveclip.scoring import zero_shot_logits
from .metrics import early_exit_accuracy


@torch.no_grad()
def text_embeddings_per_axis(
    model,
    tokenizer,
    prompts_per_axis: Mapping[str, Sequence[str]],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """CLIP text embeddings of the zero-shot prompts of every axis.

    Args:
        model: anything with CLIP's `get_text_features(input_ids, attention_mask)`
            (a `CLIPModel`, or a `WaveCLIPModel`, whose text side is the teacher's).
        tokenizer: the model's tokenizer.
        prompts_per_axis: axis name -> the C prompts of that axis, in class-id order
            (e.g. ``{name: axis.prompts() for name, axis in AXES.items()}``).
        device: where to run; default the model's device.

    Returns:
        axis name -> (C, P) float32 L2-normalised text embeddings, on the CPU.
    """
    device = device or next(model.parameters()).device
    embeds = {}
    for axis, prompts in prompts_per_axis.items():
        inputs = tokenizer(list(prompts), padding=True, return_tensors="pt").to(device)
        features = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # transformers v5 returns a ModelOutput whose pooler_output is the projected embedding.
        features = getattr(features, "pooler_output", features)
        embeds[axis] = torch.nn.functional.normalize(features.float(), dim=-1).cpu()
    return embeds


@torch.no_grad()
def image_embeddings(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    total: int | None = None,
    progress: bool = True,
    desc: str = "image embeddings",
) -> torch.Tensor:
    """Run `embed_fn` over batches of pixel values and stack the results.

    Args:
        embed_fn: (B, 3, H, W) pixel values -> (B, P) image embeddings, e.g.
            ``lambda x: model.get_image_features(pixel_values=x).pooler_output``.
            It is responsible for moving the batch to its device.
        batches: iterable of (B, 3, H, W) tensors.
        total: number of images, for the progress bar.
        progress: show a tqdm progress bar (in images).

    Returns:
        (N, P) float32 L2-normalised embeddings, on the CPU.
    """
    out = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for pixel_values in batches:
            features = embed_fn(pixel_values)
            features = getattr(features, "pooler_output", features)
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
            bar.update(len(pixel_values))
    return torch.cat(out)


def zero_shot_predictions(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N, P) image and (C, P) text embeddings -> (N,) predicted class ids (highest cosine).

    The logit scale of CLIP does not change the argmax, so it is not needed here.
    """
    return zero_shot_logits(image_embeds.float(), text_embeds.float()).argmax(dim=-1)


def zero_shot_accuracy_per_axis(
    image_embeds: torch.Tensor,
    labels: Mapping[str, torch.Tensor],
    text_embeds_per_axis: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Top-1 zero-shot accuracy of every axis.

    Args:
        image_embeds: (N, P) image embeddings (normalised or not).
        labels: axis name -> (N,) int class ids.
        text_embeds_per_axis: axis name -> (C, P) text embeddings of that axis's prompts,
            in class-id order.

    Returns:
        axis name -> accuracy in [0, 1], for every axis in `labels`.
    """
    accuracies = {}
    for axis, axis_labels in labels.items():
        axis_labels = torch.as_tensor(axis_labels)
        if axis_labels.shape != (len(image_embeds),):
            raise ValueError(f"labels[{axis!r}] has shape {tuple(axis_labels.shape)}, expected ({len(image_embeds)},)")
        predictions = zero_shot_predictions(image_embeds, text_embeds_per_axis[axis]).cpu()
        # This function knows no model cost: the metric gets 0 GFLOPs per example and only its accuracy is kept.
        accuracies[axis] = early_exit_accuracy(predictions, axis_labels.cpu(), 0.0)["accuracy"]
    return accuracies


__all__ = ["image_embeddings", "text_embeddings_per_axis", "zero_shot_accuracy_per_axis", "zero_shot_predictions"]
