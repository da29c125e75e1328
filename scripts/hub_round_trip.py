"""The Hub round trip of a small WaveCLIP folder, each step in a fresh process without the package
(`waveclip_hf.hub.round_trip`): saves after loading, a model object through `pipeline(...)`, 8 threads sharing one
pipeline, a calibration used in a fresh process. Prints the report as JSON.

    .venv/bin/python scripts/hub_round_trip.py [--work-dir runs/hub_round_trip]
"""

import argparse
import json
import tempfile
from pathlib import Path

from waveclip_hf.hub.round_trip import run_round_trip


SHIPPED = Path(__file__).resolve().parents[1] / "src" / "waveclip_hf" / "models" / "waveclip"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the folders go (default: a temporary one)")
    args = parser.parse_args(argv)
    shipped = sorted(path.name for path in SHIPPED.glob("*.py") if path.name != "__init__.py")
    with tempfile.TemporaryDirectory() as temporary:
        report = run_round_trip(args.work_dir or Path(temporary), shipped)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
