"""WaveCLIP model configuration.

`WaveCLIPVisionConfig` takes `CLIPVisionConfig`'s names (`hidden_size`, `num_hidden_layers`, ...) so a CLIP
teacher's vision config maps onto it field by field; instead of `patch_size` it has the wavelet geometry
(`wavelet`, `levels`, `cell_size`). `WaveCLIPConfig` pairs it with an unchanged `CLIPTextConfig`.

This file is shipped as remote code with saved checkpoints: it imports only `transformers` and siblings.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.clip.configuration_clip import CLIPTextConfig


ATTENTION_MODES = ("block_causal", "bidirectional")
BAND_ORDERS = ("coarse_to_fine", "fine_to_coarse")
ZERO_SHOT_TASK = "zero-shot-image-classification"
# The model's Auto classes. `register_for_auto_class` writes one entry per class as it is saved (AutoConfig and
# AutoModel here; AutoImageProcessor and AutoProcessor in the processors' own files); the task's Auto class is added
# here, since one class cannot register two. Entries already in a config (e.g. "org/repo--modeling_waveclip...") win.
WAVECLIP_AUTO_MAP = {
    "AutoConfig": "configuration_waveclip.WaveCLIPConfig",
    "AutoModel": "modeling_waveclip.WaveCLIPModel",
    "AutoModelForZeroShotImageClassification": "modeling_waveclip.WaveCLIPModel",
}
# The gated pipeline, for `pipeline(ZERO_SHOT_TASK, model=folder, trust_remote_code=True)`. transformers writes
# `custom_pipelines` only for a pipeline in its global task registry; the config carries it instead, and every save
# of the model carries the pipeline's file (a relative import of modeling_waveclip.py).
WAVECLIP_CUSTOM_PIPELINES = {
    ZERO_SHOT_TASK: {
        "impl": "pipeline_waveclip.WaveCLIPZeroShotImageClassificationPipeline",
        "pt": ["AutoModelForZeroShotImageClassification"],
        "type": "multimodal",
    }
}


@strict
class WaveCLIPVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`WaveCLIPVisionModel`], the wavelet-token vision tower.

    The image (`image_size` pixels square) is a grid of cells of `cell_size` pixels. After an `levels`-level DWT,
    stage 0 embeds one token per cell from the level-`levels` approximation band, and stage k >= 1 one token per
    cell and orientation (H, V, D) from the detail bands of level `levels - k + 1`; every stage adds its own class
    token. Defaults (224, cell 32, 1 level): 7x7 cells, stage 0 = 50 tokens, full = 198 tokens.

    Args:
        hidden_size (`int`, defaults to 768): width of the transformer.
        intermediate_size (`int`, defaults to 3072): width of the MLP.
        projection_dim (`int`, defaults to 512): size of the shared image-text embedding.
        num_hidden_layers (`int`, defaults to 12): transformer blocks.
        num_attention_heads (`int`, defaults to 12): attention heads per block.
        num_channels (`int`, defaults to 3): colour channels of the coefficients (Y, Cb, Cr).
        image_size (`int`, defaults to 224): side of the (square) input image in pixels.
        cell_size (`int`, defaults to 32): side of one token cell in input pixels; must divide `image_size`, and
            `2**levels` must divide it.
        wavelet (`str`, defaults to `"haar"`): wavelet name understood by `pywt`/`ptwt`.
        levels (`int`, defaults to 1): DWT levels L; the model has L + 1 stages.
        hidden_act (`str`, defaults to `"quick_gelu"`): MLP activation, as CLIP.
        layer_norm_eps (`float`, defaults to 1e-5): layer-norm epsilon.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the normal initialiser.
        initializer_factor (`float`, defaults to 1.0): scale on initialiser stds (testing knob, as CLIP).
        attention (`str`, defaults to `"block_causal"`): `"block_causal"`, the method: a token of stage s attends to
            stages <= s, so every stage is an exit and a cache continues it. `"bidirectional"`, for ablations: every
            token attends to every token; the model answers once, after one full forward of all stages (no cache,
            no stage-by-stage calls, no early exit).
        band_order (`str`, defaults to `"coarse_to_fine"`): the order in which stages read the bands.
            `"coarse_to_fine"`, the method: stage 0 reads the approximation, stage k the details of level L - k + 1.
            `"fine_to_coarse"`, for ablations: the reverse, stage 0 reads the finest (level-1) details and stage L
            the approximation (`stage_band_groups`).
    """

    model_type = "waveclip_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    cell_size: int = 32
    wavelet: str = "haar"
    levels: int = 1
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: int | float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    attention: str = "block_causal"
    band_order: str = "coarse_to_fine"

    def validate_architecture(self):
        """Part of `@strict` validation: the geometry must tile exactly."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"The hidden size ({self.hidden_size}) is not a multiple of the number of attention heads "
                f"({self.num_attention_heads})."
            )
        if self.levels < 1:
            raise ValueError(f"`levels` must be at least 1, got {self.levels}.")
        if self.image_size % self.cell_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `cell_size` ({self.cell_size}) so that the "
                "image is an exact grid of cells."
            )
        if self.cell_size % (2**self.levels) != 0:
            raise ValueError(
                f"`cell_size` ({self.cell_size}) must be divisible by 2**levels = {2**self.levels}: at level "
                f"{self.levels} one cell is a (cell_size / 2**levels)^2 patch. Use fewer levels or bigger cells."
            )
        if self.num_channels != 3:
            raise ValueError(f"WaveCLIP reads Y, Cb and Cr: `num_channels` must be 3, got {self.num_channels}.")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"`attention` must be one of {ATTENTION_MODES}, got {self.attention!r}.")
        if self.band_order not in BAND_ORDERS:
            raise ValueError(f"`band_order` must be one of {BAND_ORDERS}, got {self.band_order!r}.")

    # Derived geometry, used by the model, the FLOPs count and the pipeline.
    @property
    def num_stages(self) -> int:
        """L + 1: the approximation stage and one detail stage per level."""
        return self.levels + 1

    @property
    def grid_size(self) -> int:
        """Cells per side (7 at the defaults)."""
        return self.image_size // self.cell_size

    @property
    def stage_band_groups(self) -> list[int]:
        """The band group each stage reads: 0 = the level-L approximation, k >= 1 = the H, V, D details of level
        L - k + 1. [0, 1, ..., L] coarse-to-fine (the default), [L, ..., 1, 0] fine-to-coarse."""
        groups = list(range(self.levels + 1))
        return groups if self.band_order == "coarse_to_fine" else groups[::-1]

    @property
    def band_group_patch_sizes(self) -> list[int]:
        """Side of one cell in each band group's subbands, group 0 first: cell / 2^L for groups 0 and 1, then
        doubling (the patch projection of group g reads (cell / 2^j)^2 patches of level j)."""
        return [self.cell_size >> self.levels] + [
            self.cell_size >> (self.levels - k + 1) for k in range(1, self.levels + 1)
        ]

    @property
    def stage_lengths(self) -> list[int]:
        """Tokens each stage adds, class token included: 1 + G^2 for the approximation, 1 + 3 G^2 for a detail
        level ([1 + G^2, 1 + 3 G^2, ...] coarse-to-fine)."""
        cells = self.grid_size**2
        return [1 + (cells if group == 0 else 3 * cells) for group in self.stage_band_groups]

    @property
    def stage_offsets(self) -> list[int]:
        """Position of each stage's first token (its class token) in the full sequence, plus the total at the end
        ([0, 1 + G^2, 2 + 4 G^2, ...] coarse-to-fine). The one place stage boundaries are computed."""
        offsets = [0]
        for length in self.stage_lengths:
            offsets.append(offsets[-1] + length)
        return offsets

    @property
    def stage_patch_sizes(self) -> list[int]:
        """Side of one cell in the subbands a stage reads (`band_group_patch_sizes` in stage order)."""
        return [self.band_group_patch_sizes[group] for group in self.stage_band_groups]


@strict
class WaveCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of [`WaveCLIPModel`]: an unchanged CLIP text tower and a WaveCLIP vision tower.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*): the text tower, as CLIP's.
        vision_config (`dict` or `WaveCLIPVisionConfig`, *optional*): the wavelet vision tower.
        projection_dim (`int`, defaults to 512): size of the shared embedding.
        logit_scale_init_value (`float`, defaults to 2.6592): initial log of the logit scale, as CLIP.
        initializer_factor (`float`, defaults to 1.0): scale on initialiser stds.
        gate_calibrations (`list[dict]`, *optional*): the gate's label-free calibrations, one per label set
            (`gate_calibration.GateCalibration.to_dict()`); written by the pipeline's `calibrate` and used by
            `margin_threshold="auto"`.
        exit_head (`dict`, *optional*): the learned exit head (`exit_signals.EXIT_HEAD_FEATURES`, their mean and
            std, weights and bias of a logistic regression), for `exit_signal="learned"`; fitted after distillation.

    Example:

    ```python
    >>> from waveclip_hf import WaveCLIPConfig, WaveCLIPModel
    >>> config = WaveCLIPConfig(vision_config={"levels": 2})
    >>> model = WaveCLIPModel(config)
    ```
    """

    model_type = "waveclip"
    # Spelled as `SubConfigSpec`s: transformers < 5.21 accepts nothing else here.
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=WaveCLIPVisionConfig),
        "text_config": SubConfigSpec(config_class=CLIPTextConfig),
    }

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | WaveCLIPVisionConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float | int = 2.6592
    initializer_factor: float = 1.0
    gate_calibrations: list | None = None
    exit_head: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**WAVECLIP_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.custom_pipelines = getattr(self, "custom_pipelines", None) or {
            task: dict(spec) for task, spec in WAVECLIP_CUSTOM_PIPELINES.items()
        }


# Saved configs get an `auto_map` entry for `AutoConfig` and carry this file.
WaveCLIPConfig.register_for_auto_class()
WaveCLIPVisionConfig.register_for_auto_class()

__all__ = [
    "ATTENTION_MODES",
    "BAND_ORDERS",
    "WAVECLIP_AUTO_MAP",
    "WAVECLIP_CUSTOM_PIPELINES",
    "ZERO_SHOT_TASK",
    "WaveCLIPConfig",
    "WaveCLIPVisionConfig",
]
