"""Checkpoints that a crash, a SIGKILL or a full disk can never leave half-written, and exact resume.

`save_checkpoint` writes `checkpoints/tmp-step-N` (`accelerator.save_state` + `trainer_state.json`), fsyncs it and
renames it to `step-N` only once every process has written its part; resume considers only complete `step-N`
folders. Together with a data order that depends only on (seed, epoch) and a learning rate that is a function of
the step, a resumed run ends with the same weights, bit for bit, as an uninterrupted one (CPU, fp32).
"""

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..models.waveclip.folder_io import fsync_dir, fsync_tree, remove_tree
from .metrics import log_main_process


CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"

# Settings that change the run's trajectory: resuming with another value gives a different model.
RESUME_SENSITIVE_FIELDS = (
    "train_data",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "levels",
    "wavelet",
    "cell_size",
    "attention",
    "band_order",
    "teacher",
    "max_steps",
    "num_epochs",
    "learning_rate",
    "fresh_lr_multiplier",
    "streaming",
    "shuffle_buffer",
)


@dataclass
class TrainerState:
    """Where a run is; saved as `trainer_state.json` in every checkpoint (with the run's config)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per process)
    images_seen: int = 0  # over all processes, invalid placeholders included
    skipped: dict = field(default_factory=dict)  # unreadable file -> error, as met by this process
    # --streaming: this process's position in the epoch's stream ({"consumed": {worker: batches}, "last_worker"});
    # saved for every process (`streams`, by process index).
    stream: dict = field(default_factory=dict)

    def to_json(self, config, streams: list | None = None) -> dict:
        state = {k: v for k, v in dataclasses.asdict(self).items() if k != "stream"}
        return {
            **state,
            "streams": streams if streams is not None else [self.stream],
            "config": dataclasses.asdict(config),
        }


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-") :])
    except ValueError:
        return None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`step-N` folders with a trainer state), oldest first. `tmp-*` are never complete."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return [p for step, p in sorted(found) if (p / TRAINER_STATE_NAME).is_file()]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The last complete checkpoint under `output_dir/checkpoints`, or None."""
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, step: int, trainer_state: dict, keep: int
) -> Path:
    """Write `checkpoints/step-<step>` atomically and keep the last `keep` complete checkpoints.

    `accelerator.save_state` (model, optimizer, grad scaler, RNG states) and `trainer_state.json` go to
    `tmp-step-<step>`; once every file is fsync'ed the folder is renamed to `step-<step>` (`os.replace`, atomic on
    POSIX). A crash or a full disk at any point leaves at worst a `tmp-*` folder, which resume ignores and the next
    save deletes. On an `OSError` the temporary folder is removed and the error re-raised.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    tmp, final = root / f"tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob("tmp-*"), *root.glob(".*.delete-*")]:  # left by a crash or a full disk
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            with open(tmp / TRAINER_STATE_NAME, "w") as f:
                json.dump(trainer_state, f, indent=2)
            fsync_tree(tmp)
    except OSError as caught:
        error = caught
    # Every process must learn about a failure anywhere before anyone renames.
    failed = torch.tensor(float(error is not None), device=accelerator.device)
    failed = accelerator.reduce(failed, reduction="sum") if accelerator.num_processes > 1 else failed
    if failed.item() > 0:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if error is None:
            error = OSError(f"writing checkpoint {final} failed on another process")
        previous = latest_checkpoint(output_dir)
        raise OSError(
            f"Could not write checkpoint {final} ({error}); nothing was published and earlier checkpoints are intact "
            f"(the last complete one is {previous or 'none: this was the first'}). Free disk space and resume with "
            "--resume."
        ) from error
    if accelerator.is_main_process:
        remove_tree(final)  # only when re-saving a step, e.g. the end of a run resumed at its last checkpoint
        os.replace(tmp, final)
        fsync_dir(root)
        for old in complete_checkpoints(output_dir)[:-keep]:
            remove_tree(old)
    accelerator.wait_for_everyone()
    return final


class Checkpointer:
    """Saves checkpoints of one run (`save_checkpoint`) and remembers the last one written or resumed from."""

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, keep: int, last: Path | None = None):
        self.accelerator, self.output_dir, self.keep = accelerator, Path(output_dir), keep
        self.last = last  # path of the newest checkpoint of this run
        self.last_saved_step = None  # step of the newest checkpoint this process wrote

    def save(self, state: TrainerState, config) -> Path:
        # Each process streams its own part: keep every process's position (the other fields agree everywhere).
        streams = gather_object([state.stream]) if self.accelerator.num_processes > 1 else [state.stream]
        self.last = save_checkpoint(
            self.accelerator, self.output_dir, state.step, state.to_json(config, streams), self.keep
        )
        self.last_saved_step = state.step
        return self.last

    def save_unless_saved(self, state: TrainerState, config) -> Path:
        """Save unless this step is already checkpointed (by this run)."""
        return self.last if self.last_saved_step == state.step else self.save(state, config)


def resume_from_latest(
    accelerator: Accelerator, output_dir: str | os.PathLike, config
) -> tuple[TrainerState, Path | None]:
    """Load the last complete checkpoint under `output_dir` into the prepared objects (`accelerator.load_state`:
    model, optimizer, RNG states) and return its `TrainerState` and path; `(TrainerState(), None)` when there is none.
    Warns when a setting in `RESUME_SENSITIVE_FIELDS` differs from the checkpoint's."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        log_main_process(
            accelerator, f"--resume: no complete checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}; starting fresh."
        )
        return TrainerState(), None
    accelerator.load_state(str(checkpoint))
    saved = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    _warn_config_changes(accelerator, saved.get("config", {}), config)
    state = TrainerState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainerState) if f.name != "stream"})
    streams = saved.get("streams") or [{}]
    state.stream = streams[accelerator.process_index] if accelerator.process_index < len(streams) else {}
    log_main_process(
        accelerator,
        f"Resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, "
        f"{state.batches_in_epoch} batches into it).",
    )
    return state, checkpoint


def _warn_config_changes(accelerator: Accelerator, saved: dict, config) -> None:
    changed = [
        f"{k}: {saved[k]!r} -> {getattr(config, k)!r}"
        for k in RESUME_SENSITIVE_FIELDS
        if k in saved and saved[k] != getattr(config, k)
    ]
    if changed:
        log_main_process(
            accelerator,
            "Resuming with changed settings (the run will not equal an uninterrupted one): " + "; ".join(changed),
            level=logging.WARNING,
        )


__all__ = [
    "CHECKPOINTS_DIR",
    "TRAINER_STATE_NAME",
    "Checkpointer",
    "TrainerState",
    "complete_checkpoints",
    "latest_checkpoint",
    "resume_from_latest",
    "save_checkpoint",
]
