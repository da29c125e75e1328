"""Render the Hub model card (`README.md`) of a distilled WaveCLIP from real figures of the run.

The template is `hub_card/README.md.template` (a `string.Template`: `$name` placeholders, `$$` for a literal
dollar). Rendering fails loudly when any placeholder has no value, or a value is `None`: a card never ships with
a hole or a made-up number. The front matter (licence, `base_model`, `datasets`, `widget`, `model-index`) comes
from `front_matter`; the card never prints a path of the machine it was made on.
"""

import datetime
import json
import os
import string
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from .front_matter import example_labels, front_matter, hub_dataset_ids, is_local, public_name, resolve_license


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


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _evaluation_source(config) -> str:
    """Where the evaluation images came from, as the card says it."""
    if config.eval_data and config.eval_data == config.train_data:
        return "the training images themselves: this measures fit, not generalisation"
    if config.eval_data:
        return f"`{public_name(config.eval_data)}`"
    return "held out of the training data"


def _data_description(config, result) -> str:
    source = f"`{public_name(config.train_data)}`" + (" (a local folder)" if is_local(config.train_data) else "")
    if result.num_train_images is None:  # streamed: the stream has no length
        data = f"{source}, streamed"
    else:
        data = f"{source}: {result.num_train_images} training images"
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
        lines += [
            f"| {k.removeprefix('eval/cosine_stage')} | {v:.4f} | {a:.4f} |"
            for (k, v), (_, a) in zip(cosine_rows, agreement)
        ]
    else:
        lines = ["| stage | cosine to teacher |", "|---:|---:|"]
        lines += [f"| {k.removeprefix('eval/cosine_stage')} | {v:.4f} |" for k, v in cosine_rows]
    return "\n".join(lines) + (
        f"\n\nMean over {result.num_eval_images} evaluation images "
        f"({_evaluation_source(config)}) after step {result.step}."
    )


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
    fields = {
        "stage_weights": ", ".join(f"{w:.3g}" for w in weights)
        + (" (equal, the default)" if config.stage_weights is None else ""),
        "kl_description": "off",
        "kl_formula": "",
    }
    if config.label_vocabulary and config.kl_weight > 0:
        fields["kl_description"] = (
            f"on: {len(config.label_vocabulary)} prompts, weight {_fmt(config.kl_weight)}, "
            f"temperature {_fmt(config.kl_temperature)}"
        )
        fields["kl_formula"] = (
            ", plus the weighted KL between the teacher's and the student's zero-shot "
            "distributions over the label vocabulary (scaled by T^2)"
        )
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
        "schedule": (
            f"linear warmup for {warmup} steps, then cosine decay to {_fmt(config.min_lr_ratio)} x lr at "
            f"step {result.total_steps}"
        ),
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


def _model_name(config) -> str:
    return config.push_to_hub.split("/")[-1] if config.push_to_hub else f"waveclip-{public_name(config.teacher)}"


def _teacher_fields(config) -> dict:
    """How the card names the teacher and itself: a Hub teacher links to its page; a local one is named by its
    folder. Without a Hub repository to push to, the snippet's model id stands for wherever the folder goes."""
    teacher = public_name(config.teacher)
    model_id = config.push_to_hub or f"your-username/{Path(config.output_dir).expanduser().resolve().name}"
    note = (
        ""
        if config.push_to_hub
        else (f"\n`{model_id}` stands for the Hub repository you upload this folder to (or the folder's path).\n")
    )
    return {
        "model_name": _model_name(config),
        "model_id": model_id,
        "model_id_note": note,
        "teacher": teacher,  # for custom templates (`--model-card-template`); the default one uses the link
        "teacher_link": (
            f"`{teacher}` (a local folder)"
            if is_local(config.teacher)
            else f"[{teacher}](https://huggingface.co/{teacher})"
        ),
    }


def _example_fields(tokenizer, config, zero_shot: Sequence) -> dict:
    """Candidate labels the tokenizer knows (those of a measured task first) and that task's prompt template."""
    task = zero_shot[0] if zero_shot else None
    labels = example_labels(tokenizer, task.class_names if task else (), config.label_vocabulary or ())
    template = f" hypothesis_template={json.dumps(task.prompt_template)}," if task else ""
    return {
        "example_labels": json.dumps(labels),
        "first_example_label": json.dumps(labels[0]),
        "hypothesis_template_argument": template,
        "labels": labels,
    }


def _eval_results(zero_shot: Sequence) -> list:
    """`huggingface_hub.EvalResult`s of the measured tasks: accuracy after all stages and after stage 0."""
    from huggingface_hub import EvalResult

    results = []
    for task in zero_shot:
        common = dict(
            task_type="zero-shot-image-classification",
            task_name="Zero-shot image classification",
            dataset_type=task.dataset_type,
            dataset_name=task.dataset_name,
            dataset_config=task.dataset_config,
            dataset_split=task.dataset_split,
            metric_type="accuracy",
        )
        last = len(task.stage_accuracy) - 1
        results.append(
            EvalResult(
                **common,
                metric_value=round(task.stage_accuracy[-1], 4),
                metric_name=f"Top-1 accuracy, all {last + 1} stages ({task.stage_gflops[-1]:.3g} GFLOPs)",
            )
        )
        results.append(
            EvalResult(
                **common,
                metric_value=round(task.stage_accuracy[0], 4),
                metric_name=f"Top-1 accuracy, stage 0 only ({task.stage_gflops[0]:.3g} GFLOPs)",
            )
        )
    return results


def _accuracy_section(zero_shot: Sequence) -> str:
    """A table of the measured zero-shot accuracy per task and stage (teacher and gate when measured)."""
    if not zero_shot:
        return (
            "Not measured: no labelled evaluation ran. Distil with `--eval-labelled-data <folder>` (one "
            "subfolder of images per class) to publish zero-shot accuracy here, and calibrate the gate with "
            "`scripts/calibrate_gate.py` of the waveclip_hf repository."
        )
    stages = len(zero_shot[0].stage_accuracy)
    teacher = any(t.teacher_accuracy is not None for t in zero_shot)
    gate = any(t.gate for t in zero_shot)
    header = ["task", "data", "images", "classes"] + (["teacher"] if teacher else [])
    header += [f"stage {s}" for s in range(stages)] + (["gate"] if gate else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for t in zero_shot:
        cells = [
            t.task,
            t.dataset_name + (f" ({t.dataset_split})" if t.dataset_split else ""),
            str(t.num_images),
            str(len(t.class_names)),
        ] + ([_pct(t.teacher_accuracy) if t.teacher_accuracy is not None else "-"] if teacher else [])
        cells += [_pct(a) for a in t.stage_accuracy]
        if gate:
            cells.append(
                f"{_pct(t.gate['accuracy'])} at {t.gate['mean_gflops']:.3g} GFLOPs (θ = {t.gate['threshold']:g})"
                if t.gate
                else "-"
            )
        lines.append("| " + " | ".join(cells) + " |")
    gflops = " / ".join(f"{g:.3g}" for g in zero_shot[0].stage_gflops)
    prompts = "; ".join(dict.fromkeys(f"`{t.prompt_template}`" for t in zero_shot))
    skipped = sum(t.num_skipped for t in zero_shot)
    notes = (
        f"\n\nTop-1 zero-shot accuracy answering every image after each stage; stages 0..{stages - 1} cost "
        f"{gflops} GFLOPs per image (cumulative, cached path; 1 multiply-add = 2 FLOPs). Prompts: {prompts}. "
        f"Measured by {zero_shot[0].measured_by}, with the `early_exit_accuracy` metric of `evaluate`."
    )
    if gate:
        notes += " The gate column is the margin gate at the threshold θ shown, mean GFLOPs per image."
    if skipped:
        notes += f" {skipped} unreadable image(s) left out."
    return "\n".join(lines) + notes


CALIBRATIONS_BEGIN, CALIBRATIONS_END = "<!-- gate-calibrations -->", "<!-- /gate-calibrations -->"


def calibration_section(student_config) -> str:
    """The card's block on the gate calibrations the model holds (`config.gate_calibrations`): one row per label
    set, between HTML comments that `update_calibration_section` finds again. Empty when there are none."""
    from ..models.waveclip.gate_calibration import stored_calibrations

    calibrations = stored_calibrations(student_config)
    if not calibrations:
        return ""
    rows = [
        f"| {len(c.labels)} ({', '.join(c.labels[:4])}{', ...' if len(c.labels) > 4 else ''}) | {c.target} | "
        f"{'none (every stage)' if c.threshold is None else f'{c.threshold:.4g}'} | {_pct(c.agreement)} of "
        f"{c.num_images} | {c.gflops_ratio:.2f}x |"
        for c in calibrations
    ]
    return "\n".join(
        [
            CALIBRATIONS_BEGIN,
            "## Gate calibrations",
            "",
            "Thresholds chosen without labels on unlabelled images, kept in `config.json`: "
            '`margin_threshold="auto"` uses them for these label sets (in any order).',
            "",
            "| labels | target | threshold | agreement with the full model | GFLOPs vs full model |",
            "|---|---|---:|---:|---:|",
            *rows,
            CALIBRATIONS_END,
            "",
        ]
    )


def update_calibration_section(folder: str | os.PathLike, student_config) -> Path | None:
    """Rewrite the calibration block of `folder/README.md` from `student_config` (before "## Limitations", or at
    the end, when the card has none yet). Returns the card's path, or `None` when the folder has no card."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    text, block = path.read_text(), calibration_section(student_config)
    if CALIBRATIONS_BEGIN in text and CALIBRATIONS_END in text:
        start, end = text.index(CALIBRATIONS_BEGIN), text.index(CALIBRATIONS_END) + len(CALIBRATIONS_END)
        text = text[:start] + block.rstrip("\n") + text[end:]
    elif "## Limitations" in text:
        text = text.replace("## Limitations", block + "\n## Limitations", 1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
    return path


# Above this many tokens a tokenizer is taken as open-vocabulary (CLIP's byte-level BPE has 49,408).
_CLOSED_VOCABULARY_SIZE = 5_000


def vocabulary_section(tokenizer, zero_shot: Sequence) -> str:
    """For a closed-vocabulary tokenizer (the offline benchmark's word-level one): the words it knows and the label
    sets measured with it, so that a user picks labels the model can read. Empty for an open vocabulary."""
    vocabulary = tokenizer.get_vocab()
    if len(vocabulary) > _CLOSED_VOCABULARY_SIZE:
        return ""
    words = sorted(token for token in vocabulary if token.isalnum())
    lines = [
        "## Words this model knows",
        "",
        f"Its tokenizer has a closed vocabulary of {len(words)} words; a label with another word maps to the unknown "
        "token and cannot be told apart (the pipeline warns). The words: " + ", ".join(f"`{w}`" for w in words) + ".",
        "",
    ]
    if zero_shot:
        lines += ["Label sets that work (each measured in the accuracy table above), with their template:", ""]
        lines += [
            f'- {task.task}: {", ".join(task.class_names)} (`hypothesis_template="{task.prompt_template}"`)'
            for task in zero_shot
        ]
        lines.append("")
    return "\n".join(lines) + "\n"


def _package_version() -> str:
    try:
        return metadata.version("waveclip-hf")
    except metadata.PackageNotFoundError:
        return "(source)"


def card_fields(
    config,
    result,
    student_config,
    tokenizer,
    teacher_config=None,
    zero_shot: Sequence | None = None,
    date: datetime.date | None = None,
) -> dict:
    """Every placeholder of the default template, from a `DistillationConfig` and a `DistillationResult`.

    Args:
        config: the run's `DistillationConfig`.
        result: its `DistillationResult` (metrics, throughput, counts).
        student_config: the student's `WaveCLIPConfig`.
        tokenizer: the student's (= the teacher's) tokenizer: the example labels must be words it knows.
        teacher_config: the teacher's `CLIPConfig`, to show a plain CLIP ViT beside the stage costs (optional).
        zero_shot: measured [`ZeroShotResult`]s to publish (accuracy table, `model-index`); default: the run's own
            (`result.zero_shot`, from `--eval-labelled-data`).
        date: when the run finished (default: today).
    """
    from ..models.waveclip.flops import format_flops_table

    zero_shot = list(result.zero_shot if zero_shot is None else zero_shot)
    card_license = resolve_license(config.license, config.teacher)
    examples = _example_fields(tokenizer, config, zero_shot)
    clip_vision_config = getattr(teacher_config, "vision_config", None)
    return {
        "front_matter": front_matter(
            _model_name(config),
            card_license,
            None if is_local(config.teacher) else config.teacher,
            hub_dataset_ids([config.train_data, config.eval_data]),
            examples.pop("labels"),
            _eval_results(zero_shot),
        ),
        **_teacher_fields(config),
        **examples,
        **_architecture_fields(student_config),
        "data_description": _data_description(config, result),
        **_optimisation_fields(config, result),
        **_loss_fields(config, student_config.vision_config.num_stages),
        "cosine_table": _cosine_table(config, result),
        "flops_table": format_flops_table(student_config, clip_vision_config=clip_vision_config),
        "accuracy_section": _accuracy_section(zero_shot),
        "calibration_section": calibration_section(student_config),
        "vocabulary_section": vocabulary_section(tokenizer, zero_shot),
        "throughput": _throughput(result),
        "license_origin": f"Licence: {card_license.origin}",
        "date": (date or datetime.date.today()).isoformat(),
        "version": _package_version(),
    }


__all__ = [
    "DEFAULT_TEMPLATE",
    "calibration_section",
    "card_fields",
    "render_model_card",
    "update_calibration_section",
]
