"""Smoke test of the benchmark harness: every section runs on tiny configs and the reports carry the expected keys.

No timing assertions: the numbers depend on the machine and on whatever else runs on it.
"""

import json

import pytest
import torch

import waveclip_hf.benchmarking.timing as timing
from waveclip_hf.benchmarking import (
    HAND_WRITTEN_MARKER,
    SECTIONS,
    BenchmarkSettings,
    Schedule,
    evaluate_targets,
    run_benchmarks,
)
from waveclip_hf.benchmarking.contention import QuietPolicy
from waveclip_hf.benchmarking.encoder import ENCODER_CONFIGS, encoder_rows
from waveclip_hf.benchmarking.report import write_reports
from waveclip_hf.benchmarking.run import main
from waveclip_hf.benchmarking.settings import SECTION_NAMES, quick_settings
from waveclip_hf.benchmarking.timing import run_interleaved, summarize


def tiny_settings(**overrides) -> BenchmarkSettings:
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=64,
        patch_size=8,
        projection_dim=16,
        cell_size=16,
        levels=1,
        text_hidden_size=32,
        text_num_hidden_layers=2,
        text_num_attention_heads=4,
        text_intermediate_size=64,
        text_max_length=16,
        cpu_schedules=(Schedule(1, 1, 2), Schedule(3, 0, 1)),
        cpu_early_exit=Schedule(4, 0, 2),
        preprocessing_single=Schedule(1, 0, 1),
        preprocessing_batch=Schedule(3, 0, 1),
        profile_batch_size=2,
        gpu_schedules=(Schedule(2, 0, 1),),
        gpu_early_exit=Schedule(4, 0, 1),
        num_labels=12,
        pipeline_images=2,
        stock_pipeline_images=1,
        pipeline_rounds=1,
        pipeline_batch_sizes=(1, 2),
        compile_backend=None,
        single_image_schedules=(Schedule(1, 0, 1),),
        # `single_image` exports ONNX graphs (seconds each): its own test runs it.
        sections=tuple(name for name in SECTION_NAMES if name != "single_image"),
    )
    settings.update(overrides)
    return BenchmarkSettings(**settings)


def test_summarize_gives_median_quartiles_and_range():
    summary = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (summary["median"], summary["q1"], summary["q3"], summary["iqr"]) == (3.0, 2.0, 4.0, 2.0)
    assert (summary["min"], summary["max"], summary["n"]) == (1.0, 5.0, 5)
    with pytest.raises(ValueError, match="No samples"):
        summarize([])


def test_run_interleaved_runs_warmup_untimed_then_rotates_the_trials():
    calls = []

    def case(name):
        def run(watch):
            calls.append(name)
            with watch.part("inner"):
                pass

        return run

    times = run_interleaved({"a": case("a"), "b": case("b")}, warmup=1, trials=2, device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert set(times) == {"a", "b"}
    assert all(len(times[name]["total"]) == 2 and len(times[name]["inner"]) == 2 for name in times)


def test_rounds_during_which_other_processes_were_busy_are_re_run(monkeypatch):
    readings = iter([2.0, 0.0, 1.5, 1.5, 0.1])  # round 1: busy then quiet; round 2: busy, busy, then quiet

    class FakeMonitor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.result = {"others_busy_cores": next(readings), "steal_cores": 0.0, "seconds": 5.0}

    monkeypatch.setattr(timing, "CpuMonitor", FakeMonitor)
    monkeypatch.setattr(timing, "wait_for_idle", lambda *args, **kwargs: {})
    calls, stats = [], {}
    times = run_interleaved(
        {"a": lambda watch: calls.append("a")},
        warmup=0,
        trials=2,
        device=torch.device("cpu"),
        quiet=QuietPolicy(max_busy_cores=0.3, max_retries=3),
        stats=stats,
    )
    assert len(calls) == 5 and len(times["a"]["total"]) == 2
    assert stats == {"rounds_busy_cores": [0.0, 0.1], "discarded_rounds": 3, "contended_rounds_kept": 0}


def test_quick_run_writes_json_markdown_and_plot(tmp_path):
    results = run_benchmarks(tiny_settings(), command="pytest smoke", log=lambda *_: None)
    paths = write_reports(results, tmp_path, notes="profiled nothing")
    assert set(paths) == {"json", "markdown", "plot"}
    assert paths["plot"].stat().st_size > 0

    report = json.loads(paths["json"].read_text())
    assert {
        "meta",
        "settings",
        "encoder",
        "encoder_profile",
        "early_exit",
        "preprocessing",
        "pipeline",
        "targets",
    } <= set(report)
    assert set(report["encoder_profile"]["calls"]) == {
        "clip_full",
        "waveclip_stage0_cached",
        "waveclip_stage1_from_cache",
        "waveclip_full_forward",
    }
    meta = report["meta"]
    assert {"cpu_model", "cpu_cores", "torch", "date_utc", "command", "flops_convention", "wall_seconds"} <= set(meta)
    assert meta["command"] == "pytest smoke"

    encoder = report["encoder"]["cpu"]["float32"]
    assert set(encoder) == {"1", "3"}
    for entry in encoder.values():  # the quick settings do not compile
        assert set(entry["configs"]) == {name for name in ENCODER_CONFIGS if not name.endswith("_compiled")}
        assert entry["first_call_seconds"] == {}
        for row in entry["configs"].values():
            assert {
                "median",
                "q1",
                "q3",
                "min",
                "max",
                "samples",
                "ms_per_image",
                "gflops_per_image",
                "gflops_per_second",
            } <= set(row)
            assert row["gflops_per_image"] > 0
    if torch.cuda.is_available():
        assert set(report["encoder"]["cuda"]) == {"float32", "bfloat16"}
    else:  # the GPU path is skipped, and the report says why
        assert "torch.cuda.is_available() is False" in report["encoder"]["cuda"]["skipped"]
        assert "torch.cuda.is_available() is False" in paths["markdown"].read_text()

    rows = report["early_exit"]["cpu"]["rows"]
    assert [row["exit_fraction"] for row in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [row["exited_images"] for row in rows] == [0, 1, 2, 3, 4]
    assert all({"predicted_seconds", "deviation_percent", "gflops_per_image"} <= set(row) for row in rows)
    # GFLOPs fall with the exit fraction; at f = 1 every image stops after stage 0.
    assert [row["gflops_per_image"] for row in rows] == sorted((row["gflops_per_image"] for row in rows), reverse=True)

    preprocessing = report["preprocessing"]
    assert preprocessing["processors"]["waveclip"] == "WaveCLIPImageProcessor"
    assert preprocessing["processors"]["waveclip_fast"] == "WaveCLIPImageProcessorFast"
    assert {"astronaut", "coffee", "chelsea", "rocket", "random_1024"} == set(preprocessing["single"])
    assert all(preprocessing["single"][name]["waveclip_fast"]["median"] > 0 for name in preprocessing["single"])

    pipeline = report["pipeline"]
    assert pipeline["num_labels"] == 12
    assert pipeline["waveclip_pipeline_class"] == "WaveCLIPZeroShotImageClassificationPipeline"
    runs = pipeline["runs"]
    assert set(runs) == {
        "stock",
        "stock_image_side",
        "waveclip_theta0_first",
        "waveclip_theta0",
        "waveclip_theta_middle",
        "waveclip_theta_high",
        "stock@batch2",
        "waveclip_theta0@batch2",
        "waveclip_theta_middle@batch2",
        "waveclip_theta_high@batch2",
        "bare_waveclip_theta0",
        "stock_image_side_int8",
        "waveclip_theta0_int8",
    }
    # int8 changes the arithmetic, not the count: the same GFLOPs as float32, and the same answering stage.
    int8_gflops = runs["waveclip_theta0_int8"]["gflops_per_image"]
    assert int8_gflops == pytest.approx(runs["waveclip_theta0"]["gflops_per_image"])
    assert runs["stock_image_side_int8"]["gflops_per_image"] == runs["stock_image_side"]["gflops_per_image"]
    assert runs["waveclip_theta0_int8"]["exit_fraction_stage0"] == 1.0
    # The bare path does what the θ = 0 pipeline does (stage 0 for every image): same GFLOPs.
    assert runs["bare_waveclip_theta0"]["gflops_per_image"] == pytest.approx(
        runs["waveclip_theta0"]["gflops_per_image"]
    )
    assert runs["waveclip_theta_high@batch2"]["exit_fraction_stage0"] == 0.0
    assert runs["waveclip_theta0"]["exit_fraction_stage0"] == 1.0
    assert runs["waveclip_theta_high"]["exit_fraction_stage0"] == 0.0
    assert all(run["images_per_second"] > 0 and run["gflops_per_image"] > 0 for run in runs.values())

    targets = report["targets"]
    assert len(targets) >= 10 and all(isinstance(t["passed"], bool) for t in targets)

    markdown = paths["markdown"].read_text()
    for heading in (
        "## Targets",
        "## 1. Image encoder",
        "## 2. Preprocessing",
        "## 3. Zero-shot pipeline",
        "## 4. Early exit",
        "## Profiling notes",
    ):
        assert heading in markdown
    assert "`pytest smoke`" in markdown and "FLOPs convention" in markdown and meta["cpu_model"] in markdown
    overhead = runs["waveclip_theta0"]["ms_per_image"] - runs["bare_waveclip_theta0"]["ms_per_image"]
    assert f"The pipeline's own cost at θ = 0, `batch_size=1`: {overhead:.1f} ms per image" in markdown

    # The command line re-renders the same report from the JSON alone.
    notes = tmp_path / "notes.md"
    notes.write_text("profiled nothing")
    main(["--from-json", str(paths["json"]), "--output-dir", str(tmp_path / "again"), "--notes", str(notes)])
    assert (tmp_path / "again" / "benchmarks.md").read_text() == markdown
    assert (tmp_path / "again" / "benchmark_time_vs_gflops.png").stat().st_size > 0

    # A hand-written analysis after the marker survives regeneration, once.
    paths["markdown"].write_text(markdown + "\n" + HAND_WRITTEN_MARKER + "\n## Findings\n\nstage 1 is slow\n")
    write_reports(results, tmp_path)
    regenerated = paths["markdown"].read_text()
    assert regenerated.count(HAND_WRITTEN_MARKER) == 1 and regenerated.endswith("stage 1 is slow\n")


def test_the_sections_run_in_the_order_the_settings_name_them():
    assert tuple(SECTIONS) == SECTION_NAMES == BenchmarkSettings().sections
    assert [section.result_key for section in SECTIONS.values()] == [
        "encoder",
        "encoder_profile",
        "early_exit",
        "single_image",
        "preprocessing",
        "pipeline",
    ]


def test_encoder_rows_take_each_configuration_from_its_case_and_part():
    times = {
        "clip_full": {"total": [0.4, 0.6]},
        "waveclip_cached_full": {"total": [0.5, 0.5], "stage0_cached": [0.1, 0.1], "stage1": [0.4, 0.4]},
        "waveclip_naive": {"total": [0.9, 0.7], "stages_0-0": [0.2, 0.2], "stages_0-1": [0.7, 0.5]},
    }
    gflops = {
        "clip_full": 4.0,
        "waveclip_stage0": 1.0,
        "waveclip_cached_full": 4.0,
        "waveclip_naive": 5.0,
        "waveclip_full_forward": 4.0,
    }
    rows = encoder_rows(times, batch_size=2, gflops_per_image=gflops, num_stages=2)
    # Rows for the configurations whose case ran, in the report's order.
    assert list(rows) == [
        "clip_full",
        "waveclip_stage0",
        "waveclip_cached_full",
        "waveclip_naive",
        "waveclip_full_forward",
    ]
    medians = {name: row["median"] for name, row in rows.items()}
    assert medians == pytest.approx(
        {
            "clip_full": 0.5,
            "waveclip_stage0": 0.2,
            "waveclip_cached_full": 0.5,
            "waveclip_naive": 0.8,
            "waveclip_full_forward": 0.6,
        }
    )
    assert rows["clip_full"]["ms_per_image"] == pytest.approx(250.0)
    assert rows["clip_full"]["gflops_per_second"] == pytest.approx(4.0 * 2 / 0.5)
    # Only configurations timed by a whole case with parts carry them.
    assert set(rows["waveclip_cached_full"]["parts"]) == {"stage0_cached", "stage1"}
    assert set(rows["waveclip_naive"]["parts"]) == {"stages_0-0", "stages_0-1"}
    assert all("parts" not in rows[name] for name in ("clip_full", "waveclip_stage0", "waveclip_full_forward"))


def test_a_single_section_runs_alone_and_is_reported_alone(tmp_path):
    results = run_benchmarks(tiny_settings(sections=("early_exit",), use_gpu=False), log=lambda *_: None)
    assert set(results) == {"meta", "settings", "early_exit", "targets"}
    assert set(results["meta"]["contention"]) == {"early_exit"}
    assert results["early_exit"]["cuda"] == {"skipped": "skipped: disabled (--no-gpu)"}
    cpu = results["early_exit"]["cpu"]  # the CPU schedule (4, 0, 2), not the GPU's (4, 0, 1)
    assert (cpu["batch_size"], cpu["warmup"], cpu["trials"]) == (4, 0, 2)
    assert [t["target"].split(":")[0] for t in results["targets"]] == ["early exit"]
    markdown = write_reports(results, tmp_path)["markdown"].read_text()
    assert "## 4. Early exit" in markdown and "## 1. Image encoder" not in markdown
    assert "**CUDA**: skipped: disabled (--no-gpu)." in markdown


def test_encoder_targets_are_ratios_of_medians_against_their_bounds():
    configs = {
        "clip_full": {"median": 1.0},
        "waveclip_stage0": {"median": 0.3},
        "waveclip_cached_full": {"median": 1.2},
        "waveclip_naive": {"median": 1.8},
    }
    targets = evaluate_targets({"encoder": {"cpu": {"float32": {"8": {"configs": configs}}}}})
    assert [(t["target"], t["measured"], t["kind"], t["bound"], t["passed"]) for t in targets] == [
        ("stage 0 / CLIP full pass, CPU batch 8", pytest.approx(0.3), "<=", 0.35, True),
        ("cached full pass / CLIP full pass, CPU batch 8", pytest.approx(1.2), "<=", 1.10, False),
        ("naive re-run / cached full pass, CPU batch 8", pytest.approx(1.5), ">=", 1.20, True),
    ]
    assert evaluate_targets({}) == []


def test_at_batch_4_the_kept_stage_cache_is_judged_against_clip_and_one_full_forward():
    configs = {
        "clip_full": {"median": 1.0},
        "waveclip_stage0": {"median": 0.25},
        "waveclip_cached_full": {"median": 1.1},
        "waveclip_cached_kept": {"median": 1.02},
        "waveclip_cached_dynamic": {"median": 1.08},
        "waveclip_naive": {"median": 1.3},
        "waveclip_full_forward": {"median": 1.0},
    }
    targets = evaluate_targets({"encoder": {"cpu": {"float32": {"4": {"configs": configs}}}}})
    assert [(t["target"], t["measured"], t["bound"], t["passed"]) for t in targets] == [
        ("stage 0 / CLIP full pass, CPU batch 4", pytest.approx(0.25), 0.35, True),
        ("cached full pass (kept stage cache) / CLIP full pass, CPU batch 4", pytest.approx(1.02), 1.04, True),
        (
            "cached full pass (kept stage cache) / one block-causal full forward, CPU batch 4",
            pytest.approx(1.02),
            1.03,
            True,
        ),
        ("naive re-run / cached full pass (kept stage cache), CPU batch 4", pytest.approx(1.3 / 1.02), 1.20, True),
    ]
    # The other caches' ratios are in the details.
    assert "new stage cache: 1.100; DynamicCache: 1.080" in targets[1]["detail"]
    assert "with DynamicCache: 1.204" in targets[3]["detail"]


@pytest.mark.slow
def test_compiled_encoder_rows_sit_beside_the_eager_ones(tmp_path):
    """`backend="eager"`: torch.compile's tracing without code generation, so the rows and the report are checked
    without minutes of compilation."""
    results = run_benchmarks(
        tiny_settings(
            sections=("encoder",),
            use_gpu=False,
            compile_backend="eager",
            cpu_schedules=(Schedule(1, 0, 1), Schedule(3, 0, 1)),
        ),
        log=lambda *_: None,
    )
    for entry in results["encoder"]["cpu"]["float32"].values():
        assert set(entry["configs"]) == set(ENCODER_CONFIGS)
        assert set(entry["first_call_seconds"]) == {
            "clip_full_compiled",
            "waveclip_cached_kept_compiled",
            "waveclip_naive_compiled",
        }
    markdown = write_reports(results, tmp_path)["markdown"].read_text()
    assert "WaveCLIP stage 0 only, compiled" in markdown and "First call of each compiled case" in markdown


def test_a_crash_keeps_the_sections_measured_before_it(tmp_path, monkeypatch, capsys):
    """A section that fails (here: a full disk in the pipeline section) leaves the earlier sections in
    benchmarks.partial.json, which `--from-json` renders; a run that completes leaves no partial file."""
    import waveclip_hf.benchmarking.run as run

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(run.SECTIONS, "pipeline", run.Section("pipeline", full_disk, inference_mode=False))
    args = ["--quick", "--sections", "preprocessing", "pipeline", "--no-gpu", "--output-dir", str(tmp_path)]
    with pytest.raises(OSError, match="No space left"):
        main(args)
    partial = tmp_path / run.PARTIAL_NAME
    assert "sections measured before are in" in capsys.readouterr().out
    saved = json.loads(partial.read_text())
    assert "preprocessing" in saved and "pipeline" not in saved
    main(["--from-json", str(partial), "--output-dir", str(tmp_path / "rendered")])
    assert "## 2. Preprocessing" in (tmp_path / "rendered" / "benchmarks.md").read_text()
    main(["--quick", "--sections", "preprocessing", "--no-gpu", "--output-dir", str(tmp_path)])
    assert not partial.exists() and (tmp_path / "benchmarks.json").is_file()


def test_one_image_at_a_time_runs_every_mode_against_clip_in_the_same_mode(tmp_path):
    """Exports tiny CLIP and WaveCLIP to ONNX (float32 and int8) and times the four calls of each mode (~30 s)."""
    results = run_benchmarks(tiny_settings(sections=("single_image",), use_gpu=False), log=lambda *_: None)
    single = results["single_image"]
    assert set(single["modes"]) == {"eager", "compiled", "torch_int8", "onnxruntime", "onnxruntime_int8"}
    entry = single["1"]
    # compile_backend=None in the tiny settings: no compiled mode; every other mode times CLIP and WaveCLIP.
    assert set(entry["rows"]) == {"eager", "torch_int8", "onnxruntime", "onnxruntime_int8"}
    for mode, rows in entry["rows"].items():
        assert set(rows) == {"clip", "stage0", "cached", "naive"}
        ratios = entry["ratios"][mode]
        assert ratios["cached_over_clip"] == pytest.approx(rows["cached"]["median"] / rows["clip"]["median"])
        assert ratios["naive_over_cached"] == pytest.approx(rows["naive"]["median"] / rows["cached"]["median"])
    per_image = single["gflops_per_image"]
    assert per_image["stage0"] < per_image["cached"] < per_image["naive"]
    assert set(entry["int8_speedup"]) == {"torch_int8", "onnxruntime_int8"}
    names = [t["target"] for t in results["targets"]]
    assert len(names) == 4 and all(name.startswith(("one image at a time", "int8")) for name in names)
    markdown = write_reports(results, tmp_path)["markdown"].read_text()
    assert "## 5. One image at a time" in markdown and "ONNX Runtime, dynamic int8" in markdown


def test_one_image_at_a_time_targets_take_the_best_mode():
    ratios = {
        "eager": {"cached_over_clip": 1.18, "naive_over_cached": 1.13, "stage0_speedup_over_gflops_ratio": 0.64},
        "onnxruntime": {"cached_over_clip": 1.04, "naive_over_cached": 1.25, "stage0_speedup_over_gflops_ratio": 0.8},
    }
    entry = {"ratios": ratios, "int8_speedup": {"torch_int8": {"cached": 1.2}, "onnxruntime_int8": {"cached": 1.7}}}
    targets = evaluate_targets({"single_image": {"1": entry}})
    assert [(t["measured"], t["passed"]) for t in targets] == [(1.04, True), (1.25, True), (0.8, False), (1.7, True)]
    assert "best mode (onnxruntime)" in targets[0]["target"] and "eager 1.180" in targets[0]["detail"]
    assert "best route (onnxruntime_int8)" in targets[3]["target"]


def test_token_scaling_fits_a_fixed_part_per_pass_and_predicts_the_cached_pass_from_its_parts(tmp_path):
    from waveclip_hf.benchmarking.token_scaling import (
        TOKEN_COUNTS,
        linear_weight_bytes,
        plot_token_scaling,
        render_markdown,
        scaling_summary,
    )
    from waveclip_hf.export.quantization import quantize_linear_layers

    # A machine where a pass costs 60 ms plus 1.2 ms per token: the cached pass pays the 60 ms twice.
    seconds = {n: 0.060 + 0.0012 * n for n in TOKEN_COUNTS}
    summary = scaling_summary(TOKEN_COUNTS, seconds, weight_bytes=340_000_000)
    assert summary["fit_fixed_ms"] == pytest.approx(60.0) and summary["fit_per_token_ms"] == pytest.approx(1.2)
    assert summary["fit_max_error_ms"] == pytest.approx(0.0, abs=1e-9)
    assert summary["cached_over_clip_from_parts"] == pytest.approx((2 * 60 + 197 * 1.2) / (60 + 197 * 1.2))
    assert summary["weights_gb_per_s_if_fixed_is_streaming"] == pytest.approx(0.34 / 0.060)

    # int8 linear layers hold a quarter of the float32 bytes.
    layers = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    model = torch.nn.Module()
    model.vision_model = layers
    assert linear_weight_bytes(layers) == 4 * 2 * 64 * 256
    assert linear_weight_bytes(quantize_linear_layers(model).vision_model) == 2 * 64 * 256

    meta = {
        "command": "python -m waveclip_hf.benchmarking.token_scaling",
        "date_utc": "2026-12-07 00:00 UTC",
        "cpu_model": "test CPU",
        "torch_threads": 2,
        "torch": torch.__version__,
        "transformers": "5.x",
    }
    report = {"meta": meta, "settings": {"trials": 3}, "results": {"float32": summary}}
    markdown = render_markdown(report, "token_scaling.png")
    assert "| **cached / CLIP predicted from the parts** | **1.202** |" in markdown
    assert plot_token_scaling(report, tmp_path / "scaling.png").stat().st_size > 10_000


def test_batch1_profile_splits_each_call_by_kind_and_prices_the_second_pass(tmp_path):
    """The batch-1 profile: operators fall into their kind, the time between operators is the wall clock less
    their self time, the cached pass is stage 0 plus stage 1, and the excess over CLIP is split per kind; a real
    run at the quick geometry profiles every call in every mode (~15 s)."""
    from waveclip_hf.benchmarking.batch1_profile import (
        BETWEEN,
        KINDS,
        OTHER,
        measure_batch1_profile,
        operator_kind,
        plot_batch1_profile,
        render_markdown,
        split_by_kind,
        summarize_precision,
    )

    assert operator_kind("aten::addmm") == operator_kind("quantized::linear_dynamic") == "matrix products"
    assert operator_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert operator_kind("aten::add") == operator_kind("aten::native_layer_norm") == "norms and element-wise"
    assert operator_kind("aten::copy_") == "copies" and operator_kind("aten::mkldnn_convolution") == "patch embedding"
    assert operator_kind("aten::view") == OTHER
    kinds = split_by_kind({"aten::addmm": 30.0, "aten::copy_": 2.0, "aten::view": 0.5}, wall_ms=40.0)
    assert kinds["matrix products"] == 30.0 and kinds["copies"] == 2.0 and kinds[OTHER] == 0.5
    assert kinds[BETWEEN] == pytest.approx(7.5) and list(kinds) == list(KINDS)

    # CLIP: 100 ms of matrix products and 20 of the rest; the stages: 40 + 90 of matrix products, 10 + 25 of the rest.
    def profile(matrix, rest):
        return {"kinds": split_by_kind({"aten::addmm": matrix, "aten::add": rest}, matrix + rest)}

    profiles = {"clip": profile(100.0, 20.0), "stage0": profile(40.0, 10.0), "stage1": profile(90.0, 25.0)}
    summary = summarize_precision({"clip": 120.0, "stage0": 50.0, "stage1": 115.0, "cached": 168.0}, profiles)
    assert summary["cached_over_clip"] == pytest.approx(1.4)
    assert summary["excess_ms"]["matrix products"] == pytest.approx(30.0)
    assert summary["excess_ms"]["norms and element-wise"] == pytest.approx(15.0)
    assert summary["matrix_products_over_clip"] == pytest.approx(1.3)
    assert summary["cached_over_clip_if_only_matrix_products_grew"] == pytest.approx(150.0 / 120.0)

    results = measure_batch1_profile(quick_settings(), warmup=1, trials=2, profile_repeats=1, log=lambda *_: None)
    assert set(results) == {"float32", "int8", "int8, q/k/v separate"}
    for result in results.values():
        assert all(result["wall_ms"][call] > 0 for call in ("clip", "stage0", "stage1", "cached"))
        assert result["kinds"]["clip"]["matrix products"] > 0 and result["kinds"]["cached"]["attention"] > 0
        for kind in KINDS:
            stages = sum(result["profiles"][stage]["kinds"][kind] for stage in ("stage0", "stage1"))
            assert result["kinds"]["cached"][kind] == pytest.approx(stages)
    assert any("quantized::linear" in op for op in results["int8"]["profiles"]["clip"]["self_ms"])
    assert not any("quantized::linear" in op for op in results["float32"]["profiles"]["clip"]["self_ms"])
    # Fused q/k/v: one int8 product per layer for q, k and v and one for the output (+ 2 MLP), against four.
    layers = quick_settings().num_hidden_layers
    for mode, per_layer in (("int8", 4), ("int8, q/k/v separate", 6)):
        calls = results[mode]["profiles"]["stage0"]
        assert calls["calls"]["quantized::linear_dynamic"] == per_layer * layers + 1, mode

    meta = {
        "command": "python -m waveclip_hf.benchmarking.batch1_profile",
        "date_utc": "2026-12-07 00:00 UTC",
        "cpu_model": "test CPU",
        "torch_threads": 2,
        "torch": torch.__version__,
        "transformers": "5.x",
    }
    report = {"meta": meta, "settings": {"trials": 2, "profile_repeats": 1}, "results": {"float32": summary}}
    markdown = render_markdown(report, "batch1_profile.png")
    assert "| **cached / CLIP, measured** | **1.400** |" in markdown
    assert "| matrix products | 100.0 | 40.0 | 90.0 | 130.0 | +30.0 |" in markdown
    assert plot_batch1_profile({"results": results}, tmp_path / "profile.png").stat().st_size > 10_000

    # The pipelines' part: 200 ms against 60 ms for 4x fewer GFLOPs is 3.33x / 4 = 0.833 of the ratio.
    pipelines = {"images": 16, "labels": 1000, "bare_waveclip_theta0_ms": 55.0}
    for precision, (stock, wave) in (("float32", (400.0, 150.0)), ("int8", (200.0, 60.0))):
        pipelines[precision] = {"stock_ms": stock, "waveclip_ms": wave, "speedup": stock / wave, "gflops_ratio": 4.0}
        pipelines[precision]["speedup_over_gflops_ratio"] = stock / wave / 4.0
    report = {**report, "pipelines": pipelines, "settings": {**report["settings"], "pipeline_trials": 5}}
    markdown = render_markdown(report, "batch1_profile.png")
    assert "| int8 | 200.0 | 60.0 | 3.33x | 4.00x | **0.833** |" in markdown
    assert "so the pipeline's own work costs +95.0 ms" in markdown


@pytest.mark.slow
def test_batch1_pipelines_time_both_pipelines_in_float32_and_int8():
    """The pipelines' part of the batch-1 profile on the quick geometry: both precisions, every WaveCLIP image
    answered at stage 0 (θ = 0), and the GFLOPs ratio the stage-0 answer implies (~40 s)."""
    from waveclip_hf.benchmarking.batch1_profile import PIPELINE_RUNS, measure_pipelines

    settings = quick_settings()
    result = measure_pipelines(settings, warmup=0, trials=1)
    assert result["images"] == settings.pipeline_images and result["labels"] == settings.num_labels
    for precision in PIPELINE_RUNS:
        entry = result[precision]
        assert entry["answered_at_stage0"] == 1.0 and entry["stock_ms"] > 0 and entry["waveclip_ms"] > 0
        assert entry["gflops_ratio"] > 3  # stage 0 carries a quarter of the tokens
        assert entry["speedup_over_gflops_ratio"] == pytest.approx(entry["speedup"] / entry["gflops_ratio"])
    assert result["bare_waveclip_theta0_ms"] > 0
