"""What a run reports: loss, per-stage cosine, images/s and model FLOPs utilisation (MFU), per logging window.

    MFU = images/s x FLOPs per training image / (peak FLOP/s per device x processes)
    FLOPs per training image = 3 x student full forward + teacher image forward (0 when cached)

FLOPs follow `flops.FLOPS_CONVENTION` (1 multiply-add = 2 FLOPs). The peak is `--peak-tflops`, else a known GPU's
spec sheet, else a matmul measured at start-up. Time spent on evaluation and checkpoints is not training time.
"""

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..models.waveclip.flops import clip_vit_flops, full_forward_flops


logger = logging.getLogger(__name__)


def log_main_process(accelerator: Accelerator, message: str, level=logging.INFO) -> None:
    """Log on the main process; also print it (through tqdm) when logging is not configured to show it."""
    if accelerator.is_main_process:
        logger.log(level, message)
        if level >= logging.WARNING or not logger.isEnabledFor(level):
            tqdm.write(message)


# Dense bf16 tensor-core peaks (TFLOPS, no sparsity) from the vendors' spec sheets; first match wins.
_GPU_BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def train_flops_per_image(student_config, teacher_config, teacher_cached: bool) -> dict:
    """Model FLOPs per training image: 3 x the student's full forward (forward + backward ~ 2 x forward) plus one
    teacher image forward (none when teacher embeddings are cached). Convention: `flops.FLOPS_CONVENTION`."""
    student_forward = full_forward_flops(student_config)
    teacher_forward = (
        0 if teacher_cached else clip_vit_flops(teacher_config.vision_config, teacher_config.projection_dim)
    )
    return {
        "student_forward": student_forward,
        "teacher_forward": teacher_forward,
        "total": 3 * student_forward + teacher_forward,
    }


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5
) -> float:
    """Best achieved TFLOPS of a square matmul on `device`: a quick, honest stand-in for an unknown peak."""
    repeats = 4 if device.type == "cuda" else 1  # many short rounds on a CPU: the best one is the least disturbed
    generator = torch.Generator(device).manual_seed(0)  # never touch the global RNG: a run's randomness is seeded
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(2):  # warm-up (kernel selection, thread pools)
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:  # at least one timed round
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, repeats * 2 * size**3 / (time.perf_counter() - start) / 1e12)
    return best


def peak_tflops(config, device: torch.device) -> tuple[float, str]:
    """The per-device peak MFU is measured against, and where it comes from."""
    if config.peak_tflops:
        return config.peak_tflops, "given (--peak-tflops)"
    if device.type == "cuda" and config.mixed_precision in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_BF16_PEAK_TFLOPS:
            if key in name:
                return value, f"{name} dense bf16/fp16 spec sheet"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    if device.type == "cpu":
        dtype = torch.float32  # CPU autocast runs matmuls in bf16 only where supported; fp32 is the honest peak
    size = 4096 if device.type == "cuda" else 2048  # 1024 on CPU reads ~25% lower than 2048 (cache effects)
    measured = measure_matmul_tflops(device, dtype, size=size, seconds=2.0)
    return measured, f"measured {size}x{size} {str(dtype).removeprefix('torch.')} matmul on {device.type}"


class TrainingMeter:
    """Sums loss, per-stage cosine and images over a logging window; `log` reduces them over processes, updates the
    progress bar and appends a line to `log.jsonl`. `with meter.paused():` keeps evaluation and checkpoints out of
    the measured time."""

    def __init__(self, accelerator: Accelerator, flops_per_image: float, peak_tflops: float, log_path: Path, progress):
        self.accelerator, self.flops_per_image, self.peak_tflops = accelerator, flops_per_image, peak_tflops
        self.log_path, self.progress = log_path, progress
        self.windows = []  # (images, seconds) of every logged window
        self.last = {}  # the last logged metrics
        self._start_window()

    def _start_window(self) -> None:
        self.loss, self.cosine, self.micro_batches, self.images = 0.0, 0.0, 0, 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, cosine: torch.Tensor, batch_size: int) -> None:
        """One micro-batch: its scalar loss, its (stages,) mean cosine and its size (placeholders included)."""
        self.loss += loss.detach()
        self.cosine += cosine
        self.micro_batches += 1
        self.images += batch_size * self.accelerator.num_processes

    @contextmanager
    def paused(self):
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - paused

    def log(self, step: int, epoch: int, lr: float, num_skipped: int) -> dict:
        """Close the window: metrics reduced over processes, shown on the progress bar and written to log.jsonl."""
        seconds = time.perf_counter() - self.started
        accelerator = self.accelerator
        loss = torch.as_tensor(self.loss, device=accelerator.device, dtype=torch.float32) / self.micro_batches
        cosine = torch.as_tensor(self.cosine, device=accelerator.device, dtype=torch.float32) / self.micro_batches
        if accelerator.num_processes > 1:
            loss, cosine = accelerator.reduce(loss, "mean"), accelerator.reduce(cosine, "mean")
        images_per_second = self.images / max(seconds, 1e-9)
        mfu = self._mfu(images_per_second)
        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": float(loss),
            "lr": lr,
            **{f"cosine_stage{s}": float(c) for s, c in enumerate(cosine.reshape(-1))},
            "images_per_second": images_per_second,
            "mfu": mfu,
            "skipped": num_skipped,
        }
        if accelerator.is_main_process:
            postfix = {"loss": f"{metrics['loss']:.4f}"}
            postfix.update({f"c{s}": f"{float(c):.3f}" for s, c in enumerate(cosine.reshape(-1))})
            postfix.update({"img/s": f"{images_per_second:.3g}", "mfu": f"{100 * mfu:.3g}%"})
            if num_skipped:
                postfix["skipped"] = num_skipped
            self.progress.set_postfix(postfix, refresh=False)
            append_log(self.log_path, metrics)
        accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        self.windows.append((self.images, seconds))
        self.last = metrics
        self._start_window()
        return metrics

    def overall(self) -> tuple[float | None, float | None]:
        """(images/s, MFU) over all logged windows but the first (start-up: worker spin-up, allocator warm-up)."""
        if not self.windows:
            return None, None
        steady = self.windows[1:] or self.windows
        images_per_second = sum(w[0] for w in steady) / max(sum(w[1] for w in steady), 1e-9)
        return images_per_second, self._mfu(images_per_second)

    def _mfu(self, images_per_second: float) -> float:
        return images_per_second * self.flops_per_image / (self.peak_tflops * 1e12 * self.accelerator.num_processes)


def start_trackers(accelerator: Accelerator, project_name: str, settings: dict) -> None:
    """Start the experiment trackers the accelerator was built with (`log_with=`, the runs' `report_to`), with the
    run's settings as hyperparameters (as TensorBoard takes them: numbers, strings and booleans)."""
    if accelerator.log_with:
        plain = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in settings.items()}
        accelerator.init_trackers(project_name, config=plain)


def append_log(path: Path, entry: dict) -> None:
    """One JSON line in `log.jsonl` (call on the main process)."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run's tail)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


__all__ = [
    "TrainingMeter",
    "append_log",
    "log_main_process",
    "measure_matmul_tflops",
    "peak_tflops",
    "train_flops_per_image",
    "truncate_log",
]
