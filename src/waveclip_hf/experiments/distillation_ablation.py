"""Distillation ablation: the main job's data and teacher (reused from its cache), several distillation settings,
one student each, compared per axis. Writes docs/distillation_ablation.{json,md}.

    python scripts/distillation_ablation.py              # after `bash scripts/run_main.sh`
"""

import json
import time
from pathlib import Path

from ..data.synthetic import AXES
from .cached_steps import log
from .end_to_end import EndToEndConfig, evaluate_main_job_student, main_job_inputs, main_job_student
from .report import machine_description, recorded_command, utc_now


# Each variant is merged into the size's distillation settings; "main job" is the size's own recipe.
DISTILLATION_VARIANTS = {
    "main job (cosine, fresh parameters at 10x lr)": {},
    "fresh parameters at 1x lr": {"fresh_lr_multiplier": 1.0},
    "+ zero-shot KL over the benchmark prompts": {"kl_on_benchmark_prompts": True},
}


def run_distillation_ablation(config: EndToEndConfig, variants: dict | None = None) -> dict:
    """Distil one student per variant from the main job's data and teacher (both reused from the cache) and
    report per-axis accuracy of every fixed stage and the best gated point; writes
    docs/distillation_ablation.{json,md}.

    Args:
        config: the main job's configuration (size, cache and docs folders, seed, ...).
        variants: name -> overrides of the distillation settings (default `DISTILLATION_VARIANTS`).

    Returns:
        variant name -> {"distillation", "per_axis", "summary", "student_dir"}.
    """
    started = time.time()
    variants = DISTILLATION_VARIANTS if variants is None else variants
    base = config.settings()
    inputs = main_job_inputs(config, base)
    report = {}
    for name, overrides in variants.items():
        settings = json.loads(json.dumps(base))
        settings["distillation"].update(overrides)
        log(f"variant {name!r}: {settings['distillation']}")
        student_dir = main_job_student(config, settings, inputs)
        results, _ = evaluate_main_job_student(config, inputs, student_dir)
        report[name] = {
            "distillation": settings["distillation"],
            "per_axis": results["per_axis"],
            "summary": results["summary"],
            "student_dir": str(student_dir),
        }
    context = {
        "command": recorded_command("python scripts/distillation_ablation.py"),
        "date": utc_now(),
        "machine": machine_description(),
        "wall_minutes": (time.time() - started) / 60,
        "teacher": str(inputs.teacher_dir),
        "data": str(inputs.data_root),
    }
    docs = Path(config.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "distillation_ablation.json").write_text(
        json.dumps({"context": context, "variants": report}, indent=2, default=str) + "\n"
    )
    (docs / "distillation_ablation.md").write_text(ablation_markdown(report, context))
    return report


def _variant_row(name: str, entry: dict, axes: list[str]) -> str:
    per_axis, summary = entry["per_axis"], entry["summary"]
    cells = [f"{100 * per_axis[a]['stages'][0]:.1f} / {100 * per_axis[a]['stages'][-1]:.1f}" for a in axes]
    full = summary["full_gflops"]
    gated_cells = [
        f"{100 * p['accuracy']:.1f}% at {p['mean_gflops'] / full:.2f}x" if p else "none"
        for p in (summary["best_within_budget"], summary["cheapest_within_one_point"])
    ]
    oracle = summary.get("oracle_exit_gflops")
    gated_cells.append(f"{oracle / full:.2f}x" if oracle is not None else "—")
    return (
        f"| {name} | " + " | ".join(cells) + f" | {100 * summary['student_stage_mean'][-1]:.1f} | "
        f"{100 * summary['teacher_mean']:.1f} | " + " | ".join(gated_cells) + " |"
    )


def ablation_markdown(report: dict, context: dict) -> str:
    """docs/distillation_ablation.md: one table row per variant (stage 0 / full accuracy per axis, means, gated
    points, oracle bound) and each variant's settings."""
    axes = list(AXES)
    lines = [
        "# Distillation ablation on the generated offline benchmark",
        "",
        f"Written by `{context['command']}` on {context['date']} ({context['machine']}; "
        f"{context['wall_minutes']:.1f} min including any distillation not already cached); do not edit by hand. "
        "Same data and teacher as the main job"
        " (docs/results.md); only the distillation settings differ. Zero-shot accuracy on the 5,000-image test split"
        " (%), full student = last stage. Gated: one margin threshold for all axes, GFLOPs as a fraction of the full"
        " student's; the oracle gate keeps every full-student answer at the least cost (`oracle_exit_point`).",
        "",
        "| variant | " + " | ".join(f"{a}, stage 0 / full" for a in axes) + " | mean, full | teacher mean |"
        " best gated at <= 0.6x GFLOPs | cheapest gated within 1 point | oracle gate |",
        "|---|" + "---:|" * (len(axes) + 5),
    ]
    lines += [_variant_row(name, entry, axes) for name, entry in report.items()]
    lines += ["", "Settings per variant:", ""]
    lines += [f"- {name}: `{json.dumps(entry['distillation'], sort_keys=True)}`" for name, entry in report.items()]
    return "\n".join(lines) + "\n"


__all__ = ["DISTILLATION_VARIANTS", "ablation_markdown", "run_distillation_ablation"]
