"""PyTorch WaveCLIP model: a CLIP whose image encoder reads wavelet tokens coarse-to-fine.

Read top to bottom: outputs -> masks -> embeddings -> attention -> layer -> encoder -> models.

Token layout (see docs/model.md): the packed DWT coefficients (B, 3, S, S) are cut into a G x G grid of cells.
Stage 0 is [cls_0, one token per cell of the level-L approximation]; stage k >= 1 is [cls_k, the H, V and D
detail tokens of level L - k + 1, one per cell each]. Attention is block-causal over stages, so a stage never
changes when later stages arrive: running stage by stage with a KV cache equals one full forward with the
block-causal mask, and the cached path never recomputes anything.

This file is shipped as remote code with saved checkpoints: it imports only torch, transformers and siblings.
"""

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict, Unpack

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.clip.modeling_clip import (
    CLIPMLP,
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPOutput,
    CLIPTextModel,
    eager_attention_forward,
    image_text_contrastive_loss,
)
from transformers.utils import ModelOutput, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_waveclip import WaveCLIPConfig, WaveCLIPVisionConfig
from .gating import check_stage_count
from .pipeline_waveclip import register_gated_pipeline
from .refinement_waveclip import WaveCLIPRefinementMixin
from .stage_cache import WaveCLIPStageCache
from .wavelet_layout import unpack_coefficients


logger = logging.get_logger(__name__)


@dataclass
class WaveCLIPVisionModelOutput(ModelOutput):
    r"""
    Output of [`WaveCLIPVisionModel`].

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, new_tokens, hidden_size)`):
        Hidden states of the tokens computed in this call (stages `cached..num_stages-1`), before post-layernorm.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Class token of the last processed stage after the post-layernorm: the image's answer after that stage.
        ([`WaveCLIPModel.get_image_features`] puts the projected embedding here, as `CLIPModel` does.)
    stage_pooler_outputs (`torch.FloatTensor` of shape `(batch_size, new_stages, hidden_size)`):
        The same for every stage computed in this call, in stage order (one full forward gives all stages).
    cache (`Cache`, *optional*):
        Keys and values of every processed token per layer, to continue with the next stage (transformers < 5.24
        called this `past_key_values`; that name still reads it).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Input of every layer plus the final output, each `(batch_size, new_tokens, hidden_size)`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Attention probabilities per layer, `(batch_size, heads, new_tokens, all_tokens)` (needs `eager`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    stage_pooler_outputs: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None

    @property
    def past_key_values(self) -> Cache | None:
        # transformers >= 5.24 gives every output this alias; older releases have no `cache` field to alias.
        return self.cache


class TowerKwargs(TypedDict, total=False):
    """What `WaveCLIPModel` passes through to its towers, as CLIP passes `TransformersKwargs`."""

    use_cache: bool | None  # the vision tower only
    output_attentions: bool | None
    output_hidden_states: bool | None


def token_stage_ids(config: WaveCLIPVisionConfig, first_stage: int, end_stage: int, device=None) -> torch.Tensor:
    """Stage index of every token of stages `first_stage..end_stage-1`, shape (tokens,)."""
    lengths = config.stage_lengths[first_stage:end_stage]
    # Built on the host from the config (one small copy, as the lengths tensor it replaces): no device sync, meta
    # tensors work, and the ONNX exporter needs no `repeat_interleave` with an output size.
    stage_ids = [stage for stage, length in zip(range(first_stage, end_stage), lengths) for _ in range(length)]
    return torch.tensor(stage_ids, dtype=torch.long, device=device)


def block_causal_mask(
    config: WaveCLIPVisionConfig, first_stage: int, end_stage: int, dtype: torch.dtype, device=None
) -> torch.Tensor | None:
    """Additive attention mask letting a token of stage s see every token of stages <= s and nothing later.

    Queries are the tokens of stages `first_stage..end_stage-1` (the ones computed in this call), keys the tokens of
    stages `0..end_stage-1` (cached stages first).

    Returns:
        (1, 1, Q, K) tensor with 0 where attention is allowed and the dtype's minimum elsewhere, or `None` when one new
        stage is fed (on top of a cache or not) or the config's `attention` is `"bidirectional"`: then every query
        may see every key, and SDPA keeps its fastest kernel. The choice is made from the stage counts and the
        config, known on the host, so `torch.export` and `torch.compile` see no branch on tensor data.
    """
    if end_stage - first_stage == 1 or config.attention == "bidirectional":
        return None
    query_stages = token_stage_ids(config, first_stage, end_stage, device)
    key_stages = token_stage_ids(config, 0, end_stage, device)
    allowed = key_stages[None, :] <= query_stages[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class WaveCLIPVisionEmbeddings(nn.Module):
    """Stage tokens from packed DWT coefficients.

    Each band group (0 = the approximation, k = the details of level L - k + 1) has its own patch projection (a
    `cell / 2^j`-strided convolution over its subbands, since input sizes differ per level); the three orientations
    of a level share it and are told apart by a band embedding. Every token gets its cell's position embedding
    (shared by all stages) and its band embedding (band 0 = approximation, band 1 + 3(k-1) + o = orientation o of
    group k). Each stage has its own class token. Stage s reads group `config.stage_band_groups[s]` (s itself in
    the default coarse-to-fine order), so projections and band embeddings keep their meaning in either order.
    """

    def __init__(self, config: WaveCLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_stages = config.num_stages
        self.num_cells = config.grid_size**2

        self.class_embedding = nn.Parameter(torch.randn(self.num_stages, self.embed_dim))
        self.patch_embeddings = nn.ModuleList(
            nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=patch, stride=patch, bias=True)
            for patch in config.band_group_patch_sizes
        )
        self.position_embedding = nn.Embedding(self.num_cells, self.embed_dim)
        self.band_embedding = nn.Embedding(1 + 3 * config.levels, self.embed_dim)

    def embed_stage(self, coefficients: list, stage: int) -> torch.Tensor:
        """Tokens of one stage, class token first.

        Args:
            coefficients: output of `unpack_coefficients` for the batch.
            stage: 0 to L; coarse-to-fine, 0 is the approximation and L the finest details.

        Returns:
            (batch, 1 + G^2, hidden) for the approximation, (batch, 1 + 3 G^2, hidden) for details, ordered
            [cls, H cells, V cells, D cells] with cells row-major.
        """
        group = self.config.stage_band_groups[stage]
        projection = self.patch_embeddings[group]
        dtype = projection.weight.dtype
        positions = self.position_embedding.weight  # (G^2, hidden)
        if group == 0:
            bands = coefficients[0].to(dtype)
            band_ids = torch.zeros(1, dtype=torch.long, device=positions.device)
        else:
            # Stack the orientations along the batch so one convolution embeds all three.
            bands = torch.cat([band.to(dtype) for band in coefficients[group]], dim=0)
            band_ids = torch.arange(1 + 3 * (group - 1), 1 + 3 * group, device=positions.device)
        batch_size = coefficients[0].shape[0]
        tokens = projection(bands).flatten(2).transpose(1, 2)  # (orientations * batch, G^2, hidden)
        tokens = tokens.view(len(band_ids), batch_size, self.num_cells, self.embed_dim)
        tokens = tokens + positions[None, None] + self.band_embedding(band_ids)[:, None, None]
        tokens = tokens.transpose(0, 1).reshape(batch_size, len(band_ids) * self.num_cells, self.embed_dim)
        class_token = self.class_embedding[stage].expand(batch_size, 1, -1)
        return torch.cat([class_token, tokens], dim=1)

    def forward(self, pixel_values: torch.Tensor, first_stage: int, end_stage: int) -> torch.Tensor:
        """Tokens of stages `first_stage..end_stage-1` concatenated in stage order.

        Args:
            pixel_values: (batch, 3, S, S) packed coefficients from [`WaveCLIPImageProcessor`].

        Returns:
            (batch, sum of those stages' lengths, hidden).
        """
        coefficients = unpack_coefficients(pixel_values, self.config.levels)
        return torch.cat([self.embed_stage(coefficients, stage) for stage in range(first_stage, end_stage)], dim=1)


class WaveCLIPAttention(CLIPAttention):
    """CLIP's multi-head attention plus a KV cache, so a new stage attends to every earlier stage's tokens."""

    def __init__(self, config: WaveCLIPVisionConfig, layer_idx: int):
        super().__init__(config)
        self.layer_idx = layer_idx

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch, tokens, hidden) -> queries, keys and values, each (batch, tokens, hidden). One method, so that a
        serving copy can compute the three in one product (`export.quantization` fuses them in int8)."""
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        attn_implementation: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, new_tokens, hidden) -> same shape, and the attention probabilities when `eager`."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries, keys, values = self.project_qkv(hidden_states)
        queries = queries.reshape(hidden_shape).transpose(1, 2)
        keys = keys.reshape(hidden_shape).transpose(1, 2)
        values = values.reshape(hidden_shape).transpose(1, 2)
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn_implementation or self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            queries,
            keys,
            values,
            attention_mask,
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
            is_causal=False,
        )
        attn_output = self.out_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


class WaveCLIPEncoderLayer(CLIPEncoderLayer):
    """CLIP's pre-norm transformer block with a cache-aware attention; parameter names match CLIP's exactly."""

    def __init__(self, config: WaveCLIPVisionConfig, layer_idx: int):
        super().__init__(config)
        self.self_attn = WaveCLIPAttention(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """(batch, new_tokens, hidden) -> same shape, and the attention probabilities when `eager`; `kwargs`
        (`cache`, `attn_implementation`) go to the attention, as CLIP's layer passes its own."""
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(self.layer_norm1(hidden_states), attention_mask, **kwargs)
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return hidden_states, attn_weights


class WaveCLIPEncoder(nn.Module):
    """A stack of [`WaveCLIPEncoderLayer`]s: CLIP's encoder, reading and extending a cache."""

    def __init__(self, config: WaveCLIPVisionConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(WaveCLIPEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cache: Cache | None = None,
    ) -> BaseModelOutput:
        """Runs the new tokens through every layer, appending their keys and values to `cache`.

        Args:
            inputs_embeds: (batch, new_tokens, hidden) tokens of the stages computed in this call.
            attention_mask: (1, 1, new_tokens, all_tokens) additive mask from `block_causal_mask`, or `None`.
            cache: keys and values of the earlier stages, extended in place (`None`: nothing cached).

        Returns:
            `BaseModelOutput` with `last_hidden_state` (batch, new_tokens, hidden), and when asked `hidden_states`
            (input of every layer plus the output) and `attentions` (batch, heads, new_tokens, all_tokens) per layer.
        """
        # SDPA returns no probabilities; asking for them switches this call to the eager kernel.
        attn_implementation = "eager" if output_attentions else None
        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            # The hidden states go positionally and the rest by name, as `GradientCheckpointingLayer` expects: it
            # checkpoints the positional inputs and drops a `cache` keyword when it recomputes a layer.
            hidden_states, attn_weights = layer(
                hidden_states, attention_mask, cache=cache, attn_implementation=attn_implementation
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class WaveCLIPPreTrainedModel(PreTrainedModel):
    """Weight initialisation and attention backends shared by the WaveCLIP models."""

    config: WaveCLIPConfig
    base_model_prefix = "waveclip"
    input_modalities = ("image", "text")
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "WaveCLIPEncoderLayer", "WaveCLIPVisionEmbeddings"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        # CLIP's scheme for the vision blocks it shares with us (attention, MLP); the wavelet embeddings are new.
        # The text tower is CLIP's `CLIPTextModel`, initialised by CLIP's own `_init_weights` (see
        # `initialize_weights`). `init.*` respects parameters already loaded from a checkpoint.
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, WaveCLIPVisionEmbeddings):
            std = module.config.initializer_range * factor
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5 * factor)
            init.normal_(module.position_embedding.weight, std=std)
            init.normal_(module.band_embedding.weight, std=std)
            for projection in module.patch_embeddings:
                init.normal_(projection.weight, std=std)
                init.zeros_(projection.bias)
        elif isinstance(module, CLIPAttention):
            layers = module.config.num_hidden_layers
            in_proj_std = (module.embed_dim**-0.5) * ((2 * layers) ** -0.5) * factor
            for projection in (module.q_proj, module.k_proj, module.v_proj):
                init.normal_(projection.weight, std=in_proj_std)
            init.normal_(module.out_proj.weight, std=(module.embed_dim**-0.5) * factor)
        elif isinstance(module, CLIPMLP):
            hidden, layers = module.config.hidden_size, module.config.num_hidden_layers
            init.normal_(module.fc1.weight, std=(2 * hidden) ** -0.5 * factor)
            init.normal_(module.fc2.weight, std=(hidden**-0.5) * ((2 * layers) ** -0.5) * factor)
        elif isinstance(module, WaveCLIPModel):
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)

    @torch.no_grad()
    def initialize_weights(self):
        """transformers' `initialize_weights` (every module bottom-up, each by the `_init_weights` of the model that
        owns it, the CLIP text tower by CLIP's), always on transformers' in-library path.

        transformers takes classes defined outside its package for remote code that may write weights in place, and
        then skips every module without parameters of its own: attention and MLP blocks would keep the generic
        normal(0, 0.02) of their linear layers instead of CLIP's depth-scaled scheme. Every `_init_weights` here writes
        through `transformers.initialization`, which leaves tensors loaded from a checkpoint alone, so the in-library
        path is safe.
        """

        def initialize(module: nn.Module, owner: PreTrainedModel) -> None:
            for child in module.children():
                initialize(child, child if isinstance(child, PreTrainedModel) else owner)
            owner._initialize_weights(module)  # is_custom_code=False: the in-library path

        with init.guard_torch_init_functions():
            initialize(self, self)


class WaveCLIPVisionModel(WaveCLIPPreTrainedModel):
    """The WaveCLIP image encoder: staged wavelet tokens, block-causal attention, a KV cache per stage.

    Example (continue an image from its coarse stage without recomputing it):

    ```python
    >>> out0 = vision(pixel_values, num_stages=1, use_cache=True)   # stage 0 only: 50 tokens
    >>> out1 = vision(pixel_values, num_stages=2, cache=out0.cache)  # adds 148 tokens
    ```
    """

    config: WaveCLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: WaveCLIPVisionConfig):
        super().__init__(config)
        self.embeddings = WaveCLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = WaveCLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings[0]

    # Set by `compile_stages`: only then does `forward` tell torch.compile which dimensions vary.
    stages_compiled = False

    def compile_stages(self, **compile_kwargs) -> "WaveCLIPVisionModel":
        """Compile the stages' tensor work with `torch.compile`, in place: the embeddings and the encoder.

        The checks, the cache's buffers (see [`WaveCLIPStageCache.prepare`]) and the output stay in Python, so a
        compiled stage sees static shapes: one graph per (stages computed, stages cached), for any batch of 2 or
        more images (the batch dimension is marked dynamic, so the smaller batches of an early exit reuse the graphs),
        and one more per stage for a single image (torch specialises size 1); dynamo's per-function graph limit is
        raised to that count around these calls only. The first call of each graph compiles it (tens of seconds on
        a CPU). Reload the model to undo.

        Args:
            compile_kwargs: passed to `torch.compile` (e.g. `backend=`, `mode=`, `fullgraph=`).

        Returns:
            This model.
        """
        for module in (self.embeddings, self.encoder):
            module.compile(**compile_kwargs)
        self.stages_compiled = True
        return self

    def _compiled_graphs_allowed(self):
        """A context in which dynamo may keep every graph the compiled stages need: one per (first stage, end
        stage) pair, twice (a single image and any larger batch), so n * (n + 1) for n stages. Its default limit
        (8 per function) is below that from 3 stages on, and past it calls fall back to eager. Raised only around
        these calls; the rest of the process keeps its own setting."""
        stages = self.config.num_stages
        limit = max(torch._dynamo.config.recompile_limit, stages * (stages + 1))
        return torch._dynamo.config.patch(recompile_limit=limit)

    def _mark_batch_dynamic(self, pixel_values: torch.Tensor, cache: Cache | None) -> None:
        """Mark the batch dimension of the compiled stages' inputs dynamic, so the first compiled call makes a graph
        for any batch size rather than for this one. Called only after `compile_stages`."""
        tensors = [pixel_values]
        if isinstance(cache, WaveCLIPStageCache):
            tensors += [buffer for layer in cache.layers for buffer in (layer.key_buffer, layer.value_buffer)]
        for tensor in tensors:
            if tensor is not None and tensor.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)

    def cached_stages(self, cache: Cache | None) -> int:
        """How many stages `cache` holds (0 for `None` or an empty cache)."""
        if cache is None:
            return 0
        cached_tokens = cache.get_seq_length()
        boundaries = self.config.stage_offsets
        if cached_tokens not in boundaries:
            raise ValueError(
                f"The cache holds {cached_tokens} tokens, which is not a whole number of stages for this config "
                f"(stage boundaries {boundaries}). Pass a cache returned by this model for the same images."
            )
        return boundaries.index(cached_tokens)

    def _check_pixel_values(self, pixel_values) -> None:
        config = self.config
        if pixel_values is None:
            raise ValueError(
                "You have to specify `pixel_values` (packed DWT coefficients from WaveCLIPImageProcessor)."
            )
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(
                f"`pixel_values` must be a torch tensor, got {type(pixel_values).__name__}. Use "
                "`WaveCLIPImageProcessor(...)(images, return_tensors='pt')['pixel_values']`."
            )
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (
            config.num_channels,
            config.image_size,
            config.image_size,
        ):
            raise ValueError(
                f"`pixel_values` must have shape (batch, {config.num_channels}, {config.image_size}, "
                f"{config.image_size}) (packed DWT coefficients from WaveCLIPImageProcessor), got "
                f"{tuple(pixel_values.shape)}."
            )
        if not pixel_values.is_floating_point():
            # Raw 8-bit pixels have the right shape once resized; casting them would silently give nonsense.
            raise ValueError(
                f"`pixel_values` must be floating point (packed DWT coefficients), got {pixel_values.dtype}: these "
                "look like raw pixels. Run the images through WaveCLIPImageProcessor first."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("`pixel_values` holds no images (batch size 0): pass at least one image.")

    def _check_cache(self, cache, batch_size: int) -> int:
        """How many stages `cache` holds, after checking it can continue these images on this model."""
        if cache is None:
            return 0
        if not isinstance(cache, Cache):
            raise ValueError(
                f"`cache` must be a transformers `Cache` returned by this model (e.g. `WaveCLIPStageCache`), got "
                f"{type(cache).__name__}. Legacy tuple caches are not supported."
            )
        cached = self.cached_stages(cache)
        if not cached:
            return 0
        config = self.config
        keys = cache.layers[0].keys
        if keys.shape[0] != batch_size:
            raise ValueError(
                f"The cache holds {keys.shape[0]} images but `pixel_values` has {batch_size}. After an early "
                "exit, call `cache.batch_select_indices(idx)` with the indices of the images that "
                "continue, and pass `pixel_values[idx]`."
            )
        head_dim = config.hidden_size // config.num_attention_heads
        if len(cache.layers) != config.num_hidden_layers or tuple(keys.shape[1::2]) != (
            config.num_attention_heads,
            head_dim,
        ):
            raise ValueError(
                f"The cache has {len(cache.layers)} layers of {keys.shape[1]} heads x {keys.shape[-1]} but "
                f"this model has {config.num_hidden_layers} layers of {config.num_attention_heads} heads x "
                f"{head_dim}: it comes from another model. Start without a cache, or pass the cache this model "
                "returned."
            )
        owner = getattr(cache, "_waveclip_owner", None)  # a weakref: ids are reused, objects are not
        if owner is not None and owner() is not self:
            raise ValueError(
                "The cache was filled by another WaveCLIP model instance (same shapes, but other weights or another "
                "config would give wrong answers): it comes from another model. Pass the cache this model returned."
            )
        weight = self.embeddings.patch_embeddings[0].weight
        if keys.device != weight.device:
            raise ValueError(
                f"The cache holds keys on {keys.device} but the model runs on {weight.device}: it was filled before "
                "the model was moved. Start again without a cache (or `cache.reset()`) after moving the model."
            )
        if keys.dtype != weight.dtype and not torch.is_autocast_enabled(weight.device.type):
            raise ValueError(
                f"The cache holds {keys.dtype} keys but the model runs in {weight.dtype}: it was filled before the "
                "model was cast (or by another model). Start again without a cache after changing the dtype."
            )
        return cached

    def _check_inputs(self, pixel_values: torch.Tensor, cache: Cache | None, num_stages: int | None):
        config = self.config
        self._check_pixel_values(pixel_values)
        cached = self._check_cache(cache, pixel_values.shape[0])
        if num_stages is None:
            return cached, config.num_stages
        hint = f" (the stages processed after this call; the cache holds {cached} of {config.num_stages})"
        return cached, check_stage_count(num_stages, "num_stages", config.num_stages, cached + 1, hint)

    def _check_bidirectional_call(self, cache: Cache | None, use_cache: bool | None, end_stage: int) -> None:
        """A bidirectional model (`config.attention="bidirectional"`) runs only one full forward: every token sees
        every later stage, so a stage-by-stage call or a cache would give other answers than that forward."""
        if self.config.attention != "bidirectional":
            return
        if cache is not None or use_cache or end_stage != self.config.num_stages:
            raise ValueError(
                "This WaveCLIP has `attention='bidirectional'`: every token attends to every stage, so it runs only "
                f"one full forward of all {self.config.num_stages} stages, with no cache (got "
                f"num_stages={end_stage}, cache={type(cache).__name__ if cache is not None else None}, "
                f"use_cache={use_cache}). Call it without `num_stages`, `cache` and `use_cache`, or use a "
                "block-causal model (the default) for stage-by-stage refinement."
            )

    def _cache_to_use(
        self, cache: Cache | None, cached_stages: int, use_cache: bool | None, batch_size: int
    ) -> tuple[Cache | None, bool]:
        """The cache this call reads and extends (`None`: none) and whether the output returns it."""
        use_cache = use_cache if use_cache is not None else cache is not None
        if self.encoder.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The backward pass recomputes every layer, which would append the new stage to the cache a second time.
            if cached_stages:
                raise ValueError(
                    "Gradient checkpointing cannot continue from a cache: recomputing a layer in the backward pass "
                    "would write the new stage into it twice. Run every stage in one call (no cache), or call "
                    "`model.gradient_checkpointing_disable()` first."
                )
            if use_cache:
                logger.warning_once(
                    "`use_cache=True` is incompatible with gradient checkpointing: no cache is returned."
                )
            return None, False
        if use_cache and cache is None:
            cache = WaveCLIPStageCache(self.config)
        if isinstance(cache, WaveCLIPStageCache) and not cached_stages:
            # Buffers are allocated (or kept) here, outside the modules `compile_stages` compiles, so that a compiled
            # stage always finds them and has no allocating variant.
            # The patch embedding's weight, not a linear layer's: dynamic int8 quantisation replaces those.
            weight = self.embeddings.patch_embeddings[0].weight
            device_type = weight.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
            cache.prepare(batch_size, dtype, weight.device)
        # A cache holding earlier stages is read (and extended) even when the caller wants no cache back.
        return (cache if use_cache or cached_stages else None), use_cache

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        num_stages: int | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> WaveCLIPVisionModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                Packed DWT coefficients from [`WaveCLIPImageProcessor`].
            num_stages (`int`, *optional*):
                How many stages have been processed after this call, cached ones included (default: all). With a
                cache holding k stages only stages k..num_stages-1 are computed.
            cache (`Cache`, *optional*):
                A cache returned by an earlier call on the same images; it is extended in place.
            use_cache (`bool`, *optional*):
                Return a cache to continue from (a new [`WaveCLIPStageCache`] if none was passed; a `DynamicCache`
                passed in works too).
            output_attentions (`bool`, *optional*):
                Return attention probabilities (computed with `eager` attention for this call).
            output_hidden_states (`bool`, *optional*): Return every layer's hidden states.
            return_dict (`bool`, *optional*):
                Return a [`WaveCLIPVisionModelOutput`] rather than a tuple (default: `config.return_dict`; handled by
                `can_return_tuple`, as CLIP's methods).
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        first_stage, end_stage = self._check_inputs(pixel_values, cache, num_stages)
        self._check_bidirectional_call(cache, use_cache, end_stage)
        cache, use_cache = self._cache_to_use(cache, first_stage, use_cache, pixel_values.shape[0])

        mark_dynamic = self.stages_compiled and not torch.compiler.is_compiling()
        with self._compiled_graphs_allowed() if mark_dynamic else contextlib.nullcontext():
            if mark_dynamic:
                self._mark_batch_dynamic(pixel_values, cache)
            hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, first_stage, end_stage))
            if mark_dynamic:
                self._mark_batch_dynamic(hidden_states, None)
            mask = block_causal_mask(config, first_stage, end_stage, hidden_states.dtype, hidden_states.device)
            encoder_outputs = self.encoder(hidden_states, mask, output_attentions, output_hidden_states, cache)
        hidden_states = encoder_outputs.last_hidden_state

        # Each computed stage's class token sits at the first position of its block.
        offsets = config.stage_offsets
        starts = [offset - offsets[first_stage] for offset in offsets[first_stage:end_stage]]
        stage_pooler_outputs = self.post_layernorm(hidden_states[:, starts])
        if cache is not None:
            cache._waveclip_owner = weakref.ref(self)  # lets a later call tell this cache from another model's
        output = WaveCLIPVisionModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=stage_pooler_outputs[:, -1],
            stage_pooler_outputs=stage_pooler_outputs,
            cache=cache if use_cache else None,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )
        return output


class WaveCLIPModel(WaveCLIPPreTrainedModel, WaveCLIPRefinementMixin):
    """CLIP's dual encoder with a WaveCLIP vision tower; methods and outputs mirror `CLIPModel`.

    The text tower, text projection and logit scale are CLIP's (so text embeddings equal the teacher's); the
    image side answers after any stage (`num_stages`) and continues from a cache.
    """

    config: WaveCLIPConfig

    def __init__(self, config: WaveCLIPConfig):
        super().__init__(config)
        text_config, vision_config = config.text_config, config.vision_config
        self.projection_dim = config.projection_dim
        self.text_embed_dim = text_config.hidden_size
        self.vision_embed_dim = vision_config.hidden_size
        self.text_model = CLIPTextModel._from_config(text_config)
        self.vision_model = WaveCLIPVisionModel._from_config(vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(self.config.logit_scale_init_value))
        self.post_init()

    def compile_stages(self, **compile_kwargs) -> "WaveCLIPModel":
        """`torch.compile` the vision tower's stages in place (see [`WaveCLIPVisionModel.compile_stages`]); the text
        tower, which `refine` does not run, stays eager. Returns this model."""
        self.vision_model.compile_stages(**compile_kwargs)
        return self

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Text tower as `CLIPModel.get_text_features`: `pooler_output` is the projected (batch, projection_dim)."""
        # Unset flags are left to the text tower, which reads them from its own config.
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            return_dict=True,
            **{name: value for name, value in flags.items() if value is not None},
        )
        outputs.pooler_output = self.text_projection(outputs.pooler_output)
        return outputs

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        num_stages: int | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TowerKwargs],
    ) -> WaveCLIPVisionModelOutput | tuple:
        """Vision tower as `CLIPModel.get_image_features`, after `num_stages` stages (see the vision model, which
        takes `kwargs`: `use_cache`, `output_attentions`, `output_hidden_states`).

        `pooler_output` is the projected (batch, projection_dim) embedding of the last processed stage and
        `stage_pooler_outputs` the projected (batch, new_stages, projection_dim) embeddings of every stage
        computed in this call (not normalised, as CLIP).
        """
        outputs = self.vision_model(pixel_values, num_stages, cache, return_dict=True, **kwargs)
        outputs.stage_pooler_outputs = self.visual_projection(outputs.stage_pooler_outputs)
        outputs.pooler_output = outputs.stage_pooler_outputs[:, -1]
        return outputs

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        num_stages: int | None = None,
        cache: Cache | None = None,
        return_loss: bool | None = None,
        **kwargs: Unpack[TowerKwargs],
    ) -> CLIPOutput | tuple:
        """Image-text logits as `CLIPModel.forward`, with the image answered after `num_stages` stages. `kwargs`
        (`use_cache`, `output_attentions`, `output_hidden_states`) go to the towers, as CLIP passes its own."""
        vision_outputs = self.get_image_features(pixel_values, num_stages, cache, return_dict=True, **kwargs)
        kwargs.pop("use_cache", None)  # the text tower keeps no cache
        text_outputs = self.get_text_features(input_ids, attention_mask, position_ids, return_dict=True, **kwargs)
        image_embeds = nn.functional.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = nn.functional.normalize(text_outputs.pooler_output, dim=-1)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()
        loss = image_text_contrastive_loss(logits_per_text) if return_loss else None
        output = CLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return output


# Saved folders get an `auto_map` entry for `AutoModel` and carry this file with its relative imports, the gated
# pipeline's among them; a model object handed to `pipeline("zero-shot-image-classification", model=...)` gets that
# pipeline (every other model keeps the stock one).
WaveCLIPModel.register_for_auto_class("AutoModel")
WaveCLIPVisionModel.register_for_auto_class("AutoModel")
register_gated_pipeline(WaveCLIPModel)

__all__ = [
    "WaveCLIPModel",
    "WaveCLIPPreTrainedModel",
    "WaveCLIPStageCache",
    "WaveCLIPVisionModel",
    "WaveCLIPVisionModelOutput",
    "block_causal_mask",
]
