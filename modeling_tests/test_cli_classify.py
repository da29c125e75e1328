"""Trying the model in five minutes: the README's snippet runs as written on the main job's folder, and the classify
command line answers for your own images, with clear messages for bad paths and unknown words."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from waveclip_hf import WaveCLIPConfig, WaveCLIPImageProcessor, WaveCLIPModel, WaveCLIPProcessor
from waveclip_hf.data.synthetic import AXES
from waveclip_hf.data.text_tokenizer import build_word_level_tokenizer, clip_text_config_kwargs


REPO = Path(__file__).resolve().parents[1]


def save_benchmark_folder(folder: Path) -> None:
    """A tiny WaveCLIP whose tokenizer knows the offline benchmark's words, as the main job's model does."""
    tokenizer = build_word_level_tokenizer([prompt for axis in AXES.values() for prompt in axis.prompts()])
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    config = WaveCLIPConfig(
        text_config={**tower, **clip_text_config_kwargs(tokenizer)},
        vision_config={**tower, "image_size": 64, "cell_size": 16},
        projection_dim=16,
    )
    torch.manual_seed(0)
    WaveCLIPModel(config).eval().save_pretrained(folder)
    WaveCLIPProcessor(WaveCLIPImageProcessor(image_size=64), tokenizer).save_pretrained(folder)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory with `runs/waveclip-offline`, where the main job leaves its model."""
    root = tmp_path_factory.mktemp("work")
    save_benchmark_folder(root / "runs" / "waveclip-offline")
    images = root / "my_images" / "nested"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(images / f"{index}.png")
    return root


def run(args, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}
    )


def test_the_readmes_use_snippet_runs_as_written(workdir):
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("## Use")[1].split("```python")[1].split("```")[0]
    assert 'from_pretrained("runs/waveclip-offline"' in snippet
    result = run([sys.executable, "-c", snippet], workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = eval(result.stdout.strip())  # noqa: S307 - the snippet prints the pipeline's list of dicts
    assert sorted(answer["label"] for answer in answers) == ["blue", "green", "red"]
    assert {"score", "label", "stage", "gflops"} == set(answers[0]) and answers[0]["stage"] in (0, 1)


def test_classify_answers_every_image_of_a_folder(workdir):
    result = run(
        [
            sys.executable,
            "-m",
            "waveclip_hf.cli.classify",
            "my_images",
            "--labels",
            "red,green,blue",
            "--template",
            "a photo of a {} shape",
            "--threshold",
            "0.3",
        ],
        workdir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    answer = r"(red|green|blue) \(0\.\d{3}\), stage [01], [\d.]+ GFLOPs \(\d\.\d\dx the full model\)"
    pattern = r"my_images/nested/\d\.png: " + answer
    assert all(re.fullmatch(pattern, line) for line in lines), lines


def test_classify_json_and_every_stage(workdir):
    result = run(
        [
            sys.executable,
            "-m",
            "waveclip_hf.cli.classify",
            "my_images/nested/0.png",
            "--labels",
            "circle,square,star",
            "--template",
            "a photo of a {}",
            "--json",
        ],
        workdir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout)
    assert answer["image"] == "my_images/nested/0.png" and answer["stage"] == 1  # no threshold: every stage
    assert answer["gflops"] == pytest.approx(answer["full_gflops"]) and len(answer["ranking"]) == 3


def test_classify_names_bad_paths_unknown_words_and_missing_calibrations(workdir):
    missing = run([sys.executable, "-m", "waveclip_hf.cli.classify", "nowhere.png", "--labels", "red,blue"], workdir)
    assert missing.returncode == 2 and "No such file or folder: nowhere.png." in missing.stderr
    (workdir / "empty").mkdir(exist_ok=True)
    empty = run([sys.executable, "-m", "waveclip_hf.cli.classify", "empty", "--labels", "red,blue"], workdir)
    assert empty.returncode == 2 and "empty holds no image files" in empty.stderr
    unknown = run(
        [
            sys.executable,
            "-m",
            "waveclip_hf.cli.classify",
            "my_images/nested/1.png",
            "--labels",
            "red,zebra",
            "--template",
            "a photo of a {} shape",
        ],
        workdir,
    )
    assert unknown.returncode == 0 and "does not know 'zebra' in 'a photo of a zebra shape'" in unknown.stderr
    auto = run(
        [
            sys.executable,
            "-m",
            "waveclip_hf.cli.classify",
            "my_images/nested/1.png",
            "--labels",
            "red,blue",
            "--threshold",
            "auto",
        ],
        workdir,
    )
    assert auto.returncode == 2 and "needs a calibration for these labels" in auto.stderr
    bad = run(
        [sys.executable, "-m", "waveclip_hf.cli.classify", "my_images", "--labels", "red,blue", "--threshold", "high"],
        workdir,
    )
    assert bad.returncode == 2 and "--threshold must be 'auto' or a number, got 'high'" in bad.stderr
