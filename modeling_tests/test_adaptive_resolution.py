"""The adaptive-resolution preset (448 px, L=2, three stages, three-scale benchmark): its report on embeddings with
known answers, its cache keys, and that the main job's keys stay as they were."""

import json

import pytest
import torch
from conftest import tiny_config
from test_end_to_end import tiny_clip_config

from waveclip_hf.data.synthetic import GENERATOR_VERSION, THREE_SCALE_AXES, THREE_SCALE_VERSION
from waveclip_hf.experiments import cached_steps
from waveclip_hf.experiments.adaptive_report import HAND_WRITTEN_MARKER, first_answering_stage
from waveclip_hf.experiments.adaptive_resolution import (
    PRESETS,
    adaptive_report,
    main_job_teacher,
    plain_clip_gflops,
    preset_settings,
    vit_b16_reference,
    write_adaptive_docs,
)
from waveclip_hf.experiments.end_to_end import EndToEndConfig
from waveclip_hf.experiments.report import portable_paths
from waveclip_hf.experiments.run_evaluation import evaluate
from waveclip_hf.training.teacher import TRAINING_INFO_NAME


# The stage that first sees each scale at 448 px / L=2: approximation, level-2 details, level-1 details.
FIRST_STAGE = {"coarse": 0, "fine": 1, "micro": 2}


def three_scale_embeddings(num_images: int = 12):
    """Each axis owns its dimensions (class c is a unit vector); stage s points at the true class of the axes whose
    scale stage s sees (`FIRST_STAGE`) and at a wrong class of the others; the teacher at every true class."""
    offsets, dim = {}, 0
    for name, axis in THREE_SCALE_AXES.items():
        offsets[name], dim = dim, dim + len(axis.class_names)
    rows = [
        {name: axis.class_names[i % len(axis.class_names)] for name, axis in THREE_SCALE_AXES.items()}
        for i in range(num_images)
    ]
    stages = torch.zeros(num_images, 3, dim)
    for i, row in enumerate(rows):
        for name, axis in THREE_SCALE_AXES.items():
            true = axis.class_names.index(row[name])
            for stage in range(3):
                seen = stage >= FIRST_STAGE[axis.scale]
                stages[i, stage, offsets[name] + (true if seen else (true + 1) % len(axis.class_names))] = 0.5
    embeddings = {"teacher": stages[:, 2].clone(), "student": stages, "logit_scale": torch.tensor([10.0])}
    for name, axis in THREE_SCALE_AXES.items():
        text = torch.eye(dim)[offsets[name] : offsets[name] + len(axis.class_names)]
        embeddings[f"text.{name}"], embeddings[f"student_text.{name}"] = text, text.clone()
    return embeddings, rows


def test_report_on_known_answers(tmp_path):
    embeddings, rows = three_scale_embeddings()
    student_config = tiny_config(levels=2)
    results = evaluate(
        embeddings, rows, student_config, tiny_clip_config(), [0.0, 0.5, 0.99, 1.01], 0.6, axes=THREE_SCALE_AXES
    )
    gflops = results["student_cumulative_gflops"]
    assert results["per_axis"]["color"]["stages"] == [1.0, 1.0, 1.0]
    assert results["per_axis"]["glyph"]["stages"] == [0.0, 1.0, 1.0]
    assert results["per_axis"]["grain"]["stages"] == [0.0, 0.0, 1.0]
    context = {
        "command": "python -m waveclip_hf.experiments.adaptive_resolution",
        "preset": "adaptive-448",
        "settings": preset_settings("adaptive-448"),
        "date": "2026-01-01 00:00 UTC",
        "machine": "test machine",
        "wall_minutes": 1.5,
        "step_seconds": {"benchmark": 1.0, "teacher": 2.0},
        "first_run": {"minutes": 3.0, "date": "2026-01-01 00:00 UTC", "machine": "test machine"},
        "teacher_training": {"images_seen": 10, "train_seconds": 1.0},
        "figures": {
            "curve": "figures/adaptive_accuracy_vs_gflops.png",
            "shares": "figures/adaptive_exit_stage_share.png",
        },
    }
    report = adaptive_report(results, student_config, context)
    # The keys, with accuracies as fractions.
    assert report["stage_gflops"] == gflops and report["clip_448_gflops"] > report["clip_224_gflops"] > 0
    assert report["per_axis"]["grain"] == {
        "scale": "micro",
        "teacher_accuracy": 1.0,
        "stage_accuracy": [0.0, 0.0, 1.0],
        "chance": 1 / 6,
    }
    # θ = 0.99 sends every image to stage 2 (all margins are the same 0.5-ish); it is the cheapest within 1 point.
    gated = report["gated"]
    assert (gated["margin_threshold"], gated["accuracy"], gated["rule"]) == (0.99, 1.0, "cheapest")
    assert gated["mean_gflops"] == pytest.approx(gflops[-1]) and gated["stage_share"] == [0.0, 0.0, 1.0]

    page = write_adaptive_docs(tmp_path, report)
    text = page.read_text()
    assert "| grain | micro | 16.7 | 100.0 | 0.0 | 0.0 | 100.0 | 100.0 |" in text
    assert "- coarse axes: answered color from stage 0, shape from stage 0; the gate spends" in text
    assert "- fine axes: answered texture from stage 1, glyph from stage 1;" in text
    assert "- micro axes: answered grain from stage 2;" in text
    assert (
        "- Micro axis grain: stage 0 -16.7, stage 1 -16.7, stage 2 +83.3 points over chance: near chance "
        "before stage 2; stage 2 reaches 100.0% (teacher 100.0%): learned at stage 2." in text
    )
    assert "- Teacher axes under 90%: none" in text
    assert (tmp_path / "figures" / "adaptive_accuracy_vs_gflops.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "adaptive_resolution.json").read_text())["gated"]["margin_threshold"] == 0.99

    # The hand-written part survives a rewrite.
    page.write_text(text + "Hand-written note.\n")
    write_adaptive_docs(tmp_path, report)
    assert page.read_text().count(HAND_WRITTEN_MARKER) == 1 and page.read_text().endswith("Hand-written note.\n")


def test_first_answering_stage():
    assert first_answering_stage([0.2, 0.95, 0.96]) == 1
    assert first_answering_stage([0.99, 0.5, 0.98]) == 0
    assert first_answering_stage([0.1, 0.1, 0.9]) == 2
    assert first_answering_stage([0.17, 0.16, 0.19], chance=1 / 6) is None


def test_costs_against_plain_clip():
    """At ViT-B/16 width stage 0 of 448 / L=2 / cell 64 is the 224-px model's 50 tokens and 8.64 GFLOPs, and the whole
    three-stage model costs less than half a 448-px CLIP ViT-B/16 (785 tokens)."""
    b16 = vit_b16_reference()
    assert b16["stage_tokens"] == [50, 148, 148]
    assert b16["stage_gflops"][0] == pytest.approx(8.64, abs=0.01)
    assert b16["clip_224_gflops"] == pytest.approx(35.13, abs=0.01)
    assert b16["stage_gflops"][-1] < 0.5 * b16["clip_448_gflops"]
    assert plain_clip_gflops(tiny_config(levels=2), 448) > 4 * plain_clip_gflops(tiny_config(levels=2), 224)


def test_benchmark_keys(monkeypatch, tmp_path):
    """The three-scale benchmark gets its own key; the main job's two-scale key is the one it always had."""
    calls = []
    monkeypatch.setattr(
        cached_steps, "generate_benchmark", lambda root, **kwargs: calls.append((root, kwargs)) or root
    )
    counts = {"num_train": 20_000, "num_validation": 1_000, "num_test": 5_000}
    two_scale = cached_steps.build_benchmark(tmp_path, counts, 0, 1, False)
    assert two_scale.name == f"benchmark-v{GENERATOR_VERSION}-6a4eae49cbab" and calls[0][1]["layout"] == "two-scale"
    settings = preset_settings("adaptive-448")
    three_scale = cached_steps.build_benchmark(tmp_path, settings, 0, 1, False)
    keyed = {
        "seed": 0,
        "generator_version": GENERATOR_VERSION,
        "num_train": settings["num_train"],
        "num_validation": settings["num_validation"],
        "num_test": settings["num_test"],
        "layout": "three-scale",
        "layout_version": THREE_SCALE_VERSION,
    }
    assert three_scale.name == f"benchmark-v{GENERATOR_VERSION}-{cached_steps.settings_hash(keyed)}"
    assert calls[1][1]["layout"] == "three-scale"
    with pytest.raises(ValueError, match="Unknown preset"):
        preset_settings("adaptive-896")
    assert preset_settings("adaptive-448", {"teacher": {"num_epochs": 1.0}})["teacher"]["patch_size"] == 64
    assert PRESETS["adaptive-448"]["teacher"]["image_size"] == 448


def test_the_preset_uses_bf16_only_where_it_runs_natively(monkeypatch):
    """ "auto" precision, resolved as the main job resolves it: float32 on a CPU that emulates bf16 (there the 448-px
    teacher's patch convolution took seconds a step in bf16), bf16 where it is native, which is what the preset
    said before, so the cache keys of runs made there stay valid."""
    for native, expected in ((False, "no"), (True, "bf16")):
        resolved = "bf16" if native else "no"
        monkeypatch.setattr(cached_steps, "auto_mixed_precision", lambda resolved=resolved: resolved)
        settings = preset_settings("adaptive-448")
        assert settings["teacher"]["mixed_precision"] == expected
        assert settings["distillation"]["mixed_precision"] == expected
    assert PRESETS["adaptive-448"]["teacher"]["mixed_precision"] == "auto"


def test_the_source_teacher_is_found_where_the_main_job_trains_it(monkeypatch, tmp_path):
    """`main_job_teacher` looks where `build_teacher` writes for the main job's resolved settings (a second
    derivation of the key once missed the resolved `mixed_precision` and looked in a folder nothing wrote)."""
    trained = []
    monkeypatch.setattr(cached_steps, "train_clip_teacher", lambda data_root, output, *a, **k: trained.append(output))
    settings = EndToEndConfig(cache_dir=str(tmp_path), seed=3).settings()
    data_root = cached_steps.benchmark_folder(tmp_path, settings, 3)
    cached_steps.build_teacher(tmp_path, settings, data_root, 3, 1, False)
    with pytest.raises(FileNotFoundError, match=str(trained[0])):
        main_job_teacher(tmp_path, 3)
    trained[0].mkdir()
    (trained[0] / TRAINING_INFO_NAME).write_text("{}")
    assert main_job_teacher(tmp_path, 3) == trained[0].resolve()


def test_patch_scaled_teacher_reads_a_2x_nearest_upsample_like_the_original():
    from transformers import CLIPModel

    from waveclip_hf.experiments.interpolated_teacher import patch_scaled_copy

    torch.manual_seed(0)
    teacher = CLIPModel(tiny_clip_config()).eval()
    scaled = patch_scaled_copy(teacher)
    assert (scaled.config.vision_config.image_size, scaled.config.vision_config.patch_size) == (128, 32)
    pixels = torch.randn(2, 3, 64, 64)
    upsampled = pixels.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    with torch.no_grad():
        expected = teacher.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(
            scaled.get_image_features(pixel_values=upsampled).pooler_output, expected, atol=1e-5, rtol=1e-5
        )
        # Interpolated positions on the same upsample read a 4x4 grid of 16-px patches: another embedding.
        interpolated = teacher.get_image_features(pixel_values=upsampled, interpolate_pos_encoding=True).pooler_output
    assert not torch.allclose(interpolated, expected, atol=1e-2)


def test_a_student_at_twice_the_teachers_size_needs_no_interpolated_positions():
    """`convert_clip_to_waveclip` from a teacher at S px to a student at 2S px, L=2, 2C-px cells: the same cell grid as
    the teacher's patch grid (its positions are taken as they are), and stage 0, which reads the 4x downsample,
    starts close to the teacher on the S-px image (measured: cosine 0.985 on random images at this seed)."""
    import numpy as np
    from transformers import CLIPModel

    from waveclip_hf.conversion.clip_to_waveclip import convert_clip_to_waveclip
    from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor
    from waveclip_hf.training.teacher_data import build_image_processor

    torch.manual_seed(0)
    teacher = CLIPModel(tiny_clip_config()).eval()  # 64 px, patch 16: a 4 x 4 grid
    student = convert_clip_to_waveclip(teacher, image_size=128, levels=2, cell_size=32).eval()
    assert student.config.vision_config.grid_size == 4 and student.config.vision_config.stage_lengths == [17, 49, 49]
    small = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    big = [image.repeat(2, 0).repeat(2, 1) for image in small]
    with torch.no_grad():
        expected = teacher.get_image_features(
            pixel_values=build_image_processor(64)(list(small), return_tensors="pt")["pixel_values"]
        ).pooler_output
        stage0 = student.get_image_features(
            WaveCLIPImageProcessor(image_size=128, levels=2)(big, return_tensors="pt")["pixel_values"]
        ).stage_pooler_outputs[:, 0]
    assert torch.nn.functional.cosine_similarity(stage0, expected).min() > 0.95


def test_the_label_free_gate_is_evaluated_on_the_benchmarks_own_axes():
    embeddings, rows = three_scale_embeddings()
    results = evaluate(
        embeddings,
        rows,
        tiny_config(levels=2),
        tiny_clip_config(),
        [0.0, 0.5, 0.99, 1.01],
        0.6,
        calibration_embeddings=embeddings["student"],
        axes=THREE_SCALE_AXES,
    )
    assert list(results["label_free"]["per_axis"]) == list(THREE_SCALE_AXES) == list(results["per_axis"])
    # Calibrated on the test images themselves, every axis keeps at least 99% of the full model's answers there.
    assert all(row["test_agreement"] >= 0.99 for row in results["label_free"]["per_axis"].values())
    assert len(results["summary"]["stage_flip_rate_mean"]) == 3


def test_reports_name_no_folder_of_the_machine(tmp_path):
    """Paths under the cache folders become "<label>/..." (also through a symlink); other strings stay."""
    cache, main = tmp_path / "cache", tmp_path / "main"
    cache.mkdir(), main.mkdir()
    (tmp_path / "link").symlink_to(main)
    report = {
        "student": str(cache / "student-1" / "final"),
        "teacher": [str(main.resolve() / "teacher-2")],
        "nested": {"linked": str(tmp_path / "link" / "teacher-3"), "other": "/elsewhere/x", "n": 1.5},
        "prefix_only": str(cache) + "-other",
    }
    assert portable_paths(report, {"<cache>": cache, "<main job cache>": tmp_path / "link"}) == {
        "student": "<cache>/student-1/final",
        "teacher": ["<main job cache>/teacher-2"],
        "nested": {"linked": "<main job cache>/teacher-3", "other": "/elsewhere/x", "n": 1.5},
        "prefix_only": str(cache) + "-other",
    }


TINY_PRESET = {
    "num_train": 16,
    "num_validation": 4,
    "num_test": 12,
    "teacher": {
        "vision_hidden_size": 32,
        "vision_intermediate_size": 64,
        "vision_num_layers": 1,
        "text_hidden_size": 32,
        "text_intermediate_size": 64,
        "text_num_layers": 1,
        "projection_dim": 16,
        "batch_size": 8,
        "num_epochs": 1.0,
        "mixed_precision": "no",
    },
    "distillation": {"max_steps": 2, "batch_size": 4, "mixed_precision": "no"},
}


@pytest.mark.slow
def test_the_preset_runs_end_to_end_and_records_its_first_run(tmp_path):
    """The whole preset on a tiny benchmark (~1 min): the JSON keys, a first-run record from the run that built
    every step (and none written by a rerun that reused them), and no folder of this machine in the reports."""
    from waveclip_hf.experiments.adaptive_resolution import main

    argv = [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--docs-dir",
        str(tmp_path / "docs"),
        "--fresh-teacher",
        "--num-workers",
        "1",
        "--no-progress",
        "--override",
        json.dumps(TINY_PRESET),
    ]
    first = main(argv)
    assert len(first["stage_gflops"]) == 3 and first["clip_448_gflops"] > first["clip_224_gflops"]
    assert set(first["per_axis"]) == set(THREE_SCALE_AXES) and first["per_axis"]["grain"]["scale"] == "micro"
    assert first["context"]["first_run"]["minutes"] == first["context"]["wall_minutes"]
    written = (tmp_path / "docs" / "adaptive_resolution.json").read_text()
    assert str(tmp_path) not in written and "<cache>/student-" in written
    again = main(argv)  # every step reused: the first run's record, not this run's time
    assert again["context"]["first_run"] == first["context"]["first_run"]
    assert again["context"]["wall_minutes"] < first["context"]["wall_minutes"]
