"""`--streaming`: a `datasets` collection read as a stream. The order is seeded and covers every row once per epoch,
held-out rows never train, and a run resumed after an interruption ends with the same weights as an uninterrupted
one (also with data-loader workers, whose turn order a resume must restore). Datasets are built in the tests from
the PNGs of `test_distillation.make_images`, saved with `Dataset.save_to_disk` or kept as an image folder."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate_state
from test_distillation import (
    PYTHON,
    Crash,
    cli_args,
    crash_at,
    make_images,
    make_teacher,
    subprocess_env,
    tiny_config,
    vision_state,
)

from waveclip_hf.training.checkpoints import TrainerState, latest_checkpoint
from waveclip_hf.training.config import DistillationConfig
from waveclip_hf.training.data import DistillationCollator
from waveclip_hf.training.distillation import distill
from waveclip_hf.training.streaming import load_streaming_data, stream_of_batches, streaming_loader


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), 40)


@pytest.fixture(scope="module")
def saved_dataset(images_dir, tmp_path_factory):
    """The 40 images as a `datasets.Dataset` (image column + label) written with `save_to_disk`."""
    import datasets

    paths = sorted(str(p) for p in images_dir.rglob("*") if p.suffix in (".png", ".jpg"))
    dataset = datasets.Dataset.from_dict({"image": paths, "label": [int(Path(p).parent.name[-1]) for p in paths]})
    folder = tmp_path_factory.mktemp("saved") / "dataset"
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(folder))
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate_state()
    yield
    reset_accelerate_state()
    torch.set_num_threads(threads)


def names_in_order(saved_dataset, count: int, num_workers: int = 0, seed: int = 0, state=None):
    """The file names of the next `count` streamed batches (batch 5) from `state`, and the state after them."""
    config = DistillationConfig(
        train_data=str(saved_dataset),
        streaming=True,
        max_steps=1,
        seed=seed,
        shuffle_buffer=8,
        eval_holdout=8,
        num_workers=num_workers,
    )
    images, eval_set = load_streaming_data(config)
    accelerator = Accelerator(rng_types=[])
    collator = DistillationCollator(teacher_processor=_Identity())
    state = state or TrainerState()
    batches = stream_of_batches(accelerator, streaming_loader(images, collator, 5, num_workers, accelerator), state)
    return [[Path(name).name for name in next(batches)["names"]] for _ in range(count)], state, eval_set


class _Identity:
    """A stand-in image processor: the file names are what these tests look at."""

    def __call__(self, images, return_tensors="pt"):
        return {"pixel_values": torch.zeros(len(images), 1)}


def test_streamed_order_is_seeded_covers_every_row_once_and_skips_held_out_rows(saved_dataset, monkeypatch):
    # Keep each item's file name in the batch, to see the order.
    original = DistillationCollator.__call__
    monkeypatch.setattr(
        DistillationCollator,
        "__call__",
        lambda self, items: {**original(self, items), "names": [i["name"] for i in items]},
    )
    first, state, eval_set = names_in_order(saved_dataset, 14)
    assert len(eval_set) == 8  # the first 8 rows of the unshuffled stream
    held_out = {Path(eval_set[i]["name"]).name for i in range(8)}
    epoch0, epoch1 = sum(first[:7], []), sum(first[7:14], [])  # 32 training rows = 7 batches (the last of 2)
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 32 and not held_out & set(epoch0)
    assert epoch0 != epoch1  # reshuffled each epoch
    assert (state.epoch, state.batches_in_epoch) == (1, 7)  # the next epoch starts when its first batch is asked for
    again, _, _ = names_in_order(saved_dataset, 14)
    assert again == first  # the same seed: the same order
    other_seed, _, _ = names_in_order(saved_dataset, 7, seed=1)
    assert sum(other_seed, []) != epoch0

    # Two workers (each makes batches of its own half): again every row once per epoch. A loader resumed from a
    # saved position continues the order exactly, also when the second worker's turn comes first.
    straight, _, _ = names_in_order(saved_dataset, 14, num_workers=2)
    per_epoch = next(k for k in range(1, 15) if len(sum(straight[:k], [])) == 32)
    assert sorted(sum(straight[:per_epoch], [])) == sorted(epoch0) and straight[:per_epoch] != first[:per_epoch]
    _, state, _ = names_in_order(saved_dataset, per_epoch + 1, num_workers=2)
    assert (state.epoch, state.batches_in_epoch, state.stream["last_worker"]) == (1, 1, 0)
    saved = TrainerState(epoch=1, batches_in_epoch=1, stream=json.loads(json.dumps(state.stream)))  # as checkpointed
    resumed, _, _ = names_in_order(saved_dataset, 3, num_workers=2, state=saved)
    assert resumed == straight[per_epoch + 1 : per_epoch + 4]


def test_streaming_needs_max_steps_and_no_teacher_cache(saved_dataset, capsys):
    from waveclip_hf.cli.distill import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--train-data", str(saved_dataset), "--output-dir", "unused", "--streaming"])
    assert exit_info.value.code == 2 and "needs `max_steps` (--max-steps)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a stream cannot do"):
        DistillationConfig(train_data=str(saved_dataset), streaming=True, max_steps=3, cache_teacher_embeddings=True)
    config = DistillationConfig(train_data=str(saved_dataset), streaming=True, max_steps=3, image_column="img")
    with pytest.raises(ValueError, match="no column 'img'; its columns are \\['image', 'label'\\]"):
        load_streaming_data(config)


def test_streaming_resume_after_an_interruption_equals_an_uninterrupted_run(teacher_dir, saved_dataset, tmp_path):
    """Two data-loader workers, 32 training rows in batches of 8 (4 per epoch); a crash after step 7 with checkpoints
    every 5, so the resume starts mid-epoch at the second worker's turn."""
    kwargs = dict(streaming=True, shuffle_buffer=16, max_steps=12, checkpoint_every=5, num_workers=2)
    straight = distill(tiny_config(teacher_dir, saved_dataset, tmp_path / "a", **kwargs))
    assert straight.num_train_images is None and straight.num_eval_images == 8
    reset_accelerate_state()

    config = tiny_config(teacher_dir, saved_dataset, tmp_path / "b", eval_every=1, **kwargs)
    with pytest.raises(Crash):
        distill(config, evaluate=crash_at(7))
    checkpoint = latest_checkpoint(tmp_path / "b")
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (saved["step"], saved["epoch"], saved["batches_in_epoch"]) == (5, 1, 1)
    assert saved["streams"] == [{"consumed": {"0": 1}, "last_worker": 0}]
    reset_accelerate_state()
    config.resume = True
    resumed = distill(config, evaluate=lambda model, step: {})
    a, b = vision_state(straight.student), vision_state(resumed.student)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_cli_streams_an_image_folder(teacher_dir, images_dir, tmp_path):
    """`--streaming` on a plain image folder (`load_dataset(folder, streaming=True)`, the imagefolder builder) from
    the command line (about 15 s); without --max-steps the CLI says why it cannot run."""
    config = tiny_config(teacher_dir, images_dir, tmp_path / "run", max_steps=3, num_workers=0)
    env = subprocess_env(HF_DATASETS_OFFLINE="1")
    out = subprocess.run(
        [PYTHON, "-m", "waveclip_hf.cli.distill", *cli_args(config), "--streaming", "--shuffle-buffer", "16"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["step"], summary["num_train_images"], summary["config"]["streaming"]) == (3, None, True)
    assert "on a stream of" in out.stderr
    args = [a for a in cli_args(config) if a not in ("--max-steps", "3")]
    out = subprocess.run(
        [PYTHON, "-m", "waveclip_hf.cli.distill", *args, "--streaming"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "needs `max_steps` (--max-steps)" in out.stderr


@pytest.mark.slow
def test_two_cpu_processes_stream_their_own_parts_and_resume_after_sigterm(teacher_dir, saved_dataset, tmp_path):
    """DDP over gloo (torchrun, 2 processes on CPU), each streaming its half with one data-loader worker: SIGTERM to
    the group checkpoints every process's stream position, `--resume` continues, and the final weights equal an
    uninterrupted 2-process run bit for bit."""
    import os
    import signal
    import time

    from safetensors.torch import load_file

    env = subprocess_env(ACCELERATE_USE_CPU="1", HF_DATASETS_OFFLINE="1")

    def command(port, name):
        config = tiny_config(
            teacher_dir,
            saved_dataset,
            tmp_path / name,
            max_steps=30,
            batch_size=4,
            checkpoint_every=0,
            log_every=1,
            num_workers=1,
        )
        return [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "waveclip_hf.cli.distill",
            *cli_args(config),
            "--streaming",
            "--shuffle-buffer",
            "8",
        ]

    straight = subprocess.run(command(29621, "straight"), env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    process = subprocess.Popen(
        command(29622, "stopped"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = tmp_path / "stopped" / "log.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 6):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert "Stopped by SIGTERM" in stderr, stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "stopped")
    streams = json.loads((checkpoint / "trainer_state.json").read_text())["streams"]
    assert len(streams) == 2 and all(stream["consumed"] for stream in streams)
    resumed = subprocess.run([*command(29623, "stopped"), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
