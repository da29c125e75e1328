"""Writing a folder so that a crash or a full disk never leaves it half written.

`written_atomically(target)` gives a temporary sibling folder to write into; when the block ends without an error,
the temporary folder is flushed to disk and renamed onto `target` (an existing `target` is moved aside first and
deleted after), so `target` is at every moment either absent, the old folder, or the complete new one. With
`merge=True` the new files are instead renamed into an existing `target` one by one, keeping its other files (what
`save_pretrained` into a folder that has a README does): nothing reaches `target` before every file is written, and
the renames themselves need no space. On an error the temporary folder is deleted and the error re-raised. Every
whole-folder save of the project goes through it: the pipeline's `save_pretrained`, the trainer's final folder and
checkpoints' publication, the teacher and the generated benchmark.

    >>> with written_atomically("runs/model") as tmp:
    ...     model.save_pretrained(tmp)
    ...     processor.save_pretrained(tmp)

This file is shipped as remote code with saved checkpoints (the pipeline uses it).
"""

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the folders, so that a rename after it publishes complete files."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def remove_tree(path: Path) -> None:
    """Delete a folder without ever leaving it half deleted under its own name: rename it aside first."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.delete-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def publish(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` onto `target` (replacing a folder there), after flushing it to disk."""
    fsync_tree(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_tree(target)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def merge_into(tmp: Path, target: Path) -> None:
    """Rename every file of the finished folder `tmp` into `target`, replacing files of the same name."""
    fsync_tree(tmp)
    for folder, _, files in os.walk(tmp):
        destination = target / Path(folder).relative_to(tmp)
        destination.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(Path(folder) / name, destination / name)
    fsync_dir(target)


@contextmanager
def written_atomically(target, merge: bool = False):
    """A temporary folder beside `target` to write into, published onto `target` when the block succeeds.

    Args:
        target: the folder to write (str or path); its parent is created if needed.
        merge: keep the files of an existing `target` that the new folder does not replace.

    Yields:
        `Path` of the temporary folder (empty, hidden: `.<name>.tmp-<pid>-<ns>`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir()
    try:
        yield tmp
        merge_into(tmp, target) if merge and target.is_dir() else publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["fsync_dir", "fsync_tree", "merge_into", "publish", "remove_tree", "written_atomically"]
