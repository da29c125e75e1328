"""Benchmark WaveCLIP against a plain CLIP ViT side by side (thin wrapper over `waveclip_hf.benchmarking.run`).

    .venv/bin/python scripts/benchmark.py                 # the full CPU run (and the GPU path where CUDA is up)
    .venv/bin/python scripts/benchmark.py --quick         # every section at tiny size: a smoke run
    .venv/bin/python scripts/benchmark.py --wait-for-idle 900   # on a shared machine: start each section quiet
    .venv/bin/python scripts/benchmark.py --from-json docs/benchmarks.json   # re-render the report only

Writes benchmarks.json, benchmarks.md and benchmark_time_vs_gflops.png into --output-dir (default: docs/ for the
full run, runs/benchmarks_quick/ with --quick, so a smoke run never overwrites the committed report).
`--help` lists every flag.
"""

from waveclip_hf.benchmarking.run import main


if __name__ == "__main__":
    main()
