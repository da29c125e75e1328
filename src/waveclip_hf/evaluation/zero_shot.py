"""Zero-shot classification accuracy from embeddings, one label axis at a time, and on a labelled image folder.

Everything here is a function of embeddings, so the same code scores the CLIP teacher
and any other image encoder with the same projection space (the WaveCLIP student after
each stage): compute text embeddings of the prompts once, compute image embeddings
with whatever encoder, then call `zero_shot_accuracy_per_axis`. `evaluate_labelled_folder` does all of it for a
folder with one subfolder per class and returns a [`ZeroShotResult`], what a model card publishes.
"""

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.waveclip.scoring import embed_prompts, zero_shot_logits
from .metrics import early_exit_accuracy


def text_embeddings_per_axis(
    model,
    tokenizer,
    prompts_per_axis: Mapping[str, Sequence[str]],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """CLIP text embeddings of the zero-shot prompts of every axis (`scoring.embed_prompts`, normalised).

    Args:
        model: anything with CLIP's `get_text_features(input_ids, attention_mask)`
            (a `CLIPModel`, or a `WaveCLIPModel`, whose text side is the teacher's), on the device to run on.
        tokenizer: the model's tokenizer.
        prompts_per_axis: axis name -> the C prompts of that axis, in class-id order
            (e.g. ``{name: axis.prompts() for name, axis in AXES.items()}``).
        device: where the model is (it runs there); kept for callers that pass it.

    Returns:
        axis name -> (C, P) float32 L2-normalised text embeddings, on the CPU.
    """
    return {
        axis: torch.nn.functional.normalize(embed_prompts(model, tokenizer, prompts).float(), dim=-1).cpu()
        for axis, prompts in prompts_per_axis.items()
    }


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


# ----------------------------------------------------------------------------------------------------------------
# A measured zero-shot task, as a model card publishes it
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ZeroShotResult:
    """Zero-shot top-1 accuracy of an early-exit student on one labelled task, after each stage.

    Names are what a public model card may print: never a local path (a local folder is named by its last
    component).
    """

    task: str  # what was classified, e.g. "color" or a folder's name
    dataset_name: str  # how the card names the data, e.g. "image folder `pets`"
    dataset_type: str  # `model-index` dataset type: a Hub dataset id, or a short name for local data
    num_images: int
    class_names: list[str]
    prompt_template: str  # "{}" stands for a class name
    stage_accuracy: list[float]  # answering every image after stage s
    stage_gflops: list[float]  # cumulative GFLOPs per image to answer after stage s (cached path)
    measured_by: str  # one sentence: which command measured it
    teacher_accuracy: float | None = None
    dataset_config: str | None = None
    dataset_split: str | None = None
    gate: dict | None = None  # {"threshold", "accuracy", "mean_gflops"} of a gated operating point
    num_skipped: int = 0  # unreadable images left out

    @classmethod
    def from_json(cls, data: dict) -> "ZeroShotResult":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def labelled_image_folder(folder: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """The classes of a folder with one subfolder per class (label = subfolder name) and its images.

    Returns:
        (class names in sorted order, [(image path, class id), ...] with the images of each class found
        recursively, in sorted order)

    Raises:
        ValueError: the folder does not exist, has fewer than two class subfolders, or a class has no image.
    """
    from ..data.image_folders import IMAGE_EXTENSIONS, list_image_files

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"Labelled evaluation data {str(folder)!r} is not a folder. Pass a folder with one "
            "subfolder of images per class (the label is the subfolder's name)."
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(
            f"Labelled evaluation data {str(folder)!r} has {len(classes)} class subfolder(s); zero-shot "
            "accuracy needs at least two (one subfolder of images per class, named by its label)."
        )
    items = []
    for class_id, name in enumerate(classes):
        images = list_image_files(root / name)
        if not images:
            raise ValueError(
                f"Class folder {name!r} of {root.name!r} holds no image "
                f"(looked recursively for {sorted(IMAGE_EXTENSIONS)})."
            )
        items += [(path, class_id) for path in images]
    return classes, items


@torch.no_grad()
def evaluate_labelled_folder(
    model,
    processor,
    tokenizer,
    folder: str | os.PathLike,
    prompt_template: str,
    batch_size: int = 32,
    teacher=None,
    teacher_processor=None,
    num_workers: int = 0,
    progress: bool = False,
) -> ZeroShotResult:
    """Zero-shot accuracy of a `WaveCLIPModel` after each stage (and of its CLIP teacher, if given) on a labelled
    folder; accuracies through the `early_exit_accuracy` metric. Unreadable images are left out and counted.

    Args:
        model, processor, tokenizer: the student, its `WaveCLIPImageProcessor` and its tokenizer.
        folder: one subfolder of images per class; the subfolder's name is the label.
        prompt_template: the prompt of a class, "{}" standing for its name (e.g. "a photo of a {}.").
        teacher, teacher_processor: the CLIP teacher and its image processor, to report its accuracy beside.
        num_workers: data-loader processes that decode the images.
    """
    from ..models.waveclip.flops import answer_gflops, clip_vit_flops

    class_names, items = labelled_image_folder(folder)
    text = text_embeddings_per_axis(model, tokenizer, {"labels": [prompt_template.format(c) for c in class_names]})
    embeds = _labelled_embeddings(
        model, processor, teacher, teacher_processor, folder, items, batch_size, num_workers, progress
    )
    gflops = answer_gflops(model.config)
    stage_accuracy = [
        early_exit_accuracy(
            zero_shot_predictions(embeds["stages"][:, s], text["labels"]), embeds["labels"], gflops[s]
        )["accuracy"]
        for s in range(len(gflops))
    ]
    teacher_accuracy = None
    if teacher is not None:
        teacher_gflops = clip_vit_flops(teacher.config.vision_config, teacher.config.projection_dim) / 1e9
        teacher_accuracy = early_exit_accuracy(
            zero_shot_predictions(embeds["teacher"], text["labels"]), embeds["labels"], teacher_gflops
        )["accuracy"]
    name = Path(folder).expanduser().resolve().name
    return ZeroShotResult(
        task=name,
        dataset_name=f"image folder `{name}`",
        dataset_type="imagefolder",
        num_images=len(embeds["labels"]),
        class_names=class_names,
        prompt_template=prompt_template,
        stage_accuracy=stage_accuracy,
        stage_gflops=gflops,
        measured_by="`--eval-labelled-data` of the distillation run, on the final weights",
        teacher_accuracy=teacher_accuracy,
        num_skipped=embeds["skipped"],
    )


def _labelled_embeddings(
    model, processor, teacher, teacher_processor, folder, items, batch_size: int, num_workers: int, progress: bool
) -> dict:
    """{"stages": (N, S, P) student embeddings after every stage, "teacher": (N, P) or None, "labels": (N,),
    "skipped": unreadable images left out} of the readable images of `items`, decoded in `num_workers` workers."""
    from ..data.image_folders import ImageFolderDataset

    dataset = ImageFolderDataset([path for path, _ in items], Path(folder).expanduser())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    device = next(model.parameters()).device
    stages, teacher_embeds, labels, skipped = [], [], [], 0
    for batch in tqdm(loader, desc="labelled evaluation", disable=not progress):
        readable = [item for item in batch if item["image"] is not None]
        skipped += len(batch) - len(readable)
        if not readable:
            continue
        images = [item["image"] for item in readable]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        stages.append(model.get_image_features(pixels).stage_pooler_outputs.float().cpu())
        if teacher is not None:
            teacher_pixels = teacher_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            teacher_embeds.append(teacher.get_image_features(pixel_values=teacher_pixels).pooler_output.float().cpu())
        labels += [items[item["index"]][1] for item in readable]
    if not labels:
        raise ValueError(f"No readable image in the labelled evaluation data {Path(folder).name!r}.")
    return {
        "stages": torch.cat(stages),
        "teacher": torch.cat(teacher_embeds) if teacher_embeds else None,
        "labels": torch.tensor(labels),
        "skipped": skipped,
    }


__all__ = [
    "ZeroShotResult",
    "evaluate_labelled_folder",
    "image_embeddings",
    "labelled_image_folder",
    "text_embeddings_per_axis",
    "zero_shot_accuracy_per_axis",
    "zero_shot_predictions",
]
