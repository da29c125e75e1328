"""Every knob of a distillation run, in one dataclass (the CLI maps one flag to each field), and the named recipes."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.waveclip.configuration_waveclip import ATTENTION_MODES, BAND_ORDERS


# Named settings for a real teacher (`--recipe`, `DistillationConfig.from_recipe`); explicit values override them.
RECIPES = {
    # openai/clip-vit-base-patch16 on one GPU (docs/distillation.md): the student keeps the teacher's 224 px and
    # ViT-B/16 token count (49 + 147 + 2 tokens at L = 1, cells of 32 px).
    "vit-b16": dict(
        teacher="openai/clip-vit-base-patch16",
        levels=1,
        cell_size=32,
        batch_size=128,
        max_steps=20_000,
        learning_rate=1e-4,
        mixed_precision="bf16",
        num_workers=8,
        checkpoint_every=1000,
        eval_every=1000,
    ),
}


@dataclass
class DistillationConfig:
    """Every knob of a distillation run; the CLI (`python -m waveclip_hf.cli.distill`) maps one flag to each field.

    Stage weights: `None` means equal weights, normalised to sum to 1. Every stage is an exit the margin gate can
    take at inference, so each must answer like the teacher on its own; nothing in the method says one exit
    matters more. Equal weights also do not need a ramp to be tuned: the coarse stage has the largest loss
    (it sees a 2^L-times smaller image), so it already pulls hardest on the shared blocks where it lags most,
    while the finest stage, which sees everything the teacher sees, is not starved. Pass e.g. `(1, 2)` to favour
    the full-detail answer instead. A bidirectional student (`attention="bidirectional"`, an ablation) has no
    exits: every stage's class token sees every token and only the last one is read, so `None` puts all the
    weight on the last stage there (a loss on the others would train read-outs that nothing uses).

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
    streaming: bool = False  # read `train_data` with `datasets.load_dataset(..., streaming=True)`; needs max_steps
    shuffle_buffer: int = 10_000  # examples in the seeded shuffle buffer of a streamed dataset
    eval_labelled_data: str | None = None  # folder, one subfolder per class: zero-shot accuracy for the card
    eval_prompt_template: str = "This is a photo of {}."  # the prompt of a class of `eval_labelled_data`

    # Student geometry (see `WaveCLIPVisionConfig`).
    levels: int = 1
    wavelet: str = "haar"
    cell_size: int = 32
    # Ablations of the method (`WaveCLIPVisionConfig`): "bidirectional" attention, "fine_to_coarse" band order.
    attention: str = "block_causal"
    band_order: str = "coarse_to_fine"

    # Optimisation. One "step" is one optimizer update of `batch_size * gradient_accumulation_steps * processes`.
    max_steps: int | None = None  # None: `num_epochs` passes over the data
    num_epochs: int = 1
    batch_size: int = 64  # per device and micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.05  # CLIP's rule: not on biases, norms, embeddings (`optimization.decays`)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # The detail projections and band embeddings start at random while everything else starts at the teacher;
    # a larger step for them lets the detail path catch up without shaking the copied blocks.
    fresh_lr_multiplier: float = 10.0
    warmup_steps: int | None = None  # linear from 0; None: `warmup_ratio` of the run
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
    hub_private: bool = False  # create that repo private
    license: str | None = None  # the card's licence (a Hub licence id); None: the teacher card's, else "other"
    model_card_template: str | None = None  # default: hub_card/README.md.template
    progress_bar: bool = True

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"`mixed_precision` must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"`attention` must be one of {ATTENTION_MODES}, got {self.attention!r}.")
        if self.band_order not in BAND_ORDERS:
            raise ValueError(f"`band_order` must be one of {BAND_ORDERS}, got {self.band_order!r}.")
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
        if self.streaming and self.max_steps is None:
            raise ValueError("A streamed dataset has no length, so `streaming` needs `max_steps` (--max-steps).")
        if self.streaming and self.cache_teacher_embeddings:
            raise ValueError(
                "`cache_teacher_embeddings` embeds every training image once before step 0, which a "
                "stream cannot do: drop --cache-teacher-embeddings or --streaming."
            )
        if self.hub_private and not self.push_to_hub:
            raise ValueError(
                "`hub_private` makes the repository of `push_to_hub` private, but no repository was given: "
                "add --push-to-hub REPO_ID or drop --hub-private."
            )
        if self.shuffle_buffer < 1:
            raise ValueError(f"`shuffle_buffer` must be at least 1, got {self.shuffle_buffer}.")
        if self.eval_labelled_data is not None:
            from ..models.waveclip.pipeline_waveclip import check_hypothesis_template

            try:
                check_hypothesis_template(self.eval_prompt_template)
            except ValueError as error:
                raise ValueError(f"--eval-prompt-template: {error}") from None
        self.adam_betas = tuple(self.adam_betas)
        if self.stage_weights is not None:
            self.stage_weights = [float(w) for w in self.stage_weights]
        if self.label_vocabulary is not None:
            self.label_vocabulary = [str(p) for p in self.label_vocabulary]

    def resolved_stage_weights(self, num_stages: int) -> torch.Tensor:
        """(num_stages,) weights summing to 1 (the default: see the class docstring)."""
        if self.stage_weights is not None:
            weights = list(self.stage_weights)
        elif self.attention == "bidirectional":
            weights = [0.0] * (num_stages - 1) + [1.0]
        else:
            weights = [1.0] * num_stages
        if len(weights) != num_stages or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"`stage_weights` must be {num_stages} non-negative numbers (levels={self.levels} gives "
                f"{num_stages} stages) with a positive sum, got {weights}."
            )
        weights = torch.tensor(weights, dtype=torch.float32)
        return weights / weights.sum()

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "DistillationConfig":
        """The config of the named recipe (`RECIPES`), with `overrides` taking precedence over its values."""
        if name not in RECIPES:
            raise ValueError(f"Unknown recipe {name!r}; the recipes are {sorted(RECIPES)}.")
        return cls(**{**RECIPES[name], **overrides})


__all__ = ["RECIPES", "DistillationConfig"]
