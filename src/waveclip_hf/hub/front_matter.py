"""The Hub metadata (YAML front matter) of a distilled WaveCLIP's card, and how the card names what was local.

A card is written for the Hub, so it never prints a path of the machine that made it: a local teacher, training
folder or evaluation folder appears by its folder name. The front matter is built with `huggingface_hub`'s
`ModelCardData`, which writes `model-index` the way the Hub reads it.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger(__name__)

TAGS = ["waveclip", "clip", "wavelet", "zero-shot-image-classification", "distillation"]
# The sample image the Hub's own examples use for zero-shot image classification widgets.
WIDGET_IMAGE = "https://huggingface.co/datasets/mishig/sample_images/resolve/main/cat-dog-music.png"
DEFAULT_EXAMPLE_LABELS = ("cat", "dog", "car")
EXAMPLE_LABEL_COUNT = 3


def is_local(source: str) -> bool:
    """Whether `source` (a teacher or data argument) is a path on this machine rather than a Hub id."""
    return Path(source).expanduser().exists()


def public_name(source: str) -> str:
    """How a card names `source`: a Hub id as given, a local path by its last component only."""
    return Path(source).expanduser().resolve().name if is_local(source) else source


def hub_dataset_ids(sources: Sequence[str | None]) -> list[str]:
    """The Hub dataset ids among the data arguments (local folders have no Hub page to link)."""
    ids = []
    for source in sources:
        if source and not is_local(source) and source not in ids:
            ids.append(source)
    return ids


# ---------------------------------------------------------------------------------------------------- licence


@dataclass
class CardLicense:
    """The `license` (+ `license_name`, `license_link` for "other") of the card, and where it came from."""

    license: str
    name: str | None = None
    link: str | None = None
    origin: str = ""  # one sentence for the card


def resolve_license(given: str | None, teacher: str) -> CardLicense:
    """The licence the user gave (`--license`), else the one the teacher's model card states, else "other"
    pointing at the teacher: a distilled model carries its teacher's weights' terms."""
    if given:
        return CardLicense(given, origin=f"`{given}`, as given when distilling (`--license`).")
    inherited = _teacher_card_license(teacher)
    if inherited.get("license"):
        return CardLicense(
            inherited["license"],
            inherited.get("license_name"),
            inherited.get("license_link"),
            origin=f"`{inherited['license']}`, inherited from the teacher's model card.",
        )
    logger.warning(
        "The teacher %r states no licence in a model card this machine can read; the card says 'other' "
        "(the teacher's terms). Pass --license to state it.",
        public_name(teacher),
    )
    link = None if is_local(teacher) else f"https://huggingface.co/{teacher}"
    return CardLicense(
        "other",
        "teacher-license",
        link,
        origin="`other`: the teacher's terms apply, but its model card states no licence that this "
        "run could read (distil with `--license` to state one).",
    )


def _teacher_card_license(teacher: str) -> dict:
    """`license`, `license_name`, `license_link` of the teacher's README front matter: a local folder's, or a Hub
    teacher's (downloaded, or from the local cache offline). Empty when there is none or it cannot be read."""
    from huggingface_hub import ModelCard

    try:
        if is_local(teacher):
            readme = Path(teacher).expanduser() / "README.md"
            if not readme.is_file():
                return {}
        else:
            from huggingface_hub import hf_hub_download

            readme = hf_hub_download(teacher, "README.md")
        data = ModelCard.load(readme).data
    except Exception as error:  # noqa: BLE001 - offline, no card, malformed card: the licence is unknown
        logger.info("Could not read the teacher's model card (%s: %s).", type(error).__name__, error)
        return {}
    return {key: getattr(data, key, None) for key in ("license", "license_name", "license_link")}


# ----------------------------------------------------------------------------------------------- example labels


def tokenizes_without_unknown(tokenizer, text: str) -> bool:
    """True when `tokenizer` maps `text` to known tokens only (special tokens left out: CLIP's unknown token is its
    end-of-text token)."""
    unknown = tokenizer.unk_token_id
    return unknown is None or unknown not in tokenizer(text, add_special_tokens=False)["input_ids"]


def example_labels(tokenizer, class_names: Sequence[str] = (), prompts: Sequence[str] = ()) -> list[str]:
    """Up to three candidate labels for the card's snippet and widget that `tokenizer` knows every token of.

    Tried in order: `class_names` (of a measured evaluation), cat / dog / car, the last word of each prompt of the
    distillation's label vocabulary, then the tokenizer's own words. (A byte-level BPE tokenizer, as real CLIP
    checkpoints ship, knows everything; a word-level one only its vocabulary.)
    """
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [token for token, _ in vocabulary if token.isalpha() and len(token) >= 3]
    last_words = [prompt.split()[-1].strip(".,") for prompt in prompts if prompt.split()]
    for labels in (class_names, DEFAULT_EXAMPLE_LABELS, last_words, words):
        # The widget takes its labels as one comma-separated string.
        usable = (label for label in labels if label and "," not in label)
        known = list(dict.fromkeys(label for label in usable if tokenizes_without_unknown(tokenizer, label)))
        if len(known) >= 2:
            return known[:EXAMPLE_LABEL_COUNT]
    raise ValueError("The tokenizer knows fewer than two words: no example labels for the model card.")


# ---------------------------------------------------------------------------------------------- front matter


def front_matter(
    model_name: str,
    card_license: CardLicense,
    base_model: str | None,
    datasets: list[str],
    labels: Sequence[str],
    eval_results: list | None,
) -> str:
    """The YAML between the card's `---` lines (without them).

    Args:
        model_name: the model's name in `model-index`.
        base_model: the teacher's Hub id (None for a local teacher: the Hub would link a page that does not exist).
        datasets: Hub dataset ids the model was distilled or evaluated on.
        labels: the widget's candidate labels.
        eval_results: `huggingface_hub.EvalResult`s; None or empty: no `model-index`.
    """
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=card_license.license,
        license_name=card_license.name,
        license_link=card_license.link,
        base_model=base_model,
        datasets=datasets or None,
        tags=TAGS,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        widget=[{"src": WIDGET_IMAGE, "candidate_labels": ", ".join(labels), "example_title": "Cat & dog"}],
    )
    return data.to_yaml()


__all__ = [
    "CardLicense",
    "TAGS",
    "WIDGET_IMAGE",
    "example_labels",
    "front_matter",
    "hub_dataset_ids",
    "is_local",
    "public_name",
    "resolve_license",
    "tokenizes_without_unknown",
]
