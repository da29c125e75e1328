"""Classify your own images with a WaveCLIP folder, from the shell.

    python -m waveclip_hf.cli.classify photo.jpg more/ --labels red,green,blue
    python -m waveclip_hf.cli.classify images/ --labels circle,square --template "a photo of a {}" --threshold 0.2
    python -m waveclip_hf.cli.classify images/ --labels red,green,blue --threshold auto --json

Per image: the answer, its score, the stage that answered and the image encoder's GFLOPs against the full model's.
Folders are read recursively (a progress bar shows how far). `--threshold auto` uses the calibration the model
keeps for these labels (`python -m waveclip_hf.cli.calibrate ... --save-to-model`); a number is the gate's
threshold; without `--threshold` every stage runs. The default model is the main job's, `runs/waveclip-offline`.
"""

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..data.image_folders import list_image_files


DEFAULT_MODEL = "runs/waveclip-offline"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m waveclip_hf.cli.classify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files or folders (read recursively)")
    parser.add_argument("--labels", required=True, help="candidate labels, comma-separated: red,green,blue")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="a saved WaveCLIP folder or Hub id (default: %(default)s)"
    )
    parser.add_argument("--template", default=None, help="prompt with {} for the label (default: the pipeline's)")
    parser.add_argument("--threshold", default=None, help="the gate: 'auto' (the model's calibration) or a number")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward")
    parser.add_argument("--json", action="store_true", help="one JSON line per image instead of a sentence")
    return parser


def image_paths(inputs: list[str]) -> list[Path]:
    """Every image named or found (recursively) in a named folder; a `FileNotFoundError` names what is missing."""
    paths, missing = [], [item for item in inputs if not Path(item).exists()]
    if missing:
        raise FileNotFoundError(f"No such file or folder: {', '.join(missing)}.")
    for item in map(Path, inputs):
        found = list_image_files(item) if item.is_dir() else [item]
        if not found:
            raise FileNotFoundError(f"{item} holds no image files (looked recursively for PNG, JPEG, WebP, ...).")
        paths += found
    return paths


def parse_threshold(text: str | None):
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--threshold must be 'auto' or a number, got {text!r}.") from None


def classify(classifier, paths: list[Path], labels: list[str], template, threshold, batch_size: int, progress: bool):
    """(path, the pipeline's ranked answers) for every image, in batches."""
    options = {"candidate_labels": labels, "margin_threshold": threshold}
    if template is not None:
        options["hypothesis_template"] = template
    with tqdm(total=len(paths), unit="img", desc="classifying", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            for path, answer in zip(
                batch, classifier([str(path) for path in batch], batch_size=batch_size, **options)
            ):
                bar.update()
                yield path, answer


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    try:
        paths, threshold = image_paths(args.images), parse_threshold(args.threshold)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    from transformers import logging as transformers_logging
    from transformers import pipeline

    transformers_logging.set_verbosity_error()  # the answers, not load reports, go to the terminal
    transformers_logging.get_logger("transformers_modules").setLevel("WARNING")  # unknown words still warn
    classifier = pipeline("zero-shot-image-classification", model=args.model, trust_remote_code=True)
    full = float(classifier.model.answer_gflops()[-1])
    try:
        for path, answer in classify(
            classifier,
            paths,
            labels,
            args.template,
            threshold,
            args.batch_size,
            progress=not args.json and len(paths) > 1,
        ):
            top = answer[0]
            if args.json:
                print(json.dumps({"image": str(path), **top, "full_gflops": full, "ranking": answer}))
            else:
                tqdm.write(
                    f"{path}: {top['label']} ({top['score']:.3f}), stage {top['stage']}, "
                    f"{top['gflops']:.4g} GFLOPs ({top['gflops'] / full:.2f}x the full model)"
                )
    except ValueError as error:  # labels, threshold or an unreadable image: the pipeline's message names it
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
