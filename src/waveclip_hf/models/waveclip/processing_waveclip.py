"""WaveCLIPProcessor: the WaveCLIP image processor and the CLIP tokenizer in one object, as `CLIPProcessor`.

`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` returns it for a saved WaveCLIP folder, so that

    inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=image, return_tensors="pt", padding=True)
    model(**inputs)           # CLIP-style logits_per_image
    model.refine(**inputs)    # the gated, coarse-to-fine answer

works as it does for CLIP: `text` goes to the tokenizer (`input_ids`, `attention_mask`), `images` to
`WaveCLIPImageProcessor` (`pixel_values`, packed DWT coefficients).

This file is shipped as remote code with saved checkpoints.
"""

from transformers.processing_utils import ProcessorMixin


class WaveCLIPProcessor(ProcessorMixin):
    """Wraps a [`WaveCLIPImageProcessor`] and a CLIP tokenizer into a single processor.

    Args:
        image_processor ([`WaveCLIPImageProcessor`]): turns images into `pixel_values`.
        tokenizer (`PreTrainedTokenizerBase`): turns text into `input_ids` and `attention_mask`.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)


# A processor saved on its own carries this file and the image processor's (transformers copies what it imports).
WaveCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["WaveCLIPProcessor"]
