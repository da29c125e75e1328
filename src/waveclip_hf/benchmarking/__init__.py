"""Speed benchmarks: WaveCLIP against a plain CLIP ViT, side by side, in one process and one run.

Sections, each comparing like with like on the same machine, interleaved so that a noisy neighbour slows every
configuration alike (one module each):

- `encoder`: a transformers `CLIPVisionModelWithProjection` full pass against WaveCLIP's image encoder: stage 0
  only, the cached full pass, the naive re-run and the single block-causal full forward (`encoder.py`); `profile`:
  `torch.profiler` of one call of each (`profiling.py`).
- `early_exit`: the batched early-exit path of `WaveCLIPModel.refine` with the fraction of images that stop at
  stage 0 forced, against the line the GFLOPs count predicts (`early_exit.py`).
- `preprocessing`: `WaveCLIPImageProcessor` (YCbCr + DWT) against `transformers.CLIPImageProcessor()`
  (`preprocessing.py`).
- `pipeline`: the stock `pipeline("zero-shot-image-classification")` around a `CLIPModel` against the WaveCLIP
  pipeline (loaded through `trust_remote_code`), in images per second (`pipelines.py`).

Every figure carries the analytic GFLOPs of `flops.py` (`FLOPS_CONVENTION`) and the achieved GFLOP/s. Around
them: `settings.py` (every knob), `timing.py` (stopwatch, interleaved trials, summaries), `contention.py` (other
processes' CPU use, waiting for a quiet machine), `machine.py`, `models.py` (the models under test), `targets.py`,
`report.py` (JSON and Markdown) and `plot.py`. `run.py` runs the sections (`run_benchmarks`, whose `SECTIONS`
lists them) and holds the command line that `scripts/benchmark.py` wraps.

Timing: `time.perf_counter` around each call (with `torch.cuda.synchronize` on a GPU), under
`torch.inference_mode()`, `torch.set_num_threads(<all cores>)`, warm-up rounds first, then repeated trials;
reports give the median, the inter-quartile range and min / max over the trials.
"""

from .report import HAND_WRITTEN_MARKER, markdown_report, write_reports
from .run import SECTIONS, Section, run_benchmarks
from .settings import BenchmarkSettings, Schedule, quick_settings
from .targets import evaluate_targets


__all__ = [
    "HAND_WRITTEN_MARKER",
    "SECTIONS",
    "BenchmarkSettings",
    "Schedule",
    "Section",
    "evaluate_targets",
    "markdown_report",
    "quick_settings",
    "run_benchmarks",
    "write_reports",
]
