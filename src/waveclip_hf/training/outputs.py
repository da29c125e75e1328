"""What a distillation run leaves behind: its result (also `summary.json`) and the Hub-ready folder `final/`."""

import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from ..evaluation.zero_shot import ZeroShotResult
from ..models.waveclip.folder_io import written_atomically
from ..models.waveclip.modeling_waveclip import WaveCLIPModel
from ..models.waveclip.processing_waveclip import WaveCLIPProcessor
from .checkpoints import TRAINER_STATE_NAME, latest_checkpoint
from .config import DistillationConfig
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
    num_train_images: int | None  # None: streamed
    num_eval_images: int
    global_batch_size: int
    num_processes: int
    skipped_count: int
    skipped_examples: list
    zero_shot: list[ZeroShotResult] = field(default_factory=list)  # `--eval-labelled-data`, on the final weights
    student: WaveCLIPModel | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "student"}

    @classmethod
    def from_json(cls, data: dict) -> "DistillationResult":
        """The result of a `summary.json` (extra keys, such as its config, are ignored)."""
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data and f.name != "student"}
        values["zero_shot"] = [ZeroShotResult.from_json(t) for t in values.get("zero_shot", [])]
        return cls(**values)


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
    speed = (
        f"{result.images_per_second:.3g} images/s, MFU {100 * result.mfu:.3g}% of {result.peak_tflops:.3g} "
        f"TFLOPS ({result.peak_source})"
        if result.images_per_second
        else "no throughput measured"
    )
    skipped = f"{result.skipped_count} unreadable image(s) skipped"
    if result.skipped_count:
        skipped += ": " + "; ".join(result.skipped_examples[:SHOW_SKIPPED])
    return f"Done: {result.step} steps. {cos or 'no evaluation'}. {speed}. {skipped}. Final model: {result.final_dir}"


def write_summary(
    accelerator: Accelerator, output_dir: Path, result: DistillationResult, config: DistillationConfig
) -> None:
    """`output_dir/summary.json` (main process): the result and the run's config (`rewrite_model_card` reads
    both)."""
    if accelerator.is_main_process:
        summary = {**result.to_json(), "config": dataclasses.asdict(config)}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))


# What transformers records about how a tokenizer was loaded (v5 keeps it in `init_kwargs` and saves it back): it
# describes the machine that loaded it, not the tokenizer, and `local_files_only: true` has no place on the Hub.
LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "_name_or_path")


@contextmanager
def without_load_time_keys(tokenizer):
    """Inside the block, `tokenizer` saves without the load-time keys of `LOAD_TIME_TOKENIZER_KEYS`."""
    loaded_with = tokenizer.init_kwargs
    tokenizer.init_kwargs = {k: v for k, v in loaded_with.items() if k not in LOAD_TIME_TOKENIZER_KEYS}
    try:
        yield tokenizer
    finally:
        tokenizer.init_kwargs = loaded_with


def save_tokenizer(tokenizer, folder: Path) -> None:
    """`tokenizer.save_pretrained(folder)` without the load-time keys of `LOAD_TIME_TOKENIZER_KEYS`."""
    with without_load_time_keys(tokenizer):
        tokenizer.save_pretrained(folder)


def write_model_card(
    folder: Path,
    config: DistillationConfig,
    result: DistillationResult,
    student_config,
    tokenizer,
    teacher_config=None,
    zero_shot: Sequence[ZeroShotResult] | None = None,
    date: datetime.date | None = None,
) -> Path:
    """Render the card (`hub.model_card`) into `folder/README.md`; warn if the folder names a local path."""
    from ..hub.model_card import card_fields, render_model_card

    fields = card_fields(config, result, student_config, tokenizer, teacher_config, zero_shot, date)
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(fields, config.model_card_template))
    for name, local in local_path_mentions(folder, config):
        logger.warning("%s in the saved folder mentions the local path %s: remove it before uploading.", name, local)
    return path


def local_path_mentions(folder: Path, config: DistillationConfig) -> list[tuple[str, str]]:
    """(file name, path) for every text file of `folder` that contains an absolute local path of the run."""
    sources = [config.teacher, config.train_data, config.eval_data, config.eval_labelled_data, config.output_dir]
    paths = {str(Path(s).expanduser().resolve()) for s in sources if s and Path(s).expanduser().exists()}
    found = []
    for file in sorted(Path(folder).iterdir()):
        if file.suffix in (".md", ".json", ".txt", ".py", ".template") and file.is_file():
            text = file.read_text(errors="replace")
            found += [(file.name, path) for path in sorted(paths) if path in text]
    return found


def save_final(
    student: WaveCLIPModel,
    processor,
    tokenizer,
    config: DistillationConfig,
    result: DistillationResult,
    teacher_config=None,
) -> Path:
    """`output_dir/final`: weights + remote code (`save_pretrained`), the processor (image processor and the
    teacher's tokenizer, also saved on their own for loaders that read them separately) and a model card rendered
    from real figures of this run. Written to a temporary folder and renamed, like checkpoints."""
    final = Path(config.output_dir) / "final"
    with written_atomically(final) as tmp, without_load_time_keys(tokenizer):
        student.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        WaveCLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(tmp)
        write_model_card(tmp, config, result, student.config, tokenizer, teacher_config)
    return final


def rewrite_model_card(final_dir: str | os.PathLike, zero_shot: Sequence[ZeroShotResult]) -> Path:
    """Re-render the card of a finished run's `final/` folder with accuracy measured after the run (e.g. by the main
    job): the run's config and result come from its `summary.json` (or, for runs older than that, the config from
    the last checkpoint), the tokenizer and student config from the folder; the tokenizer files are saved again
    without load-time keys (`save_tokenizer`). Returns the card's path."""
    from transformers import AutoConfig, AutoTokenizer

    final_dir = Path(final_dir)
    summary_path = final_dir.parent / "summary.json"
    summary = json.loads(summary_path.read_text())
    if "config" not in summary:
        checkpoint = latest_checkpoint(final_dir.parent)
        if checkpoint is None:
            raise FileNotFoundError(
                f"{summary_path} holds no config (a run older than that) and "
                f"{final_dir.parent / 'checkpoints'} no checkpoint to read it from: the card of "
                f"{final_dir} cannot be re-rendered. Distil again to get a current folder."
            )
        summary["config"] = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())["config"]
    known = {f.name for f in dataclasses.fields(DistillationConfig)}
    config = DistillationConfig(**{k: v for k, v in summary["config"].items() if k in known})
    try:
        teacher_config = AutoConfig.from_pretrained(config.teacher)
    except Exception:  # noqa: BLE001 - the teacher's column of the cost table is optional
        teacher_config = None
    tokenizer = AutoTokenizer.from_pretrained(final_dir, trust_remote_code=True)
    save_tokenizer(tokenizer, final_dir)  # a folder saved before the load-time keys were dropped loses them now
    write_model_card(
        final_dir,
        config,
        DistillationResult.from_json(summary),
        AutoConfig.from_pretrained(final_dir, trust_remote_code=True),
        tokenizer,
        teacher_config,
        zero_shot,
        datetime.date.fromtimestamp(summary_path.stat().st_mtime),
    )
    return final_dir / "README.md"


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload WaveCLIP distilled with waveclip_hf.cli.distill",
    )
    logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)
    return str(info)


__all__ = [
    "DistillationResult",
    "gather_skipped",
    "local_path_mentions",
    "push_folder_to_hub",
    "rewrite_model_card",
    "save_final",
    "save_tokenizer",
    "summary_line",
    "write_model_card",
    "write_summary",
]
