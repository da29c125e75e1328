"""Command line for `distillation.distill`: distil a CLIP teacher into a WaveCLIP student.

    python -m waveclip_hf.cli.distill --recipe vit-b16 --train-data /data/images --output-dir runs/waveclip-b16
    python -m waveclip_hf.cli.distill --recipe vit-b16 --batch-size 64 ...   # explicit flags override the recipe

    accelerate launch --num_processes 8 -m waveclip_hf.cli.distill ...   # multi-GPU, same flags
    python -m waveclip_hf.cli.distill ... --resume                        # continue from the last complete checkpoint

Exit status: 0 when the run finished (the final folder is written), 143 when SIGTERM stopped it after saving a
checkpoint (so `distill && upload` does not upload a half-trained model), 2 on bad arguments.
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from ..models.waveclip.configuration_waveclip import ATTENTION_MODES, BAND_ORDERS
from ..training.config import RECIPES, DistillationConfig
from ..training.distillation import distill
from ..training.signals import SIGTERM_EXIT_CODE


def _optional_int(text: str) -> int | None:
    """An int, or None for "none" / ""."""
    return None if text.lower() in ("none", "") else int(text)


def build_parser(recipe: str | None = None) -> argparse.ArgumentParser:
    """The CLI: one flag per `DistillationConfig` field, each with its help and default (the recipe's values when
    `recipe` names one of `RECIPES`)."""
    defaults = DistillationConfig(**RECIPES.get(recipe, {}))
    p = argparse.ArgumentParser(
        prog="python -m waveclip_hf.cli.distill",
        description="Distil a frozen CLIP teacher into a WaveCLIP student (only the vision side trains).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=recipe,
        help="named settings for a real teacher (docs/distillation.md); explicit flags override its values. "
        "vit-b16: " + ", ".join(f"{k}={v}" for k, v in RECIPES["vit-b16"].items()),
    )
    _add_data_flags(p.add_argument_group("what to distil"), defaults)
    _add_optimisation_flags(p.add_argument_group("student and optimisation"), defaults)
    _add_loss_flags(p.add_argument_group("loss"), defaults)
    _add_bookkeeping_flags(p.add_argument_group("bookkeeping"), defaults)
    return p


def _add_data_flags(g, defaults: DistillationConfig) -> None:
    g.add_argument("--teacher", default=defaults.teacher, help="hub id or folder of a transformers CLIPModel")
    g.add_argument(
        "--train-data",
        required=True,
        help="image folder (recursive), `datasets` name/path, or a `save_to_disk` folder",
    )
    g.add_argument(
        "--output-dir",
        required=True,
        help="where checkpoints/, log.jsonl, summary.json and the Hub-ready final/ folder go",
    )
    g.add_argument(
        "--data-format",
        default=defaults.data_format,
        choices=["auto", "folder", "datasets"],
        help="how to read --train-data/--eval-data; auto: a folder of images, a `save_to_disk` folder, "
        "else `datasets.load_dataset`",
    )
    g.add_argument("--data-split", default=defaults.data_split, help="split of a `datasets` dataset")
    g.add_argument("--image-column", default=defaults.image_column, help="image column of a `datasets` dataset")
    g.add_argument(
        "--eval-data", default=None, help="held-out images (same formats); default: hold out training images"
    )
    g.add_argument(
        "--eval-split", default=defaults.eval_split, help="split of --eval-data when it is a `datasets` one"
    )
    g.add_argument(
        "--eval-holdout",
        type=int,
        default=defaults.eval_holdout,
        help="training images held out for evaluation when --eval-data is not given (at most 10%%)",
    )
    g.add_argument(
        "--num-workers",
        type=int,
        default=defaults.num_workers,
        help="data-loading processes (decoding and both image processors run there)",
    )
    g.add_argument(
        "--streaming",
        action="store_true",
        help="stream --train-data with `datasets.load_dataset(..., streaming=True)` (a Hub dataset or "
        "data files) or a `save_to_disk` folder, without reading it all first; needs --max-steps",
    )
    g.add_argument(
        "--shuffle-buffer",
        type=int,
        default=defaults.shuffle_buffer,
        help="examples in the seeded shuffle buffer of --streaming (the order depends only on the seed, "
        "the epoch, the number of processes and --num-workers)",
    )
    g.add_argument(
        "--eval-labelled-data",
        default=None,
        metavar="FOLDER",
        help="after training, zero-shot accuracy of every stage (and of the teacher) on a folder with one "
        "subfolder of images per class (label = subfolder name); the model card publishes it",
    )
    g.add_argument(
        "--eval-prompt-template",
        default=defaults.eval_prompt_template,
        help="prompt of a class for --eval-labelled-data; {} stands for the class name",
    )


def _add_optimisation_flags(g, defaults: DistillationConfig) -> None:
    g.add_argument("--levels", type=int, default=defaults.levels, help="wavelet levels L of the student (L+1 stages)")
    g.add_argument("--wavelet", default=defaults.wavelet, help="pywt wavelet name of the student's DWT")
    g.add_argument(
        "--cell-size",
        type=int,
        default=defaults.cell_size,
        help="pixels per token cell of the student (the image is a grid of such cells)",
    )
    g.add_argument(
        "--attention",
        default=defaults.attention,
        choices=list(ATTENTION_MODES),
        help="block_causal (the method: every stage is an exit) or bidirectional (an ablation: one full "
        "forward, no early exit)",
    )
    g.add_argument(
        "--band-order",
        default=defaults.band_order,
        choices=list(BAND_ORDERS),
        help="coarse_to_fine (the method: the approximation first) or fine_to_coarse (an ablation)",
    )
    g.add_argument(
        "--max-steps",
        type=_optional_int,
        default=defaults.max_steps,
        help="optimizer steps; default: --num-epochs passes over the data",
    )
    g.add_argument(
        "--num-epochs", type=int, default=defaults.num_epochs, help="passes over the data without --max-steps"
    )
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per device and micro-batch")
    g.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=defaults.gradient_accumulation_steps,
        help="micro-batches per optimizer step",
    )
    g.add_argument(
        "--lr",
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=defaults.learning_rate,
        help="peak learning rate (after warmup)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="AdamW weight decay (see docs/distillation.md for which parameters get it)",
    )
    g.add_argument(
        "--fresh-lr-multiplier",
        type=float,
        default=defaults.fresh_lr_multiplier,
        help="learning-rate factor for the parameters the teacher has no counterpart for "
        "(detail projections, band embeddings)",
    )
    g.add_argument(
        "--warmup-steps",
        type=_optional_int,
        default=defaults.warmup_steps,
        help="linear warmup steps; default: --warmup-ratio of the run",
    )
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=defaults.warmup_ratio,
        help="warmup as a fraction of the run, when --warmup-steps is not given",
    )
    g.add_argument(
        "--min-lr-ratio",
        type=float,
        default=defaults.min_lr_ratio,
        help="the cosine decays to this fraction of --lr at the last step",
    )
    g.add_argument(
        "--max-grad-norm",
        type=float,
        default=defaults.max_grad_norm,
        help="gradient clipping by global norm; 0: no clipping",
    )
    g.add_argument(
        "--mixed-precision",
        default=defaults.mixed_precision,
        choices=["no", "bf16", "fp16"],
        help="autocast dtype (weights stay fp32)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seeds the new student parameters, the held-out split and the data order",
    )


def _add_loss_flags(g, defaults: DistillationConfig) -> None:
    g.add_argument(
        "--stage-weights",
        type=float,
        nargs="+",
        default=None,
        help="one weight per stage (levels + 1); default: equal",
    )
    g.add_argument(
        "--label-vocabulary",
        type=Path,
        default=None,
        help="text file, one prompt per line: adds the zero-shot KL term",
    )
    g.add_argument(
        "--kl-weight",
        type=float,
        default=defaults.kl_weight,
        help="weight of the zero-shot KL term (only with --label-vocabulary)",
    )
    g.add_argument(
        "--kl-temperature",
        type=float,
        default=defaults.kl_temperature,
        help="temperature T of the zero-shot KL (the term is scaled by T^2)",
    )
    g.add_argument(
        "--cache-teacher-embeddings",
        action="store_true",
        help="embed every training image with the teacher once (faster for several epochs)",
    )


def _add_bookkeeping_flags(g, defaults: DistillationConfig) -> None:
    g.add_argument(
        "--log-every",
        type=int,
        default=defaults.log_every,
        help="optimizer steps per logging window (loss, cosine, images/s, MFU to log.jsonl)",
    )
    g.add_argument("--eval-every", type=int, default=defaults.eval_every, help="0: only at the end")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, help="0: only at the end and on SIGTERM"
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=defaults.keep_checkpoints,
        help="complete checkpoints kept (older ones are deleted)",
    )
    g.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint (if any)")
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="per-device peak for MFU; default: spec sheet (known GPUs) or a measured matmul",
    )
    g.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the final folder (opt-in)")
    g.add_argument("--hub-private", action="store_true", help="create the --push-to-hub repository private")
    g.add_argument(
        "--license",
        default=None,
        help="licence of the model card (a Hub licence id, e.g. mit); default: the one the teacher's "
        "model card states, else 'other' (the teacher's terms)",
    )
    g.add_argument(
        "--model-card-template",
        default=None,
        help="string.Template of the model card; default: the package's hub_card/README.md.template",
    )
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", help="no tqdm progress bar")


def config_from_args(args: argparse.Namespace) -> DistillationConfig:
    """The `DistillationConfig` of parsed flags (the label vocabulary read from its file). Raises `ValueError`."""
    values = vars(args).copy()
    vocabulary = values.pop("label_vocabulary")
    if vocabulary is not None:
        prompts = [line.strip() for line in vocabulary.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--label-vocabulary {vocabulary} has no prompts.")
        values["label_vocabulary"] = prompts
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None
    names = {f.name for f in dataclasses.fields(DistillationConfig)}
    return DistillationConfig(**{k: v for k, v in values.items() if k in names})


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """(parser, parsed flags): with `--recipe`, the recipe's values are the defaults that explicit flags override."""
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe", choices=sorted(RECIPES))
    known, _ = recipe_parser.parse_known_args(argv)
    parser = build_parser(known.recipe)
    return parser, parser.parse_args(argv)


def main(argv=None) -> int:
    """Parse `argv`, run the distillation, return the exit status (0 done, 143 stopped by SIGTERM)."""
    parser, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    result = distill(config)
    return SIGTERM_EXIT_CODE if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
