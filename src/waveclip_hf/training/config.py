"""Every knob of a distillation run, in one dataclass (the CLI maps one flag to each field), and the named recipes."""

from dataclasses import dataclass
from typing import Literal

import torch
from transformers.hf_argparser import HfArg

from ..models.waveclip.configuration_waveclip import ATTENTION_MODES, BAND_ORDERS


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    except OSError:
        return set()


def bf16_runs_natively(device_type: str | None = None) -> bool:
    """Whether bf16 autocast runs on bf16 hardware here: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or
    AMX. Elsewhere (an AVX2-only CPU, for one) torch emulates bf16 and autocast makes training several times slower
    than float32: the main job's teacher trained about 8x slower in bf16 than in float32 on a 2-core AVX2 AMD EPYC
    (docs/results.md). Where the flags cannot be read, float32, which is never the slow choice."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def auto_mixed_precision(device_type: str | None = None) -> str:
    """`"bf16"` where it runs natively (`bf16_runs_natively`), else `"no"` (float32)."""
    return "bf16" if bf16_runs_natively(device_type) else "no"


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
    teacher: str = HfArg(default="openai/clip-vit-base-patch16", help="hub id or folder of a transformers CLIPModel")
    train_data: str = HfArg(
        default="", help="image folder (recursive), `datasets` name/path, or a `save_to_disk` folder (required)"
    )
    output_dir: str = HfArg(
        default="waveclip-distilled",
        help="where checkpoints/, log.jsonl, summary.json and the Hub-ready final/ folder go (required)",
    )
    data_format: Literal["auto", "folder", "datasets"] = HfArg(
        default="auto",
        help="how to read --train-data/--eval-data; auto: a folder of images, a `save_to_disk` folder, else "
        "`datasets.load_dataset`",
    )
    data_split: str = HfArg(default="train", help="split of a `datasets` dataset")
    image_column: str = HfArg(default="image", help="image column of a `datasets` dataset")
    eval_data: str | None = HfArg(
        default=None, help="held-out images (same formats); default: hold out training images"
    )
    eval_split: str = HfArg(default="validation", help="split of --eval-data when it is a `datasets` one")
    eval_holdout: int = HfArg(
        default=128, help="training images held out for evaluation when --eval-data is not given (at most 10%%)"
    )
    num_workers: int = HfArg(default=4, help="data-loading processes (decoding and both image processors run there)")
    streaming: bool = HfArg(
        default=False,
        help="stream --train-data with `datasets.load_dataset(..., streaming=True)` (a Hub dataset or data files) or "
        "a `save_to_disk` folder, without reading it all first; needs --max-steps",
    )
    shuffle_buffer: int = HfArg(
        default=10_000,
        help="examples in the seeded shuffle buffer of --streaming (the order depends only on the seed, the epoch, "
        "the number of processes and --num-workers)",
    )
    eval_labelled_data: str | None = HfArg(
        default=None,
        metadata={"metavar": "FOLDER"},
        help="after training, zero-shot accuracy of every stage (and of the teacher) on a folder with one subfolder "
        "of images per class (label = subfolder name); the model card publishes it",
    )
    eval_prompt_template: str = HfArg(
        default="This is a photo of {}.", help="prompt of a class for --eval-labelled-data; {} stands for the class"
    )

    # Student geometry (see `WaveCLIPVisionConfig`) and the method's ablations.
    levels: int = HfArg(default=1, help="wavelet levels L of the student (L+1 stages)")
    wavelet: str = HfArg(default="haar", help="pywt wavelet name of the student's DWT")
    cell_size: int = HfArg(default=32, help="pixels per token cell of the student (the image is a grid of cells)")
    attention: Literal["block_causal", "bidirectional"] = HfArg(
        default="block_causal",
        help="block_causal (the method: every stage is an exit) or bidirectional (an ablation: one full forward, "
        "no early exit)",
    )
    band_order: Literal["coarse_to_fine", "fine_to_coarse"] = HfArg(
        default="coarse_to_fine",
        help="coarse_to_fine (the method: the approximation first) or fine_to_coarse (an ablation)",
    )

    # Optimisation. One "step" is one optimizer update of `batch_size * gradient_accumulation_steps * processes`.
    max_steps: int | None = HfArg(default=None, help="optimizer steps; default: --num-epochs passes over the data")
    num_epochs: int = HfArg(default=1, help="passes over the data without --max-steps")
    batch_size: int = HfArg(default=64, help="per device and micro-batch")
    gradient_accumulation_steps: int = HfArg(default=1, help="micro-batches per optimizer step")
    learning_rate: float = HfArg(default=1e-4, aliases=["--lr"], help="peak learning rate (after warmup)")
    weight_decay: float = HfArg(
        default=0.05, help="AdamW weight decay, CLIP's rule: not on biases, norms, embeddings (docs/distillation.md)"
    )
    adam_betas: list[float] = HfArg(default_factory=lambda: [0.9, 0.999], help="AdamW betas")
    # The detail projections and band embeddings start at random while everything else starts at the teacher;
    # a larger step for them lets the detail path catch up without shaking the copied blocks.
    fresh_lr_multiplier: float = HfArg(
        default=10.0,
        help="learning-rate factor for the parameters the teacher has no counterpart for (detail projections, "
        "band embeddings)",
    )
    warmup_steps: int | None = HfArg(default=None, help="linear warmup steps; default: --warmup-ratio of the run")
    warmup_ratio: float = HfArg(default=0.05, help="warmup as a fraction of the run, when --warmup-steps is not given")
    min_lr_ratio: float = HfArg(default=0.1, help="the cosine decays to this fraction of --lr at the last step")
    max_grad_norm: float | None = HfArg(default=1.0, help="gradient clipping by global norm; 0: no clipping")
    mixed_precision: Literal["no", "bf16", "fp16"] = HfArg(default="no", help="autocast dtype (weights stay fp32)")
    seed: int = HfArg(default=0, help="seeds the new student parameters, the held-out split and the data order")

    # Loss.
    stage_weights: list[float] | None = HfArg(
        default=None, help="one weight per stage (levels + 1); default: equal (see the class docstring)"
    )
    label_vocabulary: list[str] | None = HfArg(
        default=None,
        help="prompts for the optional zero-shot KL term, or one text file with a prompt per line",
    )
    kl_weight: float = HfArg(default=1.0, help="weight of the zero-shot KL term (only with --label-vocabulary)")
    kl_temperature: float = HfArg(default=1.0, help="temperature T of the zero-shot KL (the term is scaled by T^2)")
    cache_teacher_embeddings: bool = HfArg(
        default=False, help="embed every training image with the teacher once, before step 0 (faster for epochs)"
    )

    # Bookkeeping.
    log_every: int = HfArg(
        default=10, help="optimizer steps per logging window (loss, cosine, images/s, MFU to log.jsonl and trackers)"
    )
    report_to: list[str] = HfArg(
        default_factory=list,
        help="experiment trackers for accelerate to log to beside log.jsonl (e.g. tensorboard, wandb, all)",
    )
    eval_every: int = HfArg(default=500, help="0: only at the end")
    eval_batch_size: int | None = HfArg(default=None, help="default: --batch-size")
    checkpoint_every: int = HfArg(default=1000, help="0: only at the end and on SIGTERM")
    keep_checkpoints: int = HfArg(default=2, help="complete checkpoints kept (older ones are deleted)")
    resume: bool = HfArg(default=False, help="continue from the last complete checkpoint in --output-dir (if any)")
    peak_tflops: float | None = HfArg(
        default=None, help="per-device peak for MFU; default: spec sheet (known GPUs) or a measured matmul"
    )
    push_to_hub: str | None = HfArg(
        default=None, metadata={"metavar": "REPO_ID"}, help="upload the final folder (opt-in)"
    )
    hub_private: bool = HfArg(default=False, help="create the --push-to-hub repository private")
    license: str | None = HfArg(
        default=None,
        help="licence of the model card (a Hub licence id, e.g. mit); default: the one the teacher's model card "
        "states, else 'other' (the teacher's terms)",
    )
    model_card_template: str | None = HfArg(
        default=None, help="string.Template of the model card; default: the package's hub_card/README.md.template"
    )
    progress_bar: bool = HfArg(default=True, help="tqdm progress bar (--no-progress-bar: none)")

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
        if self.max_grad_norm == 0:
            self.max_grad_norm = None
        self.report_to = list(self.report_to)

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
