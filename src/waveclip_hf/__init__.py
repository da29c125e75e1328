"""WaveCLIP for Hugging Face transformers.

Importing the package registers the WaveCLIP classes with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForZeroShotImageClassification`, `AutoImageProcessor`, `AutoProcessor`), so a saved folder loads in-process
without `trust_remote_code`; a process without this package runs the remote code the folder carries.

The gated zero-shot pipeline comes with the model: `pipeline("zero-shot-image-classification", model=folder,
trust_remote_code=True)` reads it from the folder's config, and `pipeline("zero-shot-image-classification",
model=<WaveCLIPModel object>, tokenizer=..., image_processor=...)` builds it too (loading the model registers it for
WaveCLIP models only; every other model keeps the stock pipeline). A folder needs `trust_remote_code=True` even in a
process that imported this package, because its config names the pipeline's file; or pass
`pipeline_class=WaveCLIPZeroShotImageClassificationPipeline`.

The training and conversion tools (`DistillationConfig`, `distill`, `convert_clip_to_waveclip`) are imported on
first use: they need accelerate and datasets, which a model user does not.
"""

import importlib

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .models.waveclip.configuration_waveclip import WaveCLIPConfig, WaveCLIPVisionConfig
from .models.waveclip.gate_calibration import GateCalibration
from .models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor, WaveCLIPImageProcessorFast
from .models.waveclip.modeling_waveclip import (
    WaveCLIPModel,
    WaveCLIPPreTrainedModel,
    WaveCLIPVisionModel,
    WaveCLIPVisionModelOutput,
)
from .models.waveclip.pipeline_waveclip import WaveCLIPZeroShotImageClassificationPipeline
from .models.waveclip.processing_waveclip import WaveCLIPProcessor
from .models.waveclip.refinement_waveclip import WaveCLIPRefinementOutput
from .models.waveclip.stage_cache import WaveCLIPStageCache


AutoConfig.register(WaveCLIPConfig.model_type, WaveCLIPConfig, exist_ok=True)
AutoConfig.register(WaveCLIPVisionConfig.model_type, WaveCLIPVisionConfig, exist_ok=True)
AutoModel.register(WaveCLIPConfig, WaveCLIPModel, exist_ok=True)
AutoModel.register(WaveCLIPVisionConfig, WaveCLIPVisionModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(WaveCLIPConfig, WaveCLIPModel, exist_ok=True)
AutoImageProcessor.register(
    WaveCLIPConfig,
    slow_image_processor_class=WaveCLIPImageProcessor,
    fast_image_processor_class=WaveCLIPImageProcessorFast,
    exist_ok=True,
)
AutoProcessor.register(WaveCLIPConfig, WaveCLIPProcessor, exist_ok=True)

# Public names imported on first use, and where they live.
_LAZY = {
    "DistillationConfig": ".training.config",
    "distill": ".training.distillation",
    "convert_clip_to_waveclip": ".conversion.clip_to_waveclip",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "DistillationConfig",
    "GateCalibration",
    "WaveCLIPConfig",
    "WaveCLIPImageProcessor",
    "WaveCLIPImageProcessorFast",
    "WaveCLIPModel",
    "WaveCLIPPreTrainedModel",
    "WaveCLIPProcessor",
    "WaveCLIPRefinementOutput",
    "WaveCLIPStageCache",
    "WaveCLIPVisionConfig",
    "WaveCLIPVisionModel",
    "WaveCLIPVisionModelOutput",
    "WaveCLIPZeroShotImageClassificationPipeline",
    "convert_clip_to_waveclip",
    "distill",
]
