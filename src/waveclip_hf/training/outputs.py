"""What a distillation run leaves behind: its result (also `summary.json`) and the Hub-ready folder `final/`."""

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from ..models.waveclip.modeling_waveclip import WaveCLIPModel
from .checkpoints import fsync_tree, remove_tree
from .data import SHOW_SKIPPED


logger = logging.getLogger(__name__)


@dataclass
class DistillationResult:
    """What `distill` returns (also written to `output_dir/summary.json`)."""

    step: int
    total_steps: int
    interrupted: bool  # stopped by SIGTERM after saving a checkpoint
    final_dir: str | None  # the Hub-ready folder (None when interrupted)
    checkpoint: str | None  # the last checkpoint written
    metrics: dict  # last evaluation
    train_metrics: dict  # last logged training metrics
    images_per_second: float | None
    mfu: float | None
    peak_tflops: float
    peak_source: str
    train_flops_per_image: dict
    num_train_images: int
    num_eval_images: int
    global_batch_size: int
    num_processes: int
    skipped_count: int
    skipped_examples: list
    student: WaveCLIPModel | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "student"}


def gather_skipped(accelerator: Accelerator, skipped: dict) -> dict:
    """Every process's unreadable files (name -> error), merged (on every process)."""
    if accelerator.num_processes == 1:
        return skipped
    merged = {}
    for part in gather_object([skipped]):
        for name, error in part.items():
            merged.setdefault(name, error)
    return merged


def summary_line(result: DistillationResult) -> str:
    """One line for the log: steps, final metrics, throughput, skipped files, where the model is."""
    cos = ", ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in result.metrics.items())
    speed = (f"{result.images_per_second:.3g} images/s, MFU {100 * result.mfu:.3g}% of {result.peak_tflops:.3g} "
             f"TFLOPS ({result.peak_source})" if result.images_per_second else "no throughput measured")
    skipped = f"{result.skipped_count} unreadable image(s) skipped"
    if result.skipped_count:
        skipped += ": " + "; ".join(result.skipped_examples[:SHOW_SKIPPED])
    return f"Done: {result.step} steps. {cos or 'no evaluation'}. {speed}. {skipped}. Final model: {result.final_dir}"


def write_summary(accelerator: Accelerator, output_dir: Path, result: DistillationResult) -> None:
    """`output_dir/summary.json` (main process)."""
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(result.to_json(), indent=2))


def save_final(student: WaveCLIPModel, processor, tokenizer, config,
               result: DistillationResult, teacher_config=None) -> Path:
    """`output_dir/final`: weights + remote code (`save_pretrained`), image processor, the teacher's tokenizer and
    a model card rendered from real figures of this run. Written to `final.tmp` and renamed, like checkpoints."""
    from ..hub.model_card import card_fields, render_model_card

    output_dir = Path(config.output_dir)
    final, tmp = output_dir / "final", output_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    fields = card_fields(config, result, student.config, teacher_config)
    (tmp / "README.md").write_text(render_model_card(fields, config.model_card_template))
    fsync_tree(tmp)
    remove_tree(final)
    os.replace(tmp, final)
    return final


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message="Upload WaveCLIP distilled with waveclip_hf.cli.distill")
    logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)
    return str(info)


__all__ = ["DistillationResult", "gather_skipped", "push_folder_to_hub", "save_final", "summary_line", "write_summary"]
