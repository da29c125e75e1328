"""The method ablations (docs/ablations.md): which transfers the gate-stability analysis compares (fast), and the
whole run on a miniature benchmark with two seeds, where the ablation students are distilled from the main job's
cached data and teachers and a rerun reuses everything (slow, a few minutes on 2 cores)."""

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from test_end_to_end import MINIATURE
from waveclip_hf.experiments.cached_steps import student_distillation_fields, student_output_dir
from waveclip_hf.experiments.end_to_end import EndToEndConfig
from waveclip_hf.experiments.method_ablations import VARIANTS, build_parser, run_method_ablations, transfer_pairs


def test_transfer_pairs_compare_what_each_question_asks():
    keys = [(seed, axis, size) for seed in (0, 1) for axis, sizes in (("color", (2, 3)), ("shape", (2,)))
            for size in sizes]
    pairs = transfer_pairs(dict.fromkeys(keys))
    assert sorted(pairs["across_label_set_sizes"]) == [((0, "color", 2), (0, "color", 3)), ((0, "color", 3), (0, "color", 2)),
                                                       ((1, "color", 2), (1, "color", 3)), ((1, "color", 3), (1, "color", 2))]
    # Across seeds: the whole label set of an axis (3 colours, 2 shapes), both directions.
    assert sorted(pairs["across_seeds"]) == [((0, "color", 3), (1, "color", 3)), ((0, "shape", 2), (1, "shape", 2)),
                                             ((1, "color", 3), (0, "color", 3)), ((1, "shape", 2), (0, "shape", 2))]
    assert ((0, "color", 3), (0, "color", 2)) in pairs["from_all_labels"]
    assert ((0, "color", 2), (0, "color", 3)) not in pairs["from_all_labels"]
    assert len(pairs["on_itself"]) == len(keys)
    args = build_parser().parse_args(["--seeds", "0", "3", "--variant-seeds", "0"])
    assert (args.seeds, args.variant_seeds, args.max_subsets) == ([0, 3], [0], 10)


@pytest.mark.slow
def test_method_ablations_miniature_and_cached_rerun(tmp_path):
    config = EndToEndConfig(cache_dir=str(tmp_path / "cache"), docs_dir=str(tmp_path / "docs"), overrides=MINIATURE,
                            progress=False)
    report = run_method_ablations(config, seeds=(0, 1), variant_seeds=(0,), max_subsets=3)
    saved = json.loads((tmp_path / "docs" / "ablations.json").read_text())
    assert 0 <= saved["causality"]["block_causal_mean_accuracy"] <= 1
    assert 0 <= saved["causality"]["bidirectional_mean_accuracy"] <= 1
    assert len(saved["ordering"]["coarse_to_fine_stage_mean_accuracy"]) == 2
    assert len(saved["ordering"]["fine_to_coarse_stage_mean_accuracy"]) == 2
    assert saved["seed_spread"]["seeds"] == [0, 1] and len(saved["seed_spread"]["student_full_mean_accuracy"]) == 2
    assert "margin_per_label/label_free/0.01" in saved["gate_stability"]["results"]

    # The main job's student is the one the main job caches (its key is unchanged); the variants are new folders
    # whose configs carry the option.
    folders = report["seed_spread"]["folders"][0]
    main_fields = student_distillation_fields(config.settings(), Path(folders["data"]), Path(folders["teacher"]),
                                              levels=1, seed=0, num_workers=2, progress=False)
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
    for heading in ("## The answers", "## 1. Cost of causality", "## 2. Order of the bands",
                    "## 3. Stability of the gate", "## 4. Spread over benchmark seeds"):
        assert heading in text
    assert "1. **Cost of causality.**" in text and "python scripts/method_ablations.py" in text
    for name in ("causality", "band_order", "gate_stability", "seed_spread"):
        assert (tmp_path / "docs" / "figures" / f"ablation_{name}.png").stat().st_size > 10_000

    # A rerun reuses every student and embedding: the same numbers, and the first run's time is kept.
    again = run_method_ablations(config, seeds=(0, 1), variant_seeds=(0,), max_subsets=3)
    assert again["causality"]["per_seed"] == report["causality"]["per_seed"]
    assert again["gate_stability"]["results"] == report["gate_stability"]["results"]
    assert again["context"]["first_run"] == report["context"]["first_run"]
    assert set(VARIANTS) == {"bidirectional", "fine_to_coarse"}

