"""Distil one student per variant of the main job's distillation settings (same cached data and teacher) and
compare them per axis (thin wrapper over `waveclip_hf.experiments.distillation_ablation.run_distillation_ablation`).

    .venv/bin/python scripts/distillation_ablation.py              # after `bash scripts/run_main.sh`

Writes docs/distillation_ablation.{json,md} (under --docs-dir, default ./docs). Variants:
`waveclip_hf.experiments.distillation_ablation.DISTILLATION_VARIANTS`.
"""

import argparse

from waveclip_hf.experiments.distillation_ablation import run_distillation_ablation
from waveclip_hf.experiments.end_to_end import SIZES, EndToEndConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--cache-dir", default=EndToEndConfig.cache_dir)
    parser.add_argument("--docs-dir", default=EndToEndConfig.docs_dir)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = EndToEndConfig(
        size=args.size, cache_dir=args.cache_dir, docs_dir=args.docs_dir, progress=not args.no_progress
    )
    run_distillation_ablation(config)


if __name__ == "__main__":
    main()
