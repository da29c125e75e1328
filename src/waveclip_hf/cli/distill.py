"""Command line for `distillation.distill`: distil a CLIP teacher into a WaveCLIP student.

    python -m waveclip_hf.cli.distill --teacher openai/clip-vit-base-patch16 --train-data /data/images \\
        --output-dir runs/waveclip-b16 --max-steps 20000 --batch-size 128 --mixed-precision bf16

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

from ..training.distillation import SIGTERM_EXIT_CODE, DistillationConfig, distill


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def build_parser() -> argparse.ArgumentParser:
    defaults = DistillationConfig()
    p = argparse.ArgumentParser(
        prog="python -m waveclip_hf.cli.distill",
        description="Distil a frozen CLIP teacher into a WaveCLIP student (only the vision side trains).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("what to distil")
    g.add_argument("--teacher", default=defaults.teacher, help="hub id or folder of a transformers CLIPModel")
    g.add_argument("--train-data", required=True,
                   help="image folder (recursive), `datasets` name/path, or a `save_to_disk` folder")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--data-format", default=defaults.data_format, choices=["auto", "folder", "datasets"])
    g.add_argument("--data-split", default=defaults.data_split, help="split of a `datasets` dataset")
    g.add_argument("--image-column", default=defaults.image_column, help="image column of a `datasets` dataset")
    g.add_argument("--eval-data", default=None, help="held-out images (same formats); default: hold out training images")
    g.add_argument("--eval-split", default=defaults.eval_split)
    g.add_argument("--eval-holdout", type=int, default=defaults.eval_holdout,
                   help="training images held out for evaluation when --eval-data is not given (at most 10%%)")
    g.add_argument("--num-workers", type=int, default=defaults.num_workers)

    g = p.add_argument_group("student")
    g.add_argument("--levels", type=int, default=defaults.levels)
    g.add_argument("--wavelet", default=defaults.wavelet)
    g.add_argument("--cell-size", type=int, default=defaults.cell_size)

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=_optional_int, default=defaults.max_steps,
                   help="optimizer steps; default: --num-epochs passes over the data")
    g.add_argument("--num-epochs", type=int, default=defaults.num_epochs)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per device and micro-batch")
    g.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps)
    g.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=defaults.learning_rate)
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--fresh-lr-multiplier", type=float, default=defaults.fresh_lr_multiplier,
                   help="learning-rate factor for the parameters the teacher has no counterpart for "
                        "(detail projections, band embeddings)")
    g.add_argument("--warmup-steps", type=_optional_int, default=defaults.warmup_steps,
                   help="default: --warmup-ratio of the run")
    g.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    g.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio)
    g.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="0: no clipping")
    g.add_argument("--mixed-precision", default=defaults.mixed_precision, choices=["no", "bf16", "fp16"])
    g.add_argument("--seed", type=int, default=defaults.seed)

    g = p.add_argument_group("loss")
    g.add_argument("--stage-weights", type=float, nargs="+", default=None,
                   help="one weight per stage (levels + 1); default: equal")
    g.add_argument("--label-vocabulary", type=Path, default=None,
                   help="text file, one prompt per line: adds the zero-shot KL term")
    g.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    g.add_argument("--kl-temperature", type=float, default=defaults.kl_temperature)
    g.add_argument("--cache-teacher-embeddings", action="store_true",
                   help="embed every training image with the teacher once (faster for several epochs)")

    g = p.add_argument_group("bookkeeping")
    g.add_argument("--log-every", type=int, default=defaults.log_every)
    g.add_argument("--eval-every", type=int, default=defaults.eval_every, help="0: only at the end")
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="0: only at the end and on SIGTERM")
    g.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    g.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint (if any)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU; default: spec sheet (known GPUs) or a measured matmul")
    g.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the final folder (opt-in)")
    g.add_argument("--model-card-template", default=None)
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    return p


def config_from_args(args: argparse.Namespace) -> DistillationConfig:
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


def main(argv=None) -> int:
    """Parse `argv`, run the distillation, return the exit status (0 done, 143 stopped by SIGTERM)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    result = distill(config)
    return SIGTERM_EXIT_CODE if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
