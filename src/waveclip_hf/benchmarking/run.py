"""Benchmark WaveCLIP against a plain CLIP ViT side by side, in one process and one run.

    .venv/bin/python scripts/benchmark.py                 # the full CPU run (and the GPU path where CUDA is up)
    .venv/bin/python scripts/benchmark.py --quick         # every section at tiny size: a smoke run
    .venv/bin/python scripts/benchmark.py --wait-for-idle 900   # on a shared machine: start each section quiet
    .venv/bin/python scripts/benchmark.py --from-json docs/benchmarks.json   # re-render the report only

Writes benchmarks.json, benchmarks.md and benchmark_time_vs_gflops.png into --output-dir (default: docs/ for the
full run, runs/benchmarks_quick/ with --quick, so a smoke run never overwrites the committed report).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.waveclip.flops import FLOPS_CONVENTION
from .contention import CpuMonitor, load_average, wait_if_asked
from .early_exit import early_exit_section
from .encoder import encoder_section
from .machine import command_line, machine_info, usable_cores
from .models import EncoderModels, build_encoder_models
from .pipelines import pipeline_section
from .preprocessing import preprocessing_section
from .profiling import profile_section
from .report import jsonable, write_reports
from .settings import BenchmarkSettings, Schedule, geometry_label, quick_settings
from .single_image import single_image_section
from .targets import evaluate_targets


@dataclass(frozen=True)
class Section:
    """One section of the suite.

    `measure(settings, encoder_models, log)` returns what goes under `results[result_key]`. The sections that
    compare the two image encoders share one `EncoderModels`, built once before the first of them and freed after
    the last; the others get None and build what they need.
    """

    result_key: str
    measure: Callable[[BenchmarkSettings, EncoderModels | None, Callable], dict[str, Any]]
    uses_encoder_models: bool = False
    # Loading models from folders must not happen under inference mode: such a section enters it itself, around
    # its timed calls.
    inference_mode: bool = True


# Every section, in the order they run (`settings.SECTION_NAMES` lists the same names in the same order).
# The results of a run in progress, section by section, next to the reports (removed when the run completes).
PARTIAL_NAME = "benchmarks.partial.json"

SECTIONS = {
    "encoder": Section("encoder", encoder_section, uses_encoder_models=True),
    "profile": Section("encoder_profile", profile_section, uses_encoder_models=True),
    "early_exit": Section("early_exit", early_exit_section, uses_encoder_models=True),
    # Exports and quantises copies of the encoder models (not under inference mode); times under it.
    "single_image": Section("single_image", single_image_section, uses_encoder_models=True, inference_mode=False),
    "preprocessing": Section("preprocessing", preprocessing_section),
    "pipeline": Section("pipeline", pipeline_section, inference_mode=False),
}


@contextlib.contextmanager
def _section_scope(name: str, settings: BenchmarkSettings, inference_mode: bool, contention: dict, log):
    """Wait for a quiet machine if the settings ask, then record other processes' CPU use during the block in
    `contention[name]` ({"during": `CpuMonitor` reading, "before": `wait_for_idle` result if it waited})."""
    log(name)
    before = wait_if_asked(settings, log)
    with CpuMonitor() as monitor, torch.inference_mode(inference_mode):
        yield
    contention[name] = {"during": monitor.result, **({"before": before} if before else {})}


def run_benchmarks(
    settings: BenchmarkSettings, command: str = "", log=print, partial_path: Path | None = None
) -> dict[str, Any]:
    """Run the selected sections in this process and return the results (see `write_reports`).

    With `partial_path`, the results so far are written there (JSON) after every section, so that a crash in a
    later section (out of memory, a full disk) keeps the sections already measured; `--from-json` renders them.

    Returns:
        {"meta": machine, command and conventions, "settings": `asdict(settings)`, one entry per section that ran
        (`Section.result_key`), "targets": `evaluate_targets`}.
    """
    torch.set_num_threads(usable_cores())
    started = time.perf_counter()
    results: dict[str, Any] = {"meta": machine_info(), "settings": jsonable(asdict(settings))}
    results["meta"].update(
        command=command,
        flops_convention=FLOPS_CONVENTION,
        attn_implementation=settings.attn_implementation,
        geometry=geometry_label(settings),
    )
    contention = results["meta"]["contention"] = {}
    selected = [name for name in SECTIONS if name in settings.sections]
    encoder_model_users = [name for name in selected if SECTIONS[name].uses_encoder_models]
    models = build_encoder_models(settings) if encoder_model_users else None
    for name in selected:
        section = SECTIONS[name]
        with _section_scope(name, settings, section.inference_mode, contention, log):
            results[section.result_key] = section.measure(settings, models, log)
        if partial_path is not None:
            Path(partial_path).parent.mkdir(parents=True, exist_ok=True)
            Path(partial_path).write_text(json.dumps(jsonable(results), indent=1) + "\n")
        if encoder_model_users and name == encoder_model_users[-1]:
            models = None  # the later sections build their own models: do not hold two sets in memory
            gc.collect()
    results["targets"] = evaluate_targets(results)
    results["meta"]["wall_seconds"] = time.perf_counter() - started
    results["meta"]["load_average_end"] = load_average()
    return results


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _schedules(values: str) -> tuple[Schedule, ...]:
    """'1:2:7,8:1:4' -> (Schedule(1, 2, 7), Schedule(8, 1, 4)): batch size : warm-up rounds : trials."""
    schedules = []
    for item in values.split(","):
        batch, warmup, trials = (int(v) for v in item.split(":"))
        schedules.append(Schedule(batch, warmup, trials))
    return tuple(schedules)


def _schedule(value: str) -> Schedule:
    (schedule,) = _schedules(value)
    return schedule


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny geometry, batches and trials (a smoke run)")
    parser.add_argument("--output-dir", help="default: docs (full run) or runs/benchmarks_quick (--quick)")
    parser.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), help="default: all")
    parser.add_argument("--cpu-schedules", type=_schedules, help="batch:warmup:trials,... e.g. 1:2:7,8:1:4,64:1:3")
    parser.add_argument("--gpu-schedules", type=_schedules, help="default 1:5:20,64:3:10,512:2:5")
    parser.add_argument("--early-exit", type=_schedule, help="CPU batch:warmup:trials, default 64:1:3")
    parser.add_argument(
        "--single-image-schedules", type=_schedules, help="batch:warmup:trials of `single_image`, default 1:3:15,8:1:5"
    )
    parser.add_argument("--num-labels", type=int)
    parser.add_argument("--pipeline-images", type=int)
    parser.add_argument("--stock-pipeline-images", type=int)
    parser.add_argument("--text-layers", type=int, help="text tower depth of the pipelines (default 12)")
    parser.add_argument("--text-width", type=int, help="text tower width of the pipelines (default 512)")
    parser.add_argument("--levels", type=int, help="WaveCLIP DWT levels (default 1)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU path even when CUDA is available")
    parser.add_argument(
        "--compile-backend",
        help="torch.compile backend of the compiled encoder rows (default inductor; 'none' for eager only)",
    )
    parser.add_argument(
        "--wait-for-idle",
        type=float,
        metavar="SECONDS",
        help="before each section, wait at most this long for other processes to go quiet",
    )
    parser.add_argument("--notes", type=Path, help="Markdown file appended to the report as 'Profiling notes'")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="BENCHMARKS_JSON",
        help="do not run: rewrite the Markdown and the plot from an earlier run's JSON",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    """`quick_settings()` or the defaults, with every flag the command line gave."""
    settings = quick_settings() if args.quick else BenchmarkSettings()
    overrides = {
        "sections": tuple(args.sections) if args.sections else None,
        "cpu_schedules": args.cpu_schedules,
        "gpu_schedules": args.gpu_schedules,
        "cpu_early_exit": args.early_exit,
        "single_image_schedules": args.single_image_schedules,
        "num_labels": args.num_labels,
        "pipeline_images": args.pipeline_images,
        "stock_pipeline_images": args.stock_pipeline_images,
        "text_num_hidden_layers": args.text_layers,
        "text_hidden_size": args.text_width,
        "text_intermediate_size": 4 * args.text_width if args.text_width else None,
        "levels": args.levels,
        "use_gpu": False if args.no_gpu else None,
        "compile_backend": args.compile_backend,
        "wait_for_idle_seconds": args.wait_for_idle,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if settings.compile_backend == "none":
        settings = dataclasses.replace(settings, compile_backend=None)
    return settings


def main(argv=None) -> None:
    """The command line: run the suite (or re-render an earlier run) and write the reports."""
    args = build_parser().parse_args(argv)
    notes = args.notes.read_text() if args.notes else None
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        results["targets"] = evaluate_targets(results)
        paths = write_reports(results, args.output_dir or args.from_json.parent, notes)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return
    settings = settings_from_args(args)
    output_dir = args.output_dir or ("runs/benchmarks_quick" if args.quick else "docs")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    partial = Path(output_dir) / PARTIAL_NAME
    try:
        results = run_benchmarks(settings, command=command_line(), partial_path=partial)
    except BaseException:
        if partial.is_file():
            print(
                f"\nThe run stopped; the sections measured before are in {partial}. Render them with "
                f"`python scripts/benchmark.py --from-json {partial} --output-dir <folder>`."
            )
        raise
    paths = write_reports(results, output_dir, notes)
    partial.unlink(missing_ok=True)
    print()
    for target in results["targets"]:
        print(
            f"{'pass' if target['passed'] else 'FAIL'}  {target['target']}: {target['measured']:.3f} "
            f"({target['kind']} {target['bound']:g})"
        )
    print(f"\nwall time {results['meta']['wall_seconds']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
