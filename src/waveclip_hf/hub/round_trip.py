"""The life of a checkpoint after our tests end, as its users live it: load, serve, fine-tune, calibrate, save, push,
load again, each step in a fresh process without this package.

`run_round_trip(work)` builds a small folder with the package's API (a tiny WaveCLIP, its image processor and
processor, a word-level tokenizer), then runs every step of `round_trip_steps.py` in its own fresh Python process,
with `import waveclip_hf` blocked, offline, and with its own module cache, and checks what each wrote:

1. saved again after loading (model + processor, the pipeline, a bfloat16 load, after a few optimizer steps,
   after a calibration, through `push_to_hub`), every folder holds every shipped file and loads to bit-identical
   outputs; a pipeline save that fails midway leaves nothing behind;
2. `pipeline(task, model=<WaveCLIPModel object>)` is the gated pipeline, and a CLIP model still gets the stock one;
3. one pipeline and one model's `refine` shared by 8 threads answer exactly as the same calls in sequence;
4. a calibration saved with the model is used by `margin_threshold="auto"`, for its labels in any order.

`python scripts/hub_round_trip.py` prints the report; `modeling_tests/test_hub_round_trip.py` asserts it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.text_tokenizer import build_word_level_tokenizer, clip_text_config_kwargs
from ..models.waveclip.configuration_waveclip import WaveCLIPConfig
from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor
from ..models.waveclip.modeling_waveclip import WaveCLIPModel
from ..models.waveclip.processing_waveclip import WaveCLIPProcessor


STEPS_SCRIPT = Path(__file__).with_name("round_trip_steps.py")
STEP_ORDER = ("load_and_save", "reload", "calibrated", "threads", "model_object")
LABELS = ["red square", "green circle", "blue stripes", "white noise"]


def build_tiny_folder(folder: Path, levels: int = 1, seed: int = 0) -> WaveCLIPModel:
    """A complete tiny checkpoint written with the package's API: weights, config, remote code, processor (image
    processor and an offline word-level tokenizer)."""
    tokenizer = build_word_level_tokenizer(
        [f"a photo of a {label}." for label in LABELS] + [f"This is a photo of {label}." for label in LABELS]
    )
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    text_config = {**tower, **clip_text_config_kwargs(tokenizer)}
    vision_config = {**tower, "image_size": 64, "cell_size": 16, "levels": levels}
    torch.manual_seed(seed)
    model = WaveCLIPModel(WaveCLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16))
    model.eval().save_pretrained(folder)
    WaveCLIPProcessor(WaveCLIPImageProcessor(image_size=64, levels=levels), tokenizer).save_pretrained(folder)
    return model


def run_step(step: str, work: Path, timeout: float = 300) -> dict:
    """Run one step in a fresh, offline Python with its own module cache; its JSON report."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(work / f"modules-{step}"),
        TOKENIZERS_PARALLELISM="false",
    )
    run = subprocess.run(
        [sys.executable, str(STEPS_SCRIPT), step, str(work)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if run.returncode != 0:
        raise RuntimeError(f"round-trip step {step!r} failed:\n{run.stderr[-4000:]}")
    return json.loads((work / f"{step}.json").read_text())


def compare_saved_outputs(work: Path, saves) -> dict:
    """For each save, whether every output tensor after reloading equals the reference bit for bit."""
    references = {
        "bfloat16": "reference_bfloat16",
        "fine_tuned": "reference_fine_tuned",
        "calibrated": "reference_fine_tuned",
        "pushed": "reference_fine_tuned",
    }
    result = {}
    for name in saves:
        expected = load_file(work / f"{references.get(name, 'reference')}.safetensors")
        got = load_file(work / f"reloaded_{name}.safetensors")
        result[name] = {key: bool(torch.equal(expected[key], got[key])) for key in expected}
    return result


def run_round_trip(work: Path, shipped_files: list[str]) -> dict:
    """Build the folder, run every step, and gather one report (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    build_tiny_folder(work / "source")
    report = {step: run_step(step, work) for step in STEP_ORDER}
    report["identical_outputs"] = compare_saved_outputs(work, report["reload"])
    report["missing_files"] = {
        name: sorted(set(shipped_files) - set(entry["files"])) for name, entry in report["reload"].items()
    }
    return report


__all__ = ["build_tiny_folder", "run_round_trip", "run_step"]
