"""Generate the synthetic benchmark (cached), train the CLIP teacher on it (cached), and
report its zero-shot accuracy per axis on the test split.

    .venv/bin/python scripts/train_teacher.py                       # defaults, ~cached after the first run
    .venv/bin/python scripts/train_teacher.py --num-train 2000 --epochs 1 --output-dir .cache/teachers/smoke

Multi-GPU: ``accelerate launch scripts/train_teacher.py ...`` (the main process generates
the benchmark while the others wait).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from accelerate import PartialState
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from waveclip_hf.data.synthetic import AXES, GENERATOR_VERSION, generate_benchmark
from waveclip_hf.training.teacher import TeacherTrainingConfig, evaluate_clip_zero_shot, train_clip_teacher


REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    defaults = TeacherTrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="benchmark folder (default .cache/benchmarks/synthetic-v<version>-seed<seed>-n<counts>)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="teacher folder (default .cache/teachers/clip-teacher-seed<seed>)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of both the benchmark and the training run")
    parser.add_argument("--num-train", type=int, default=30_000)
    parser.add_argument("--num-validation", type=int, default=2_000)
    parser.add_argument("--num-test", type=int, default=5_000)
    parser.add_argument("--epochs", type=float, default=defaults.num_epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--vision-hidden-size", type=int, default=defaults.vision_hidden_size)
    parser.add_argument("--vision-layers", type=int, default=defaults.vision_num_layers)
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size)
    parser.add_argument("--mixed-precision", default=defaults.mixed_precision, choices=["no", "bf16", "fp16"])
    parser.add_argument("--num-workers", type=int, default=2, help="processes for generation and pixel caching")
    parser.add_argument("--eval-split", default="test", help="split to report zero-shot accuracy on ('' to skip)")
    args = parser.parse_args()

    counts = f"{args.num_train}-{args.num_validation}-{args.num_test}"
    data_root = (
        args.data_root or REPO / ".cache" / "benchmarks" / f"synthetic-v{GENERATOR_VERSION}-seed{args.seed}-n{counts}"
    )
    output_dir = args.output_dir or REPO / ".cache" / "teachers" / f"clip-teacher-seed{args.seed}"
    config = dataclasses.replace(
        defaults,
        seed=args.seed,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        vision_hidden_size=args.vision_hidden_size,
        vision_intermediate_size=4 * args.vision_hidden_size,
        vision_num_layers=args.vision_layers,
        vision_num_heads=max(1, args.vision_hidden_size // 64),
        patch_size=args.patch_size,
        mixed_precision=args.mixed_precision,
    )

    start = time.perf_counter()
    with PartialState().main_process_first():
        generate_benchmark(
            data_root, args.num_train, args.num_validation, args.num_test, seed=args.seed, num_workers=args.num_workers
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
