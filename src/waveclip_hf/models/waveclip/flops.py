"""Analytic FLOPs of WaveCLIP's stages (cached and naive) and of a plain CLIP ViT, per image.

Convention (`FLOPS_CONVENTION`): one multiply-add is 2 FLOPs, as open_clip reports (DeiT and fvcore report
MACs, half as much). Only matrix products and convolutions are counted (linear layers, the patch convolutions,
the attention scores Q K^T and the weighted sum A V, the visual projection) - exactly the terms
`torch.utils.flop_counter.FlopCounterMode` counts (mm / addmm / bmm / baddbmm / convolution / sdpa). Bias
adds, layer norms, softmax, activations, embedding look-ups and residual adds are not counted. Attention is
counted as `eager` computes it; on CPU `FlopCounterMode` does not see the matmuls inside SDPA, so measure with
`attn_implementation="eager"` when comparing (a plain CLIP ViT-B/16 reads 35.13 GFLOPs with eager, 33.70 with
sdpa; open_clip publishes 35.13).

With hidden size D, MLP size I, new tokens n and attended keys K, one layer costs
    q/k/v/out projections 8 n D^2 + MLP 4 n D I + attention (scores and weighted sum) 4 n K D,
a stage's patch convolution costs 2 * orientations * G^2 * D * 3 p^2 (p = the stage's patch size), and the
visual projection of one class token 2 D P. Two ways to reach stage s:

- "cached": stage s on top of a KV cache of stages < s. Only stage s's tokens go through the layers, its
  queries attend to every token of stages <= s, and its class token is projected: the increment.
- "naive": stages 0..s recomputed from scratch, one forward with the block-causal mask. The mask only hides
  entries, so attention is dense over all tokens of stages 0..s, and every stage's class token is projected
  (as `WaveCLIPModel.get_image_features` does in one call).

The visual projection (hidden -> projection_dim) is counted for every answer: it is a matmul that
`FlopCounterMode` sees and the gate needs it. Pass `projection_dim=0` to count the bare vision tower
(`WaveCLIPVisionModel`, which has no projection).

Every count follows the config's `band_order` (a stage's token count and patch size are those of the band group
it reads). A bidirectional model (`attention="bidirectional"`) has no cache and answers once, after one full
forward: `stage_flops` refuses the "cached" mode for it, and `answer_flops` gives that forward's cost.

This file is shipped as remote code with saved checkpoints: it imports only torch, transformers and siblings.
"""

import argparse
from typing import NamedTuple

from transformers.models.clip.configuration_clip import CLIPVisionConfig

from .configuration_waveclip import WaveCLIPConfig, WaveCLIPVisionConfig


FLOPS_CONVENTION = (
    "1 multiply-add = 2 FLOPs (as open_clip); matmuls and convolutions only, eager attention, "
    "visual projection included; per image"
)
MODES = ("cached", "naive")


def gflops(flops: float) -> float:
    """FLOPs -> GFLOPs (1e9), under `FLOPS_CONVENTION`."""
    return flops / 1e9


def _resolve(config, projection_dim: int | None) -> tuple[WaveCLIPVisionConfig, int]:
    """The vision config and the projection width to count.

    `WaveCLIPModel` projects with `WaveCLIPConfig.projection_dim`, not `vision_config.projection_dim` (the two may
    differ), so a `WaveCLIPConfig` is resolved to its own `projection_dim`.
    """
    # Compare model types, not classes: remote code may load the config classes from another module copy.
    model_type = getattr(config, "model_type", None)
    if model_type == WaveCLIPConfig.model_type:
        vision_config = config.vision_config
        default_projection = config.projection_dim
    elif model_type == WaveCLIPVisionConfig.model_type:
        vision_config = config
        default_projection = config.projection_dim
    else:
        raise TypeError(f"Expected a WaveCLIPConfig or WaveCLIPVisionConfig, got {type(config).__name__}.")
    projection_dim = default_projection if projection_dim is None else projection_dim
    if projection_dim < 0:
        raise ValueError(f"`projection_dim` must be >= 0 (0: no visual projection), got {projection_dim}.")
    return vision_config, projection_dim


def _layer_flops(hidden: int, intermediate: int, new_tokens: int, key_tokens: int) -> int:
    """One pre-norm transformer block: `new_tokens` queries attending to `key_tokens` keys (cached ones included)."""
    projections = 4 * 2 * new_tokens * hidden * hidden  # q, k, v, out
    mlp = 2 * 2 * new_tokens * hidden * intermediate  # fc1, fc2
    attention = 2 * 2 * new_tokens * key_tokens * hidden  # Q K^T and A V, summed over heads
    return projections + mlp + attention


def _encoder_flops(config, new_tokens: int, key_tokens: int) -> int:
    return config.num_hidden_layers * _layer_flops(
        config.hidden_size, config.intermediate_size, new_tokens, key_tokens
    )


def embedding_flops(vision_config: WaveCLIPVisionConfig, stage: int) -> int:
    """Patch convolution of one stage (the approximation: one band; a detail level: three orientations)."""
    orientations = 1 if vision_config.stage_band_groups[stage] == 0 else 3
    patch = vision_config.stage_patch_sizes[stage]
    outputs = orientations * vision_config.grid_size**2 * vision_config.hidden_size
    return 2 * outputs * vision_config.num_channels * patch * patch


def _check_stages(vision_config: WaveCLIPVisionConfig, num_stages: int | None) -> int:
    num_stages = vision_config.num_stages if num_stages is None else num_stages
    if not 1 <= num_stages <= vision_config.num_stages:
        raise ValueError(f"`num_stages` must be in 1..{vision_config.num_stages}, got {num_stages}.")
    return num_stages


def full_forward_flops(config, num_stages: int | None = None, projection_dim: int | None = None) -> int:
    """One forward of stages 0..num_stages-1 from scratch with the block-causal mask (no cache).

    Attention is dense over all those tokens (masked entries are computed, then hidden), and the class token of
    every stage is projected, as `WaveCLIPModel.get_image_features(pixel_values, num_stages)` does.

    Args:
        config: a `WaveCLIPVisionConfig` or `WaveCLIPConfig`.
        num_stages: stages computed (default: all, L + 1).
        projection_dim: projection width (default: the config's; 0: no projection).
    """
    vision_config, projection_dim = _resolve(config, projection_dim)
    num_stages = _check_stages(vision_config, num_stages)
    tokens = sum(vision_config.stage_lengths[:num_stages])
    embeddings = sum(embedding_flops(vision_config, stage) for stage in range(num_stages))
    projection = num_stages * 2 * vision_config.hidden_size * projection_dim
    return embeddings + _encoder_flops(vision_config, tokens, tokens) + projection


def stage_flops(config, projection_dim: int | None = None, mode: str = "cached") -> list[int]:
    """FLOPs per image spent at each stage.

    Args:
        config: a `WaveCLIPVisionConfig` or `WaveCLIPConfig`.
        projection_dim: projection width (default: the config's; 0: no projection).
        mode: "cached" - the increment of stage s given a KV cache of stages < s; "naive" - the cost of re-running
            stages 0..s from scratch (`full_forward_flops(config, s + 1)`).

    Returns:
        L + 1 integers, one per stage.
    """
    vision_config, projection_dim = _resolve(config, projection_dim)
    if mode == "naive":
        return [full_forward_flops(vision_config, s + 1, projection_dim) for s in range(vision_config.num_stages)]
    if mode != "cached":
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if vision_config.attention == "bidirectional":
        raise ValueError(
            "A bidirectional WaveCLIP (attention='bidirectional') has no cache and no per-stage answers: it answers "
            "once, after one full forward. Count that with `answer_flops(config)` or `full_forward_flops(config)`."
        )
    flops, seen = [], 0
    for stage, length in enumerate(vision_config.stage_lengths):
        seen += length
        flops.append(
            embedding_flops(vision_config, stage)
            + _encoder_flops(vision_config, length, seen)
            + 2 * vision_config.hidden_size * projection_dim
        )
    return flops


def cumulative_flops(config, projection_dim: int | None = None, mode: str = "cached") -> list[int]:
    """FLOPs per image to hold an answer after each stage, having answered after every earlier stage too.

    "cached": sum of the cached increments (the gated, early-exit path). "naive": sum of the re-runs of stages
    0..t for t <= s (no cache: each new stage recomputes everything).
    """
    total, out = 0, []
    for flops in stage_flops(config, projection_dim, mode):
        total += flops
        out.append(total)
    return out


def clip_vit_flops(clip_vision_config: CLIPVisionConfig, projection_dim: int | None = None) -> int:
    """A plain CLIP ViT (`CLIPVisionModelWithProjection`) forward per image, for comparison.

    Patch convolution (no bias) + 1 + N^2 tokens through the layers + projection of the class token.

    Args:
        clip_vision_config: transformers' `CLIPVisionConfig`.
        projection_dim: projection width (default: `clip_vision_config.projection_dim`; 0: no projection).
    """
    config = clip_vision_config
    projection_dim = config.projection_dim if projection_dim is None else projection_dim
    patches = (config.image_size // config.patch_size) ** 2
    tokens = 1 + patches
    patch_embedding = 2 * patches * config.hidden_size * config.num_channels * config.patch_size**2
    return patch_embedding + _encoder_flops(config, tokens, tokens) + 2 * config.hidden_size * projection_dim


def answer_flops(config, projection_dim: int | None = None) -> list[int]:
    """FLOPs per image to have the model's answer after each stage, the way the model runs (what `refine` reports).

    Block-causal (the default): `cumulative_flops(config, projection_dim, "cached")`. Bidirectional: no stage
    answers before the one full forward, so every entry is `full_forward_flops(config)` (and `refine` answers
    at the last stage only).
    """
    vision_config, projection_dim = _resolve(config, projection_dim)
    if vision_config.attention == "bidirectional":
        return [full_forward_flops(vision_config, None, projection_dim)] * vision_config.num_stages
    return cumulative_flops(vision_config, projection_dim, "cached")


def answer_gflops(config, projection_dim: int | None = None) -> list[float]:
    """`answer_flops` in GFLOPs: the one cost per stage that the gate, calibration, evaluation and reports use."""
    return [gflops(flops) for flops in answer_flops(config, projection_dim)]


class FlopsRow(NamedTuple):
    """One stage of `flops_table` (GFLOPs per image, `FLOPS_CONVENTION`)."""

    stage: int
    tokens: int  # tokens this stage adds, class token included
    total_tokens: int  # tokens of stages 0..stage
    cached_gflops: float  # increment of this stage on top of the cache
    cumulative_cached_gflops: float  # answer after this stage, cached (early-exit path)
    naive_gflops: float  # re-running stages 0..stage from scratch
    cumulative_naive_gflops: float  # answer after this stage, re-running at every stage


def flops_table(config, projection_dim: int | None = None) -> list[FlopsRow]:
    """Per-stage token counts and GFLOPs (cached, cumulative cached, naive, cumulative naive) per image."""
    vision_config, projection_dim = _resolve(config, projection_dim)
    cached = stage_flops(vision_config, projection_dim, "cached")
    naive = stage_flops(vision_config, projection_dim, "naive")
    rows, total_tokens, cum_cached, cum_naive = [], 0, 0, 0
    for stage, tokens in enumerate(vision_config.stage_lengths):
        total_tokens += tokens
        cum_cached += cached[stage]
        cum_naive += naive[stage]
        rows.append(
            FlopsRow(
                stage,
                tokens,
                total_tokens,
                gflops(cached[stage]),
                gflops(cum_cached),
                gflops(naive[stage]),
                gflops(cum_naive),
            )
        )
    return rows


def format_flops_table(config, projection_dim: int | None = None, clip_vision_config=None) -> str:
    """`flops_table` as a Markdown table, with the convention and (optionally) a plain CLIP ViT for reference.
    A bidirectional model has one row: its one full forward."""
    vision_config, projection_dim = _resolve(config, projection_dim)
    if vision_config.attention == "bidirectional":
        lines = [
            "| forward | tokens | GFLOPs |",
            "|---|---:|---:|",
            "| one full forward (bidirectional attention: no cache, no early exit) | "
            f"{sum(vision_config.stage_lengths)} | "
            f"{gflops(full_forward_flops(vision_config, None, projection_dim)):.2f} |",
        ]
    else:
        lines = [
            "| stage | tokens | total tokens | cached GFLOPs | cumulative cached | naive re-run | cumulative naive |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in flops_table(vision_config, projection_dim):
            lines.append(
                f"| {row.stage} | {row.tokens} | {row.total_tokens} | {row.cached_gflops:.2f} | "
                f"{row.cumulative_cached_gflops:.2f} | {row.naive_gflops:.2f} | {row.cumulative_naive_gflops:.2f} |"
            )
    if clip_vision_config is not None:
        clip = gflops(clip_vit_flops(clip_vision_config, projection_dim))
        lines.append(f"\nPlain CLIP ViT (patch {clip_vision_config.patch_size}): {clip:.2f} GFLOPs.")
    lines.append(f"\nFLOPs convention: {FLOPS_CONVENTION}.")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Print the FLOPs table of a ViT-B/16-sized WaveCLIP for the given geometries, beside a plain CLIP ViT-B/16."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cell-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--projection-dim", type=int, default=512)
    args = parser.parse_args(argv)
    clip = CLIPVisionConfig(patch_size=16, image_size=args.image_size, projection_dim=args.projection_dim)
    for levels in args.levels:
        config = WaveCLIPVisionConfig(levels=levels, cell_size=args.cell_size, image_size=args.image_size)
        print(f"\nWaveCLIP, levels={levels}, cell={args.cell_size}, image={args.image_size}:\n")
        print(format_flops_table(config, args.projection_dim, clip))


__all__ = [
    "FLOPS_CONVENTION",
    "FlopsRow",
    "answer_flops",
    "answer_gflops",
    "clip_vit_flops",
    "cumulative_flops",
    "embedding_flops",
    "flops_table",
    "format_flops_table",
    "full_forward_flops",
    "gflops",
    "stage_flops",
]


if __name__ == "__main__":
    main()
