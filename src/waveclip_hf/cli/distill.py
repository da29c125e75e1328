"""Command line for `distillation.distill`: distil a CLIP teacher into a WaveCLIP student.

    python -m waveclip_hf.cli.distill --recipe vit-b16 --train-data /data/images --output-dir runs/waveclip-b16
    python -m waveclip_hf.cli.distill --recipe vit-b16 --batch-size 64 ...   # explicit flags override the recipe

    accelerate launch --num_processes 8 -m waveclip_hf.cli.distill ...   # multi-GPU, same flags
    python -m waveclip_hf.cli.distill ... --resume                        # continue from the last complete checkpoint

Every flag is a field of `training.config.DistillationConfig` (transformers' `HfArgumentParser` builds the command
line from it): `--help` lists them with their defaults.

Exit status: 0 when the run finished (the final folder is written), 143 when SIGTERM stopped it after saving a
checkpoint (so `distill && upload` does not upload a half-trained model), 2 on bad arguments.
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from transformers import HfArgumentParser

from ..training.config import RECIPES, DistillationConfig
from ..training.distillation import distill
from ..training.signals import SIGTERM_EXIT_CODE


def build_parser(recipe: str | None = None) -> HfArgumentParser:
    """transformers' `HfArgumentParser` over `DistillationConfig`: one flag per field (`--batch-size` and
    `--batch_size` alike), with the field's help and default (the recipe's values when `recipe` names one of
    `RECIPES`), plus `--recipe`."""
    parser = HfArgumentParser(
        DistillationConfig,
        prog="python -m waveclip_hf.cli.distill",
        description="Distil a frozen CLIP teacher into a WaveCLIP student (only the vision side trains).",
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=recipe,
        help="named settings for a real teacher (docs/distillation.md); explicit flags override its values. "
        "vit-b16: " + ", ".join(f"{k}={v}" for k, v in RECIPES["vit-b16"].items()),
    )
    parser.set_defaults(**RECIPES.get(recipe, {}))
    # A run needs its data and its folder; the library defaults of these two are placeholders.
    for name in ("train_data", "output_dir"):
        parser._option_string_actions[f"--{name}"].required = True
    # `None` is the default of these two; "none" on the command line asks for it explicitly.
    for name in ("max_steps", "warmup_steps"):
        parser._option_string_actions[f"--{name}"].type = _optional_int
    return parser


def _optional_int(text: str) -> int | None:
    """An int, or None for "none" / ""."""
    return None if text.lower() in ("none", "") else int(text)


def config_from_args(args: argparse.Namespace) -> DistillationConfig:
    """The `DistillationConfig` of parsed flags (a single `--label-vocabulary` file read, one prompt per line).
    Raises `ValueError`."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(DistillationConfig)}
    vocabulary = values["label_vocabulary"]
    if vocabulary is not None and len(vocabulary) == 1 and Path(vocabulary[0]).is_file():
        prompts = [line.strip() for line in Path(vocabulary[0]).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--label-vocabulary {vocabulary[0]} has no prompts.")
        values["label_vocabulary"] = prompts
    return DistillationConfig(**values)


def parse_args(argv=None) -> tuple[HfArgumentParser, argparse.Namespace]:
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
