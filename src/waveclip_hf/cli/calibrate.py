"""Choose the margin threshold of a saved WaveCLIP model: without labels (the default way) or on labelled images.

Without labels, on a folder of images of your domain (any layout, read recursively): the full model's answers
are the reference, and the threshold is the cheapest that keeps at least --target-agreement of them (default
0.99), or the most faithful within --gflops-budget mean GFLOPs per image. One threshold per label set:

    python -m waveclip_hf.cli.calibrate --model <folder or hub id> --images <unlabelled folder> \\
        --labels cat dog "coffee cup" --target-agreement 0.99 --output-dir runs/calibration

With labels (a folder `<split>/<class>/*.jpg` or a `datasets` id), sweep the threshold and pick it for an accuracy
loss or a budget; also writes the accuracy / GFLOPs plot:

    python -m waveclip_hf.cli.calibrate --model <folder or hub id> --data <labelled folder> --max-accuracy-drop 0.01

Both write <output-dir>/gate_calibration.json. A label-free calibration is written in the format the model keeps
(`GateCalibration.to_dict`): `--save-to-model` also stores it in the model folder's config.json, where
`pipeline(..., margin_threshold="auto")` finds it for the same labels in any order; or load the JSON file into a
pipeline with `classifier.add_calibration("<output-dir>/gate_calibration.json")`.
"""

import argparse
import json
from pathlib import Path

from ..evaluation.calibration import label_free_calibration, labelled_sweep
from ..figures.accuracy_vs_gflops import plot_tradeoff
from ..hub.model_card import update_calibration_section
from ..models.waveclip.folder_io import written_atomically


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m waveclip_hf.cli.calibrate` (and `scripts/calibrate_gate.py`)."""
    parser = argparse.ArgumentParser(
        prog="python -m waveclip_hf.cli.calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="saved WaveCLIP folder or Hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of unlabelled images of your domain (label-free calibration)")
    source.add_argument("--data", help="labelled images: folder <split>/<class>/*.jpg or a datasets id/path")
    parser.add_argument("--labels", nargs="+", help="candidate labels (label-free calibration)")
    parser.add_argument("--labels-file", help="a text file with one candidate label per line, instead of --labels")
    parser.add_argument(
        "--hypothesis-template",
        nargs="+",
        default=["This is a photo of {}."],
        help="prompt template; several make a prompt ensemble (default: %(default)s)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--target-agreement",
        type=float,
        help="label-free: share of the full model's answers to keep, e.g. 0.99 (the default)",
    )
    target.add_argument("--max-accuracy-drop", type=float, help="labelled: fraction, e.g. 0.01 = 1 point (default)")
    target.add_argument("--gflops-budget", type=float, help="mean image-encoder GFLOPs per image")
    parser.add_argument("--split", default="validation", help="labelled: split of --data")
    parser.add_argument("--image-column", default="image", help="labelled: image column of --data")
    parser.add_argument("--label-column", default="label", help="labelled: label column of --data")
    parser.add_argument("--thresholds", type=float, nargs="*", help="labelled: default 41 values in [0, 1] plus 1.01")
    parser.add_argument(
        "--margin-scaling",
        choices=["none", "num_labels"],
        default="none",
        help="labelled: threshold units (label-free thresholds are probability margins)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward")
    parser.add_argument("--max-images", type=int, help="use at most this many images")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--output-dir", default="runs/calibration", help="where gate_calibration.json goes")
    parser.add_argument(
        "--save-to-model",
        action="store_true",
        help="label-free: also store the calibration in the model folder's config.json",
    )
    return parser


def _candidate_labels(parser, args) -> list[str]:
    if (args.labels is None) == (args.labels_file is None):
        parser.error("label-free calibration (--images) needs the label set: --labels a b c, or --labels-file")
    if args.labels_file:
        return [line.strip() for line in Path(args.labels_file).read_text().splitlines() if line.strip()]
    return args.labels


def _label_free(parser, args) -> None:
    if args.max_accuracy_drop is not None:
        parser.error("--max-accuracy-drop needs labels (--data); without labels use --target-agreement")
    templates = args.hypothesis_template
    classifier, report = label_free_calibration(
        args.model,
        args.images,
        _candidate_labels(parser, args),
        hypothesis_template=templates[0] if len(templates) == 1 else templates,
        target_agreement=args.target_agreement,
        gflops_budget=args.gflops_budget,
        batch_size=args.batch_size,
        max_images=args.max_images,
        device=args.device,
    )
    write_json(Path(args.output_dir) / "gate_calibration.json", report)
    if args.save_to_model:
        save_config_to_folder(classifier.model.config, args.model)
        update_calibration_section(args.model, classifier.model.config)
    threshold = "None (every stage)" if report["threshold"] is None else f"{report['threshold']:.6g}"
    print(
        f"margin_threshold = {threshold} for {len(report['candidate_labels'])} labels ({report['target']}): "
        f"{100 * report['agreement']:.1f}% of the full model's answers kept on {report['num_images']} images, "
        f"{report['mean_gflops']:.4g} GFLOPs per image ({report['mean_gflops'] / report['full_gflops']:.2f}x the "
        "full model)"
    )
    print(
        f"wrote {Path(args.output_dir) / 'gate_calibration.json'}"
        + (f" and the calibration into {Path(args.model) / 'config.json'}" if args.save_to_model else "")
    )


def _labelled(parser, args) -> None:
    if args.save_to_model:
        parser.error(
            "--save-to-model stores a label-free calibration (--images); a labelled sweep (--data) is a report"
        )
    if args.target_agreement is not None or args.labels or args.labels_file:
        parser.error(
            "--data sweeps on labelled images (class names from the data); --labels and "
            "--target-agreement are for unlabelled --images"
        )
    drop = args.max_accuracy_drop if args.max_accuracy_drop is not None or args.gflops_budget is not None else 0.01
    sweep = labelled_sweep(
        args.model,
        args.data,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        hypothesis_template=args.hypothesis_template[0],
        thresholds=args.thresholds,
        margin_scaling=args.margin_scaling,
        max_accuracy_drop=drop,
        gflops_budget=args.gflops_budget,
        batch_size=args.batch_size,
        max_images=args.max_images,
        device=args.device,
    )
    report, output = sweep["report"], Path(args.output_dir)
    write_json(output / "gate_calibration.json", report)
    title = f"Gate calibration ({report['num_images']} images)"
    plot_tradeoff(sweep["points"], sweep["fixed"], output / "gate_calibration.png", sweep["chosen"], title=title)
    chosen, full = report["chosen"], report["fixed_stages"][-1]
    print(f"full model: accuracy {100 * full['accuracy']:.2f}% at {full['gflops']:.3f} GFLOPs")
    if chosen is None:
        print(f"no threshold meets the target ({report['target']})")
    else:
        print(
            f"chosen θ = {chosen['threshold']:g}: accuracy {100 * chosen['accuracy']:.2f}% at "
            f"{chosen['mean_gflops']:.3f} mean GFLOPs ({report['target']})"
        )
    print(f"wrote {args.output_dir}/gate_calibration.json and gate_calibration.png")


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def save_config_to_folder(config, folder) -> Path:
    """Rewrite `folder/config.json` with `config` (and so its `gate_calibrations`), atomically: the file is written
    beside and renamed over the old one."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"--save-to-model writes the calibration into a local model folder's config.json, and {folder} has none "
            "(a Hub id?). Download the model, or load gate_calibration.json with `classifier.add_calibration(path)`."
        )
    with written_atomically(folder, merge=True) as tmp:
        config.to_json_file(tmp / "config.json", use_diff=True)
    return folder / "config.json"


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is not None:
        _label_free(parser, args)
    else:
        _labelled(parser, args)


if __name__ == "__main__":
    main()
