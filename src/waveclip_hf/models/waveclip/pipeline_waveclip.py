"""Zero-shot image classification with margin-gated, coarse-to-fine refinement.

`pipeline("zero-shot-image-classification", model=<saved WaveCLIP folder or Hub id>, trust_remote_code=True)`
returns this pipeline (the saved config registers it under `custom_pipelines`). It takes the stock parameters
(`candidate_labels`, `hypothesis_template`, `batch_size`, `timeout`) and returns the stock format, a list of
`{"score", "label"}` sorted by score, with two more keys on every entry: `"stage"` (the stage that answered)
and `"gflops"` (image-encoder GFLOPs spent on that image, 1 multiply-add = 2 FLOPs).

Extra parameters:
- `margin_threshold` (default `None`): run [`WaveCLIPModel.refine`]: stop an image as soon as its top-1 minus
  top-2 probability reaches the threshold. `None` runs every stage up to `max_stages` for every image.
- `max_stages` (default: all): answer at the latest after this many stages.
- `margin_scaling` (`"none"` or `"num_labels"`): see `gating.py`.

Label text embeddings are computed once per (labels, template), in chunks of 1,024 prompts so that 10,000-label
vocabularies fit in memory, and reused by later calls. Bad parameters (threshold, `max_stages`, template, labels)
raise a `ValueError` before any image is decoded.

This file is shipped as remote code with saved checkpoints.
"""

from collections import OrderedDict

import torch
from transformers.image_utils import load_image
from transformers.pipelines.zero_shot_image_classification import ZeroShotImageClassificationPipeline

from .gating import check_margin_scaling, check_margin_threshold, check_stage_count

# Label sets kept per pipeline; a serving process cycling through more sets recomputes the oldest.
_TEXT_CACHE_SIZE = 32
# Prompts embedded per text-tower forward. Bounds activation memory for large label sets: 10,000 prompts through
# CLIP ViT-B's text tower in one batch need ~6 GB for one fp32 MLP activation (10,000 x 77 x 2048), 1,024 need
# ~0.6 GB. Smaller chunks cost time on CPU (tiny test model, busy 2-core CPU: 10,000 labels took 2.5 s in one
# batch, 3.4 s in chunks of 1,024, 9 s in chunks of 256).
_TEXT_BATCH_SIZE = 1024


def check_candidate_labels(candidate_labels) -> list[str]:
    """Return the labels as a list, or raise a `ValueError` naming what is wrong with them."""
    if isinstance(candidate_labels, str):
        candidate_labels = [candidate_labels]
    if candidate_labels is None or len(candidate_labels) == 0:
        raise ValueError("`candidate_labels` is empty: pass at least one label, e.g. candidate_labels=['cat', 'dog'].")
    labels = list(candidate_labels)
    bad = [label for label in labels if not isinstance(label, str) or not label.strip()]
    if bad:
        raise ValueError(f"`candidate_labels` must be non-empty strings; got {bad[:5]!r}.")
    seen, duplicates = set(), []
    for label in labels:
        if label in seen and label not in duplicates:
            duplicates.append(label)
        seen.add(label)
    if duplicates:
        raise ValueError(
            f"`candidate_labels` contains duplicates {duplicates[:5]!r}: their scores would split one class in two. "
            "Pass each label once."
        )
    return labels


def check_hypothesis_template(hypothesis_template) -> str:
    """Return the template, or raise a `ValueError` unless it has exactly one `{}` slot that the label fills."""
    example = "This is a photo of {}."
    if not isinstance(hypothesis_template, str):
        raise ValueError(
            f"`hypothesis_template` must be a string with one '{{}}' for the label, e.g. {example!r}; got "
            f"{type(hypothesis_template).__name__}."
        )
    try:
        first, second = hypothesis_template.format("\x00first"), hypothesis_template.format("\x00second")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"`hypothesis_template` {hypothesis_template!r} cannot be filled with a label ({type(error).__name__}: "
            f"{error}): use exactly one empty '{{}}' slot, e.g. {example!r}, and double any other braces."
        ) from None
    if first == second:
        raise ValueError(
            f"`hypothesis_template` {hypothesis_template!r} has no '{{}}' slot: every label would get the same text "
            f"and the same score. Use e.g. {example!r}."
        )
    return hypothesis_template


class WaveCLIPZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """The stock zero-shot pipeline, answering each image at the earliest stage whose margin is decisive."""

    # No video processor: otherwise transformers looks for one next to the image processor's remote code and, without
    # `trust_remote_code`, asks on the terminal whether to run it.
    _load_video_processor = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._text_embeddings = OrderedDict()

    def __call__(self, image=None, candidate_labels=None, **kwargs):
        # The stock pipeline indexes the first image before anything else: an empty list would be an IndexError.
        # No images in, no results out (after checking the labels, so a bad call fails the same way every time).
        images = kwargs.get("images", image)
        if isinstance(images, (list, tuple)) and len(images) == 0:
            check_candidate_labels(candidate_labels)
            return []
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def _sanitize_parameters(self, tokenizer_kwargs=None, **kwargs):
        preprocess_params, _, _ = super()._sanitize_parameters(tokenizer_kwargs=tokenizer_kwargs, **kwargs)
        forward_params = {}
        for name in ("margin_threshold", "max_stages", "margin_scaling"):
            if name in kwargs:
                forward_params[name] = kwargs[name]
        # Checked here, before any image is decoded, rather than deep inside the first forward.
        check_margin_scaling(forward_params.get("margin_scaling", "none"))
        if forward_params.get("margin_threshold") is not None:
            forward_params["margin_threshold"] = check_margin_threshold(forward_params["margin_threshold"])
        if forward_params.get("max_stages") is not None:
            forward_params["max_stages"] = check_stage_count(
                forward_params["max_stages"], "max_stages", self.model.num_stages, hint=" (or None for all)"
            )
        if "hypothesis_template" in preprocess_params:
            check_hypothesis_template(preprocess_params["hypothesis_template"])
        if tokenizer_kwargs is not None:
            preprocess_params["tokenizer_kwargs"] = tokenizer_kwargs
        return preprocess_params, forward_params, {}

    def preprocess(self, image, candidate_labels=None, hypothesis_template="This is a photo of {}.", timeout=None,
                   tokenizer_kwargs=None):
        labels = check_candidate_labels(candidate_labels)
        check_hypothesis_template(hypothesis_template)
        if isinstance(image, str):  # URL, path or base64, as the stock pipeline; arrays go to the processor as is
            image = load_image(image, timeout=timeout)
        inputs = self.image_processor(images=[image], return_tensors="pt")
        # Text is not tokenised per image: _forward embeds each label set once and caches it.
        inputs["candidate_labels"] = labels
        inputs["hypothesis_template"] = hypothesis_template
        inputs["tokenizer_kwargs"] = tokenizer_kwargs or {}
        return inputs

    def label_embeddings(self, candidate_labels: list[str], hypothesis_template: str, tokenizer_kwargs=None):
        """(num_labels, projection_dim) text embeddings of the prompts, computed once per (labels, template)."""
        # Tokenizer settings change the token ids, hence the embeddings: they are part of the key.
        key = (tuple(candidate_labels), hypothesis_template, tuple(sorted((tokenizer_kwargs or {}).items())))
        if key in self._text_embeddings:
            self._text_embeddings.move_to_end(key)
            return self._text_embeddings[key]
        sequences = [hypothesis_template.format(label) for label in candidate_labels]
        max_positions = self.model.config.text_config.max_position_embeddings
        chunks = []
        for start in range(0, len(sequences), _TEXT_BATCH_SIZE):
            chunk = sequences[start : start + _TEXT_BATCH_SIZE]
            text_inputs = self.tokenizer(chunk, return_tensors="pt", padding=True, **(tokenizer_kwargs or {}))
            lengths = text_inputs["attention_mask"].sum(-1) if "attention_mask" in text_inputs else None
            if text_inputs["input_ids"].shape[-1] > max_positions:
                longest = int(lengths.argmax()) if lengths is not None else 0
                raise ValueError(
                    f"The prompt {chunk[longest]!r} is {text_inputs['input_ids'].shape[-1]} tokens long, more than "
                    f"the text tower's {max_positions} positions. Shorten the label or the template, or pass "
                    "`tokenizer_kwargs={'truncation': True}`."
                )
            with torch.no_grad():
                chunks.append(self.model.get_text_features(**text_inputs.to(self.device)).pooler_output)
        embeds = torch.cat(chunks)
        self._text_embeddings[key] = embeds
        if len(self._text_embeddings) > _TEXT_CACHE_SIZE:
            self._text_embeddings.popitem(last=False)
        return embeds

    def _forward(self, model_inputs, margin_threshold=None, max_stages=None, margin_scaling="none"):
        labels_per_image = model_inputs.pop("candidate_labels")
        template = model_inputs.pop("hypothesis_template")
        tokenizer_kwargs = model_inputs.pop("tokenizer_kwargs")
        labels = labels_per_image
        if isinstance(labels[0], list):  # batched: one entry per image, all from the same call
            labels, template, tokenizer_kwargs = labels[0], template[0], tokenizer_kwargs[0]
        text_embeds = self.label_embeddings(labels, template, tokenizer_kwargs)
        outputs = self.model.refine(
            model_inputs["pixel_values"], text_embeds, margin_threshold, max_stages=max_stages,
            margin_scaling=margin_scaling,
        )
        return {
            "candidate_labels": labels_per_image,
            "logits": outputs.logits_per_image,
            "stage": outputs.exit_stage,
            "gflops": outputs.gflops,
        }

    def postprocess(self, model_outputs):
        labels = model_outputs["candidate_labels"]
        if labels and isinstance(labels[0], list):
            labels = labels[0]
        probs = model_outputs["logits"][0].float().softmax(dim=-1)
        stage = int(model_outputs["stage"].reshape(-1)[0])
        gflops = float(model_outputs["gflops"].reshape(-1)[0])
        ranked = sorted(zip(probs.tolist(), labels), key=lambda pair: -pair[0])
        return [{"score": score, "label": label, "stage": stage, "gflops": gflops} for score, label in ranked]
