"""The machine a run measures: CPU, accelerator, library versions, and the command that started the run."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .contention import load_average
from .settings import BenchmarkSettings


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the platform tells, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_info() -> dict[str, Any]:
    """CPU model (from `lscpu`), core count, threads, accelerator, library versions, date and load average."""
    import transformers

    cpu_model, cpus = platform.processor() or "unknown", os.cpu_count()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        cpu_model = fields.get("Model name", cpu_model).strip()
        cpus = int(fields.get("CPU(s)", cpus))
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_cores": cpus,
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_start": load_average(),
    }


def module_run_meta(module: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`machine_info` plus the command that ran `python -m <module>` with `argv` (default: this process's)."""
    arguments = sys.argv[1:] if argv is None else argv
    return {**machine_info(), "command": shlex.join(["python", "-m", module, *arguments])}


def written_by(meta: dict[str, Any]) -> str:
    """The provenance sentence of a generated CPU report from its `machine_info` (plus "command")."""
    return (
        f"Written by `{meta['command']}` on {meta['date_utc']} ({meta['cpu_model']}, {meta['torch_threads']} threads, "
        f"no GPU; torch {meta['torch']}, transformers {meta['transformers']}); do not edit by hand."
    )


def gpu_skip_reason(settings: BenchmarkSettings) -> str | None:
    """Why the GPU path does not run (the report prints it), or None when it runs."""
    if not settings.use_gpu:
        return "skipped: disabled (--no-gpu)"
    if not torch.cuda.is_available():
        return "skipped: torch.cuda.is_available() is False"
    return None


def for_each_gpu_dtype(settings: BenchmarkSettings, measure: Callable[[torch.dtype], dict]) -> dict[str, Any]:
    """{dtype name: measure(dtype)} for every `settings.gpu_dtypes`, or {"skipped": reason} without a GPU."""
    reason = gpu_skip_reason(settings)
    if reason is not None:
        return {"skipped": reason}
    return {name: measure(getattr(torch, name)) for name in settings.gpu_dtypes}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process, as a shell line (interpreter path relative to the cwd)."""
    argv = sys.argv if argv is None else argv
    executable = os.path.relpath(sys.executable) if sys.executable else "python"
    return shlex.join([executable, *argv])
