"""A KV cache allocated once for every stage: WaveCLIP knows each stage's length before the first stage runs.

A transformers `DynamicCache` grows by `torch.cat`, so every stage copies all earlier keys and values again. Here
the config fixes how many tokens each stage adds (`stage_offsets`), so each layer allocates its buffers for all
stages at its first `update`,

    keys, values of layer i:  (batch, heads, total_tokens, head_dim)     total_tokens = stage_offsets[num_stages]

each stage writes its keys and values into its own slice `[:, :, start:end]`, and attention reads the filled
prefix `[:, :, :end]` as a view (no copy). Early exit (`batch_select_indices`) copies the continuing images'
prefix into buffers of their size; `reset()` empties the cache and keeps the buffers for the next images. Every
stage has static shapes, which is what `torch.compile` needs.

    >>> cache = WaveCLIPStageCache(model.config)
    >>> out0 = model.get_image_features(pixel_values, num_stages=1, cache=cache)       # writes tokens 0..49
    >>> out1 = model.get_image_features(pixel_values, num_stages=2, cache=cache)       # writes 50..197, reads 0..197
    >>> cache.reset()                                                                  # ready for the next images

Written against every transformers 5.x `Cache` API: the layer implements the union of the abstract methods
`CacheLayerMixin` has had (`get_max_cache_shape` in older releases, `get_max_length` in newer ones;
`get_mask_sizes` taking a query length, or in older releases the cache positions).

This file is shipped as remote code with saved checkpoints: it imports only torch, transformers and siblings.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .gating import check_stage_count


def _new_buffers(shape: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised key and value buffers of `shape`.

    `empty`, not `zeros`: only the filled prefix is ever read, and on CPU the pages of the later stages' slices are
    then only committed if an image gets that far.
    """
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


class WaveCLIPStageCacheLayer(CacheLayerMixin):
    """One layer's keys and values for every stage, in buffers allocated at the first `update`.

    `keys` / `values` are always the filled prefix, views of shape (batch, heads, filled, head_dim), as a
    `DynamicLayer`'s would be; `key_buffer` / `value_buffer` are the whole (batch, heads, max_cache_len, head_dim).
    `reset()` empties the layer but keeps the buffers, so a cache reused for as many images allocates nothing: on
    CPU, the first write to fresh memory costs a page fault per 4 KiB, more than the copy itself. Dropping images
    (`batch_select_indices`) copies the kept images' prefix into new buffers of their size: buffers are never
    views of larger ones, which torch.compile with `dynamic=True` does not handle (torch 2.13) when they are
    written to.

    Args:
        max_cache_len: tokens of every stage the cache serves (`stage_offsets[num_stages]`).
        stage_offsets: the token offsets where stages start, ending with `max_cache_len`; an update must end on one.
        num_heads, head_dim: the attention geometry the keys must have.
        layer_idx: this layer's index (for error messages).
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, stage_offsets: tuple, num_heads: int, head_dim: int, layer_idx: int = 0):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.stage_offsets = tuple(stage_offsets)
        self.num_heads, self.head_dim, self.layer_idx = num_heads, head_dim, layer_idx
        self.filled = 0
        self.key_buffer = self.value_buffer = None

    def __repr__(self):
        shape = None if self.key_buffer is None else tuple(self.key_buffer.shape)
        return f"{type(self).__name__}(filled={self.filled}, buffer={shape})"

    # `keys` / `values` are computed from the buffers on each read rather than stored: a stored view would reach a
    # compiled graph as a second input aliasing its buffer, which torch.compile with `dynamic=True` cannot merge.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.key_buffer is None else self.key_buffer[:, :, : self.filled]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:  # `CacheLayerMixin.__init__` sets None; anything else would bypass the buffers
            raise AttributeError("Write keys with `update(...)`; `keys` is the filled prefix of `key_buffer`.")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.value_buffer is None else self.value_buffer[:, :, : self.filled]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("Write values with `update(...)`; `values` is the filled prefix of `value_buffer`.")

    @property
    def batch_size(self) -> int:
        return self.key_buffer.shape[0] if self.key_buffer is not None else -1

    max_batch_size = batch_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers for `key_states`' batch, dtype and device: the current ones if they match, else new
        (batch, heads, max_cache_len, head_dim) ones."""
        self._check_geometry(key_states, value_states)
        self.prepare(key_states.shape[0], key_states.dtype, key_states.device)

    def prepare(self, batch_size: int, dtype: torch.dtype, device) -> None:
        """Empty the layer and give it buffers for `batch_size` images of `dtype` on `device`: the current ones
        if they match, else new (batch_size, heads, max_cache_len, head_dim) ones."""
        buffer = self.key_buffer
        shape = (batch_size, self.num_heads, self.max_cache_len, self.head_dim)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (shape, dtype, torch.device(device)):
            self._bind(*_new_buffers(shape, dtype, device), filled=0)
        else:
            self._bind(buffer, self.value_buffer, filled=0)

    def _bind(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, filled: int) -> None:
        self.key_buffer, self.value_buffer, self.filled = key_buffer, value_buffer, filled
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self.is_initialized = True

    def _check_geometry(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = (self.num_heads, self.head_dim)
        for name, states in (("keys", key_states), ("values", value_states)):
            if states.dim() != 4 or (states.shape[1], states.shape[3]) != expected:
                raise ValueError(
                    f"Layer {self.layer_idx} of this WaveCLIPStageCache holds {self.num_heads} heads x "
                    f"{self.head_dim} but got {name} of shape {tuple(states.shape)} (expected (batch, "
                    f"{self.num_heads}, tokens, "
                    f"{self.head_dim})): the cache was built for another model. Build it from this model's config."
                )
        if value_states.shape[:3] != key_states.shape[:3]:
            raise ValueError(
                f"Keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} disagree on batch, heads or "
                "tokens."
            )

    def _check_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """The end of the slice these states fill, after checking they fit the buffers."""
        self._check_geometry(key_states, value_states)
        buffer = self.key_buffer
        if key_states.shape[0] != buffer.shape[0]:
            raise ValueError(
                f"The cache holds {buffer.shape[0]} images but got keys for {key_states.shape[0]}. After an early "
                "exit, call `cache.batch_select_indices(idx)` with the indices of the images that continue, and pass "
                "`pixel_values[idx]`."
            )
        for name, states in (("keys", key_states), ("values", value_states)):
            if states.dtype != buffer.dtype or states.device != buffer.device:
                raise ValueError(
                    f"The cache holds {buffer.dtype} on {buffer.device} but got {name} in {states.dtype} on "
                    f"{states.device}: it was filled before the model was cast or moved. Start with a new cache (or "
                    "`cache.reset()`) after changing the model's dtype or device."
                )
        new_tokens = key_states.shape[2]
        # The boundary itself is returned, so `filled` stays a plain int even where torch.compile made the shapes
        # symbolic (each `==` is then decided by a guard; `in` would not be).
        for boundary in self.stage_offsets:
            if boundary > self.filled and self.filled + new_tokens == boundary:
                return boundary
        raise ValueError(
            f"Layer {self.layer_idx} holds {self.filled} tokens and got {new_tokens} more, which does not end on a "
            f"stage boundary of this cache {list(self.stage_offsets)}: feed whole stages, and build the cache with "
            "`num_stages` covering every stage you will run."
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write (batch, heads, new_tokens, head_dim) keys and values after the filled prefix.

        An empty layer (new, or after `reset()`) takes any batch size, dtype and device; a filled one only more
        tokens for the same images.

        Returns:
            The filled prefix, every cached token and the new ones: two (batch, heads, filled, head_dim) views.
        """
        if self.filled == 0:
            self.lazy_initialization(key_states, value_states)
        start, end = self.filled, self._check_update(key_states, value_states)
        self.key_buffer[:, :, start:end].copy_(key_states)
        self.value_buffer[:, :, start:end].copy_(value_states)
        self.filled = end
        return self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    def get_seq_length(self) -> int:
        return self.filled

    def get_mask_sizes(self, query_length_or_positions, *args) -> tuple[int, int]:
        """(kv_length, kv_offset) for a query of that length (transformers < 5.1 passes the positions instead)."""
        query_length = query_length_or_positions
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.filled + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    get_max_cache_shape = get_max_length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the images at `indices` (batch dim), in that order; their filled prefix is copied, once, into
        new buffers of their size."""
        if not self.is_initialized:
            return
        indices = torch.as_tensor(indices, device=self.device)
        if indices.dim() != 1:
            raise ValueError(f"`indices` must be a 1-D tensor of batch positions, got shape {tuple(indices.shape)}.")
        key_buffer, value_buffer = _new_buffers(
            (indices.shape[0], *self.key_buffer.shape[1:]), self.key_buffer.dtype, self.key_buffer.device
        )
        # index_select writes straight into the prefix of the new buffers (one copy, no temporary).
        torch.index_select(self.keys, 0, indices, out=key_buffer[:, :, : self.filled])
        torch.index_select(self.values, 0, indices, out=value_buffer[:, :, : self.filled])
        self._bind(key_buffer, value_buffer, self.filled)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens: int) -> None:
        """Forget tokens: `tokens < 0` removes that many (newer transformers), `tokens >= 0` keeps at most that many
        (older releases' `crop(max_length)`). The result must be a stage boundary."""
        kept = self.filled + tokens if tokens < 0 else min(self.filled, tokens)
        if kept not in self.stage_offsets:
            raise ValueError(
                f"Cropping layer {self.layer_idx} from {self.filled} to {kept} tokens does not leave whole stages "
                f"(stage boundaries {list(self.stage_offsets)})."
            )
        if self.is_initialized:
            self._bind(self.key_buffer, self.value_buffer, kept)

    def reset(self) -> None:
        """Forget every token; the buffers stay for the next images (any batch size, dtype or device is then
        accepted, and the same ones allocate nothing)."""
        if self.is_initialized:
            self._bind(self.key_buffer, self.value_buffer, 0)

    def offload(self):
        raise NotImplementedError("WaveCLIPStageCache does not offload: its buffers stay on the model's device.")

    prefetch = offload


class WaveCLIPStageCache(Cache):
    """A KV cache for WaveCLIP's stages with every stage's slot allocated at the first stage.

    Pass it as `cache=` to [`WaveCLIPVisionModel`] / [`WaveCLIPModel.get_image_features`] calls on the same
    images, stage after stage (or several stages per call); it fills in place. Equivalent to a `DynamicCache` (same
    keys and values per layer), without the re-copy of every earlier stage at each new one. `reset()` makes it
    ready for the next images and keeps its buffers, so a cache kept across calls on batches of one size
    allocates nothing after the first.

    Args:
        config: a `WaveCLIPVisionConfig` or `WaveCLIPConfig` (its `vision_config` is used).
        num_stages: the stages the cache will hold (default: all); `refine(max_stages=k)` needs only k.
    """

    def __init__(self, config, num_stages: int | None = None):
        vision_config = getattr(config, "vision_config", config)
        all_offsets = vision_config.stage_offsets
        total_stages = len(all_offsets) - 1
        num_stages = total_stages if num_stages is None else check_stage_count(num_stages, "num_stages", total_stages)
        offsets = tuple(all_offsets[: num_stages + 1])
        heads = vision_config.num_attention_heads
        head_dim = vision_config.hidden_size // heads
        layers = [
            WaveCLIPStageCacheLayer(offsets[-1], offsets, heads, head_dim, layer_idx=i)
            for i in range(vision_config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.stage_offsets = offsets

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write one layer's new (batch, heads, tokens, head_dim) keys and values; returns the filled prefix.

        Goes straight to the layer: no offloading, no lazily added layers (the config fixes them).
        """
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"This WaveCLIPStageCache has {len(self.layers)} layers, got layer_idx={layer_idx}: it was built for "
                "another model. Build it from this model's config."
            )
        return self.layers[layer_idx].update(key_states, value_states)

    def crop(self, tokens: int) -> None:
        for layer in self.layers:
            layer.crop(tokens)

    def prepare(self, batch_size: int, dtype: torch.dtype, device) -> None:
        """Empty the cache and give every layer buffers for `batch_size` images of `dtype` on `device` (kept from
        the last images when they match, else allocated now).

        The model calls this before it runs the first stage into an empty cache, so that the allocation happens
        outside the stages that `compile_stages` compiles: a compiled stage then always finds its buffers.
        """
        for layer in self.layers:
            layer.prepare(batch_size, dtype, device)


__all__ = ["WaveCLIPStageCache", "WaveCLIPStageCacheLayer"]
