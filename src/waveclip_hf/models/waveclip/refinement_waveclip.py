"""Gated zero-shot inference, coarse to fine: `WaveCLIPModel.refine`, this model's `generate`.

`refine` runs stage 0 on a batch, scores it against the labels (`scoring.zero_shot_logits`), lets the gate
(`gating.StageGate`) answer the images whose margin is decisive, drops them from the batch and from the cache, and
feeds the next stage's tokens to the rest from the cache. No stage is ever computed twice.

It lives beside the architecture, as transformers' `GenerationMixin` does: `WaveCLIPModel` inherits it, and it
reads only the model's public pieces (`get_image_features`, `get_text_features`, `logit_scale`, the config).

This file is shipped as remote code with saved checkpoints.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .exit_signals import ExitSignal, check_exit_signal
from .flops import answer_gflops
from .gating import StageGate, check_margin_scaling, check_margin_threshold, check_stage_count
from .scoring import zero_shot_logits
from .stage_cache import WaveCLIPStageCache


@dataclass
class WaveCLIPRefinementOutput(ModelOutput):
    r"""
    Output of [`WaveCLIPModel.refine`]: per image, the answer of the stage where the gate stopped it.

    scores (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Softmax over the labels of the answering stage's logits.
    logits_per_image (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        `logit_scale * cos(image embedding, label embedding)` at the answering stage.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        Normalised image embedding of the answering stage.
    exit_stage (`torch.LongTensor` of shape `(batch_size,)`):
        The stage that answered (0 = approximation band only).
    gflops (`torch.FloatTensor` of shape `(batch_size,)`):
        Image-encoder GFLOPs spent on each image with the cache (1 multiply-add = 2 FLOPs; text excluded).
    stage_scores (`torch.FloatTensor` of shape `(batch_size, stages, num_labels)`, *optional*):
        With `return_all_stages=True`: the scores after every stage up to `max_stages`; NaN after the stage
        that answered (the image did not run those).
    """

    scores: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    exit_stage: torch.LongTensor | None = None
    gflops: torch.FloatTensor | None = None
    stage_scores: torch.FloatTensor | None = None


class RefinementAnswers:
    """What `refine` has answered so far, and which images still run.

    Args:
        batch_size, num_labels, projection_dim: the shapes of the answers.
        num_stages: the stages `refine` may run (the width of `stage_scores`).
        keep_stage_scores: also keep every stage's scores (`return_all_stages`).
        like: a tensor whose device and dtype the answers take (the label embeddings).
    """

    def __init__(
        self,
        batch_size: int,
        num_labels: int,
        projection_dim: int,
        num_stages: int,
        keep_stage_scores: bool,
        like: torch.Tensor,
    ):
        self.logits = like.new_empty(batch_size, num_labels)
        self.image_embeds = like.new_empty(batch_size, projection_dim)
        self.exit_stage = torch.full((batch_size,), -1, dtype=torch.long, device=like.device)
        self.active = torch.arange(batch_size, device=like.device)
        # NaN marks the stages an image did not run.
        self.stage_scores = (
            like.new_full((batch_size, num_stages, num_labels), float("nan")) if keep_stage_scores else None
        )

    def record(self, stage: int, logits: torch.Tensor, image_embeds: torch.Tensor, stops: torch.Tensor):
        """Store the answers of the active images that `stops` after `stage`.

        Args:
            logits: (active, labels) this stage's logits; image_embeds: (active, projection_dim), unnormalised.
            stops: (active,) bool.

        Returns:
            (continuing,) the positions, among the active images, of those that go on (`None` when none does).
        """
        if self.stage_scores is not None:
            self.stage_scores[self.active, stage] = logits.softmax(-1)
        answered = self.active[stops]
        self.logits[answered] = logits[stops]
        self.image_embeds[answered] = nn.functional.normalize(image_embeds[stops], dim=-1).to(logits.dtype)
        self.exit_stage[answered] = stage
        if bool(stops.all()):
            return None
        continuing = (~stops).nonzero().squeeze(1)
        self.active = self.active[continuing]
        return continuing

    def output(self, cumulative_gflops: torch.Tensor) -> WaveCLIPRefinementOutput:
        return WaveCLIPRefinementOutput(
            scores=self.logits.softmax(-1),
            logits_per_image=self.logits,
            image_embeds=self.image_embeds,
            exit_stage=self.exit_stage,
            gflops=cumulative_gflops.to(self.exit_stage.device)[self.exit_stage].float(),
            stage_scores=self.stage_scores,
        )


class WaveCLIPRefinementMixin:
    """Gated, coarse-to-fine zero-shot classification for [`WaveCLIPModel`] (`refine`), with its cost model."""

    @property
    def num_stages(self) -> int:
        return self.config.vision_config.num_stages

    def new_stage_cache(self, num_stages: int | None = None) -> WaveCLIPStageCache:
        """An empty [`WaveCLIPStageCache`] for this model's stages (default: all), to keep across `refine` calls.

        Build it here rather than from an import: a model and a pipeline loaded with `trust_remote_code` may come
        from different copies of the WaveCLIP code, and `refine` takes only this model's own cache class.
        """
        return WaveCLIPStageCache(self.config.vision_config, num_stages)

    def answer_gflops(self) -> torch.Tensor:
        """(num_stages,) float64: image-encoder GFLOPs to have an answer after each stage, the way the model runs
        (with the cache; for a bidirectional model, its one full forward at every entry). 1 multiply-add = 2 FLOPs."""
        return torch.tensor(answer_gflops(self.config.vision_config, self.projection_dim), dtype=torch.float64)

    @torch.no_grad()
    def refine(
        self,
        pixel_values: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        margin_threshold: float | None = None,
        max_stages: int | None = None,
        margin_scaling: str = "none",
        gflops_budget: float | None = None,
        return_all_stages: bool = False,
        exit_signal: str = "margin",
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: WaveCLIPStageCache | None = None,
    ) -> WaveCLIPRefinementOutput:
        """Margin-gated zero-shot classification, coarse to fine: the `generate` of this model.

        ```python
        >>> inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=image, return_tensors="pt")
        >>> model.refine(**inputs, margin_threshold=0.2)  # or model.refine(pixel_values, text_embeds, 0.2)
        ```

        Args:
            pixel_values: (batch, 3, S, S) packed coefficients from [`WaveCLIPImageProcessor`].
            text_embeds: (num_labels, projection_dim) label embeddings (`get_text_features(...).pooler_output`,
                normalised here); or give the labels' `input_ids` (and `attention_mask`) instead.
            margin_threshold: stop when top-1 minus top-2 probability reaches it (0: everything at stage 0;
                `None`, the default: no early exit, every image through every stage up to `max_stages`). A
                bidirectional model (`attention="bidirectional"`) takes only `None`: it answers after one full forward.
            max_stages: answer at the latest after this many stages (default: all; a bidirectional model: all).
            margin_scaling: `"none"` or `"num_labels"` (the paper's threshold x number of labels).
            gflops_budget: mean image-encoder GFLOPs per image for this batch. After each stage, of the images the
                gate sends on, those with the smallest margins continue first, as many as the budget still pays for.
            return_all_stages: also return `stage_scores`, every image's scores after every stage it ran.
            exit_signal: what the gate reads (`exit_signals.EXIT_SIGNALS`: `"margin"`, the paper's; `"stability"`,
                `"saturation"`, `"learned"`, the checkpoint's exit head, the margin without one); `margin_threshold`
                is in its units.
            input_ids, attention_mask, position_ids: (num_labels, length) tokenised label prompts, instead of
                `text_embeds` (e.g. from [`WaveCLIPProcessor`] with `text=`).
            cache: a [`WaveCLIPStageCache`] from `new_stage_cache()` to reuse (reset first; default: a new one per
                call). It serves one call at a time: a caller with several threads keeps one per thread.

        Returns:
            [`WaveCLIPRefinementOutput`] with per-image scores, answering stage and GFLOPs.
        """
        first_stage, num_stages = self._refinement_stages(margin_threshold, max_stages, margin_scaling)
        check_exit_signal(exit_signal)
        self.vision_model._check_pixel_values(pixel_values)
        text_embeds = self._refinement_label_embeddings(text_embeds, input_ids, attention_mask, position_ids)
        cumulative = self.answer_gflops()
        gate = StageGate(margin_threshold, margin_scaling, cumulative.tolist(), gflops_budget, pixel_values.shape[0])
        answers = RefinementAnswers(
            pixel_values.shape[0], *text_embeds.shape, num_stages, return_all_stages, text_embeds.to(self.device)
        )
        signal = ExitSignal(exit_signal, text_embeds, getattr(self.config, "exit_head", None))
        # A bidirectional model runs one full forward (first_stage = the last stage), without a cache.
        cache = self._refine_cache(cache, num_stages) if first_stage == 0 else None
        self._run_stages(pixel_values, text_embeds, gate, signal, answers, cache, range(first_stage, num_stages))
        return answers.output(cumulative)

    def _run_stages(self, pixel_values, text_embeds, gate, signal, answers: RefinementAnswers, cache, stages):
        """Run `stages` in order, each on the images still active, recording the answers of those that stop and
        dropping them from `cache` and from the exit signal's state; the last stage answers every image left."""
        logit_scale = self.logit_scale.exp()
        for stage in stages:
            # The first stage reads every image: no gather copy of the pixels.
            inputs = pixel_values if stage == stages[0] else pixel_values[answers.active]
            image_embeds = self.get_image_features(inputs, num_stages=stage + 1, cache=cache).pooler_output
            logits = zero_shot_logits(image_embeds, text_embeds, logit_scale)
            if stage == stages[-1]:
                stops = torch.ones_like(answers.active, dtype=torch.bool)
            else:
                stops = ~gate.continues(signal.scores(logits.softmax(-1), image_embeds), logits.shape[-1], stage)
            continuing = answers.record(stage, logits, image_embeds, stops)
            if continuing is None:
                return
            if len(continuing) < len(stops):
                cache.batch_select_indices(continuing)
                signal.keep(continuing)

    def _refinement_stages(self, margin_threshold, max_stages, margin_scaling) -> tuple[int, int]:
        """The first stage `refine` runs and how many stages it may run, after checking the gate's arguments up front
        (a single label or `max_stages=1` never reaches the gate)."""
        num_stages = (
            self.num_stages if max_stages is None else check_stage_count(max_stages, "max_stages", self.num_stages)
        )
        if margin_threshold is not None:
            margin_threshold = check_margin_threshold(margin_threshold)
        check_margin_scaling(margin_scaling)
        first_stage = self._first_refined_stage(margin_threshold, num_stages)
        if margin_threshold == 0:
            # Every probability margin is >= 0, so the gate stops every image at stage 0 (its documented meaning):
            # run that stage alone, without a cache to fill.
            num_stages = 1
        return first_stage, num_stages

    def _refinement_label_embeddings(self, text_embeds, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """(num_labels, projection_dim) label embeddings for `refine`: given, or from the labels' tokens."""
        if (text_embeds is None) == (input_ids is None):
            raise ValueError(
                "Pass the labels once: either `text_embeds` (num_labels, projection_dim) or their `input_ids` (e.g. "
                "`processor(text=prompts, images=images, return_tensors='pt', padding=True)`)."
            )
        if input_ids is not None:
            text_embeds = self.get_text_features(
                input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True
            ).pooler_output
        if not isinstance(text_embeds, torch.Tensor) or text_embeds.dim() != 2 or text_embeds.shape[0] == 0:
            got = tuple(text_embeds.shape) if isinstance(text_embeds, torch.Tensor) else type(text_embeds).__name__
            raise ValueError(f"`text_embeds` must be a (num_labels >= 1, projection_dim) tensor, got {got}.")
        if text_embeds.shape[1] != self.projection_dim:
            raise ValueError(
                f"`text_embeds` have {text_embeds.shape[1]} dimensions but this model projects to "
                f"{self.projection_dim}: use `get_text_features(...).pooler_output` of the same model."
            )
        return text_embeds

    def _refine_cache(self, cache, num_stages: int) -> WaveCLIPStageCache | None:
        """The empty cache `refine` fills: none for a single stage, else `cache` reset, or a new one for
        `num_stages` stages."""
        if num_stages == 1:
            return None
        if cache is None:
            return WaveCLIPStageCache(self.config.vision_config, num_stages)
        if not isinstance(cache, WaveCLIPStageCache):
            raise ValueError(
                f"`refine(cache=...)` reuses this model's `WaveCLIPStageCache`, got {type(cache).__module__}."
                f"{type(cache).__name__}. Pass `model.new_stage_cache()` (or nothing: refine then makes its own)."
            )
        held, layers = len(cache.stage_offsets) - 1, self.config.vision_config.num_hidden_layers
        if held < num_stages or len(cache.layers) != layers:
            raise ValueError(
                f"`refine(cache=...)` got a WaveCLIPStageCache for {held} stages of {len(cache.layers)} layers, but "
                f"runs {num_stages} stages of {layers} layers: build it with `model.new_stage_cache()`."
            )
        cache.reset()
        return cache

    def _first_refined_stage(self, margin_threshold: float | None, num_stages: int) -> int:
        """The stage `refine` starts at: 0, or for a bidirectional model the last one (it runs one full forward and
        answers there), after refusing an early exit it cannot make."""
        vision_config = self.config.vision_config
        if vision_config.attention != "bidirectional":
            return 0
        if margin_threshold is not None or num_stages != vision_config.num_stages:
            raise ValueError(
                "This WaveCLIP has `attention='bidirectional'`: every stage's class token sees every token, so no "
                "stage answers before the full forward and there is no early exit. Call `refine` with "
                f"margin_threshold=None and max_stages=None (got margin_threshold={margin_threshold}, max_stages="
                f"{num_stages}), or use a block-causal model (the default) for gated refinement."
            )
        return num_stages - 1


__all__ = ["RefinementAnswers", "WaveCLIPRefinementMixin", "WaveCLIPRefinementOutput"]
