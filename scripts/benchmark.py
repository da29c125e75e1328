"""Benchmark WaveCLIP against a plain CLIP ViT side by side (thin wrapper over `waveclip_hf.benchmarking.harness`).

    .venv/bin/python scripts/benchmark.py                 # the full CPU run (and the GPU path where CUDA is up)
    .venv/bin/python scripts/benchmark.py --quick         # every section at tiny size, under a minute
    .venv/bin/python scripts/benchmark.py --wait-for-idle 900   # on a shared machine: start each section quiet
    .venv/bin/python scripts/benchmark.py --from-json docs/benchmarks.json   # re-render the report only

Writes benchmarks.json, benchmarks.md and benchmark_time_vs_gflops.png into --output-dir (default: docs/ for the
full run, runs/benchmarks_quick/ with --quick, so a smoke run never overwrites the committed report).
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

from waveclip_hf.benchmarking.harness import (
    BenchmarkSettings,
    Schedule,
    command_line,
    evaluate_targets,
    quick_settings,
    run_benchmarks,
    write_reports,
)

SECTIONS = ("encoder", "profile", "early_exit", "preprocessing", "pipeline")


def _schedules(values):
    """'1:2:7,8:1:4' -> (Schedule(1, 2, 7), Schedule(8, 1, 4)): batch size : warm-up rounds : trials."""
    schedules = []
    for item in values.split(","):
        batch, warmup, trials = (int(v) for v in item.split(":"))
        schedules.append(Schedule(batch, warmup, trials))
    return tuple(schedules)


def _schedule(value):
    (schedule,) = _schedules(value)
    return schedule


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny geometry, batches and trials (< 1 minute)")
    parser.add_argument("--output-dir", help="default: docs (full run) or runs/benchmarks_quick (--quick)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="default: all")
    parser.add_argument("--cpu-schedules", type=_schedules, help="batch:warmup:trials,... e.g. 1:2:7,8:1:4,64:1:3")
    parser.add_argument("--gpu-schedules", type=_schedules, help="default 1:5:20,64:3:10,512:2:5")
    parser.add_argument("--early-exit", type=_schedule, help="CPU batch:warmup:trials, default 64:1:3")
    parser.add_argument("--num-labels", type=int)
    parser.add_argument("--pipeline-images", type=int)
    parser.add_argument("--stock-pipeline-images", type=int)
    parser.add_argument("--text-layers", type=int, help="text tower depth of the pipelines (default 12)")
    parser.add_argument("--text-width", type=int, help="text tower width of the pipelines (default 512)")
    parser.add_argument("--levels", type=int, help="WaveCLIP DWT levels (default 1)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU path even when CUDA is available")
    parser.add_argument("--wait-for-idle", type=float, metavar="SECONDS",
                        help="before each section, wait at most this long for other processes to go quiet")
    parser.add_argument("--notes", type=Path, help="Markdown file appended to the report as 'Profiling notes'")
    parser.add_argument("--from-json", type=Path, metavar="BENCHMARKS_JSON",
                        help="do not run: rewrite the Markdown and the plot from an earlier run's JSON")
    args = parser.parse_args(argv)
    notes = args.notes.read_text() if args.notes else None
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["targets"] = evaluate_targets(results)
        paths = write_reports(results, args.output_dir or args.from_json.parent, notes)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return

    settings = quick_settings() if args.quick else BenchmarkSettings()
    overrides = {
        "sections": tuple(args.sections) if args.sections else None,
        "cpu_schedules": args.cpu_schedules,
        "gpu_schedules": args.gpu_schedules,
        "cpu_early_exit": args.early_exit,
        "num_labels": args.num_labels,
        "pipeline_images": args.pipeline_images,
        "stock_pipeline_images": args.stock_pipeline_images,
        "text_num_hidden_layers": args.text_layers,
        "text_hidden_size": args.text_width,
        "text_intermediate_size": 4 * args.text_width if args.text_width else None,
        "levels": args.levels,
        "use_gpu": False if args.no_gpu else None,
        "wait_for_idle_seconds": args.wait_for_idle,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    output_dir = args.output_dir or ("runs/benchmarks_quick" if args.quick else "docs")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    results = run_benchmarks(settings, command=command_line())
    paths = write_reports(results, output_dir, notes)
    print()
    for target in results["targets"]:
        print(f"{'pass' if target['passed'] else 'FAIL'}  {target['target']}: {target['measured']:.3f} "
              f"({target['kind']} {target['bound']:g})")
    print(f"\nwall time {results['meta']['wall_seconds']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
