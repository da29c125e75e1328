"""SIGTERM (what Slurm, Kubernetes and `kill` send): finish the step, checkpoint on every process, exit with 143.

Data-loader workers are guarded so that a SIGTERM to the whole process group does not kill them before the main
process has checkpointed.
"""

import logging
import os
import signal
import threading

import torch
from accelerate import Accelerator


logger = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: the shell's convention for "stopped by SIGTERM"


def guard_worker_from_sigterm(worker_id: int) -> None:
    """Data-loader workers survive a SIGTERM sent to the whole process group, but obey their own parent's.

    Schedulers (Slurm, `kill -TERM -<pgid>`, `docker stop` of a shell) signal every process of the group; a worker
    dying would crash the main process before it can checkpoint. Simply ignoring SIGTERM is not enough: when the
    main process exits on an exception, `multiprocessing` terminates its daemonic workers with SIGTERM and joins
    them, which would then wait forever. So SIGTERM is blocked here and a thread reads it with `sigwaitinfo`: from
    the parent (or once orphaned) the worker exits, from anyone else it is ignored. Where `sigwaitinfo` does not
    exist (macOS, Windows) the default behaviour is kept.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait_for_parent():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait_for_parent, name="sigterm-guard", daemon=True).start()


class SigtermFlag:
    """`with SigtermFlag() as sigterm:` catches SIGTERM in the main thread; the loop asks `sigterm.agreed(accelerator)`
    after each optimizer step. The previous handler is restored on exit."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("SIGTERM received: finishing the current step, then saving a checkpoint.")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every process when any process got SIGTERM (so they all checkpoint and stop together)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


__all__ = ["SIGTERM_EXIT_CODE", "SigtermFlag", "guard_worker_from_sigterm"]
