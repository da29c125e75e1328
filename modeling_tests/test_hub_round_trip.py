"""The life of a checkpoint after our tests end: load, serve from threads, fine-tune, calibrate, save, push, load
again, each step in a fresh process without this package (`waveclip_hf.hub.round_trip`), and the smaller promises
a user meets on the way (calibrations in any label order, the calibration CLI's file, a missing image file).

The round trip runs five fresh Python processes (about a minute on a 2-core CPU): it stays in the default suite
because it is the only test of what a Hub user does with a folder after loading it.
"""

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_hub_loading import LABELS, save_tiny_folder
from transformers import pipeline

from waveclip_hf import GateCalibration, WaveCLIPZeroShotImageClassificationPipeline
from waveclip_hf.hub.round_trip import run_round_trip
from waveclip_hf.models.waveclip.gate_calibration import find_calibration, label_set_key


REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (REPO / "src/waveclip_hf/models/waveclip").glob("*.py") if p.name != "__init__.py")


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory) -> dict:
    return run_round_trip(tmp_path_factory.mktemp("round_trip"), SHIPPED)


def test_every_save_after_loading_holds_every_file_and_reloads_bit_identical(round_trip):
    saves = ("model_and_processor", "pipeline", "bfloat16", "fine_tuned", "calibrated", "pushed")
    assert round_trip["load_and_save"]["loaded_from"].startswith("transformers_modules.")  # the folder's own code
    assert round_trip["missing_files"] == {name: [] for name in saves}
    for name in saves:
        assert round_trip["identical_outputs"][name] == {
            "stages": True,
            "text": True,
            "pipeline_scores": True,
            "pipeline_stages": True,
        }, name
    assert round_trip["reload"]["bfloat16"]["dtype"] == "torch.bfloat16"
    assert (
        round_trip["reload"]["calibrated"]["calibrations"] == 1 and round_trip["reload"]["pushed"]["calibrations"] == 1
    )


def test_a_pipeline_save_that_fails_midway_leaves_nothing(round_trip):
    failed = round_trip["load_and_save"]["failed_save"]
    assert "No space left on device" in failed["error"]
    assert failed["target_exists"] is False and failed["leftovers"] == []


def test_one_pipeline_and_one_refine_shared_by_8_threads_answer_as_in_sequence(round_trip):
    for name in ("pipeline", "refine"):
        assert round_trip["threads"][name] == {"calls": 24, "threads": 8, "errors": [], "differ": 0}, name


def test_a_model_object_gets_the_gated_pipeline_and_clip_the_stock_one(round_trip):
    answer = round_trip["model_object"]
    assert answer["class"] == "WaveCLIPZeroShotImageClassificationPipeline"
    assert answer["stage"] == 0 and answer["keys"] == ["gflops", "label", "score", "stage"]
    assert answer["logged_errors"] == []  # e.g. not "The model 'WaveCLIPModel' is not supported for ..."
    assert (
        answer["clip_class"]
        == "transformers.pipelines.zero_shot_image_classification.ZeroShotImageClassificationPipeline"
    )


def test_a_saved_calibration_answers_auto_in_a_fresh_process_for_labels_in_any_order(round_trip):
    calibrated = round_trip["calibrated"]
    assert calibrated["threshold"] == pytest.approx(round_trip["load_and_save"]["calibration"]["threshold"])
    assert calibrated["auto_equals_explicit"] and calibrated["labels_back_in_caller_order"]
    assert "needs a calibration for these labels" in calibrated["uncalibrated_error"]
    assert "holds 1 calibration(s), none for this set" in calibrated["uncalibrated_error"]


# ---------------------------------------------------------------------------------------------------------------
# In-process: the same promises, quickly
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_tiny_folder(folder, levels=2)
    return folder


def noise_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8) for _ in range(count)]


def test_calibration_keys_ignore_label_order_but_not_template_or_tokenizer_settings():
    assert label_set_key(["b", "a"], "x {}") == label_set_key(["a", "b"], "x {}")
    assert label_set_key(["a", "b"], "x {}") != label_set_key(["a", "b"], "y {}")
    assert label_set_key(["a", "b"], ("x {}", "y {}")) == label_set_key(["a", "b"], ["x {}", "y {}"])
    assert label_set_key(["a", "b"], "x {}", {"truncation": True}) != label_set_key(["a", "b"], "x {}")


def test_calibrate_stores_into_the_config_and_save_pretrained_keeps_it(folder, tmp_path):
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    calibration = classifier.calibrate(noise_images(30), candidate_labels=LABELS, target_agreement=0.9)
    stored = find_calibration(classifier.model.config, LABELS[::-1], "This is a photo of {}.")
    assert stored.to_dict() == calibration.to_dict() and stored.labels == sorted(LABELS)
    # Calibrating the same set again (another order) replaces it; another set is kept beside it.
    classifier.calibrate(noise_images(30, seed=1), candidate_labels=LABELS[::-1], target_agreement=0.8)
    classifier.calibrate(noise_images(30), candidate_labels=LABELS[:2], target_agreement=0.9)
    assert len(classifier.model.config.gate_calibrations) == 2
    classifier.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["gate_calibrations"]
    assert [record["labels"] for record in saved] == [sorted(LABELS), sorted(LABELS[:2])]
    assert saved[0]["format"] == 1 and saved[0]["gflops_ratio"] == pytest.approx(
        saved[0]["mean_gflops"] / saved[0]["full_gflops"]
    )


def test_the_calibration_cli_file_loads_back_into_a_pipeline(folder, tmp_path):
    images = tmp_path / "unlabelled"
    images.mkdir()
    for index, image in enumerate(noise_images(12)):
        from PIL import Image

        Image.fromarray(image).save(images / f"{index}.png")
    model = tmp_path / "model"
    save_tiny_folder(model, levels=2)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "waveclip_hf.cli.calibrate",
            "--model",
            str(model),
            "--images",
            str(images),
            "--labels",
            *LABELS,
            "--target-agreement",
            "0.9",
            "--output-dir",
            str(tmp_path / "out"),
            "--save-to-model",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "gate_calibration.json").read_text())
    assert record["num_images"] == 12 and record["labels"] == sorted(LABELS) and record["candidate_labels"] == LABELS
    # The file reads back into a pipeline of another folder, and --save-to-model put it into the model's config.
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    loaded = classifier.add_calibration(tmp_path / "out" / "gate_calibration.json")
    assert loaded.threshold == pytest.approx(record["threshold"])
    assert classifier.calibrated_threshold(LABELS[::-1]) == pytest.approx(record["threshold"])
    saved = pipeline("zero-shot-image-classification", model=str(model), trust_remote_code=True)
    assert saved.calibrated_threshold(LABELS) == pytest.approx(record["threshold"])
    with pytest.raises(ValueError, match="Cannot read the calibration file"):
        classifier.add_calibration(tmp_path / "nowhere.json")


def test_a_calibration_from_a_newer_format_is_refused_not_misread():
    record = GateCalibration(0.1, 0.99, 1.0, 2.0, labels=["a", "b"]).to_dict()
    assert GateCalibration.from_dict(record).threshold == 0.1
    with pytest.raises(ValueError, match="format 2, newer than this model code reads"):
        GateCalibration.from_dict({**record, "format": 2})


def test_a_missing_image_file_through_the_pipeline_names_the_file(folder, tmp_path):
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    missing = str(tmp_path / "holiday.jpg")
    with pytest.raises(ValueError, match=re.escape(f"Cannot read image file '{missing}': no such file.")):
        classifier(missing, candidate_labels=LABELS)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(
        ValueError, match=r"Cannot read image file '.*notes\.png': .*Check that it is a complete image"
    ):
        classifier(str(tmp_path / "notes.png"), candidate_labels=LABELS)


def test_a_folder_needs_trust_remote_code_for_its_pipeline_even_with_the_package_imported(folder):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("zero-shot-image-classification", model=str(folder))
    by_class = pipeline(
        "zero-shot-image-classification", model=str(folder), pipeline_class=WaveCLIPZeroShotImageClassificationPipeline
    )
    assert by_class(noise_images(1)[0], candidate_labels=LABELS, margin_threshold=0.0)[0]["stage"] == 0


def test_label_embeddings_are_shared_safely_between_threads(folder):
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    label_sets = [[f"label {i} {j}" for j in range(3)] for i in range(40)]  # more sets than the cache keeps
    expected = {tuple(labels): classifier.label_embeddings(labels, "{}") for labels in label_sets}
    errors = []

    def worker(offset):
        for labels in label_sets[offset::4]:
            try:
                assert torch.equal(classifier.label_embeddings(labels, "{}"), expected[tuple(labels)])
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
