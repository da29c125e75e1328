"""Where one image's time goes on a CPU: the cost of one encoder pass against the number of tokens it carries.

At batch 1 a WaveCLIP stage multiplies a few dozen tokens by every weight of the encoder. A pass then costs a part
that does not depend on the tokens (streaming the encoder's weights from memory, launching each layer's kernels) plus
a part per token. The cached refinement pays the first part once per stage: two passes (50 tokens, then 147) where
CLIP makes one of 197. This module measures t(n), the time of the ViT-B/16 encoder's layers on n tokens of one
image, and gives from it, with no model of the hardware:

- the cached pass predicted from its parts, t(50) + t(147), against CLIP's t(197): how far batch 1's ratio of
  cached to CLIP can come down on this machine while the stages run as matrix products over their own tokens;
- a straight-line fit t(n) = fixed + n * per_token (n from 1 to 197), whose `fixed` is the part each extra stage
  pays again, and the memory bandwidth it would take to stream the weights in that time;
- the same for torch's dynamic int8 linear layers (`export.quantization`), whose weights are 4x smaller.

The layers are transformers' `CLIPEncoder` at the benchmark's geometry with random weights (the layers WaveCLIP's
stages run; a stage's extra keys from the cache add attention work that this count leaves out). Median of
interleaved trials, `torch.set_num_threads(<usable cores>)`, `torch.inference_mode()`.

    python -m waveclip_hf.benchmarking.token_scaling   # docs/token_scaling.{json,md}, docs/figures/token_scaling.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .machine import module_run_meta, usable_cores, written_by
from .models import build_encoder_models
from .settings import BenchmarkSettings
from .timing import Case, run_interleaved


TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 50, 64, 100, 147, 197)
# WaveCLIP with one level at 224 px and cell 32: stage 0 carries the 49 approximation tokens and the class token,
# stage 1 the 3 x 49 detail tokens; CLIP ViT-B/16 carries 196 patches and the class token.
STAGE_TOKENS = (50, 147)
CLIP_TOKENS = 197


def encoder_cases(encoder: torch.nn.Module, counts, hidden_size: int) -> dict[str, Case]:
    """One case per token count: `encoder` on a (1, n, hidden_size) batch of random hidden states."""
    generator = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(1, n, hidden_size, generator=generator) for n in counts}

    def case(n: int) -> Case:
        def run(stopwatch) -> None:
            with stopwatch.part("total"):
                encoder(inputs_embeds=inputs[n])

        return run

    return {str(n): case(n) for n in counts}


def scaling_summary(counts, median_seconds: dict[int, float], weight_bytes: int) -> dict[str, Any]:
    """The fit, the prediction of the cached pass from its parts, and the bandwidth the fixed part implies."""
    n = np.asarray(counts, dtype=np.float64)
    t = np.asarray([median_seconds[c] for c in counts])
    per_token, fixed = np.polyfit(n, t, 1)
    stages = sum(median_seconds[c] for c in STAGE_TOKENS)
    return {
        "median_ms": {str(c): 1e3 * median_seconds[c] for c in counts},
        "fit_fixed_ms": 1e3 * float(fixed),
        "fit_per_token_ms": 1e3 * float(per_token),
        "fit_max_error_ms": 1e3 * float(np.abs(fixed + per_token * n - t).max()),
        "cached_from_parts_ms": 1e3 * stages,
        "clip_ms": 1e3 * median_seconds[CLIP_TOKENS],
        "cached_over_clip_from_parts": stages / median_seconds[CLIP_TOKENS],
        "weight_megabytes": weight_bytes / 1e6,
        "weights_gb_per_s_if_fixed_is_streaming": weight_bytes / 1e9 / fixed if fixed > 0 else None,
    }


def linear_weight_bytes(encoder: torch.nn.Module) -> int:
    """Bytes of the linear layers' weights: float parameters, or the packed int8 weights of quantised layers."""
    total = 0
    for module in encoder.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif hasattr(module, "weight") and callable(module.weight):  # torch.ao dynamic quantised Linear
            weight = module.weight()
            total += weight.numel() * weight.element_size()
    return total


def measure_token_scaling(settings: BenchmarkSettings, warmup: int, trials: int, log=print) -> dict[str, Any]:
    """t(n) for float32 and int8 CLIP encoders at `settings`' geometry: {dtype: scaling_summary}."""
    from ..export.quantization import quantize_linear_layers

    clip_vision = build_encoder_models(settings).clip_vision.eval()
    encoders = {
        "float32": clip_vision.vision_model.encoder,
        "int8": quantize_linear_layers(clip_vision).vision_model.encoder,
    }
    results = {}
    for name, encoder in encoders.items():
        started = time.perf_counter()
        with torch.inference_mode():
            times = run_interleaved(
                encoder_cases(encoder, TOKEN_COUNTS, settings.hidden_size), warmup, trials, torch.device("cpu")
            )
        medians = {int(n): float(np.median(parts["total"])) for n, parts in times.items()}
        results[name] = scaling_summary(TOKEN_COUNTS, medians, linear_weight_bytes(encoder))
        log(
            f"  {name}: t(1) {results[name]['median_ms']['1']:.1f} ms, t(197) {results[name]['clip_ms']:.1f} ms, "
            f"cached from parts / CLIP {results[name]['cached_over_clip_from_parts']:.3f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    return results


def render_markdown(report: dict[str, Any], figure_name: str) -> str:
    meta, results = report["meta"], report["results"]
    rows = [
        "# Where one image's time goes: encoder passes against their token count",
        "",
        written_by(meta) + " The encoder: "
        f"transformers' `CLIPEncoder` at ViT-B/16 width and depth, random weights, one image; median of "
        f"{report['settings']['trials']} interleaved trials. See `benchmarking/token_scaling.py`.",
        "",
        f"![time of one encoder pass against its tokens, float32 and int8](figures/{figure_name})",
        "",
        "| tokens | " + " | ".join(f"{name} ms" for name in results) + " |",
        "|---:|" + "---:|" * len(results),
    ]
    for n in TOKEN_COUNTS:
        rows.append(f"| {n} | " + " | ".join(f"{r['median_ms'][str(n)]:.1f}" for r in results.values()) + " |")
    rows += ["", "| | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    lines = [
        ("fixed part per pass (fit), ms", "fit_fixed_ms", "{:.1f}"),
        ("per token (fit), ms", "fit_per_token_ms", "{:.3f}"),
        ("largest distance of a point from the fit, ms", "fit_max_error_ms", "{:.1f}"),
        ("linear weights, MB", "weight_megabytes", "{:.0f}"),
        (
            "bandwidth if the fixed part were the weights' stream, GB/s",
            "weights_gb_per_s_if_fixed_is_streaming",
            "{:.1f}",
        ),
        (
            f"t({STAGE_TOKENS[0]}) + t({STAGE_TOKENS[1]}), ms (the cached pass's stages)",
            "cached_from_parts_ms",
            "{:.1f}",
        ),
        (f"t({CLIP_TOKENS}), ms (CLIP's pass)", "clip_ms", "{:.1f}"),
        ("**cached / CLIP predicted from the parts**", "cached_over_clip_from_parts", "**{:.3f}**"),
    ]
    for label, key, form in lines:
        rows.append(f"| {label} | " + " | ".join(form.format(r[key]) for r in results.values()) + " |")
    return "\n".join(rows) + "\n"


def plot_token_scaling(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    n = np.asarray(TOKEN_COUNTS, dtype=float)
    for name, result in report["results"].items():
        times = [result["median_ms"][str(c)] for c in TOKEN_COUNTS]
        (line,) = ax.plot(n, times, "o", label=f"{name} (measured)")
        ax.plot(
            n,
            result["fit_fixed_ms"] + result["fit_per_token_ms"] * n,
            "-",
            color=line.get_color(),
            alpha=0.6,
            label=f"{name}: {result['fit_fixed_ms']:.0f} ms + {result['fit_per_token_ms']:.2f} ms/token",
        )
    for count, text in ((STAGE_TOKENS[0], "stage 0"), (STAGE_TOKENS[1], "stage 1"), (CLIP_TOKENS, "CLIP")):
        ax.axvline(count, color="grey", lw=0.8, ls=":")
        ax.text(count, ax.get_ylim()[1] * 0.97, text, rotation=90, va="top", ha="right", fontsize=8, color="grey")
    ax.set_xlabel("tokens in the pass (one image)")
    ax.set_ylabel("ms per encoder pass (12 layers)")
    ax.set_title("A pass costs a fixed part plus a part per token")
    ax.set_xlim(0, CLIP_TOKENS + 8)
    ax.set_ylim(0, None)
    ax.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("docs"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(usable_cores())
    settings = BenchmarkSettings()
    meta = module_run_meta(__spec__.name, argv)
    report = {
        "meta": meta,
        "settings": {"hidden_size": settings.hidden_size, "warmup": args.warmup, "trials": args.trials},
        "results": measure_token_scaling(settings, args.warmup, args.trials),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "token_scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_token_scaling(report, args.output_dir / "figures" / "token_scaling.png")
    (args.output_dir / "token_scaling.md").write_text(render_markdown(report, "token_scaling.png"))
    return report


if __name__ == "__main__":
    main()
