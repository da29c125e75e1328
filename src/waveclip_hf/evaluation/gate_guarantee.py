"""Does the gate keep its promise? The guaranteed calibration checked on held-out images, and exit signals compared.

Everything here is a function of stage probabilities and embeddings (no model runs), computed exactly with the
gate's own replay (`gating.gate_operating_points`, `gating.exit_stages`) and its own calibration
(`gate_calibration.calibrate_threshold`):

- `gated_result`: calibrate a signal on unlabelled calibration images, apply it to test images; what it costs,
  how often it changes the full model's answer, and (with labels) the accuracy it loses.
- `guarantee_check`: the promise "disagreement with the full model <= δ with probability >= 1 - ε" over many random
  calibration / test splits of a pool of images: the share of splits whose test disagreement exceeds δ.
- `cheapest_possible`: the oracle, the least any gate can spend without changing one of the full model's answers.
"""

import numpy as np
import torch

from ..models.waveclip.exit_signals import exit_scores
from ..models.waveclip.gate_calibration import (
    calibrate_threshold,
    critical_disagreements,
    guaranteed_threshold,
    threshold_grid,
)
from ..models.waveclip.gating import exit_stages, gate_operating_points


def answers_at(
    probs: torch.Tensor, scores: torch.Tensor, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) the gated answer and (N,) its exit stage at `threshold` (`None`: every stage)."""
    stages = exit_stages(scores, float("inf") if threshold is None else threshold)
    return probs.argmax(-1).gather(1, stages[:, None]).squeeze(1), stages


def gated_result(calibration: dict, test: dict, gflops, signal: str, head=None, labels=None, **target) -> dict:
    """Calibrate `signal` on `calibration`, apply its threshold to `test`.

    Args:
        calibration, test: {"probs": (N, S, C), "embeds": (N, S, P), "text": (C, P)} of unlabelled calibration images
            and of test images.
        gflops: S cumulative GFLOPs per stage; head: the learned exit head; labels: (N_test,) true classes or None.
        target: the calibration's target (`max_disagreement` with `confidence`, or `target_agreement`).

    Returns:
        threshold, its calibration record's bound, and on the test images: GFLOPs ratio, disagreement with the full
        model, and (with labels) the full model's accuracy, the gated accuracy and the drop in points.
    """
    scores = exit_scores(signal, calibration["probs"], calibration["embeds"], calibration["text"], head)
    chosen = calibrate_threshold(calibration["probs"], gflops, signal=signal, signal_scores=scores, **target)
    test_scores = exit_scores(signal, test["probs"], test["embeds"], test["text"], head)
    answers, stages = answers_at(test["probs"], test_scores, chosen.threshold)
    full = test["probs"][:, -1].argmax(-1)
    result = {
        "threshold": chosen.threshold,
        "upper_bound": chosen.upper_bound,
        "gflops_ratio": float(torch.as_tensor(gflops, dtype=torch.float64)[stages].mean()) / float(gflops[-1]),
        "disagreement": float((answers != full).double().mean()),
        "stage_share": torch.bincount(stages, minlength=len(gflops)).double().div(len(stages)).tolist(),
    }
    if labels is not None:
        full_accuracy = float((full == labels).double().mean())
        accuracy = float((answers == labels).double().mean())
        result.update(full_accuracy=full_accuracy, accuracy=accuracy, drop_points=100 * (full_accuracy - accuracy))
    return result


def cheapest_possible(probs: torch.Tensor, gflops) -> float:
    """The oracle's GFLOPs ratio: each image answers at the first stage whose top-1 is already the last stage's."""
    answers = probs.argmax(-1)
    stages = (answers == answers[:, -1:]).int().argmax(1)
    return float(torch.as_tensor(gflops, dtype=torch.float64)[stages].mean()) / float(gflops[-1])


def guarantee_check(
    pool: dict,
    gflops,
    signal: str,
    head=None,
    max_disagreements=(0.005, 0.01, 0.02),
    confidence: float = 0.95,
    calibration_sizes=(200, 1000),
    splits: int = 500,
    seed: int = 0,
) -> dict:
    """The guaranteed calibration over `splits` random calibration / test splits of `pool`.

    Args:
        pool: {"probs": (N, S, C), "embeds", "text"} of unlabelled images (no label is read).

    Returns:
        str(calibration size) -> str(δ) -> {"violation_rate": share of splits whose test disagreement exceeds δ,
        "splits", "epsilon": 1 - confidence, "certified": share of splits where some early exit was certified,
        "mean_test_disagreement", "mean_gflops_ratio"}.
    """
    scores = exit_scores(signal, pool["probs"], pool["embeds"], pool["text"], head)
    full = pool["probs"][:, -1].argmax(-1)
    num_images, num_stages = scores.shape
    grid, generator, gflops64 = threshold_grid(signal, num_stages), np.random.default_rng(seed), torch.tensor(gflops)
    report = {}
    for size in calibration_sizes:
        rows = {delta: [] for delta in max_disagreements}
        critical = {delta: critical_disagreements(size, delta, confidence) for delta in max_disagreements}
        for _ in range(splits):
            order = torch.from_numpy(generator.permutation(num_images))
            calibration, test = order[:size], order[size:]
            points = gate_operating_points(pool["probs"][calibration], gflops, signal=scores[calibration])
            for delta in max_disagreements:
                threshold = _certified(points, size, delta, confidence, grid, critical[delta])
                answers, stages = answers_at(pool["probs"][test], scores[test], threshold)
                disagreement = float((answers != full[test]).double().mean())
                ratio = float(gflops64.double()[stages].mean()) / float(gflops[-1])
                rows[delta].append((disagreement, ratio, threshold is not None))
        report[str(size)] = {str(delta): _summarise(rows[delta], delta, confidence) for delta in max_disagreements}
    return report


def _certified(points, size, delta, confidence, grid, critical) -> float | None:
    """`guaranteed_threshold`'s threshold (with the critical count already known, for speed)."""
    if critical < 0:
        return None
    return guaranteed_threshold(points, size, delta, confidence, grid, critical)[0]


def _summarise(rows, delta: float, confidence: float) -> dict:
    disagreement, ratio, certified = (np.array(column, dtype=float) for column in zip(*rows))
    return {
        "violation_rate": float((disagreement > delta).mean()),
        "epsilon": round(1 - confidence, 10),
        "splits": len(rows),
        "certified": float(certified.mean()),
        "mean_test_disagreement": float(disagreement.mean()),
        "mean_gflops_ratio": float(ratio.mean()),
    }


__all__ = ["answers_at", "cheapest_possible", "gated_result", "guarantee_check"]
