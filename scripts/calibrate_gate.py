"""Sweep the margin threshold of a saved WaveCLIP model on labelled images (thin wrapper over
`waveclip_hf.evaluation.calibration.calibrate`).

    python scripts/calibrate_gate.py --model <folder or hub id> --data <image folder or dataset> \
        --split validation --max-accuracy-drop 0.01 --output-dir runs/calibration

Writes gate_calibration.json (every threshold: accuracy, mean GFLOPs, share of images per exit stage; the fixed
stages; the chosen threshold) and gate_calibration.png (accuracy vs mean GFLOPs).
"""

import argparse

from waveclip_hf.evaluation.calibration import calibrate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved WaveCLIP folder or Hub id")
    parser.add_argument("--data", required=True, help="image folder (<split>/<class>/*.jpg) or datasets id/path")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--hypothesis-template", default="This is a photo of {}.")
    parser.add_argument("--thresholds", type=float, nargs="*", help="default: 41 values in [0, 1] plus 1.01")
    parser.add_argument("--margin-scaling", choices=["none", "num_labels"], default="none")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--max-accuracy-drop", type=float, help="fraction, e.g. 0.01 = 1 point (default)")
    target.add_argument("--gflops-budget", type=float, help="mean GFLOPs per image")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--device")
    parser.add_argument("--output-dir", default="runs/calibration")
    args = parser.parse_args(argv)
    drop = args.max_accuracy_drop if args.max_accuracy_drop is not None or args.gflops_budget is not None else 0.01
    report = calibrate(
        args.model, args.data, args.output_dir, split=args.split, image_column=args.image_column,
        label_column=args.label_column, hypothesis_template=args.hypothesis_template, thresholds=args.thresholds,
        margin_scaling=args.margin_scaling, max_accuracy_drop=drop, gflops_budget=args.gflops_budget,
        batch_size=args.batch_size, max_images=args.max_images, device=args.device,
    )
    chosen = report["chosen"]
    full = report["fixed_stages"][-1]
    print(f"full model: accuracy {100 * full['accuracy']:.2f}% at {full['gflops']:.3f} GFLOPs")
    if chosen is None:
        print(f"no threshold meets the target ({report['target']})")
    else:
        print(f"chosen θ = {chosen['threshold']:g}: accuracy {100 * chosen['accuracy']:.2f}% at "
              f"{chosen['mean_gflops']:.3f} mean GFLOPs ({report['target']})")
    print(f"wrote {args.output_dir}/gate_calibration.json and gate_calibration.png")


if __name__ == "__main__":
    main()
