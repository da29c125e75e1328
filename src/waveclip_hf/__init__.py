"""WaveCLIP for Hugging Face transformers.

Importing the package registers the WaveCLIP classes with transformers' Auto classes, so a saved folder
also loads in-process without `trust_remote_code` (a fresh process without this package uses the remote code
the folder carries).
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .models.waveclip.configuration_waveclip import WaveCLIPConfig, WaveCLIPVisionConfig
from .models.waveclip.modeling_waveclip import WaveCLIPModel, WaveCLIPPreTrainedModel, WaveCLIPVisionModel, WaveCLIPVisionModelOutput

AutoConfig.register(WaveCLIPConfig.model_type, WaveCLIPConfig, exist_ok=True)
AutoConfig.register(WaveCLIPVisionConfig.model_type, WaveCLIPVisionConfig, exist_ok=True)
AutoModel.register(WaveCLIPConfig, WaveCLIPModel, exist_ok=True)
AutoModel.register(WaveCLIPVisionConfig, WaveCLIPVisionModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(WaveCLIPConfig, WaveCLIPModel, exist_ok=True)

__all__ = [
    "WaveCLIPConfig",
    "WaveCLIPModel",
    "WaveCLIPPreTrainedModel",
    "WaveCLIPVisionConfig",
    "WaveCLIPVisionModel",
    "WaveCLIPVisionModelOutput",
]
