"""How busy other processes keep the machine, and waiting for them to go quiet (for shared machines).

Other engineers' jobs may share the machine; with every core given to torch, a process that takes a core away
stalls each parallel region, and small-batch calls (many short operators) suffer most. So every section records
the other processes' CPU use while it ran, and a run can ask to wait for a quiet machine (`wait_for_idle`) or to
re-run a timed round that was contended (`QuietPolicy`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .settings import BenchmarkSettings


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded to 0.01), or None where the platform has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, steal) jiffies of the whole machine so far, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal


class CpuMonitor:
    """How busy the machine was with *other* processes while a block ran, in cores.

    `result` (after the block) holds `others_busy_cores` = (machine busy time - this process's CPU time) / wall
    time, `steal_cores` (time the hypervisor gave to other guests) and `seconds` (wall time), so a reader can tell
    a clean run from a contended one; None where /proc/stat is missing.
    """

    def __enter__(self):
        self.start = (cpu_jiffies(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        self.result = self.read()
        return False

    def read(self) -> dict[str, float] | None:
        jiffies0, cpu0, wall0 = self.start
        jiffies1, cpu1, wall1 = cpu_jiffies(), time.process_time(), time.perf_counter()
        if jiffies0 is None or jiffies1 is None or wall1 <= wall0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        wall = wall1 - wall0
        others = max(0.0, (jiffies1[0] - jiffies0[0]) / hz - (cpu1 - cpu0)) / wall
        return {
            "others_busy_cores": round(others, 2),
            "steal_cores": round((jiffies1[1] - jiffies0[1]) / hz / wall, 2),
            "seconds": round(wall, 1),
        }


def wait_for_idle(max_seconds: float, max_busy_cores: float = 0.3, log=print, window: float = 1.0) -> dict:
    """Wait (at most `max_seconds`) until other processes keep fewer than `max_busy_cores` cores busy.

    Returns {"waited_seconds", "others_busy_cores"} of the last sample (`others_busy_cores` None off Linux).
    """
    waited, busy = 0.0, None
    while True:
        with CpuMonitor() as monitor:
            time.sleep(window)
        busy = (monitor.result or {}).get("others_busy_cores")
        if busy is None or busy <= max_busy_cores or waited >= max_seconds:
            break
        if waited == 0:
            log(f"  other processes keep {busy:.2f} cores busy: waiting up to {max_seconds:.0f} s for a quiet machine")
        waited += window
    return {"waited_seconds": waited, "others_busy_cores": busy}


def wait_if_asked(settings: BenchmarkSettings, log=print) -> dict:
    """`wait_for_idle` under the settings' limits, or {} when they do not ask to wait."""
    if settings.wait_for_idle_seconds <= 0:
        return {}
    return wait_for_idle(settings.wait_for_idle_seconds, settings.idle_busy_cores, log)


@dataclass
class QuietPolicy:
    """Retry a timed round when other processes kept the machine busy during it (for shared machines).

    A round whose `CpuMonitor` reading shows more than `max_busy_cores` of other processes' work is discarded, the
    run waits (at most `wait_seconds`) for a quiet machine and repeats the round, up to `max_retries` times; after
    that the round is kept and counted as contended. Rounds shorter than `min_round_seconds` are not judged:
    /proc/stat counts in 10 ms ticks, too coarse for them.
    """

    max_busy_cores: float = 0.3
    max_retries: int = 3
    wait_seconds: float = 600.0
    min_round_seconds: float = 0.25


def quiet_policy(settings: BenchmarkSettings) -> QuietPolicy | None:
    """The retry policy of a run: active when the settings ask to wait for a quiet machine."""
    if settings.wait_for_idle_seconds <= 0:
        return None
    return QuietPolicy(max_busy_cores=settings.idle_busy_cores, wait_seconds=settings.wait_for_idle_seconds)
