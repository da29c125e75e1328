"""Choose the margin threshold of a saved WaveCLIP model (thin wrapper over `waveclip_hf.cli.calibrate`).

    python scripts/calibrate_gate.py --model <folder or hub id> --images <unlabelled folder> --labels cat dog car
    python scripts/calibrate_gate.py --model <folder or hub id> --data <labelled folder> --max-accuracy-drop 0.01

See `python -m waveclip_hf.cli.calibrate --help`.
"""

from waveclip_hf.cli.calibrate import main


if __name__ == "__main__":
    main()
