"""Timing: a stopwatch for the parts of one call, interleaved trials, and their summary statistics.

`time.perf_counter` around each call (with `torch.cuda.synchronize` on a GPU); warm-up rounds first, then
repeated trials; summaries give the median, the inter-quartile range and min / max over the trials.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .contention import CpuMonitor, QuietPolicy, wait_for_idle


# What `run_interleaved` times: a callable that runs one case once and times its own parts on the stopwatch.
Case = Callable[["Stopwatch"], None]
# `run_interleaved`'s output: case name -> part name ("total" for the whole call) -> seconds per kept trial.
CaseTimes = dict[str, dict[str, list[float]]]


class Stopwatch:
    """Times named parts of one trial; parts with the same name add up.

    `part` synchronises the GPU before reading the clock on both sides, so a part's time is its own kernels'.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.parts: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def part(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles (linear interpolation), IQR, min, max and the raw samples, in seconds."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("No samples to summarize.")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
        "samples": [float(v) for v in values],
    }


def rate_summary(samples: Sequence[float], batch_size: int, gflops_per_image: float) -> dict[str, Any]:
    """`summarize(samples)` (seconds per batch call) plus ms per image, GFLOPs per image and achieved GFLOP/s."""
    summary = summarize(samples)
    median = summary["median"]
    return {
        **summary,
        "batch_size": batch_size,
        "ms_per_image": 1e3 * median / batch_size,
        "gflops_per_image": gflops_per_image,
        "gflops_per_second": gflops_per_image * batch_size / median,
    }


def summarize_parts(times: dict[str, list[float]], keep: Callable[[str], bool] = lambda part: part != "total"):
    """part name -> `summarize` of its seconds, for the parts `keep` accepts (by default all but the total)."""
    return {part: summarize(samples) for part, samples in times.items() if keep(part)}


def run_interleaved(
    cases: dict[str, Case],
    warmup: int,
    trials: int,
    device: torch.device,
    quiet: QuietPolicy | None = None,
    stats: dict | None = None,
) -> CaseTimes:
    """Run every case `warmup` times untimed, then `trials` timed rounds, interleaved.

    Each round runs every case once, starting one case later than the previous round, so a slowdown from another
    process hits all cases alike and no case always follows the same one.

    Args:
        cases: name -> callable taking a `Stopwatch`; it times its own parts with `stopwatch.part(name)`.
        quiet: retry rounds during which other processes were busy (see `QuietPolicy`); None keeps every round.
        stats: if given, filled with `rounds_busy_cores` (other processes' cores per kept round; None for rounds
            too short to judge), `discarded_rounds` and `contended_rounds_kept`.

    Returns:
        name -> {"total": [seconds per trial], <part>: [seconds per trial], ...}.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name](Stopwatch(device))
    results: CaseTimes = {name: {} for name in names}
    kept_busy, discarded, contended = [], 0, 0
    for trial in range(trials):
        shift = trial % len(names)
        parts, busy, retried, kept_contended = _round_until_quiet(cases, names[shift:] + names[:shift], device, quiet)
        kept_busy.append(busy)
        discarded += retried
        contended += kept_contended
        for name, case_parts in parts.items():
            results[name].setdefault("total", []).append(case_parts.pop("__total__"))
            for part, seconds in case_parts.items():
                results[name].setdefault(part, []).append(seconds)
    if stats is not None:
        stats.update(rounds_busy_cores=kept_busy, discarded_rounds=discarded, contended_rounds_kept=contended)
    return results


def _timed_round(cases: dict[str, Case], order: list[str], device) -> tuple[dict[str, dict[str, float]], dict | None]:
    """Every case once in `order`: ({case: {part: seconds, "__total__": seconds}}, the round's `CpuMonitor`
    reading)."""
    parts: dict[str, dict[str, float]] = {}
    with CpuMonitor() as monitor:
        for name in order:
            watch = Stopwatch(device)
            with watch.part("__total__"):
                cases[name](watch)
            parts[name] = watch.parts
    return parts, monitor.result


def _round_until_quiet(cases: dict[str, Case], order: list[str], device, quiet: QuietPolicy | None):
    """One round, re-run while other processes were busy during it, as far as `quiet` allows.

    Returns:
        (the kept round's parts as `_timed_round` gives them, other processes' busy cores during it (None when
        the round was too short to judge), the number of rounds discarded, whether the kept round was contended).
    """
    shortest = (quiet or QuietPolicy()).min_round_seconds
    discarded = 0
    while True:
        parts, reading = _timed_round(cases, order, device)
        busy = reading["others_busy_cores"] if reading and reading["seconds"] >= shortest else None
        quiet_enough = quiet is None or busy is None or busy <= quiet.max_busy_cores
        if quiet_enough or discarded == quiet.max_retries:
            return parts, busy, discarded, not quiet_enough
        discarded += 1
        wait_for_idle(quiet.wait_seconds, quiet.max_busy_cores, log=lambda *_: None)
