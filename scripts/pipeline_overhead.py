"""The pipeline's own cost per image at batch_size=1, before and after a change, side by side in one process.

    python scripts/pipeline_overhead.py [BASE_COMMIT]      # default 62f94e3, the pipeline before its batch-1 cuts

A tiny saved WaveCLIP folder (the tests' `save_tiny_folder`) is loaded twice with `trust_remote_code=True`: once
with this checkout's pipeline_waveclip.py, once with BASE_COMMIT's. Each classifies the same 16 images against
1,000 labels at margin_threshold=0 (stage 0 for every image), 7 interleaved rounds after a warm-up; then the same
work without a pipeline (image processor + `refine` per image). Prints the median and minimum ms per image. The
tiny model makes the encoder cheap, so what remains is mostly the pipeline's own work.
"""

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import pipeline


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modeling_tests"))
from test_hub_loading import save_tiny_folder  # noqa: E402  (the tests' tiny checkpoint)


torch.set_num_threads(2)
BASE = sys.argv[1] if len(sys.argv) > 1 else "62f94e3"
root = Path(tempfile.mkdtemp(prefix="pipeline_overhead_"))
new, old = root / "new", root / "old"
save_tiny_folder(new, levels=1)
shutil.copytree(new, old)
(old / "pipeline_waveclip.py").write_text(
    subprocess.check_output(["git", "show", f"{BASE}:src/waveclip_hf/models/waveclip/pipeline_waveclip.py"], text=True)
)
labels = [f"object {i}" for i in range(1000)]
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(16)]
pipes = {
    name: pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    for name, folder in (("old", old), ("new", new))
}
# The tiny tokenizer does not know "object" (a warning): the cost is what is measured.
for p in pipes.values():
    p(images[:2], candidate_labels=labels, margin_threshold=0.0)
times = {name: [] for name in pipes}
for _ in range(7):
    for name, p in pipes.items():
        t = time.perf_counter()
        p(images, candidate_labels=labels, margin_threshold=0.0)
        times[name].append((time.perf_counter() - t) / len(images))
bare = []
for _ in range(7):
    p = pipes["new"]
    text = p.label_embeddings(labels, "This is a photo of {}.")
    cache = p.model.new_stage_cache()
    t = time.perf_counter()
    for im in images:
        px = p.image_processor(images=[im], return_tensors="pt")["pixel_values"]
        p.model.refine(px, text, 0.0, cache=cache)
    bare.append((time.perf_counter() - t) / len(images))
print({k: [round(1e3 * statistics.median(v), 2), round(1e3 * min(v), 2)] for k, v in {**times, "bare": bare}.items()})
