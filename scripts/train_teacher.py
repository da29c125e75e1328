"""Generate the synthetic benchmark (cached), train the CLIP teacher on it (cached), and
report its zero-shot accuracy per axis on the test split.

    .venv/bin/python scripts/train_teacher.py                       # defaults, ~cached after the first run
    .venv/bin/python scripts/train_teacher.py --num-train 2000 --num-epochs 1 --output-dir .cache/teachers/smoke
    .venv/bin/python scripts/train_teacher.py --report-to tensorboard       # also log the loss to TensorBoard

Every field of `TeacherTrainingConfig` is a flag (transformers' `HfArgumentParser`); `--help` lists them.

Multi-GPU: ``accelerate launch scripts/train_teacher.py ...`` (the main process generates
the benchmark while the others wait).
"""

import dataclasses
import json
import time
from pathlib import Path

from accelerate import PartialState
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, HfArgumentParser

from waveclip_hf.data.synthetic import AXES, GENERATOR_VERSION, generate_benchmark
from waveclip_hf.training.teacher import TeacherTrainingConfig, evaluate_clip_zero_shot, train_clip_teacher


REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class TeacherRun:
    """Where the benchmark and the teacher go, and how big the benchmark is (the rest is `TeacherTrainingConfig`)."""

    data_root: str | None = dataclasses.field(
        default=None,
        metadata={"help": "benchmark folder (default .cache/benchmarks/synthetic-v<version>-seed<seed>-n<counts>)"},
    )
    output_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "teacher folder (default .cache/teachers/clip-teacher-seed<seed>)"}
    )
    num_train: int = dataclasses.field(default=30_000, metadata={"help": "training images of the benchmark"})
    num_validation: int = dataclasses.field(default=2_000, metadata={"help": "validation images"})
    num_test: int = dataclasses.field(default=5_000, metadata={"help": "test images"})
    num_workers: int = dataclasses.field(default=2, metadata={"help": "processes for generation and pixel caching"})
    eval_split: str = dataclasses.field(
        default="test", metadata={"help": "split to report zero-shot accuracy on ('' to skip)"}
    )


def main() -> None:
    parser = HfArgumentParser((TeacherTrainingConfig, TeacherRun), description=__doc__)
    config, args = parser.parse_args_into_dataclasses()
    counts = f"{args.num_train}-{args.num_validation}-{args.num_test}"
    data_root = Path(
        args.data_root
        or REPO / ".cache" / "benchmarks" / f"synthetic-v{GENERATOR_VERSION}-seed{config.seed}-n{counts}"
    )
    output_dir = Path(args.output_dir or REPO / ".cache" / "teachers" / f"clip-teacher-seed{config.seed}")

    start = time.perf_counter()
    with PartialState().main_process_first():
        generate_benchmark(
            data_root,
            args.num_train,
            args.num_validation,
            args.num_test,
            seed=config.seed,
            num_workers=args.num_workers,
        )
    print(f"benchmark: {data_root} ({time.perf_counter() - start:.0f} s)")

    result = train_clip_teacher(data_root, output_dir, config, num_workers=args.num_workers)
    info = result.info
    status = "reused (same config hash)" if result.skipped else "trained"
    print(
        f"teacher: {output_dir} {status}: {info['steps']} steps, {info['train_seconds']} s, "
        f"{info['images_per_second']} img/s"
    )

    if args.eval_split and PartialState().is_main_process:
        # Score the saved folder, loaded the way a user would load a Hub checkpoint.
        model = CLIPModel.from_pretrained(output_dir)
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
        processor = AutoImageProcessor.from_pretrained(output_dir)
        accuracies = evaluate_clip_zero_shot(
            model, tokenizer, processor, data_root, args.eval_split, num_workers=args.num_workers
        )
        chance = {axis: 1 / len(AXES[axis].class_names) for axis in AXES}
        print(f"zero-shot accuracy on {args.eval_split}:")
        for axis, accuracy in accuracies.items():
            print(f"  {axis:8s} ({AXES[axis].scale:6s}) {accuracy:6.1%}   chance {chance[axis]:.1%}")
        print(json.dumps({"split": args.eval_split, "accuracy": accuracies}))


if __name__ == "__main__":
    main()
