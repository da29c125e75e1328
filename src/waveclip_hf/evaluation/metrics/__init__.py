"""`evaluate` metric modules shipped with the package, loaded by path (offline, also from an installed wheel).

`early_exit_accuracy/` reports top-1 accuracy together with the compute an early-exit model spent per example;
the main job's per-axis accuracy, the gate calibration and the distillation's labelled evaluation all compute
their accuracy through it.
"""

import functools
from collections.abc import Sequence
from pathlib import Path


EARLY_EXIT_ACCURACY_DIR = Path(__file__).resolve().parent / "early_exit_accuracy"


@functools.cache
def load_early_exit_accuracy():
    """The `early_exit_accuracy` metric (`evaluate.load` of the shipped folder, results kept in memory), loaded
    once per process."""
    import evaluate

    return evaluate.load(str(EARLY_EXIT_ACCURACY_DIR), keep_in_memory=True)


def early_exit_accuracy(
    predictions: Sequence[int],
    references: Sequence[int],
    gflops: Sequence[float] | float,
    full_gflops: float | None = None,
) -> dict:
    """`early_exit_accuracy.compute(...)`: {"accuracy", "mean_gflops", "num_examples"} (+ "gflops_ratio" with
    `full_gflops`).

    Args:
        predictions, references: (N,) class ids (lists, numpy arrays or CPU tensors).
        gflops: (N,) what each example's answer cost, or one number for all of them (a fixed stage).
        full_gflops: the full model's cost per example, for `gflops_ratio`.
    """
    predictions, references = _as_list(predictions), _as_list(references)
    if isinstance(gflops, int | float):
        gflops = [float(gflops)] * len(predictions)
    return load_early_exit_accuracy().compute(
        predictions=predictions, references=references, gflops=_as_list(gflops), full_gflops=full_gflops
    )


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


__all__ = ["EARLY_EXIT_ACCURACY_DIR", "early_exit_accuracy", "load_early_exit_accuracy"]
