"""The reports of a run: `benchmarks.json`, the Markdown `benchmarks.md` and the plot, written by `write_reports`.

The Markdown is the header (machine, command, conventions), then one part per section from `REPORT_PARTS`, in
order, then optional notes. To report a new section, add its renderer (results -> lines) to `REPORT_PARTS`.
A hand-written tail of an existing `benchmarks.md` (after `HAND_WRITTEN_MARKER`) is kept on regeneration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .early_exit import early_exit_entries
from .encoder import ENCODER_CONFIGS
from .pipelines import PIPELINE_RUNS
from .plot import plot_time_vs_gflops
from .single_image import SINGLE_IMAGE_CALLS


JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "benchmarks.json", "benchmarks.md", "benchmark_time_vs_gflops.png"

# Everything after this line in an existing benchmarks.md is written by hand (analysis of a run) and is kept when
# the report is regenerated.
HAND_WRITTEN_MARKER = "<!-- hand-written below: kept when scripts/benchmark.py regenerates this file -->"


def jsonable(value):
    """`value` with dict keys as strings, tuples as lists and non-finite floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}" if seconds < 10 else f"{seconds:.2f} s"


def _spread(entry: dict) -> str:
    return f"{_ms(entry['q1'])}–{_ms(entry['q3'])}"


def _minmax(entry: dict) -> str:
    return f"{_ms(entry['min'])}–{_ms(entry['max'])}"


def _contention_note(stats: dict | None) -> str:
    """'other processes ≤ 0.05 cores during the kept rounds; ...' for a section's `run_interleaved` stats."""
    if not stats:
        return ""
    busy = [b for b in stats.get("rounds_busy_cores", []) if b is not None]
    note = f"other processes ≤ {max(busy):.2f} cores during the kept rounds" if busy else ""
    if stats.get("discarded_rounds"):
        note += f"; {stats['discarded_rounds']} contended round(s) discarded and re-run"
    if stats.get("contended_rounds_kept"):
        note += f"; **{stats['contended_rounds_kept']} contended round(s) kept** after the retries ran out"
    return note


# ---------------------------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------------------------


def _contention_row(meta: dict[str, Any]) -> list[str]:
    """The header row of other processes' CPU use during each section (none when no section recorded it)."""
    cells = []
    for name, entry in (meta.get("contention") or {}).items():
        during = entry.get("during") or {}
        before = entry.get("before") or {}
        cell = f"{name} {during.get('others_busy_cores', '?')}"
        if during.get("steal_cores"):
            cell += f" (+{during['steal_cores']} steal)"
        if before.get("waited_seconds"):
            cell += f" after waiting {before['waited_seconds']:.0f} s"
        cells.append(cell)
    if not cells:
        return []
    return [
        f"| other processes' CPU use during each section (cores busy, of {meta['cpu_cores']}) | {'; '.join(cells)} |"
    ]


def _header(results: dict[str, Any]) -> list[str]:
    """Title, the machine / command / conventions table, and how times were taken."""
    meta = results["meta"]
    lines = ["# Benchmarks: WaveCLIP vs a plain CLIP ViT", ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| machine | {meta['cpu_model']}, {meta['cpu_cores']} cores ({meta['usable_cores']} usable, "
        f"torch threads {meta['torch_threads']}){'; GPU ' + meta['gpu'] if meta.get('gpu') else ''} |",
        f"| torch / transformers / python | {meta['torch']} / {meta['transformers']} / {meta['python']} |",
        f"| date | {meta['date_utc']} |",
        f"| command | `{meta['command']}` |",
        f"| models | {meta['geometry']} |",
        f"| attention | `{meta['attn_implementation']}` (timing); GFLOPs count attention as eager computes it |",
        f"| FLOPs convention | {meta['flops_convention']} |",
        f"| load average (1, 5, 15 min) | start {meta['load_average_start']}, end {meta.get('load_average_end')} "
        "(other processes share this machine: a load above the core count slows every configuration) |",
        f"| wall time | {meta.get('wall_seconds', 0):.0f} s |",
    ]
    lines += _contention_row(meta)
    lines += [
        "",
        "Times: `time.perf_counter` around each call under `torch.inference_mode()`, warm-up rounds first, then "
        "trials interleaved round-robin across configurations; median, inter-quartile range (q1–q3) and min–max "
        "over the trials. ms unless marked s.",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# One renderer per section: results -> Markdown lines (none when the section did not run)
# ---------------------------------------------------------------------------------------------------------------


def _targets(results: dict[str, Any]) -> list[str]:
    targets = results.get("targets", [])
    if not targets:
        return []
    lines = ["## Targets", "", "| target | measured | bound | result | note |", "|---|---:|---:|---|---|"]
    for t in targets:
        lines.append(
            f"| {t['target']} | {t['measured']:.3f} | {t['kind']} {t['bound']:g} | "
            f"{'pass' if t['passed'] else '**FAIL**'} | {t['detail']} |"
        )
    return lines + [""]


def _encoder_table(device: str, dtype: str, batch: str, entry: dict[str, Any]) -> list[str]:
    """One (device, dtype, batch size) table of every encoder configuration, then the cached passes by call and
    the compiled cases' first calls."""
    note = _contention_note(entry.get("contention"))
    lines = [
        f"**{device.upper()} {dtype}, batch {batch}** (warm-up {entry['warmup']}, "
        f"{entry['trials']} trials{'; ' + note if note else ''})",
        "",
        "| configuration | GFLOPs / image | median / batch | IQR | min–max | ms / image | "
        "GFLOP/s | × CLIP (same mode) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = entry["configs"]
    for name, row in rows.items():
        clip = rows["clip_full_compiled" if name.endswith("_compiled") else "clip_full"]["median"]
        lines.append(
            f"| {ENCODER_CONFIGS[name]} | {row['gflops_per_image']:.2f} | {_ms(row['median'])} | "
            f"{_spread(row)} | {_minmax(row)} | {row['ms_per_image']:.2f} | "
            f"{row['gflops_per_second']:.1f} | {row['median'] / clip:.3f} |"
        )
    lines.append("")
    for name, row in rows.items():
        if name.startswith("waveclip_cached") and "parts" in row:
            lines.append(
                f"{ENCODER_CONFIGS[name]}, by call: "
                + ", ".join(f"{part} {_ms(p['median'])}" for part, p in row["parts"].items())
                + "."
            )
    first = entry.get("first_call_seconds")
    if first:
        lines.append(
            "First call of each compiled case (tracing and code generation included, not in the table): "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in first.items())
            + "."
        )
    return lines + [""]


def _encoder(results: dict[str, Any]) -> list[str]:
    encoder = results.get("encoder")
    if not encoder:
        return []
    lines = [
        "## 1. Image encoder",
        "",
        'Random pixel values (WaveCLIP reads them as packed coefficients). "Stage 0 only" and the "single '
        'full forward" are the two calls inside the naive re-run, each timed on its own.',
        "",
    ]
    settings = results["settings"]
    for device, per_dtype in encoder.items():
        if "skipped" in per_dtype:
            lines += [
                f"**{device.upper()}**: {per_dtype['skipped']}; the code path (batch sizes "
                f"{', '.join(str(s['batch_size']) for s in settings['gpu_schedules'])}, "
                f"{' and '.join(settings['gpu_dtypes'])}, sdpa) is in `benchmark_encoder`.",
                "",
            ]
            continue
        for dtype, per_batch in per_dtype.items():
            for batch, entry in per_batch.items():
                lines += _encoder_table(device, dtype, batch, entry)
    return lines


def _encoder_profile(results: dict[str, Any]) -> list[str]:
    prof = results.get("encoder_profile")
    if not prof:
        return []
    lines = [
        f"### Where the encoder time goes ({prof['device'].upper()}, batch {prof['batch_size']}, "
        "`torch.profiler`, one call each)",
        "",
        "| call | self-time total | top operators (self time, calls, share) |",
        "|---|---:|---|",
    ]
    for name, call in prof["calls"].items():
        ops = "; ".join(
            f"`{op['op']}` {_ms(op['self_ms'] / 1e3)} ({op['calls']}×, {100 * op['share']:.0f}%)" for op in call["ops"]
        )
        busy = call.get("others_busy_cores")
        busy = f" (others {busy:.2f} cores)" if busy is not None else ""
        lines.append(f"| {name}{busy} | {_ms(call['self_time_total_ms'] / 1e3)} | {ops} |")
    return lines + [""]


def _early_exit_table(device: str, dtype: str, entry: dict[str, Any]) -> list[str]:
    """One (device, dtype) early-exit sweep: what was forced, the prediction, then one row per exit fraction."""
    lines = [
        f"**{device.upper()} {dtype}, batch {entry['batch_size']}**, {entry['num_labels']} labels (warm-up "
        f"{entry['warmup']}, {entry['trials']} trials; {_contention_note(entry.get('contention')) or '-'}). "
        "The first round(f × batch) images are forced to stop after stage 0; the rest continue from "
        "the cache after `batch_select_indices`, as in `refine`. "
        "Stage 0 (with scoring) is shared by all fractions of a round. Predicted = t(stage 0) + (1 − f) "
        "× t(later stages, whole batch), the GFLOPs-scaled line; the last column compares with time ∝ "
        "GFLOPs at the no-exit rate.",
        "",
        "| exit fraction | GFLOPs / image | median / batch | IQR | ms / image | predicted | deviation | "
        "vs time ∝ GFLOPs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in entry["rows"]:
        lines.append(
            f"| {100 * row['exit_fraction']:.0f}% | {row['gflops_per_image']:.2f} | {_ms(row['median'])} "
            f"| {_spread(row)} | {row['ms_per_image']:.2f} | {_ms(row['predicted_seconds'])} | "
            f"{row['deviation_percent']:+.1f}% | {row['gflops_line_deviation_percent']:+.1f}% |"
        )
    return lines + [""]


def _early_exit(results: dict[str, Any]) -> list[str]:
    early = results.get("early_exit")
    if not early:
        return []
    lines = ["## 4. Early exit (batched `refine` path)", ""]
    for device, entry in early.items():
        if "skipped" in entry:
            lines += [f"**{device.upper()}**: {entry['skipped']}.", ""]
            continue
        for dtype, sweep in early_exit_entries(entry):
            lines += _early_exit_table(device, dtype, sweep)
    return lines


def _single_image_table(batch: str, entry: dict[str, Any], modes: dict[str, str]) -> list[str]:
    note = _contention_note(entry.get("contention"))
    lines = [
        f"**CPU, batch {batch}** (warm-up {entry['warmup']}, {entry['trials']} trials{'; ' + note if note else ''}; "
        "median ms per call, IQR in brackets)",
        "",
        "| mode | " + " | ".join(SINGLE_IMAGE_CALLS.values()) + " | cached / CLIP | naive / cached | "
        "stage 0: speed-up / GFLOPs ratio |",
        "|---|" + "---:|" * (len(SINGLE_IMAGE_CALLS) + 3),
    ]
    for mode, rows in entry["rows"].items():
        ratios = entry["ratios"][mode]
        times = " | ".join(f"{_ms(rows[call]['median'])} ({_ms(rows[call]['iqr'])})" for call in SINGLE_IMAGE_CALLS)
        lines.append(
            f"| {modes.get(mode, mode)} | {times} | {ratios['cached_over_clip']:.3f} | "
            f"{ratios['naive_over_cached']:.3f} | {ratios['stage0_speedup_over_gflops_ratio']:.3f} |"
        )
    for route, calls in entry.get("int8_speedup", {}).items():
        lines.append("")
        lines.append(
            f"int8 speed-up, {modes.get(route, route)} against float32 in the same runtime: "
            + ", ".join(f"{SINGLE_IMAGE_CALLS[call]} {value:.2f}x" for call, value in calls.items())
            + "."
        )
    return lines + [""]


def _single_image(results: dict[str, Any]) -> list[str]:
    single = results.get("single_image")
    if not single:
        return []
    per_image = single["gflops_per_image"]
    lines = [
        "## 5. One image at a time",
        "",
        "What a zero-shot service pays per request: each mode runs plain CLIP and WaveCLIP the same way, in "
        "interleaved rounds of its own (modes one after another: two runtimes in one set of rounds slow each other) "
        f"with {single['threads']} threads for torch and ONNX Runtime alike. GFLOPs per image: "
        + ", ".join(f"{SINGLE_IMAGE_CALLS[call]} {value:.2f}" for call, value in per_image.items())
        + " (int8 modes do the same multiply-adds). The last column is 1.0 when stage 0 runs at CLIP's GFLOP/s.",
        "",
    ]
    for batch, entry in single.items():
        if batch.isdigit():
            lines += _single_image_table(batch, entry, single["modes"])
    built = [f"{name} {seconds:.0f} s" for name, seconds in single.get("build_seconds", {}).items()]
    first_batch = next((entry for batch, entry in single.items() if batch.isdigit()), {})
    compiled = [
        f"{name} {seconds:.0f} s"
        for name, seconds in first_batch.get("first_call_seconds", {}).items()
        if name.startswith("compiled/")
    ]
    if built:
        lines.append("Building the modes (not timed above): " + ", ".join(built) + ".")
    if compiled:
        lines.append("First calls of the compiled cases (compilation included): " + ", ".join(compiled) + ".")
    return lines + [""]


def _preprocessing(results: dict[str, Any]) -> list[str]:
    pre = results.get("preprocessing")
    if not pre:
        return []
    clip_class = pre["processors"]["clip"]
    lines = [
        "## 2. Preprocessing",
        "",
        f"`WaveCLIPImageProcessor` (YCbCr + Haar DWT) and `WaveCLIPImageProcessorFast` (the same `pixel_values`, "
        f"made on the device it is given; here the CPU) vs `CLIPImageProcessor()`, which gives `{clip_class}` here"
        + (" (torchvision is not installed)" if clip_class.endswith("Pil") else "")
        + '. Same RGB PIL images, `return_tensors="pt"`.',
        "",
        "| image | size | WaveCLIP median | IQR | CLIP median | IQR | ratio | WaveCLIP on 1 thread | fast median "
        "| IQR | fast / WaveCLIP |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    batch = pre["batch"]
    rows = [(name, row["size"], row) for name, row in pre["single"].items()]
    rows.append((f"batch of {batch['batch_size']} (images cycled), per call", "", batch))
    for name, size, row in rows:
        one_thread = _ms(row["waveclip_1_thread"]["median"]) if "waveclip_1_thread" in row else "—"
        fast = row.get("waveclip_fast")
        fast_cells = (
            f"{_ms(fast['median'])} | {_spread(fast)} | {fast['median'] / row['waveclip']['median']:.2f}"
            if fast
            else "— | — | —"
        )
        lines.append(
            f"| {name} | {size} | {_ms(row['waveclip']['median'])} | {_spread(row['waveclip'])} | "
            f"{_ms(row['clip']['median'])} | {_spread(row['clip'])} | "
            f"{row['waveclip']['median'] / row['clip']['median']:.2f} | {one_thread} | {fast_cells} |"
        )
    return lines + [
        "",
        f"Single image: warm-up {pre['single_schedule']['warmup']}, "
        f"{pre['single_schedule']['trials']} trials per image; batch: warm-up {batch['warmup']}, "
        f"{batch['trials']} trials ({_contention_note(batch.get('contention')) or '-'}).",
        "",
        *_resize_strategies(pre.get("resize_strategies")),
    ]


def _resize_strategies(resize: dict[str, Any] | None) -> list[str]:
    """The line that times the fast processor's resize batched against one image at a time, on the CPU."""
    if not resize:
        return []
    batched, single = resize["one_call"]["median"], resize["one_call_per_image"]["median"]
    return [
        f"The fast processor's resize on the CPU, {resize['images']} to {resize['image_size']} px: one call for "
        f"the batch {_ms(batched)} ({_spread(resize['one_call'])}), one call per image {_ms(single)} "
        f"({_spread(resize['one_call_per_image'])}); batched / one by one {batched / single:.2f}x. (On the CPU it "
        "resizes one image at a time, which holds one full-size float image in memory instead of the batch.)",
        "",
    ]


def _pipeline_intro(pipe: dict[str, Any]) -> str:
    """The paragraph that says what the two pipelines ran on: labels, text tower, classes, rounds."""
    tt = pipe["text_tower"]
    clip_text = (
        "CLIP ViT-B/16's text tower size; "
        if (tt["layers"], tt["hidden_size"]) == (12, 512)
        else ("smaller than CLIP ViT-B/16's 12 x 512 text tower; ")
    )
    return (
        f'{pipe["num_labels"]} labels ("object 0" … ), template "{pipe["hypothesis_template"]}" '
        f"({pipe['prompt_tokens']} tokens with padding), word-level tokenizer. Text tower: {tt['layers']} layers, "
        f"width {tt['hidden_size']}, {tt['heads']} heads ({clip_text}random weights, shared by both "
        f"models via `convert_clip_to_waveclip`); one label set costs {pipe['text_gflops_per_label_set']:.0f} GFLOPs "
        'of text. Stock: `pipeline("zero-shot-image-classification", model=clip_folder)` → '
        f"`{pipe['stock_pipeline_class']}` "
        f"with `{pipe['stock_image_processor']}`; WaveCLIP: `trust_remote_code=True` → "
        f"`{pipe['waveclip_pipeline_class']}`. PIL images (the preprocessing sample photos, cycled), default "
        f"`batch_size=1` unless marked. {pipe['rounds']} interleaved rounds per run (median call time; IQR as ms / "
        "image). At `batch_size` > 1 the stock pipeline encodes the prompts once per batch, not per image."
    )


def _pipeline_row(key: str, run: dict[str, Any]) -> str:
    label = PIPELINE_RUNS[key.split("@")[0]].format(threshold=run.get("threshold", 0))
    if run["batch_size"] != 1:
        label += f", **batch_size={run['batch_size']}**"
    share = f"{100 * run['exit_fraction_stage0']:.0f}%" if "exit_fraction_stage0" in run else "—"
    n = run["images"]
    return (
        f"| {label} | {n} | {run['images_per_second']:.3f} | {run['ms_per_image']:.1f} | "
        f"{1e3 * run['q1'] / n:.1f}–{1e3 * run['q3'] / n:.1f} | {run['gflops_per_image']:.2f} | {share} |"
    )


def _pipeline(results: dict[str, Any]) -> list[str]:
    pipe = results.get("pipeline")
    if not pipe:
        return []
    lines = [
        "## 3. Zero-shot pipeline end to end",
        "",
        _pipeline_intro(pipe),
        "",
        "| run | images / call | images / s | ms / image | IQR ms / image | GFLOPs / image | answered at stage 0 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_pipeline_row(key, run) for key, run in pipe["runs"].items()]
    runs = pipe["runs"]
    if "bare_waveclip_theta0" in runs and "waveclip_theta0" in runs:
        piped, bare = runs["waveclip_theta0"]["ms_per_image"], runs["bare_waveclip_theta0"]["ms_per_image"]
        lines += [
            "",
            f"The pipeline's own cost at θ = 0, `batch_size=1`: {piped - bare:.1f} ms per image ({piped:.1f} "
            f"through the pipeline against {bare:.1f} for the image processor and `refine` called directly, "
            "same rounds).",
        ]
    note = _contention_note(pipe.get("contention"))
    if note:
        lines += ["", f"Rounds: {note}."]
    lines += [
        "",
        f"Tokenising the {pipe['num_labels']} prompts (which the stock pipeline does for every image, "
        f"memoised or not): median {_ms(pipe['tokenize_prompts_seconds']['median'])} ms.",
    ]
    return lines + [
        "",
        "GFLOPs / image: the image encoder (analytic, `flops.py`) plus, for the stock pipeline, the "
        "text tower on every prompt (same per-layer formula); the first WaveCLIP call carries one label "
        "set's text cost spread over its images.",
        "",
    ]


# The report's parts after the header, in order.
REPORT_PARTS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    _targets,
    _encoder,
    _encoder_profile,
    _early_exit,
    _preprocessing,
    _pipeline,
    _single_image,
)


def markdown_report(results: dict[str, Any], notes: str | None = None) -> str:
    """The Markdown report: machine, every section's table, the targets with pass / fail, notes."""
    lines = _header(results)
    for part in REPORT_PARTS:
        lines += part(results)
    if notes:
        lines += ["## Profiling notes", "", notes.strip(), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def hand_written_part(path) -> str | None:
    """The hand-written tail of an existing report (from `HAND_WRITTEN_MARKER` on), or None."""
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text()
    index = text.find(HAND_WRITTEN_MARKER)
    return text[index:].rstrip() + "\n" if index >= 0 else None


def write_reports(results: dict[str, Any], output_dir, notes: str | None = None) -> dict[str, Path]:
    """Write `benchmarks.json`, `benchmarks.md` and `benchmark_time_vs_gflops.png` into `output_dir`.

    A hand-written tail of an existing `benchmarks.md` (see `HAND_WRITTEN_MARKER`) is carried over.

    Returns:
        {"json": path, "markdown": path, "plot": path}; no "plot" when there was nothing to plot.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / JSON_NAME, "markdown": output_dir / MARKDOWN_NAME}
    kept = hand_written_part(paths["markdown"])
    paths["json"].write_text(json.dumps(jsonable(results), indent=1) + "\n")
    markdown = markdown_report(results, notes) + "\n"
    if kept:
        markdown += "\n" + kept
    paths["markdown"].write_text(markdown)
    plot = plot_time_vs_gflops(results, output_dir / PLOT_NAME)
    if plot is not None:
        paths["plot"] = plot
    return paths
