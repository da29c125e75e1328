"""Render the Hub model card (`README.md`) of a distilled WaveCLIP from real figures of the run.

The template is `hub_card/README.md.template` (a `string.Template`: `$name` placeholders, `$$` for a literal
dollar). Rendering fails loudly when any placeholder has no value, or a value is `None`: a card never ships with
a hole or a made-up number.
"""

import datetime
import os
import string
from importlib import metadata
from pathlib import Path


def _default_template() -> Path:
    """`hub_card/README.md.template`: in a checkout the repository's file; in an installed wheel the copy shipped
    as package data of `waveclip_hf.hub_card` (pyproject.toml maps that package to hub_card/)."""
    checkout = Path(__file__).resolve().parents[3] / "hub_card" / "README.md.template"
    if checkout.is_file():
        return checkout
    try:
        from importlib.resources import files

        return Path(str(files("waveclip_hf.hub_card").joinpath("README.md.template")))
    except ModuleNotFoundError:
        return checkout


DEFAULT_TEMPLATE = _default_template()


def render_model_card(fields: dict, template: str | os.PathLike | None = None) -> str:
    """Fill the card template with `fields`.

    Args:
        fields: placeholder name -> value (anything with a `str`); extra names are ignored.
        template: path of the template (default: `hub_card/README.md.template` of this repository).

    Raises:
        FileNotFoundError: the template does not exist.
        ValueError: a placeholder of the template has no value or a `None` value, or the template is malformed.
    """
    path = Path(template) if template is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template {str(path)!r} not found. Pass its path (--model-card-template); the repository "
            "keeps it in hub_card/README.md.template."
        )
    text = path.read_text()
    card = string.Template(text)
    if not card.is_valid():
        raise ValueError(f"Model card template {str(path)!r} has an invalid placeholder (use $$ for a literal $).")
    wanted = set(card.get_identifiers())
    missing = sorted(name for name in wanted if fields.get(name) is None)
    if missing:
        raise ValueError(f"Model card placeholders without a value: {missing} (template {str(path)!r}).")
    return card.substitute({name: str(fields[name]) for name in wanted})


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _evaluation_source(config) -> str:
    """Where the evaluation images came from, as the card says it."""
    if config.eval_data and config.eval_data == config.train_data:
        return "the training images themselves: this measures fit, not generalisation"
    if config.eval_data:
        return f"`{config.eval_data}`"
    return "held out of the training data"


def _data_description(config, result) -> str:
    data = f"`{config.train_data}`: {result.num_train_images} training images"
    if result.num_eval_images:
        data += f", {result.num_eval_images} evaluation images ({_evaluation_source(config)})"
    return data + f"; {result.skipped_count} unreadable file(s) skipped"


def _training_cosine_table(result) -> str:
    train = [(k, v) for k, v in result.train_metrics.items() if k.startswith("cosine_stage")]
    if not train:
        return "Not measured in this run."
    table = "No evaluation images. Mean training cosine over the last logging window:\n\n"
    table += "| stage | cosine to teacher (training batches) |\n|---:|---:|\n"
    return table + "\n".join(f"| {k.removeprefix('cosine_stage')} | {v:.4f} |" for k, v in train)


def _cosine_table(config, result) -> str:
    """Per-stage cosine to the teacher (and top-1 agreement when measured) on the evaluation images; the training
    cosine when there were none."""
    cosine_rows = [(k, v) for k, v in result.metrics.items() if k.startswith("eval/cosine_stage")]
    if not cosine_rows:
        return _training_cosine_table(result)
    agreement = [(k, v) for k, v in result.metrics.items() if k.startswith("eval/top1_agreement_stage")]
    if agreement:
        lines = ["| stage | cosine to teacher | top-1 agreement with teacher |", "|---:|---:|---:|"]
        lines += [f"| {k.removeprefix('eval/cosine_stage')} | {v:.4f} | {a:.4f} |"
                  for (k, v), (_, a) in zip(cosine_rows, agreement)]
    else:
        lines = ["| stage | cosine to teacher |", "|---:|---:|"]
        lines += [f"| {k.removeprefix('eval/cosine_stage')} | {v:.4f} |" for k, v in cosine_rows]
    return "\n".join(lines) + (f"\n\nMean over {result.num_eval_images} evaluation images "
                               f"({_evaluation_source(config)}) after step {result.step}.")


def _throughput(result) -> str:
    if not result.images_per_second:
        return "Not measured in this run."
    flops = result.train_flops_per_image
    return (
        f"{result.images_per_second:.3g} images/s over {result.step} steps on {result.num_processes} device(s), "
        f"model FLOPs utilisation {100 * result.mfu:.3g}% of {result.peak_tflops:.3g} TFLOPS per device "
        f"({result.peak_source}); "
        f"{flops['total'] / 1e9:.2f} GFLOPs per training image (3 x the student's full "
        f"forward {flops['student_forward'] / 1e9:.2f} + teacher forward "
        f"{flops['teacher_forward'] / 1e9:.2f}; 1 multiply-add = 2 FLOPs)."
    )


def _loss_fields(config, num_stages: int) -> dict:
    """Stage weights and the optional zero-shot KL term of the distillation loss."""
    weights = config.resolved_stage_weights(num_stages).tolist()
    fields = {"stage_weights": ", ".join(f"{w:.3g}" for w in weights)
              + (" (equal, the default)" if config.stage_weights is None else ""),
              "kl_description": "off", "kl_formula": ""}
    if config.label_vocabulary and config.kl_weight > 0:
        fields["kl_description"] = (f"on: {len(config.label_vocabulary)} prompts, weight {_fmt(config.kl_weight)}, "
                                    f"temperature {_fmt(config.kl_temperature)}")
        fields["kl_formula"] = (", plus the weighted KL between the teacher's and the student's zero-shot "
                                "distributions over the label vocabulary (scaled by T^2)")
    return fields


def _optimisation_fields(config, result) -> dict:
    """Steps, batch, optimiser, schedule, clipping and precision of the run."""
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * result.total_steps)
    return {
        "steps": result.step,
        "global_batch_size": result.global_batch_size,
        "images_seen": result.step * result.global_batch_size,
        "learning_rate": _fmt(config.learning_rate),
        "weight_decay": _fmt(config.weight_decay),
        "adam_betas": ", ".join(_fmt(b) for b in config.adam_betas),
        "schedule": (f"linear warmup for {warmup} steps, then cosine decay to {_fmt(config.min_lr_ratio)} x lr at "
                     f"step {result.total_steps}"),
        "grad_clip": f"global norm {_fmt(config.max_grad_norm)}" if config.max_grad_norm else "none",
        "mixed_precision": {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[config.mixed_precision],
        "num_processes": result.num_processes,
        "seed": config.seed,
    }


def _architecture_fields(student_config) -> dict:
    vision = student_config.vision_config
    return {
        "levels": vision.levels,
        "wavelet": vision.wavelet,
        "num_stages": vision.num_stages,
        "image_size": vision.image_size,
        "cell_size": vision.cell_size,
        "coarse_size": vision.image_size >> vision.levels,
        "stage_tokens": ", ".join(str(n) for n in vision.stage_lengths),
        "projection_dim": student_config.projection_dim,
    }


def _teacher_fields(config) -> dict:
    """How the card names the teacher: a Hub id links to its page and becomes `base_model`; a local folder not."""
    teacher_is_local = Path(config.teacher).expanduser().exists()
    return {
        "base_model_line": (f"# base_model: not set, the teacher was a local folder ({Path(config.teacher).name})"
                            if teacher_is_local else f"base_model: {config.teacher}"),
        "model_name": (config.push_to_hub.split("/")[-1] if config.push_to_hub
                       else f"WaveCLIP distilled from {config.teacher}"),
        "model_id": config.push_to_hub or str(Path(config.output_dir) / "final"),
        "teacher": config.teacher,
        "teacher_link": (f"`{config.teacher}`" if teacher_is_local
                         else f"[{config.teacher}](https://huggingface.co/{config.teacher})"),
    }


def _package_version() -> str:
    try:
        return metadata.version("waveclip-hf")
    except metadata.PackageNotFoundError:
        return "(source)"


def card_fields(config, result, student_config, teacher_config=None, accuracy_markdown: str | None = None) -> dict:
    """Every placeholder of the default template, from a `DistillationConfig` and a `DistillationResult`.

    Args:
        config: the run's `DistillationConfig`.
        result: its `DistillationResult` (metrics, throughput, counts).
        student_config: the student's `WaveCLIPConfig`.
        teacher_config: the teacher's `CLIPConfig`, to show a plain CLIP ViT beside the stage costs (optional).
        accuracy_markdown: measured accuracy to publish (e.g. a zero-shot table); default: says none was measured.
    """
    from ..models.waveclip.flops import format_flops_table

    clip_vision_config = getattr(teacher_config, "vision_config", None)
    return {
        **_teacher_fields(config),
        **_architecture_fields(student_config),
        "data_description": _data_description(config, result),
        **_optimisation_fields(config, result),
        **_loss_fields(config, student_config.vision_config.num_stages),
        "cosine_table": _cosine_table(config, result),
        "flops_table": format_flops_table(student_config, clip_vision_config=clip_vision_config),
        "accuracy_section": accuracy_markdown
        or "Not measured by the distillation run. Zero-shot accuracy needs a labelled set and prompts; see "
        "`docs/` of the waveclip_hf repository for the evaluation and threshold calibration tools.",
        "throughput": _throughput(result),
        "date": datetime.date.today().isoformat(),
        "version": _package_version(),
    }


__all__ = ["DEFAULT_TEMPLATE", "card_fields", "render_model_card"]
