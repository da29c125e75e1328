"""Early-exit accuracy: top-1 accuracy together with the compute an early-exit model spent on each example.

An `evaluate` metric module. Load it by path, which works offline and from an installed wheel:

    import evaluate
    metric = evaluate.load("path/to/early_exit_accuracy")  # this folder
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], gflops=[1.2, 4.4, 1.2], full_gflops=4.4)
    # {'accuracy': 0.6666666666666666, 'mean_gflops': 2.266666666666667, 'gflops_ratio': 0.5151515151515152,
    #  'num_examples': 3}

Any model that answers some examples early (a gated cascade, a multi-exit network, adaptive-resolution
inference) can report through it: pass what each example's answer cost, in the unit of your choice, and the cost
of the full model for the ratio.
"""

import math

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Top-1 accuracy of an early-exit model and the mean compute it spent per example. Each example carries its
predicted class, its reference class and the GFLOPs (or any other cost) spent to produce that prediction, e.g. the
cumulative cost of the stage at which a gate stopped. With `full_gflops` (the cost of running the whole model on one
example) the metric also reports the ratio of the mean cost to the full cost.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, one per example.
    references (`list` of `int`): true class ids, one per example.
    gflops (`list` of `float`): the cost spent on each example (GFLOPs, or any unit; at least 0).
    full_gflops (`float`, *optional*): the cost of the full model on one example, in the same unit (positive).

Returns:
    accuracy (`float`): the fraction of examples whose prediction equals the reference, in [0, 1].
    mean_gflops (`float`): the mean of `gflops` (a correctly rounded sum divided by the count).
    gflops_ratio (`float`): `mean_gflops / full_gflops`; only when `full_gflops` is given.
    num_examples (`int`): the number of examples.

Examples:
    >>> metric = evaluate.load("path/to/early_exit_accuracy")
    >>> metric.compute(predictions=[0, 1], references=[0, 0], gflops=[2.0, 6.0], full_gflops=8.0)
    {'accuracy': 0.5, 'mean_gflops': 4.0, 'gflops_ratio': 0.5, 'num_examples': 2}
"""

_CITATION = """
@misc{waveclip,
  note = {WaveCLIP},
  howpublished = {arXiv:2509.21153}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EarlyExitAccuracy(evaluate.Metric):
    """Accuracy and mean per-example compute of an early-exit classifier."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "gflops": datasets.Value("float64"),
                }
            ),
            # No "numpy" format: `datasets`' numpy formatter hands floats over as float32.
            reference_urls=["https://arxiv.org/abs/2509.21153"],
        )

    def _compute(self, predictions, references, gflops, full_gflops=None):
        count = len(predictions)
        if count == 0:
            raise ValueError("early_exit_accuracy needs at least one example; got none.")
        predictions, references = np.asarray(predictions), np.asarray(references)
        gflops = np.asarray(gflops, dtype=np.float64)
        if not np.all(np.isfinite(gflops)) or np.any(gflops < 0):
            raise ValueError("early_exit_accuracy: every `gflops` value must be finite and at least 0.")
        # Python's int / int is correctly rounded: the same float as a float64 mean of 0/1 values.
        result = {
            "accuracy": int(np.count_nonzero(predictions == references)) / count,
            # fsum: exact whatever the order of the examples (so also after a distributed gather), and a
            # constant cost comes back as itself.
            "mean_gflops": math.fsum(gflops.tolist()) / count,
        }
        if full_gflops is not None:
            if not full_gflops > 0:
                raise ValueError(f"early_exit_accuracy: `full_gflops` must be positive, got {full_gflops}.")
            result["gflops_ratio"] = result["mean_gflops"] / float(full_gflops)
        result["num_examples"] = count
        return result
