"""Loading a WaveCLIP checkpoint with errors that name the file and the fix.

`AutoModel.from_pretrained(folder, trust_remote_code=True)` is transformers' own loader, unchanged: the model file
has no `from_pretrained` override. The tools of this package (the command lines, evaluation, experiments) load
through `load_waveclip`, which checks a local folder first and turns transformers' terse failures into messages
that say what to do:

- a local path that does not exist (transformers: "Repo id must be in the form ...");
- a folder without config.json (transformers would build a default, ViT-B sized config and fail on 80 shapes), or
  with another model's config.json;
- a truncated or corrupt .safetensors file;
- weights that do not fit the config;
- tensors missing from the checkpoint (transformers warns and initialises them randomly).
"""

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import AutoModel


def unreadable_safetensors(folder: Path) -> list[Path]:
    """The `.safetensors` files in `folder` whose header safetensors cannot read."""
    bad = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError):
            bad.append(path)
    return bad


def check_model_folder(folder: Path, model_type: str, class_name: str) -> None:
    """A local folder must hold config.json for `model_type` (transformers would fall back to defaults, or warn
    and build the wrong geometry from another model's config)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: the weights cannot be read without the geometry it records. Save the "
            "model with `model.save_pretrained(folder)` (it writes config.json next to model.safetensors), or "
            "pass `config=`."
        )
    try:
        found = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError, OSError):
        return  # not JSON (or not an object): transformers' own error names the file
    if found == model_type:
        return
    hint = (
        " It is a full WaveCLIP checkpoint: load it with `WaveCLIPModel.from_pretrained(...)` and use its "
        "`.vision_model`."
        if found == "waveclip"
        else " Put back the config.json that was saved with these weights (`save_pretrained` writes both), or pass "
        "`config=`."
    )
    raise ValueError(
        f"{config_file} describes a {found!r} model, not a {model_type!r} one ({class_name}): the folder holds "
        f"another model's config.{hint}"
    )


def _local_folder(source) -> Path | None:
    """`source` as a folder when it is a local path; a `FileNotFoundError` when it looks local but is not a folder."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    if os.path.isdir(text):
        return Path(text)
    if os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(text):
        raise FileNotFoundError(
            f"{text} is not a folder: pass the folder written by `model.save_pretrained(...)` or a Hub id."
        )
    return None


def load_waveclip(source, model_class=None, output_loading_info: bool = False, **kwargs):
    """Load a WaveCLIP checkpoint (a folder or a Hub id), naming what is wrong when it cannot.

    Args:
        source: the folder written by `save_pretrained`, or a Hub id.
        model_class: `WaveCLIPModel`, `WaveCLIPVisionModel`, or `None` for `AutoModel` with the folder's own remote
            code (`trust_remote_code=True`), as a user without this package loads it.
        output_loading_info: return `(model, report)` and accept missing tensors, as transformers does.
        kwargs: passed to `from_pretrained` (`dtype=`, `revision=`, ...).

    Returns:
        The model in eval mode (and transformers' loading report with `output_loading_info`).
    """
    folder = _local_folder(source)
    model_type = getattr(model_class, "config_class", None)
    model_type = model_type.model_type if model_type is not None else "waveclip"
    class_name = model_class.__name__ if model_class is not None else "WaveCLIPModel"
    if folder is not None and kwargs.get("config") is None:
        check_model_folder(folder, model_type, class_name)
    loader = model_class.from_pretrained if model_class is not None else AutoModel.from_pretrained
    if model_class is None:
        kwargs.setdefault("trust_remote_code", True)
    try:
        model, report = loader(source, output_loading_info=True, **kwargs)
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ValueError(
            f"The weights in {source} do not match the shapes its config.json asks for (the report above lists each "
            "tensor): the config and the safetensors come from different models. Save both with "
            "`model.save_pretrained(folder)`, or pass the config the weights were trained with."
        ) from error
    except SafetensorError as error:
        bad = unreadable_safetensors(folder) if folder is not None else []
        where = ", ".join(map(str, bad)) if bad else f"a .safetensors file of {source}"
        raise ValueError(
            f"{where} is truncated or corrupt (safetensors: {error}). Download it again (for a Hub model, "
            "`from_pretrained(..., force_download=True)`) or save the model again with `save_pretrained`."
        ) from error
    if output_loading_info:
        return model.eval(), report
    missing = sorted(report.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"The checkpoint {source} has no weights for {len(missing)} of this {type(model).__name__}'s tensors "
            f"(e.g. {missing[:3]}): they would be randomly initialised. Save the model with "
            "`model.save_pretrained(folder)` so that every tensor is written, or pass `output_loading_info=True` "
            "to get the partly loaded model and transformers' report."
        )
    return model.eval()


__all__ = ["check_model_folder", "load_waveclip", "unreadable_safetensors"]
