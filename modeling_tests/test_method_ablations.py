"""The method ablations (docs/ablations.md): which transfers the gate-stability analysis compares (fast), and the
whole run on a miniature benchmark with two seeds, where the ablation students are distilled from the main job's
cached data and teachers and a rerun reuses everything (slow, a few minutes on 2 cores)."""

import json
from pathlib import Path

import pytest
from test_end_to_end import MINIATURE
from transformers import AutoConfig

from waveclip_hf.experiments.cached_steps import student_distillation_fields, student_output_dir
from waveclip_hf.experiments.end_to_end import EndToEndConfig
from waveclip_hf.experiments.method_ablations import VARIANTS, build_parser, run_method_ablations, transfer_pairs


def test_transfer_pairs_compare_what_each_question_asks():
    # (student seed, data seed): seed 0 and seed 1 on their own benchmarks, seed 0's student on seed 2's benchmark.
    keys = [
        (student, data, axis, size)
        for student, data in ((0, 0), (1, 1), (0, 2))
        for axis, sizes in (("color", (2, 3)), ("shape", (2,)))
        for size in sizes
    ]
    pairs = transfer_pairs(dict.fromkeys(keys))
    assert ((0, 0, "color", 2), (0, 0, "color", 3)) in pairs["across_label_set_sizes"]
    assert len(pairs["across_label_set_sizes"]) == 6  # two directions on the colour axis of each of three sources
    # Across benchmark samples: seed 0's student on its own and on seed 2's test split, the whole label set.
    assert sorted(pairs["across_benchmark_samples"]) == [
        ((0, 0, "color", 3), (0, 2, "color", 3)),
        ((0, 0, "shape", 2), (0, 2, "shape", 2)),
        ((0, 2, "color", 3), (0, 0, "color", 3)),
        ((0, 2, "shape", 2), (0, 0, "shape", 2)),
    ]
    # Across retrained models: each seed's own student on its own benchmark (not seed 0's on seed 2's data).
    assert sorted(pairs["across_retrained_models"]) == [
        ((0, 0, "color", 3), (1, 1, "color", 3)),
        ((0, 0, "shape", 2), (1, 1, "shape", 2)),
        ((1, 1, "color", 3), (0, 0, "color", 3)),
        ((1, 1, "shape", 2), (0, 0, "shape", 2)),
    ]
    assert ((0, 2, "color", 3), (0, 2, "color", 2)) in pairs["from_all_labels"]
    assert ((0, 2, "color", 2), (0, 2, "color", 3)) not in pairs["from_all_labels"]
    assert len(pairs["on_itself"]) == len(keys)
    # One seed, no other sample: only the label-set sizes remain.
    alone = transfer_pairs(dict.fromkeys(key for key in keys if key[:2] == (0, 0)))
    assert alone["across_benchmark_samples"] == alone["across_retrained_models"] == []
    args = build_parser().parse_args(["--seeds", "0", "3", "--variant-seeds", "0", "--sample-seeds"])
    assert (args.seeds, args.variant_seeds, args.sample_seeds, args.max_subsets) == ([0, 3], [0], [], 10)
    assert build_parser().parse_args([]).sample_seeds == [1, 2]


@pytest.mark.slow
def test_method_ablations_miniature_and_cached_rerun(tmp_path):
    config = EndToEndConfig(
        cache_dir=str(tmp_path / "cache"), docs_dir=str(tmp_path / "docs"), overrides=MINIATURE, progress=False
    )
    # First one seed with the ablation students and another benchmark sample read by its student ...
    alone = run_method_ablations(config, seeds=(0,), variant_seeds=(0,), sample_seeds=(1,), max_subsets=3)
    assert alone["gate_stability"]["transfer_kinds"] == [
        "across_benchmark_samples",
        "across_label_set_sizes",
        "from_all_labels",
        "on_itself",
    ]
    assert alone["seed_spread"]["benchmark_samples"]["data_seeds"] == [0, 1]
    assert "Retrained seeds were not run" in (tmp_path / "docs" / "ablations.md").read_text()
    # ... then a second seed's main job, which reuses that benchmark.
    report = run_method_ablations(config, seeds=(0, 1), variant_seeds=(0,), sample_seeds=(1,), max_subsets=3)
    saved = json.loads((tmp_path / "docs" / "ablations.json").read_text())
    assert 0 <= saved["causality"]["block_causal_mean_accuracy"] <= 1
    assert 0 <= saved["causality"]["bidirectional_mean_accuracy"] <= 1
    assert len(saved["ordering"]["coarse_to_fine_stage_mean_accuracy"]) == 2
    assert len(saved["ordering"]["fine_to_coarse_stage_mean_accuracy"]) == 2
    assert saved["seed_spread"]["seeds"] == [0, 1] and len(saved["seed_spread"]["student_full_mean_accuracy"]) == 2
    assert "margin_per_label/label_free/0.01" in saved["gate_stability"]["results"]
    assert "across_retrained_models" in saved["gate_stability"]["results"]["top1/labelled/0.01"]
    assert report["causality"]["per_seed"] == alone["causality"]["per_seed"]  # the ablation students were reused
    samples = report["seed_spread"]["benchmark_samples"]
    assert samples["timing"][1]["data"] == report["seed_spread"]["folders"][1]["data"]
    # The seed-0 student on seed 1's images is not seed 1's own student.
    assert samples["per_sample"][1] != report["seed_spread"]["per_seed"][1]

    # The main job's student is the one the main job caches (its key is unchanged); the variants are new folders
    # whose configs carry the option.
    folders = report["seed_spread"]["folders"][0]
    main_fields = student_distillation_fields(
        config.settings(),
        Path(folders["data"]),
        Path(folders["teacher"]),
        levels=1,
        seed=0,
        num_workers=2,
        progress=False,
    )
    assert folders["student"] == str(student_output_dir(config.cache_dir, main_fields) / "final")
    causal_entry = report["causality"]["per_seed"][0]
    bidirectional = AutoConfig.from_pretrained(causal_entry["student_dir"], trust_remote_code=True).vision_config
    assert bidirectional.attention == "bidirectional" and causal_entry["student_dir"] != folders["student"]
    order_entry = report["ordering"]["per_seed"][0]
    fine_first = AutoConfig.from_pretrained(order_entry["student_dir"], trust_remote_code=True).vision_config
    assert fine_first.band_order == "fine_to_coarse"
    # Reading 148 detail tokens first costs more than 50 approximation tokens; the whole image costs the same.
    g_c2f, g_f2c = (order_entry[o]["cumulative_gflops"] for o in ("coarse_to_fine", "fine_to_coarse"))
    assert g_f2c[0] > 2 * g_c2f[0] and g_f2c[-1] == pytest.approx(g_c2f[-1])
    assert report["causality"]["gflops"]["bidirectional"] > g_c2f[-1]

    text = (tmp_path / "docs" / "ablations.md").read_text()
    for heading in (
        "## The answers",
        "## 1. Cost of causality",
        "## 2. Order of the bands",
        "## 3. Stability of the gate",
        "## 4. Spread over benchmark seeds",
    ):
        assert heading in text
    assert "1. **Cost of causality.**" in text and "python scripts/method_ablations.py" in text
    for name in ("causality", "band_order", "gate_stability", "seed_spread"):
        assert (tmp_path / "docs" / "figures" / f"ablation_{name}.png").stat().st_size > 10_000

    # A rerun reuses every student and embedding: the same numbers, and the first run's time is kept.
    again = run_method_ablations(config, seeds=(0, 1), variant_seeds=(0,), sample_seeds=(1,), max_subsets=3)
    assert again["causality"]["per_seed"] == report["causality"]["per_seed"]
    assert again["gate_stability"]["results"] == report["gate_stability"]["results"]
    assert again["context"]["first_run"] == report["context"]["first_run"]
    assert set(VARIANTS) == {"bidirectional", "fine_to_coarse"}


def test_the_causality_answer_calls_a_difference_a_cost_only_beyond_three_times_the_measured_spread():
    from waveclip_hf.experiments.ablations_report import causality_answer

    spread = {
        "last_stage": 1,
        "seeds": [0],
        "benchmark_samples": {"data_seeds": [0, 1, 2], "spread": {"student_stage1_mean_accuracy": {"std": 0.001}}},
    }

    def answer(bidirectional_minus_causal_points):
        return causality_answer(
            {
                "difference_points_per_seed": [bidirectional_minus_causal_points],
                "block_causal_mean_accuracy": 0.889,
                "bidirectional_mean_accuracy": 0.889 + bidirectional_minus_causal_points / 100,
            },
            spread,
        )

    assert "mask costs little accuracy, if any, here" in answer(0.2)  # 2 std of a 0.1-point spread
    assert "mask costs accuracy here" in answer(0.5)
    assert "mask does not cost accuracy here" in answer(-0.3)
    assert "spread of 0.1 points (std) of the same student over the test splits of 3 benchmark seeds" in answer(0.2)


def test_recorded_costs_count_the_seeds_this_command_built():
    """A seed the main job built is one step (its first-run record); a seed the ablation command built is its
    teacher's training loop plus its distillation."""
    from waveclip_hf.experiments.ablations_report import recorded_costs

    report = {
        "seed_spread": {
            "main_job_timing": {
                "0": {"main_job_first_run": {"minutes": 13.4}},
                "1": {
                    "main_job_first_run": None,
                    "teacher_training_minutes": 8.0,
                    "student_distillation": {"wall_minutes": 9.5, "cpu_minutes": 18.0},
                },
            }
        },
        "causality": {"per_seed": {}},
        "ordering": {"per_seed": {}},
    }
    costs = recorded_costs(report)
    assert costs["steps"] == {
        "main job, seed 0": {"wall_minutes": 13.4},
        "teacher, seed 1 (training loop)": {"wall_minutes": 8.0},
        "student, seed 1": {"wall_minutes": 9.5, "cpu_minutes": 18.0},
    }
    assert costs["wall_minutes"] == pytest.approx(30.9)
