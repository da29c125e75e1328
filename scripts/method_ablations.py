"""The method's open questions on the generated benchmark: the cost of causality, the order of the bands, the
stability of the gate and the spread over benchmark seeds (thin wrapper over
`waveclip_hf.experiments.method_ablations.main`).

    .venv/bin/python scripts/method_ablations.py --cache-dir .cache/end_to_end     # reuses the main job's cache

Builds what the cache lacks (each seed's main job, the bidirectional and fine-to-coarse students) and writes
docs/ablations.{json,md} and docs/figures/ablation_*.png (under --docs-dir, default ./docs).
"""

from waveclip_hf.experiments.method_ablations import main


if __name__ == "__main__":
    main()
