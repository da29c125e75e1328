"""Zero-shot image classification with margin-gated, coarse-to-fine refinement.

`pipeline("zero-shot-image-classification", model=<saved WaveCLIP folder or Hub id>, trust_remote_code=True)`
returns this pipeline (the saved config registers it under `custom_pipelines`). It takes the stock parameters
(`candidate_labels`, `hypothesis_template`, `timeout`, `tokenizer_kwargs`, and `batch_size` / `num_workers`) and
returns the stock format, a list of `{"score", "label"}` sorted by score, with two more keys on every entry:
`"stage"` (the stage that answered) and `"gflops"` (image-encoder GFLOPs spent on that image, 1 multiply-add = 2
FLOPs).

Extra parameters:
- `margin_threshold` (default `None`): run [`WaveCLIPModel.refine`]: stop an image as soon as its top-1 minus
  top-2 probability reaches the threshold. `None` runs every stage up to `max_stages` for every image. `"auto"`
  uses the threshold that `calibrate` chose for these labels and template.
- `max_stages` (default: all): answer at the latest after this many stages.
- `margin_scaling` (`"none"` or `"num_labels"`): see `gating.py`.
- `gflops_budget`: mean image-encoder GFLOPs per image for the call. After stage 0, the images with the smallest
  margins are refined first until the budget is spent. The images of a list share one budget (they go through
  the model together); a generator or dataset shares it per batch of `batch_size`.
- `return_all_stages` (default `False`): every entry also gets `"stage_scores"`, its score after every stage the
  image ran.
- `top_k`: return only the `top_k` best labels.
- `hypothesis_template` may be a list of templates: a label's embedding is then the mean of its normalised
  per-template embeddings (CLIP's prompt ensembles).

Any other keyword is an error that names the accepted ones (a typo must not silently run the default). A prompt
that the tokenizer maps to its unknown token gets a warning naming the words: a closed-vocabulary tokenizer would
otherwise give such labels near-uniform scores without a word.

`calibrate(images, candidate_labels=..., target_agreement=0.99)` chooses the threshold for one label set (and
template) without labels: the full model's answers on unlabelled images of the user's domain are the reference
that early exits must keep (`gate_calibration.calibrate_threshold`). It is stored in the model's config
(`gate_calibrations`), so `save_pretrained` keeps it and `margin_threshold="auto"` finds it again, in any process,
for the same labels in any order. To calibrate several label sets on the same images, embed them once
(`image_stage_embeddings(images)`) and pass `image_embeddings=` to each `calibrate`.

Label text embeddings are computed once per (labels, template), in chunks of 1,024 prompts so that 10,000-label
vocabularies fit in memory, and reused by later calls. Bad parameters (threshold, `max_stages`, template, labels)
raise a `ValueError` before any image is decoded.

Sharing: one pipeline may serve many threads at once (a web server's pattern). A call keeps its parameters and its
label set to itself; the label embeddings are shared under a lock (the same labels give the same embeddings in
every thread); the stage cache that `refine` reuses is one per thread. `calibrate` changes what
`margin_threshold="auto"` means for its label set from then on, in every thread: calibrate before serving.

`pipeline("zero-shot-image-classification", model=<WaveCLIPModel object>, ...)` returns this pipeline too: loading
the model registers it for WaveCLIP models (`register_gated_pipeline`); every other model keeps the stock pipeline.

This file is shipped as remote code with saved checkpoints.
"""

import difflib
import importlib
import json
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Sized
from pathlib import Path

import torch
from transformers.image_utils import load_image
from transformers.pipelines.zero_shot_image_classification import ZeroShotImageClassificationPipeline
from transformers.utils import logging

from .configuration_waveclip import ZERO_SHOT_TASK
from .exit_signals import check_exit_signal, exit_scores
from .folder_io import written_atomically
from .gate_calibration import (
    GateCalibration,
    calibrate_threshold,
    find_calibration,
    store_calibration,
)
from .gating import check_gflops_budget, check_margin_scaling, check_margin_threshold, check_stage_count
from .processing_waveclip import WaveCLIPProcessor
from .scoring import label_embeddings, zero_shot_logits


logger = logging.get_logger(__name__)

DEFAULT_TEMPLATE = "This is a photo of {}."
# The keywords that reach the gate (the pipeline's forward), and every keyword a call takes (`batch_size` and
# `num_workers` are read by transformers' `Pipeline.__call__`).
GATE_PARAMETERS = (
    "margin_threshold",
    "exit_signal",
    "max_stages",
    "margin_scaling",
    "gflops_budget",
    "return_all_stages",
)
CALL_PARAMETERS = (
    "candidate_labels",
    "hypothesis_template",
    "timeout",
    "tokenizer_kwargs",
    "top_k",
    *GATE_PARAMETERS,
    "batch_size",
    "num_workers",
)
# Label sets kept per pipeline; a serving process cycling through more sets recomputes the oldest.
_TEXT_CACHE_SIZE = 32
# Below this many calibration images, one disagreement moves the measured agreement by more than a point.
_FEW_CALIBRATION_IMAGES = 100


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


def check_hypothesis_template(hypothesis_template) -> str | tuple[str, ...]:
    """The template, or a tuple of templates for a prompt ensemble; a `ValueError` unless each has exactly one
    `{}` slot that the label fills."""
    if isinstance(hypothesis_template, (list, tuple)):
        if not hypothesis_template:
            raise ValueError(
                "`hypothesis_template` is an empty list: pass one template, e.g. 'This is a photo of {}.', or several "
                "for a prompt ensemble."
            )
        return tuple(_check_one_template(template) for template in hypothesis_template)
    return _check_one_template(hypothesis_template)


def _check_one_template(hypothesis_template) -> str:
    example = DEFAULT_TEMPLATE
    if not isinstance(hypothesis_template, str):
        raise ValueError(
            f"`hypothesis_template` must be a string with one '{{}}' for the label (or a list of such strings), e.g. "
            f"{example!r}; got {type(hypothesis_template).__name__}."
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


def _describe(value) -> str:
    """A tensor's shape, or another value's type name, for error messages."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_top_k(top_k) -> int | None:
    """`top_k` as a positive int (or `None`: every label), or a `ValueError`."""
    if top_k is None:
        return None
    try:
        value = None if isinstance(top_k, bool) else operator.index(top_k)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"`top_k` must be a positive integer (or None for every label), got {top_k!r}.")
    return value


def check_call_parameters(names) -> None:
    """A `TypeError` naming the accepted keywords if any of `names` is not one (with the closest match)."""
    unknown = [name for name in names if name not in CALL_PARAMETERS]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, CALL_PARAMETERS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise TypeError(
            f"`{name}` is not a parameter of the WaveCLIP zero-shot pipeline.{hint} Accepted: "
            f"{', '.join(CALL_PARAMETERS)}."
        )


def embedding_key(candidate_labels, hypothesis_template, tokenizer_kwargs) -> tuple:
    """What identifies a label set's embeddings, one row per label in the caller's order: labels, template(s) and
    tokenizer settings (they change the token ids, hence the embeddings)."""
    return (tuple(candidate_labels), hypothesis_template, tuple(sorted((tokenizer_kwargs or {}).items())))


def is_image_path(image: str) -> bool:
    """Whether a string image is a local path (rather than a URL or base64 data, which `load_image` decodes).

    Base64 has no '.', and a base64 image is thousands of characters long, so a string with a '.' or a short one
    is a path; the image processor then opens it and names the file when it cannot.
    """
    if image.startswith(("http://", "https://", "data:")):
        return False
    return "." in image or len(image) < 256


class _LabelSet:
    """One call's checked labels, with the template and tokenizer arguments their embeddings were made with.

    Every image of a call carries a reference to the same object. It is opaque to transformers' pipeline: the device
    moves and the batching of model inputs and outputs recurse into lists and tuples, and walking a list of
    1,000 labels for every image cost ~1 ms per image (tiny model, 2-core CPU), a tenth of stage 0.
    """

    __slots__ = ("labels", "template", "tokenizer_kwargs")

    def __init__(self, labels: list[str], template, tokenizer_kwargs: dict):
        self.labels, self.template, self.tokenizer_kwargs = labels, template, tokenizer_kwargs

    @classmethod
    def checked(cls, candidate_labels, hypothesis_template, tokenizer_kwargs) -> "_LabelSet":
        return cls(
            check_candidate_labels(candidate_labels),
            check_hypothesis_template(hypothesis_template),
            dict(tokenizer_kwargs or {}),
        )

    def matches(self, hypothesis_template, tokenizer_kwargs) -> bool:
        """Whether the call's template and tokenizer arguments are the ones this set was checked with."""
        return hypothesis_template == self.template and (tokenizer_kwargs or {}) == self.tokenizer_kwargs


class WaveCLIPZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """The stock zero-shot pipeline, answering each image at the earliest stage whose margin is decisive."""

    # No video processor: otherwise transformers looks for one next to the image processor's remote code and, without
    # `trust_remote_code`, asks on the terminal whether to run it.
    _load_video_processor = False

    def __init__(self, **kwargs):
        self._text_embeddings = OrderedDict()
        self._text_embeddings_lock = threading.Lock()
        # One stage cache per thread: `refine` resets it, batches of one size reuse its buffers, and two threads
        # never write into the same one.
        self._per_thread = threading.local()
        super().__init__(**kwargs)

    def check_model_type(self, supported_models):
        # transformers' list holds the CLIP-like models of its own mapping and logs an error for any other; this
        # pipeline exists for WaveCLIP, so a WaveCLIP model is no error.
        if type(self.model).__name__ not in ("WaveCLIPModel",):
            super().check_model_type(supported_models)

    def __call__(self, image=None, candidate_labels=None, **kwargs):
        # The stock pipeline indexes the first image before anything else: an empty list would be an IndexError.
        # No images in, no results out (after checking the labels, so a bad call fails the same way every time).
        images = kwargs.get("images", image)
        if isinstance(images, (list, tuple)) and len(images) == 0:
            check_candidate_labels(candidate_labels)
            return []
        budget = kwargs.get("gflops_budget", self._forward_params.get("gflops_budget"))
        if budget is not None and isinstance(images, list):
            kwargs["batch_size"] = len(images)  # one budget for the call's images: they go through together
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def _sanitize_parameters(self, tokenizer_kwargs=None, **kwargs):
        check_call_parameters(kwargs)
        preprocess_params, _, _ = super()._sanitize_parameters(tokenizer_kwargs=tokenizer_kwargs, **kwargs)
        forward_params = {name: kwargs[name] for name in GATE_PARAMETERS if name in kwargs}
        # Checked here, before any image is decoded, rather than deep inside the first forward.
        check_margin_scaling(forward_params.get("margin_scaling", "none"))
        if "exit_signal" in forward_params:
            check_exit_signal(forward_params["exit_signal"])
        threshold = forward_params.get("margin_threshold")
        if isinstance(threshold, str) and threshold == "auto":
            self._check_auto_threshold(forward_params, preprocess_params, tokenizer_kwargs)
        elif threshold is not None:
            forward_params["margin_threshold"] = check_margin_threshold(threshold)
        if forward_params.get("max_stages") is not None:
            forward_params["max_stages"] = check_stage_count(
                forward_params["max_stages"], "max_stages", self.model.num_stages, hint=" (or None for all)"
            )
        if forward_params.get("gflops_budget") is not None:
            stage0 = float(self.model.answer_gflops()[0])
            forward_params["gflops_budget"] = check_gflops_budget(forward_params["gflops_budget"], stage0)
        if not isinstance(forward_params.get("return_all_stages", False), bool):
            raise ValueError(
                f"`return_all_stages` must be True or False, got {forward_params['return_all_stages']!r}."
            )
        if "hypothesis_template" in preprocess_params:
            preprocess_params["hypothesis_template"] = check_hypothesis_template(
                preprocess_params["hypothesis_template"]
            )
        if tokenizer_kwargs is not None:
            preprocess_params["tokenizer_kwargs"] = tokenizer_kwargs
        if "candidate_labels" in preprocess_params:  # checked once per call, not once per image
            preprocess_params["candidate_labels"] = _LabelSet.checked(
                preprocess_params["candidate_labels"],
                preprocess_params.get("hypothesis_template", DEFAULT_TEMPLATE),
                tokenizer_kwargs,
            )
        postprocess_params = {"top_k": check_top_k(kwargs["top_k"])} if "top_k" in kwargs else {}
        return preprocess_params, forward_params, postprocess_params

    def _check_auto_threshold(self, forward_params: dict, preprocess_params: dict, tokenizer_kwargs) -> None:
        """`margin_threshold="auto"` reads the calibration of the call's label set: say now if there is none."""
        if forward_params.get("margin_scaling", "none") != "none":
            raise ValueError(
                "`margin_threshold='auto'` is a probability margin calibrated for one label set; it takes no "
                "`margin_scaling`. Drop `margin_scaling`, or pass a number as `margin_threshold`."
            )
        if "candidate_labels" in preprocess_params:
            label_set = _LabelSet.checked(
                preprocess_params["candidate_labels"],
                preprocess_params.get("hypothesis_template", DEFAULT_TEMPLATE),
                tokenizer_kwargs,
            )
            self.calibrated_threshold(label_set.labels, label_set.template, label_set.tokenizer_kwargs)

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """One image at a time without a DataLoader when nothing is batched or loaded in parallel; otherwise
        transformers' DataLoader path. A `DataLoader` with `batch_size=1` and no workers adds nothing but its own
        machinery per image (~1.6 ms per image with the tiny model on a 2-core CPU, against a ~10 ms stage 0)."""
        if batch_size != 1 or num_workers:
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        items = (inputs[index] for index in range(len(inputs))) if isinstance(inputs, Sized) else iter(inputs)
        return (self.run_single(item, preprocess_params, forward_params, postprocess_params) for item in items)

    def calibrated_threshold(self, candidate_labels, hypothesis_template=DEFAULT_TEMPLATE, tokenizer_kwargs=None):
        """The threshold calibrated for this label set (its labels in any order) and template, as stored in the
        model's config (`None`: every stage); a `ValueError` if it was never calibrated."""
        return self.calibration_for(candidate_labels, hypothesis_template, tokenizer_kwargs).threshold

    def calibration_for(self, candidate_labels, hypothesis_template=DEFAULT_TEMPLATE, tokenizer_kwargs=None):
        """The [`GateCalibration`] stored in the model's config for this label set (its labels in any order) and
        template; a `ValueError` if it was never calibrated."""
        calibration = find_calibration(self.model.config, candidate_labels, hypothesis_template, tokenizer_kwargs)
        if calibration is None:
            stored = len(getattr(self.model.config, "gate_calibrations", None) or [])
            raise ValueError(
                "`margin_threshold='auto'` needs a calibration for these labels and template "
                f"({len(candidate_labels)} labels, template {hypothesis_template!r}); the model holds {stored} "
                "calibration(s), none for this "
                "set. Call `classifier.calibrate(images, candidate_labels=..., hypothesis_template=...)` on "
                "unlabelled images of your domain with the same labels and template (then `save_pretrained` keeps "
                "it), or pass a number as `margin_threshold`."
            )
        return calibration

    def preprocess(
        self, image, candidate_labels=None, hypothesis_template=DEFAULT_TEMPLATE, timeout=None, tokenizer_kwargs=None
    ):
        label_set = candidate_labels
        if not (isinstance(label_set, _LabelSet) and label_set.matches(hypothesis_template, tokenizer_kwargs)):
            label_set = _LabelSet.checked(candidate_labels, hypothesis_template, tokenizer_kwargs)
        if isinstance(image, str) and not is_image_path(image):
            image = load_image(image, timeout=timeout)  # URL or base64, as the stock pipeline
        # Paths, arrays and PIL images go to the image processor, which names a file it cannot read.
        inputs = self.image_processor(images=[image], return_tensors="pt").to(self.dtype)
        # Text is not tokenised per image: _forward embeds each label set once and caches it. One reference per
        # image, so that batching keeps the set together.
        inputs["label_set"] = label_set
        return inputs

    def label_embeddings(self, candidate_labels: list[str], hypothesis_template, tokenizer_kwargs=None):
        """(num_labels, projection_dim) text embeddings of the prompts, computed once per (labels, template).

        A list of templates gives each label the mean of its normalised per-template embeddings (CLIP's prompt
        ensembles); a single template gives the text tower's embedding as is.
        """
        key = embedding_key(candidate_labels, hypothesis_template, tokenizer_kwargs)
        with self._text_embeddings_lock:
            if key in self._text_embeddings:
                self._text_embeddings.move_to_end(key)
                return self._text_embeddings[key]
        embeds = label_embeddings(
            self.model,
            self.tokenizer,
            candidate_labels,
            hypothesis_template,
            tokenizer_kwargs,
            inspect_tokens=self._warn_about_unknown_words,
        )
        # Two threads may embed the same new set at once; both get equal tensors and one is kept.
        with self._text_embeddings_lock:
            self._text_embeddings[key] = embeds
            if len(self._text_embeddings) > _TEXT_CACHE_SIZE:
                self._text_embeddings.popitem(last=False)
        return embeds

    def _warn_about_unknown_words(self, prompts: list[str], text_inputs, special_tokens_mask) -> None:
        """Warn, naming the words, when the tokenizer maps part of a prompt to its unknown token.

        Special tokens are left out: CLIP's tokenizer uses one id for its unknown, end and padding tokens.
        """
        unk_id = getattr(self.tokenizer, "unk_token_id", None)
        if unk_id is None:
            return
        unknown = (text_inputs["input_ids"] == unk_id) & (special_tokens_mask == 0)
        if "attention_mask" in text_inputs:
            unknown &= text_inputs["attention_mask"].bool()
        rows = unknown.any(-1).nonzero().squeeze(1).tolist()
        if not rows:
            return
        examples = [f"{self._unknown_words(prompts[row])} in {prompts[row]!r}" for row in rows[:3]]
        more = f" (and {len(rows) - 3} more prompts)" if len(rows) > 3 else ""
        logger.warning(
            f"The tokenizer does not know {'; '.join(examples)}{more}: it maps them to its unknown token "
            f"{self.tokenizer.unk_token!r}, so those labels' text embeddings cannot tell them apart and their scores "
            "say little (e.g. a uniform 1/N). Use words the tokenizer knows, or a checkpoint whose tokenizer has an "
            "open vocabulary (CLIP's byte-level BPE)."
        )

    def _unknown_words(self, prompt: str) -> str:
        """The words of `prompt` that become the unknown token, quoted (the whole prompt if offsets are missing)."""
        try:
            encoding = self.tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
        except NotImplementedError:  # slow tokenizers have no offsets
            return repr(prompt)
        words = [
            prompt[begin:end]
            for token, (begin, end), special in zip(
                encoding["input_ids"], encoding["offset_mapping"], encoding["special_tokens_mask"]
            )
            if token == self.tokenizer.unk_token_id and not special
        ]
        return ", ".join(repr(word) for word in words) or repr(prompt)

    def _forward(
        self,
        model_inputs,
        margin_threshold=None,
        max_stages=None,
        margin_scaling="none",
        gflops_budget=None,
        return_all_stages=False,
        exit_signal=None,
    ):
        label_sets = model_inputs.pop("label_set")
        # Batched: one reference per image, all to the same call's set.
        label_set = label_sets[0] if isinstance(label_sets, list) else label_sets
        labels, template, tokenizer_kwargs = label_set.labels, label_set.template, label_set.tokenizer_kwargs
        if isinstance(margin_threshold, str):  # "auto", checked in _sanitize_parameters: the calibration's signal too
            calibration = self.calibration_for(labels, template, tokenizer_kwargs)
            if exit_signal not in (None, calibration.signal):
                raise ValueError(
                    f"`margin_threshold='auto'` reads the calibration of these labels, made for exit_signal="
                    f"{calibration.signal!r}, but the call asks for {exit_signal!r}: drop `exit_signal`, or calibrate "
                    f"with exit_signal={exit_signal!r}."
                )
            margin_threshold, exit_signal = calibration.threshold, calibration.signal
        text_embeds = self.label_embeddings(labels, template, tokenizer_kwargs)
        cache = getattr(self._per_thread, "stage_cache", None)
        if cache is None:
            cache = self._per_thread.stage_cache = self.model.new_stage_cache()
        outputs = self.model.refine(
            model_inputs["pixel_values"],
            text_embeds,
            margin_threshold,
            max_stages=max_stages,
            margin_scaling=margin_scaling,
            gflops_budget=gflops_budget,
            return_all_stages=return_all_stages,
            exit_signal=exit_signal or "margin",
            cache=cache,
        )
        num_images = model_inputs["pixel_values"].shape[0]
        return {
            "label_set": [label_set] * num_images if isinstance(label_sets, list) else label_set,
            "logits": outputs.logits_per_image,
            "stage": outputs.exit_stage,
            "gflops": outputs.gflops,
            "stage_scores": outputs.stage_scores,
        }

    def postprocess(self, model_outputs, top_k=None):
        label_set = model_outputs["label_set"]
        labels = (label_set[0] if isinstance(label_set, list) else label_set).labels
        probs = model_outputs["logits"][0].float().softmax(dim=-1)
        stage = int(model_outputs["stage"].reshape(-1)[0])
        gflops = float(model_outputs["gflops"].reshape(-1)[0])
        # Ranked in torch (stable, so ties keep label order as the stock pipeline's sort does), then one dict per
        # kept label: with 1,000 labels, Python's sort with a key function and a per-entry loop cost 0.27 ms.
        order = probs.sort(descending=True, stable=True)
        kept = slice(None) if top_k is None else slice(top_k)
        scores, ranked = order.values[kept].tolist(), order.indices[kept].tolist()
        stage_scores = model_outputs.get("stage_scores")
        if stage_scores is None:
            return [
                {"score": score, "label": labels[index], "stage": stage, "gflops": gflops}
                for score, index in zip(scores, ranked)
            ]
        # (1, stages, labels): keep the stages this image ran
        per_label = stage_scores.reshape(-1, len(labels))[: stage + 1].float().T[ranked].tolist()
        return [
            {"score": score, "label": labels[index], "stage": stage, "gflops": gflops, "stage_scores": row}
            for score, index, row in zip(scores, ranked, per_label)
        ]

    def add_calibration(self, calibration) -> GateCalibration:
        """Use a calibration made elsewhere for `margin_threshold="auto"`: a [`GateCalibration`], its dict, or the
        path of a JSON file in that format (`python -m waveclip_hf.cli.calibrate` writes one). It is stored in the
        model's config, as `calibrate` stores its own, and replaces an earlier one for the same label set."""
        if isinstance(calibration, (str, os.PathLike)):
            try:
                calibration = json.loads(Path(calibration).read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"Cannot read the calibration file {calibration}: {error}") from error
        if isinstance(calibration, dict):
            calibration = GateCalibration.from_dict(calibration)
        if not isinstance(calibration, GateCalibration) and type(calibration).__name__ != "GateCalibration":
            raise ValueError(
                f"`add_calibration` takes a GateCalibration, its dict or a JSON file, got {calibration!r}."
            )
        store_calibration(self.model.config, calibration)
        return calibration

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' pipeline save (the model with its remote code and calibrations, the tokenizer, the image
        processor) and the [`WaveCLIPProcessor`] that pairs the last two, written to a temporary folder first: a save
        that fails midway leaves `save_directory` as it was. Files already in `save_directory` that the save does not
        write (a README) are kept.

        The processor is saved too because a loaded image processor keeps the processor's `AutoProcessor` entry in
        its `auto_map`: saved alone, it would name a file the folder lacks."""
        with written_atomically(save_directory, merge=True) as tmp:
            super().save_pretrained(tmp, **kwargs)
            if self.tokenizer is not None and self.image_processor is not None:
                WaveCLIPProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer).save_pretrained(tmp)

    def calibrate(
        self,
        images=None,
        candidate_labels=None,
        hypothesis_template=DEFAULT_TEMPLATE,
        max_disagreement=None,
        confidence=0.95,
        target_agreement=None,
        gflops_budget=None,
        exit_signal="margin",
        batch_size=None,
        tokenizer_kwargs=None,
        timeout=None,
        image_embeddings=None,
    ) -> GateCalibration:
        """Choose the gate's threshold for one label set without labels, and keep it in the model's config for
        `margin_threshold="auto"` (`save_pretrained` then saves it with the model).

        The full model's answer is the reference, so no labels are needed. On `images` (unlabelled images of your
        domain, not the ones you will evaluate on), exactly one target (`gate_calibration.calibrate_threshold`):

        - `max_disagreement` δ at `confidence` 1 - ε (the default: δ = 0.01 at 0.95): a promise about new images. The
          cheapest threshold whose Clopper-Pearson upper bound on disagreement with the full model is <= δ, chosen
          by fixed-sequence testing: with probability >= 1 - ε, the gate changes at most a share δ of the full
          model's answers on new images of this distribution. Too few images certify nothing: the result then says
          how many are needed (`images_needed`) and runs every stage.
        - `target_agreement`: the cheapest threshold that keeps at least that share of the full model's answers on
          these images (no promise beyond them);
        - `gflops_budget`: the most faithful threshold within that many mean GFLOPs per image.

        Args:
            images: paths, URLs, PIL images or arrays, as a call takes them.
            candidate_labels, hypothesis_template, tokenizer_kwargs: the label set, as in a call.
            exit_signal: what the gate reads (`exit_signals.EXIT_SIGNALS`); the calibration remembers it.
            batch_size: images per forward (default: the pipeline's, else 32).
            image_embeddings: instead of `images`, their `image_stage_embeddings(images)`: calibrating several label
                sets on the same images then runs the image encoder once.

        Returns:
            [`GateCalibration`]: the threshold (`None`: only every stage meets the target), its agreement, mean
            GFLOPs and exit-stage shares on these images, and for the guarantee its bound.
        """
        labels = check_candidate_labels(candidate_labels)
        template = check_hypothesis_template(hypothesis_template)
        exit_signal = check_exit_signal(exit_signal, getattr(self.model.config, "exit_head", None))
        if target_agreement is None and gflops_budget is None and max_disagreement is None:
            max_disagreement = 0.01
        stage_probs, stage_embeds, text_embeds = self._calibration_probabilities(
            images, image_embeddings, labels, template, tokenizer_kwargs, batch_size, timeout
        )
        exit_head = getattr(self.model.config, "exit_head", None)
        scores = exit_scores(exit_signal, stage_probs, stage_embeds, text_embeds, exit_head)
        calibration = calibrate_threshold(
            stage_probs,
            self.model.answer_gflops().tolist(),
            target_agreement,
            gflops_budget,
            max_disagreement,
            confidence,
            exit_signal,
            scores,
        ).for_label_set(labels, template, tokenizer_kwargs)
        if calibration.images_needed is not None:
            logger.warning(
                f"{calibration.num_images} calibration images cannot certify any early exit at disagreement <= "
                f"{calibration.max_disagreement:g} with confidence {calibration.confidence:g}: that needs at least "
                f"{calibration.images_needed} images (with no disagreement at all). Every stage runs for this label "
                "set until you calibrate on more images, or loosen the target."
            )
        store_calibration(self.model.config, calibration)
        return calibration

    @torch.no_grad()
    def _calibration_probabilities(
        self, images, image_embeddings, labels, template, tokenizer_kwargs, batch_size, timeout
    ) -> torch.Tensor:
        """The calibration images' (N, stages, labels) float32 zero-shot probabilities after every stage, their
        (N, stages, projection_dim) image embeddings and the (labels, projection_dim) label embeddings, on the CPU,
        from `images` or their `image_embeddings`."""
        if (images is None) == (image_embeddings is None):
            raise ValueError(
                "Pass the calibration images once: `images` (unlabelled images of your domain) or their "
                "`image_embeddings=classifier.image_stage_embeddings(images)`."
            )
        if image_embeddings is None:
            image_embeddings = self.image_stage_embeddings(images, batch_size, timeout)
        expected = (self.model.num_stages, self.model.projection_dim)
        if not isinstance(image_embeddings, torch.Tensor) or tuple(image_embeddings.shape[1:]) != expected:
            raise ValueError(
                f"`image_embeddings` must be (num_images, {expected[0]} stages, {expected[1]}) from this pipeline's "
                f"`image_stage_embeddings(images)`, got {_describe(image_embeddings)}."
            )
        text_embeds = self.label_embeddings(labels, template, tokenizer_kwargs)
        logits = zero_shot_logits(image_embeddings.to(self.device), text_embeds, self.model.logit_scale.exp())
        stage_probs = logits.float().softmax(-1).cpu()
        if len(stage_probs) < _FEW_CALIBRATION_IMAGES:
            logger.warning(
                f"Calibrating on {len(stage_probs)} images: one disagreement moves the measured agreement by "
                f"{100 / len(stage_probs):.1f} points, so agreement on new images may fall short of the target. Use a "
                f"few hundred images of your domain."
            )
        return stage_probs, image_embeddings.float().cpu(), text_embeds.float().cpu()

    @torch.no_grad()
    def image_stage_embeddings(self, images, batch_size=None, timeout=None) -> torch.Tensor:
        """(N, stages, projection_dim) image embeddings after every stage, in the model's dtype and on its device:
        one block-causal forward per batch gives every stage exactly as the cached refinement does.

        Args:
            images: paths, URLs, PIL images or arrays, as a call takes them.
            batch_size: images per forward (default: the pipeline's, else 32).
        """
        if isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
            images = [images]
        batch_size = batch_size or self._batch_size or 32
        embeds, batch = [], []

        def flush():
            # On the model's device: the fast image processor works there, the slow one copies its result.
            pixel_values = self.image_processor(images=batch, return_tensors="pt", device=self.device)["pixel_values"]
            embeds.append(self.model.get_image_features(pixel_values.to(self.dtype)).stage_pooler_outputs)
            batch.clear()

        for image in images:
            is_remote = isinstance(image, str) and not is_image_path(image)
            batch.append(load_image(image, timeout=timeout) if is_remote else image)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if not embeds:
            raise ValueError("`calibrate` got no images: pass unlabelled images of your domain (a few hundred).")
        return torch.cat(embeds)


class ZeroShotImageClassificationDispatch(ZeroShotImageClassificationPipeline):
    """Stands in transformers' task registry for the zero-shot image pipeline: builds the gated pipeline for a model
    whose class names one (`_gated_pipeline_class`, set by `register_gated_pipeline`) and, for every other model,
    the pipeline the registry held before (the stock one), with the same arguments.

    `pipeline(task, model=<folder or Hub id>)` reads the folder's `custom_pipelines` and never gets here; a model
    object has no folder to read, which is the case this serves.
    """

    _builds_gated_pipelines = True
    fallback_class = ZeroShotImageClassificationPipeline

    def __new__(cls, *args, model=None, **kwargs):
        pipeline_class = getattr(model, "_gated_pipeline_class", None) or cls.fallback_class
        return pipeline_class(*args, model=model, **kwargs)


def register_gated_pipeline(model_class) -> None:
    """Make `pipeline(ZERO_SHOT_TASK, model=<model_class instance>)` build this file's gated pipeline.

    The registry's entry for the task keeps everything (default model, model classes) but its implementation, which
    becomes `ZeroShotImageClassificationDispatch`: every other model still gets the pipeline it got before. Loading
    several copies of the WaveCLIP code (two folders with `trust_remote_code`) registers one dispatcher; each model
    class names its own copy's pipeline.
    """
    from transformers.pipelines import PIPELINE_REGISTRY

    model_class._gated_pipeline_class = WaveCLIPZeroShotImageClassificationPipeline
    entry = PIPELINE_REGISTRY.supported_tasks.get(ZERO_SHOT_TASK)
    if entry is None or getattr(entry["impl"], "_builds_gated_pipelines", False):
        return
    previous = entry["impl"]
    if isinstance(previous, str):  # transformers >= 5.24 names the class by its dotted path until first use
        module_path, class_name = previous.rsplit(".", 1)
        previous = getattr(importlib.import_module(module_path), class_name)
    dispatch = type(
        "ZeroShotImageClassificationDispatch",
        (ZeroShotImageClassificationDispatch,),
        {"fallback_class": previous, "__module__": __name__},
    )
    PIPELINE_REGISTRY.supported_tasks[ZERO_SHOT_TASK] = {**entry, "impl": dispatch}


__all__ = [
    "CALL_PARAMETERS",
    "ZeroShotImageClassificationDispatch",
    "register_gated_pipeline",
    "WaveCLIPZeroShotImageClassificationPipeline",
    "check_candidate_labels",
    "check_hypothesis_template",
]
