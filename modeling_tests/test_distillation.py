"""Distillation trainer: learning, frozen text side, atomic checkpoints, exact resume, SIGTERM, bad files, Hub folder.

Every test builds a tiny CLIP teacher (64 px images, patch 16) and a folder of small structured PNGs; nothing is
downloaded. Subprocess tests run `python -m waveclip_hf.cli.distill` like a user would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reset_accelerate_state
from PIL import Image
from safetensors.torch import load_file
from test_teacher_training import tensorboard_scalars
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from waveclip_hf import WaveCLIPModel
from waveclip_hf.data.text_tokenizer import build_word_level_tokenizer, clip_text_config_kwargs
from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor
from waveclip_hf.training.checkpoints import complete_checkpoints, latest_checkpoint, save_checkpoint
from waveclip_hf.training.config import DistillationConfig
from waveclip_hf.training.data import load_image_dataset
from waveclip_hf.training.distillation import distill, distillation_loss
from waveclip_hf.training.models import load_teacher


PYTHON = sys.executable
PROMPTS = ["a photo of a red square", "a photo of a blue circle", "a photo of green stripes", "a photo of noise"]


# ------------------------------------------------------------------------------------------------- fixtures


def make_teacher(folder: Path, seed: int = 0) -> Path:
    tokenizer = build_word_level_tokenizer(PROMPTS + ["a photo of a {}"], max_length=16)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            **clip_text_config_kwargs(tokenizer),
        ),
        # initializer_factor=10: a default-initialised tiny CLIP maps every image to nearly the same direction
        # (mean pairwise cosine ~0.9), which would make "cosine to the teacher" meaningless; this one spreads them
        # (~0.2) and depends on fine detail, as a real teacher does.
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
            initializer_factor=10.0,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """Shapes, stripes and gradients on coloured backgrounds, various sizes, in nested folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = int(rng.integers(64, 96)), int(rng.integers(64, 96))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        background = rng.uniform(0, 1, 3)
        image = background * (0.5 + 0.5 * yy[..., None]) + 0.2 * rng.uniform(-1, 1, 3) * xx[..., None]
        kind = i % 4
        colour = rng.uniform(0, 1, 3)
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        if kind == 0:
            mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        elif kind == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        elif kind == 2:
            mask = (np.floor(xx * rng.integers(4, 12)) % 2) == 0
        else:
            mask = rng.uniform(0, 1, (h, w)) < 0.3
        image[mask] = colour
        sub = folder / f"class{kind}"
        sub.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if i % 3 else ".jpg"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(sub / f"img{i:03d}{suffix}")
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), 64)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide singletons. One thread: the
    models are tiny, and on a busy 2-core machine a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate_state()
    yield
    reset_accelerate_state()
    torch.set_num_threads(threads)


def tiny_config(teacher_dir, images_dir, output_dir, **overrides) -> DistillationConfig:
    values = dict(
        teacher=str(teacher_dir),
        train_data=str(images_dir),
        output_dir=str(output_dir),
        levels=1,
        cell_size=16,
        batch_size=8,
        learning_rate=2e-3,
        weight_decay=0.0,
        warmup_steps=5,
        max_steps=20,
        num_workers=0,
        eval_holdout=8,
        eval_every=0,
        checkpoint_every=0,
        log_every=5,
        peak_tflops=1.0,
        progress_bar=False,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def cli_args(config: DistillationConfig) -> list[str]:
    """The CLI flags for a config built by `tiny_config` (only the fields it sets)."""
    return [
        "--teacher",
        config.teacher,
        "--train-data",
        config.train_data,
        "--output-dir",
        config.output_dir,
        "--levels",
        str(config.levels),
        "--cell-size",
        str(config.cell_size),
        "--batch-size",
        str(config.batch_size),
        "--lr",
        str(config.learning_rate),
        "--weight-decay",
        str(config.weight_decay),
        "--warmup-steps",
        str(config.warmup_steps),
        "--max-steps",
        str(config.max_steps),
        "--num-workers",
        str(config.num_workers),
        "--eval-holdout",
        str(config.eval_holdout),
        "--eval-every",
        str(config.eval_every),
        "--checkpoint-every",
        str(config.checkpoint_every),
        "--keep-checkpoints",
        str(config.keep_checkpoints),
        "--log-every",
        str(config.log_every),
        "--peak-tflops",
        str(config.peak_tflops),
        "--seed",
        str(config.seed),
        "--no-progress-bar",
    ]


def subprocess_env(**extra) -> dict:
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    env.update(extra)
    return env


def vision_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("text_model", "text_projection"))}


# ------------------------------------------------------------------------------------------------- unit pieces


def test_loss_is_zero_for_identical_embeddings_and_ignores_invalid_rows():
    teacher = torch.randn(4, 16)
    student = teacher[:, None].repeat(1, 2, 1) * 3.0  # scale does not matter for a cosine
    weights = torch.tensor([0.5, 0.5])
    loss, parts = distillation_loss(student, teacher, weights)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(parts["cosine"], torch.ones(2))
    student[0] = -student[0]  # an invalid row with the worst possible embedding
    valid = torch.tensor([False, True, True, True])
    loss, _ = distillation_loss(student, teacher, weights, valid)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    text = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    loss, parts = distillation_loss(student, teacher, weights, valid, text, 100.0, kl_weight=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert parts["kl"].shape == (2,)


def test_checkpoint_every_zero_still_checkpoints_the_end(teacher_dir, images_dir, tmp_path):
    result = distill(tiny_config(teacher_dir, images_dir, tmp_path / "run", max_steps=4, checkpoint_every=0))
    assert [path.name for path in complete_checkpoints(tmp_path / "run")] == ["step-4"]
    assert result.checkpoint == str(tmp_path / "run" / "checkpoints" / "step-4")


def test_stage_weights_default_equal_and_validated():
    torch.testing.assert_close(DistillationConfig().resolved_stage_weights(3), torch.full((3,), 1 / 3))
    torch.testing.assert_close(
        DistillationConfig(stage_weights=[1, 3]).resolved_stage_weights(2), torch.tensor([0.25, 0.75])
    )
    with pytest.raises(ValueError, match="2 stages"):
        DistillationConfig(stage_weights=[1, 1, 1], levels=1).resolved_stage_weights(2)


def test_non_clip_teacher_is_named_in_the_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=rf"{tmp_path}.*'bert'.*not a CLIP model"):
        load_teacher(str(tmp_path))
    with pytest.raises(ValueError, match="no-such-folder"):
        load_teacher(str(tmp_path / "no-such-folder"))


def test_image_folder_is_recursive_and_takes_common_extensions(tmp_path):
    for i, ext in enumerate(["png", "JPG", "jpeg", "bmp", "gif", "webp", "tif"]):
        (tmp_path / f"d{i}").mkdir()
        Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(tmp_path / f"d{i}" / f"x.{ext}")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = load_image_dataset(str(tmp_path))
    assert len(dataset) == 7
    assert all(dataset[i]["image"].size == (20, 20) for i in range(7))


def test_datasets_dataset_is_read_and_bad_rows_are_reported(tmp_path, images_dir):
    import datasets

    paths = sorted(str(p) for p in images_dir.rglob("*.png"))[:6]
    ds = datasets.Dataset.from_dict({"image": paths, "label": list(range(6))}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    dataset = load_image_dataset(str(tmp_path / "saved"))
    assert len(dataset) == 6 and dataset[0]["image"] is not None
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(paths[0]).read_bytes()[:100])
    ds2 = datasets.Dataset.from_dict({"img": [paths[0], str(broken)]}).cast_column("img", datasets.Image())
    dataset = load_image_dataset(str(_save(ds2, tmp_path / "saved2")), image_column="img")
    assert dataset[0]["image"] is not None
    assert dataset[1]["image"] is None and dataset[1]["error"]
    with pytest.raises(ValueError, match="no column 'image'.*'img'"):
        load_image_dataset(str(tmp_path / "saved2"))


def _save(ds, path):
    ds.save_to_disk(str(path))
    return path


def test_teacher_only_collator_matches_the_two_tower_one(teacher_dir, images_dir):
    """The teacher-embedding cache preprocesses for the teacher only (no wavelet transform of the student's input);
    its teacher pixels are exactly those of the collator the evaluation uses, and bad files are still skipped."""
    from waveclip_hf.training.data import DistillationCollator

    _, teacher_processor, _ = load_teacher(str(teacher_dir))
    student_processor = WaveCLIPImageProcessor(image_size=64, levels=1)
    dataset = load_image_dataset(str(images_dir))
    items = [dataset[i] for i in range(4)] + [{"index": 4, "name": "bad.png", "image": None, "error": "OSError"}]
    both = DistillationCollator(student_processor, teacher_processor)(items)
    teacher_only = DistillationCollator(None, teacher_processor)(items)
    assert "pixel_values" not in teacher_only and both["pixel_values"].shape == (5, 3, 64, 64)
    assert torch.equal(teacher_only["teacher_pixel_values"], both["teacher_pixel_values"])
    assert teacher_only["valid"].tolist() == [True, True, True, True, False]
    assert teacher_only["skipped"] == [("bad.png", "OSError")]
    with pytest.raises(ValueError, match="needs a student processor, a teacher processor or both"):
        DistillationCollator(None, None)


def test_epochs_of_batches_resumes_mid_epoch_where_it_left_off():
    """Batches handed out after a restart from a saved position continue the uninterrupted sequence, across epochs."""
    from accelerate import Accelerator

    from waveclip_hf.training.checkpoints import TrainerState
    from waveclip_hf.training.data import EpochPermutationSampler, epochs_of_batches

    accelerator = Accelerator(rng_types=[])

    def loader():
        return accelerator.prepare_data_loader(
            torch.utils.data.DataLoader(list(range(10)), batch_size=4, sampler=EpochPermutationSampler(10, seed=3))
        )

    straight_state = TrainerState()
    straight = epochs_of_batches(accelerator, loader(), straight_state)
    expected = [next(straight).tolist() for _ in range(8)]  # 3 batches per epoch: into the third epoch
    assert sorted(sum(expected[:3], [])) == list(range(10)) and expected[:3] != expected[3:6]

    state = TrainerState()
    first = epochs_of_batches(accelerator, loader(), state)
    got = [next(first).tolist() for _ in range(4)]
    assert (state.epoch, state.batches_in_epoch) == (1, 1)
    resumed_state = TrainerState(epoch=state.epoch, batches_in_epoch=state.batches_in_epoch)
    resumed = epochs_of_batches(accelerator, loader(), resumed_state)
    got += [next(resumed).tolist() for _ in range(4)]
    assert got == expected
    assert (
        (resumed_state.epoch, resumed_state.batches_in_epoch)
        == (straight_state.epoch, straight_state.batches_in_epoch)
        == (2, 2)
    )


def test_training_meter_reduces_windows_and_excludes_paused_time(tmp_path):
    from accelerate import Accelerator

    from waveclip_hf.training.metrics import TrainingMeter

    class Bar:
        def set_postfix(self, postfix, refresh):
            self.postfix = postfix

    bar = Bar()
    meter = TrainingMeter(
        Accelerator(), flops_per_image=2e9, peak_tflops=1.0, log_path=tmp_path / "log.jsonl", progress=bar
    )
    meter.add(torch.tensor(1.0), torch.tensor([0.5, 0.25]), batch_size=8)
    meter.add(torch.tensor(3.0), torch.tensor([0.7, 0.45]), batch_size=8)
    started = meter.started
    with meter.paused():
        time.sleep(0.05)
    assert meter.started - started >= 0.05  # the pause is not counted as training time
    metrics = meter.log(step=2, epoch=0, lr=1e-3, num_skipped=1)
    assert metrics["loss"] == pytest.approx(2.0) and metrics["lr"] == 1e-3 and metrics["skipped"] == 1
    assert (metrics["cosine_stage0"], metrics["cosine_stage1"]) == pytest.approx((0.6, 0.35))
    assert metrics["mfu"] == pytest.approx(metrics["images_per_second"] * 2e9 / 1e12)
    assert json.loads((tmp_path / "log.jsonl").read_text()) == metrics
    assert bar.postfix["loss"] == "2.0000" and bar.postfix["skipped"] == 1
    assert meter.micro_batches == 0 and meter.windows[0][0] == 16
    meter.windows = [(100, 100.0), (30, 1.0), (30, 2.0)]  # the first (start-up) window is left out
    assert meter.overall()[0] == pytest.approx(20.0)


def test_checkpoint_write_failure_publishes_nothing(tmp_path, monkeypatch):
    """A full disk (OSError) while writing leaves no step-N folder and keeps earlier checkpoints loadable."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    accelerator.prepare(torch.nn.Linear(3, 3))
    save_checkpoint(accelerator, tmp_path, 1, {"step": 1}, keep=3)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if "random_states" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="step-2.*No space left"):
        save_checkpoint(accelerator, tmp_path, 2, {"step": 2}, keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-1"]
    assert latest_checkpoint(tmp_path).name == "step-1"
    monkeypatch.setattr(torch, "save", real_save)
    # The next save works and rotation keeps the newest `keep`.
    for step in (2, 3, 4):
        save_checkpoint(accelerator, tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-3", "step-4"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_resume_ignores_tmp_and_incomplete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-5").mkdir(parents=True)
    (root / "step-5" / "trainer_state.json").write_text("{}")
    (root / "tmp-step-10").mkdir()
    (root / "tmp-step-10" / "trainer_state.json").write_text("{}")
    (root / "step-7").mkdir()  # no trainer state: not complete
    assert latest_checkpoint(tmp_path).name == "step-5"


# ------------------------------------------------------------------------------------------------- training


def read_log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]


def test_short_run_improves_stages_and_keeps_text_side_exact(teacher_dir, images_dir, tmp_path):
    # Evaluated on the training images: this checks that the optimisation fits the teacher, not generalisation
    # (64 images of a random teacher say nothing about that).
    config = tiny_config(
        teacher_dir,
        images_dir,
        tmp_path / "run",
        max_steps=30,
        eval_every=30,
        eval_data=str(images_dir),
        eval_holdout=0,
        report_to=["tensorboard"],
    )
    result = distill(config)
    start = next(entry for entry in read_log(tmp_path / "run") if entry["step"] == 0)
    # accelerate's TensorBoard tracker got what log.jsonl got: the training windows and the evaluations.
    windows = [entry for entry in read_log(tmp_path / "run") if "loss" in entry]
    logged = tensorboard_scalars(tmp_path / "run" / "distill", "loss")
    assert [step for step, _ in logged] == [entry["step"] for entry in windows] == [5, 10, 15, 20, 25, 30]
    assert np.allclose([value for _, value in logged], [entry["loss"] for entry in windows], rtol=1e-6)
    assert [step for step, _ in tensorboard_scalars(tmp_path / "run" / "distill", "eval/cosine_stage1")] == [0, 30]
    end = result.metrics
    # The conversion starts stage 0 as the teacher looking at a 2x downsampled image (close already); the detail stage
    # starts from fresh projections, far away.
    assert start["eval/cosine_stage0"] > 0.75 and start["eval/cosine_stage1"] < 0.4
    assert end["eval/cosine_stage1"] > start["eval/cosine_stage1"] + 0.3
    assert end["eval/cosine_stage0"] > 0.75
    assert result.images_per_second > 0 and result.mfu > 0

    teacher = CLIPModel.from_pretrained(teacher_dir).eval()
    student = WaveCLIPModel.from_pretrained(result.final_dir).eval()
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(result.final_dir)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = teacher.get_text_features(**tokens).pooler_output
        got = student.get_text_features(**tokens).pooler_output
    assert torch.equal(got, expected)
    assert torch.equal(student.logit_scale, teacher.logit_scale)


@pytest.mark.slow
def test_few_hundred_steps_bring_stages_close_to_teacher(teacher_dir, images_dir, tmp_path):
    """900 steps (~30 s): both stages end far above where they started and the full-detail stage is closest."""
    config = tiny_config(
        teacher_dir,
        images_dir,
        tmp_path / "run",
        max_steps=900,
        eval_every=300,
        log_every=50,
        eval_data=str(images_dir),
        eval_holdout=0,
    )
    result = distill(config)
    start = next(entry for entry in read_log(tmp_path / "run") if entry["step"] == 0)
    end = result.metrics
    assert start["eval/cosine_stage0"] < 0.9 and start["eval/cosine_stage1"] < 0.4
    assert end["eval/cosine_stage0"] > start["eval/cosine_stage0"] + 0.1
    assert end["eval/cosine_stage1"] > 0.97
    assert end["eval/cosine_stage1"] > end["eval/cosine_stage0"]


class Crash(Exception):
    """Stops a distillation mid-run, as a killed process would (`crash_at`)."""


def crash_at(step_to_crash: int):
    """An `evaluate` callback for `distill` that raises `Crash` at `step_to_crash` (checkpoints before it stay)."""

    def evaluate(model, step):
        if step == step_to_crash:
            raise Crash
        return {}

    return evaluate


def test_in_process_resume_equals_uninterrupted_run(teacher_dir, images_dir, tmp_path):
    """Crash after step 7 (checkpoints every 3), resume: same weights bit for bit as a straight 12-step run."""
    straight = distill(
        tiny_config(
            teacher_dir, images_dir, tmp_path / "a", max_steps=12, checkpoint_every=3, eval_every=0, eval_holdout=0
        )
    )
    reset_accelerate_state()

    config = tiny_config(
        teacher_dir, images_dir, tmp_path / "b", max_steps=12, checkpoint_every=3, eval_every=1, eval_holdout=0
    )
    with pytest.raises(Crash):
        distill(config, evaluate=crash_at(7))
    assert latest_checkpoint(tmp_path / "b").name == "step-6"
    reset_accelerate_state()
    config.resume = True
    resumed = distill(config, evaluate=lambda model, step: {})
    assert resumed.step == 12
    a, b = vision_state(straight.student), vision_state(resumed.student)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_resume_across_epochs_with_gradient_accumulation(teacher_dir, images_dir, tmp_path):
    """56 training images / batch 8 = 7 batches; accumulation 2 -> 4 steps per epoch (last one a single batch)."""
    kwargs = dict(max_steps=10, checkpoint_every=5, gradient_accumulation_steps=2, eval_holdout=8, eval_every=0)
    straight = distill(tiny_config(teacher_dir, images_dir, tmp_path / "a", **kwargs))
    reset_accelerate_state()
    config = tiny_config(teacher_dir, images_dir, tmp_path / "b", **{**kwargs, "max_steps": 5})
    distill(config)
    reset_accelerate_state()
    config = tiny_config(teacher_dir, images_dir, tmp_path / "b", **kwargs, resume=True)
    resumed = distill(config)
    state = json.loads((latest_checkpoint(tmp_path / "b") / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 10
    a, b = vision_state(straight.student), vision_state(resumed.student)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_label_vocabulary_kl_and_cached_teacher_embeddings(teacher_dir, images_dir, tmp_path):
    config = tiny_config(
        teacher_dir,
        images_dir,
        tmp_path / "run",
        max_steps=6,
        eval_every=3,
        log_every=3,
        label_vocabulary=PROMPTS,
        kl_weight=0.5,
        kl_temperature=2.0,
        cache_teacher_embeddings=True,
    )
    result = distill(config)
    assert set(result.metrics) >= {"eval/top1_agreement_stage0", "eval/top1_agreement_stage1"}
    assert result.train_flops_per_image["teacher_forward"] == 0  # cached: the teacher does not run per step
    card = (Path(result.final_dir) / "README.md").read_text()
    assert "on: 4 prompts, weight 0.5, temperature 2" in card and "top-1 agreement" in card
    assert all(np.isfinite(entry["loss"]) for entry in read_log(tmp_path / "run") if "loss" in entry)
    # With a label vocabulary the run fits the learned exit head on its held-out images and ships it in config.json.
    head = json.loads((Path(result.final_dir) / "config.json").read_text())["exit_head"]
    assert head["features"][0] == "margin" and head["examples"] > 0 and len(head["weight"]) == len(head["features"])


def test_bf16_autocast_runs_on_cpu(teacher_dir, images_dir, tmp_path):
    config = tiny_config(teacher_dir, images_dir, tmp_path / "run", max_steps=4, mixed_precision="bf16", log_every=2)
    result = distill(config)
    assert result.step == 4 and np.isfinite(result.train_metrics["loss"])
    assert next(result.student.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_corrupt_files_are_skipped_and_counted(teacher_dir, images_dir, tmp_path):
    data = tmp_path / "data"
    make_images(data, 24, seed=3)
    good = next(data.rglob("*.png")).read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "text.jpg").write_text("this is not a JPEG at all")
    (data / "empty.webp").write_bytes(b"")
    (data / "deep").mkdir()
    (data / "deep" / "zero.gif").write_bytes(b"GIF89a")
    config = tiny_config(teacher_dir, data, tmp_path / "run", max_steps=8, eval_holdout=0, log_every=2)
    result = distill(config)
    assert result.skipped_count == 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_count"] == 4
    assert {entry.split(" ")[0] for entry in summary["skipped_examples"]} == {
        "truncated.png",
        "text.jpg",
        "empty.webp",
        "deep/zero.gif",
    }
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped"] == 4
    assert np.isfinite(log[-1]["loss"])


def test_sigterm_in_process_saves_a_checkpoint_and_stops(teacher_dir, images_dir, tmp_path):
    def send_sigterm(model, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    config = tiny_config(teacher_dir, images_dir, tmp_path / "run", max_steps=50, eval_every=1, eval_holdout=0)
    result = distill(config, evaluate=send_sigterm)
    assert result.interrupted and result.step == 4 and result.final_dir is None
    assert latest_checkpoint(tmp_path / "run").name == "step-4"
    assert not (tmp_path / "run" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


# ------------------------------------------------------------------------------------------------- subprocesses


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted_run(teacher_dir, images_dir, tmp_path):
    """A real `python -m waveclip_hf.cli.distill` killed with SIGKILL after its 2nd checkpoint, then resumed, ends with
    exactly the weights of an uninterrupted run; every step-* folder that ever appeared was complete."""
    steps = 150
    straight = tiny_config(
        teacher_dir,
        images_dir,
        tmp_path / "straight",
        max_steps=steps,
        checkpoint_every=10,
        keep_checkpoints=3,
        eval_holdout=0,
    )
    subprocess.run(
        [PYTHON, "-m", "waveclip_hf.cli.distill", *cli_args(straight)],
        check=True,
        env=subprocess_env(),
        capture_output=True,
    )

    killed = tiny_config(
        teacher_dir,
        images_dir,
        tmp_path / "killed",
        max_steps=steps,
        checkpoint_every=10,
        keep_checkpoints=3,
        eval_holdout=0,
    )
    process = subprocess.Popen(
        [PYTHON, "-m", "waveclip_hf.cli.distill", *cli_args(killed)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    seen = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if checkpoints.is_dir():
                for path in checkpoints.glob("step-*"):
                    if path.name not in seen:  # published by a rename: complete the moment it is visible
                        state = path / "trainer_state.json"
                        assert state.exists() or not path.exists(), f"{path} is visible but incomplete"
                        seen.add(path.name)
                if len(seen) >= 2:
                    break
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    for checkpoint in checkpoints.glob("step-*"):  # every published checkpoint is complete and loads
        load_file(checkpoint / "model.safetensors")
        torch.load(checkpoint / "optimizer.bin", weights_only=False)
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == int(checkpoint.name[5:])
    last = latest_checkpoint(tmp_path / "killed")
    assert 10 <= int(last.name[5:]) < steps

    out = subprocess.run(
        [PYTHON, "-m", "waveclip_hf.cli.distill", *cli_args(killed), "--resume"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Resumed from {last}" in out.stderr
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_exits_143(teacher_dir, images_dir, tmp_path):
    """SIGTERM to the whole process group (as Slurm or `kill -TERM -<pgid>` do), data-loader workers included:
    the run finishes its step, checkpoints, says so and exits with 143, without a traceback."""
    config = tiny_config(
        teacher_dir,
        images_dir,
        tmp_path / "run",
        max_steps=100000,
        checkpoint_every=0,
        eval_holdout=0,
        log_every=1,
        num_workers=2,
    )
    process = subprocess.Popen(
        [PYTHON, "-m", "waveclip_hf.cli.distill", *cli_args(config)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "Stopped by SIGTERM" in stderr and "Traceback" not in stderr
    checkpoint = latest_checkpoint(tmp_path / "run")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] >= 3 and checkpoint.name == f"step-{state['step']}"
    load_file(checkpoint / "model.safetensors")


@pytest.mark.slow
def test_a_crash_with_workers_exits_instead_of_hanging(teacher_dir, images_dir, tmp_path):
    """Workers shrug off a group SIGTERM, but when the main process dies of an exception, multiprocessing's own
    SIGTERM must still end them (an ignored SIGTERM made the interpreter wait forever at exit)."""
    script = (
        "import sys\n"
        "from waveclip_hf.training.distillation import DistillationConfig, distill\n"
        "def boom(model, step):\n"
        "    if step == 2:\n"
        "        raise RuntimeError('boom at step 2')\n"
        "    return {}\n"
        f"distill(DistillationConfig(teacher={str(teacher_dir)!r}, train_data={str(images_dir)!r}, "
        f"output_dir={str(tmp_path / 'run')!r}, levels=1, cell_size=16, batch_size=8, max_steps=20, num_workers=2, "
        "eval_every=1, eval_holdout=0, checkpoint_every=0, peak_tflops=1.0, progress_bar=False), evaluate=boom)\n"
    )
    start = time.time()
    out = subprocess.run([PYTHON, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "boom at step 2" in out.stderr
    assert time.time() - start < 60


@pytest.mark.slow
def test_two_cpu_processes_sigterm_and_resume_equal_an_uninterrupted_run(teacher_dir, images_dir, tmp_path):
    """DDP over gloo (torchrun, 2 processes on CPU): SIGTERM to the group checkpoints on every rank in step,
    `--resume` continues, and the final weights equal an uninterrupted 2-process run bit for bit."""
    env = subprocess_env(ACCELERATE_USE_CPU="1")

    def torchrun(port):
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
        ]

    def config(name):
        return tiny_config(
            teacher_dir,
            images_dir,
            tmp_path / name,
            max_steps=40,
            batch_size=4,
            checkpoint_every=0,
            eval_holdout=0,
            log_every=1,
            num_workers=1,
        )

    subprocess.run([*torchrun(29611), *cli_args(config("straight"))], check=True, env=env, capture_output=True)
    process = subprocess.Popen(
        [*torchrun(29612), *cli_args(config("stopped"))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = tmp_path / "stopped" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 5):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "Stopped by SIGTERM" in stderr, stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "stopped")
    assert 5 <= int(checkpoint.name[5:]) < 40
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    out = subprocess.run(
        [*torchrun(29613), *cli_args(config("stopped")), "--resume"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_final_folder_loads_in_a_fresh_offline_process(teacher_dir, images_dir, tmp_path):
    config = tiny_config(teacher_dir, images_dir, tmp_path / "run", max_steps=6, eval_every=0)
    result = distill(config)
    final = Path(result.final_dir)
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_waveclip.py",
        "configuration_waveclip.py",
        "image_processing_waveclip.py",
        "tokenizer.json",
    ):
        assert (final / name).exists(), name

    images = sorted(images_dir.rglob("*.png"))[:3]
    from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor

    processor = WaveCLIPImageProcessor.from_pretrained(final)
    pixels = processor(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = result.student.eval().get_image_features(pixels).stage_pooler_outputs

    script = (
        "import sys, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        "folder, out, *paths = sys.argv[1:]\n"
        "model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()\n"
        "processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)\n"
        "pixels = processor(images=[Image.open(p) for p in paths], return_tensors='pt')['pixel_values']\n"
        "with torch.no_grad():\n"
        "    stages = model.get_image_features(pixels).stage_pooler_outputs\n"
        "assert 'waveclip_hf' not in sys.modules, 'the fresh process imported the package'\n"
        "torch.save({'stages': stages, 'pixels': pixels, 'cls': type(model).__module__}, out)\n"
    )
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [PYTHON, "-c", script, str(final), str(tmp_path / "out.pt"), *map(str, images)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = torch.load(tmp_path / "out.pt")
    assert "transformers_modules" in fresh["cls"]
    assert torch.equal(fresh["pixels"], pixels)
    torch.testing.assert_close(fresh["stages"], expected, rtol=0, atol=1e-6)


def test_model_card_front_matter_and_no_placeholders(teacher_dir, images_dir, tmp_path):
    import yaml

    config = tiny_config(teacher_dir, images_dir, tmp_path / "run", max_steps=3, eval_every=0)
    result = distill(config)
    card = (Path(result.final_dir) / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "zero-shot-image-classification"
    assert front["license"] == "other"  # the local teacher states none: its terms (test_model_card.py has the rest)
    assert set(front["tags"]) == {"waveclip", "clip", "wavelet", "zero-shot-image-classification", "distillation"}
    assert "$" not in card
    assert "margin_threshold" in card and "trust_remote_code=True" in card
    assert "cosine to teacher" in card and f"| 1 | {result.metrics['eval/cosine_stage1']:.4f} |" in card
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.pipeline_tag == "zero-shot-image-classification"


def test_model_card_rendering_fails_on_missing_values(tmp_path):
    from waveclip_hf.hub.model_card import render_model_card

    template = tmp_path / "t.md"
    template.write_text("---\nbase_model: $teacher\n---\n$steps steps, cost $$5\n")
    assert (
        render_model_card({"teacher": "x/y", "steps": 3}, template) == "---\nbase_model: x/y\n---\n3 steps, cost $5\n"
    )
    with pytest.raises(ValueError, match=r"\['steps'\]"):
        render_model_card({"teacher": "x/y"}, template)
    with pytest.raises(ValueError, match=r"\['steps'\]"):
        render_model_card({"teacher": "x/y", "steps": None}, template)


def test_an_installed_package_finds_the_model_card_template(tmp_path):
    """pyproject.toml ships hub_card/README.md.template inside the wheel as `waveclip_hf/hub_card/`; a package laid
    out that way (no repository around it) renders cards without `--model-card-template`."""
    import shutil
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    setuptools_config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_config["package-dir"]["waveclip_hf.hub_card"] == "hub_card"
    assert "waveclip_hf.hub_card" in setuptools_config["packages"]
    assert setuptools_config["package-data"]["waveclip_hf.hub_card"] == ["README.md.template"]

    site = tmp_path / "site-packages"
    shutil.copytree(repo / "src" / "waveclip_hf", site / "waveclip_hf", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "waveclip_hf" / "hub_card").mkdir()
    shutil.copy(repo / "hub_card" / "README.md.template", site / "waveclip_hf" / "hub_card")
    found = subprocess.run(
        [PYTHON, "-c", "import waveclip_hf.hub.model_card as m; print(m.__file__); print(m.DEFAULT_TEMPLATE)"],
        cwd=tmp_path,
        env=subprocess_env(PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert found == [
        str(site / "waveclip_hf" / "hub" / "model_card.py"),
        str(site / "waveclip_hf" / "hub_card" / "README.md.template"),
    ]


def test_cli_help_and_bad_teacher(tmp_path, images_dir):
    import dataclasses

    from waveclip_hf.cli.distill import build_parser, config_from_args

    parser = build_parser()
    flags = [action for action in parser._actions if action.dest != "help"]
    assert [a.option_strings[0] for a in flags if not a.help] == []  # every flag says what it does
    # transformers' HfArgumentParser: one flag per field of the config (plus --recipe), nothing written twice.
    assert {a.dest for a in flags} == {f.name for f in dataclasses.fields(DistillationConfig)} | {"recipe"}
    args = build_parser().parse_args(
        [
            "--train-data",
            "x",
            "--output-dir",
            "y",
            "--max-steps",
            "7",
            "--lr",
            "0.1",
            "--stage-weights",
            "1",
            "2",
            "--mixed-precision",
            "bf16",
        ]
    )
    config = config_from_args(args)
    assert (config.max_steps, config.learning_rate, config.stage_weights, config.mixed_precision) == (
        7,
        0.1,
        [1.0, 2.0],
        "bf16",
    )
    vocabulary = tmp_path / "labels.txt"
    vocabulary.write_text("a photo of a cat\n\na photo of a dog\n")
    args = build_parser().parse_args(["--train-data", "x", "--output-dir", "y", "--label-vocabulary", str(vocabulary)])
    assert config_from_args(args).label_vocabulary == ["a photo of a cat", "a photo of a dog"]


def test_a_saved_dataset_dict_gives_the_asked_split_and_names_the_others(tmp_path):
    import datasets

    from waveclip_hf.training.data import load_saved_split

    folder = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"x": [1, 2, 3]}), "validation": datasets.Dataset.from_dict({"x": [4]})}
    ).save_to_disk(str(folder))
    assert load_saved_split(folder, str(folder), "validation")["x"] == [4]
    assert len(load_saved_split(folder, str(folder), "train")) == 3
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\], not 'test'. Pass --data-split"):
        load_saved_split(folder, str(folder), "test")
    assert load_saved_split(tmp_path / "not_saved", "x", "train") is None
