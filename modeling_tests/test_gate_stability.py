"""`evaluation.gate_stability` on small probability tensors whose answers are worked out by hand."""

import pytest
import torch

from waveclip_hf.evaluation.calibration import sweep_thresholds
from waveclip_hf.evaluation.gate_stability import (
    choose_label_free,
    choose_labelled,
    gate_scores,
    label_subsets,
    replay,
    subset_setting,
    summarise_transfers,
    threshold_curve,
    transfers,
)


GFLOPS = [1.0, 3.0]


def four_images():
    """Two stages, two labels. Stage-0 margins 0.75, 0.5, 0.25, 0 (exact binary fractions); only the first image
    is right at stage 0, every image is right at stage 1."""
    stage0 = torch.tensor([[0.875, 0.125], [0.25, 0.75], [0.625, 0.375], [0.5, 0.5]], dtype=torch.float64)
    stage1 = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8]], dtype=torch.float64)
    return torch.stack([stage0, stage1], dim=1), torch.tensor([0, 0, 1, 1])


def test_threshold_curve_of_the_margin_gate_by_hand():
    probs, labels = four_images()
    curve = threshold_curve(probs, GFLOPS, "margin", labels)
    # θ = 0: all stop at stage 0; θ = 0.25: three stop; 0.5: two; 0.75: one; +inf: none.
    assert curve.thresholds.tolist() == [0.0, 0.25, 0.5, 0.75, float("inf")]
    assert curve.accuracy.tolist() == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert curve.mean_gflops.tolist() == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert curve.agreement.tolist() == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert choose_labelled(curve, 0.01) == 0.75
    assert choose_labelled(curve, 0.3) == 0.5
    assert choose_label_free(threshold_curve(probs, GFLOPS, "margin"), 0.99) == 0.75
    assert threshold_curve(probs, GFLOPS, "margin").accuracy is None
    # With two labels p1 = (1 + margin) / 2 and the per-label margin is margin / 2: the same decisions.
    assert threshold_curve(probs, GFLOPS, "top1", labels).thresholds.tolist() == [
        0.5,
        0.625,
        0.75,
        0.875,
        float("inf"),
    ]
    assert threshold_curve(probs, GFLOPS, "margin_per_label", labels).thresholds.tolist() == [
        0.0,
        0.125,
        0.25,
        0.375,
        float("inf"),
    ]
    result = replay(probs, labels, GFLOPS, "top1", 0.75)
    assert (result.accuracy, result.full_accuracy, result.agreement, result.mean_gflops) == (0.75, 1.0, 0.75, 2.0)


def test_curve_equals_replay_and_the_library_sweep_with_three_stages():
    generator = torch.Generator().manual_seed(0)
    probs = (2 * torch.randn(400, 3, 5, generator=generator, dtype=torch.float64)).softmax(-1)
    labels = torch.randint(0, 5, (400,), generator=generator)
    gflops = [0.1, 0.3, 0.6]
    for gate in ("margin", "margin_per_label", "top1"):
        curve = threshold_curve(probs, gflops, gate, labels)
        for k in range(0, len(curve.thresholds), 97):
            result = replay(probs, labels, gflops, gate, curve.thresholds[k])
            assert (result.accuracy, result.mean_gflops, result.agreement) == pytest.approx(
                (curve.accuracy[k], curve.mean_gflops[k], curve.agreement[k]), abs=1e-12
            )
    # The margin gates are the library's gate (`calibration.sweep_thresholds`, which `refine` is tested against).
    for gate, scaling in (("margin", "none"), ("margin_per_label", "num_labels")):
        curve = threshold_curve(probs, gflops, gate, labels)
        picked = list(range(0, len(curve.thresholds) - 1, 113))
        # Thresholds halfway between scores, so that float rounding of θ·N cannot flip a decision.
        between = [(curve.thresholds[k] + curve.thresholds[k + 1]) / 2 for k in picked]
        library = sweep_thresholds(probs, labels, gflops, between, margin_scaling=scaling)
        ours = [replay(probs, labels, gflops, gate, theta) for theta in between]
        assert [p.accuracy for p in library] == pytest.approx([r.accuracy for r in ours], abs=1e-12)
        assert [p.mean_gflops for p in library] == pytest.approx([r.mean_gflops for r in ours], abs=1e-12)
    assert torch.equal(gate_scores(probs, "margin_per_label"), gate_scores(probs, "margin") / 5)


def test_label_free_choice_of_the_margin_gate_is_the_pipelines_calibration():
    """For the plain margin, `choose_label_free` picks the operating point `gating.calibrate_threshold` (what
    `pipeline.calibrate` and `margin_threshold="auto"` use) picks: same agreement, same mean GFLOPs."""
    from waveclip_hf.models.waveclip.gate_calibration import calibrate_threshold

    generator = torch.Generator().manual_seed(1)
    probs = (2 * torch.randn(300, 3, 6, generator=generator, dtype=torch.float64)).softmax(-1)
    gflops = [0.1, 0.3, 0.6]
    curve = threshold_curve(probs, gflops, "margin")
    for target in (0.8, 0.9, 0.95, 0.99, 1.0):
        theta = choose_label_free(curve, target)
        library = calibrate_threshold(probs, gflops, target_agreement=target)
        ours = replay(probs, torch.zeros(300, dtype=torch.long), gflops, "margin", theta)
        assert (ours.agreement, ours.mean_gflops) == pytest.approx((library.agreement, library.mean_gflops), abs=1e-12)
        assert ours.agreement >= target


def test_a_threshold_moved_to_another_setting_misses_by_a_known_amount():
    source = four_images()
    # Every stage-0 margin is 0.75 and one of the four images is wrong at stage 0, right at stage 1.
    stage0 = torch.tensor([[0.875, 0.125]] * 4, dtype=torch.float64)
    stage1 = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)
    target = (torch.stack([stage0, stage1], dim=1), torch.tensor([0, 0, 0, 1]))
    settings = {"A": source, "B": target}
    rows = transfers(settings, [("A", "B"), ("B", "B"), ("A", "A")], GFLOPS, "margin", "labelled", 0.01)
    moved, own_b, own_a = rows
    # θ = 0.75 from A stops all of B at stage 0: 75% against a target of 99%, at 1 GFLOP where B's own threshold
    # (+inf: nothing stops early) spends 3.
    assert moved["threshold"] == 0.75 and moved["accuracy"] == 0.75
    assert moved["shortfall_points"] == pytest.approx(24.0) and moved["cost_ratio"] == pytest.approx(1 / 3)
    assert own_b["threshold"] == float("inf") and own_b["shortfall_points"] == pytest.approx(-1.0)
    assert own_a["cost_ratio"] == 1.0
    summary = summarise_transfers(rows)
    assert summary["count"] == 3 and summary["share_missed"] == pytest.approx(1 / 3)
    assert summary["mean_shortfall_points"] == pytest.approx(8.0) and summary[
        "worst_shortfall_points"
    ] == pytest.approx(24.0)
    assert summary["mean_gflops"] == pytest.approx((1 + 3 + 2.5) / 3)
    # The label-free calibration sees no labels: on B it asks for agreement, which θ = 0.75 gives only for 3 of 4.
    label_free = transfers(settings, [("B", "B")], GFLOPS, "margin", "label_free", 0.01)[0]
    assert label_free["threshold"] == float("inf") and label_free["agreement"] == 1.0


def test_label_subsets_and_pooled_subset_settings():
    assert label_subsets(4, 2, max_subsets=10) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    sampled = label_subsets(8, 4, max_subsets=10, seed=3)
    assert len(set(sampled)) == 10 and all(len(s) == 4 for s in sampled) and sampled == sorted(sampled)
    assert sampled == label_subsets(8, 4, max_subsets=10, seed=3)
    logits = torch.tensor([[[1.0, 5.0, 3.0]], [[0.0, 0.0, 2.0]], [[4.0, 1.0, 0.0]]], dtype=torch.float64)  # (3, 1, 3)
    labels = torch.tensor([0, 2, 1])
    probs, subset_labels = subset_setting(logits, labels, [(0, 2), (1, 2)])
    # Subset (0, 2) keeps images 0 and 1 (labels 0, 2 -> 0, 1); subset (1, 2) keeps images 1 and 2 (2, 1 -> 1, 0).
    assert subset_labels.tolist() == [0, 1, 1, 0]
    expected = torch.tensor([[1.0, 3.0], [0.0, 2.0], [0.0, 2.0], [1.0, 0.0]], dtype=torch.float64).softmax(-1)
    assert torch.allclose(probs[:, 0], expected)
