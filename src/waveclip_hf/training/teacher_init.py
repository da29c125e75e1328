"""Start a CLIP teacher from a trained one at a lower resolution (`TeacherTrainingConfig.init_from`).

A 224-px teacher with patch P becomes a 448-px teacher with patch 2P: the same G x G patch grid, the same position
embeddings, and the patch kernel upsampled 2x (nearest) and divided by 4, so that on a 2x nearest-upsampled image
every token is the one the source gives the original image (a 448-px image whose 2x2 block means are the 224-px
image, as the three-scale benchmark draws its scene, reads as the 224-px image).

The kernel's other part, the one that sees only detail that averages out in 2x2 blocks (the three-scale
benchmark's micro axis), starts as a fresh CLIP's would: the new model's random kernel minus its 2x2 block means.
Zero there (the copy alone) left the teacher blind to the new scale at step 0, and a 448-px teacher grown that way
never learned its micro axis in the preset's budget (docs/adaptive_resolution.md); the random part adds nothing
on a 2x-upsampled image, so the source's reading stays exact.

The text side is copied word by word: both tokenizers are word-level (`data.text_tokenizer`), so every word the
source knows keeps its embedding, and new words (e.g. the grain names of the micro axis) start at random.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPModel


TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding.weight"


@torch.no_grad()
def init_from_smaller_teacher(model: CLIPModel, tokenizer, source_dir: str | Path) -> dict:
    """Overwrite `model` (a fresh `CLIPModel` of the same widths and depths, image size and patch size both k times
    the source's) in place with the weights of the teacher in `source_dir`, as the module docstring says.

    Returns:
        {"factor": k, "copied_words": n, "new_words": [words the source lacks]}.
    """
    source = CLIPModel.from_pretrained(source_dir)
    source_tokenizer = AutoTokenizer.from_pretrained(source_dir)
    vision, source_vision = model.config.vision_config, source.config.vision_config
    factor = vision.patch_size // source_vision.patch_size
    if (
        vision.patch_size != factor * source_vision.patch_size
        or vision.image_size != factor * source_vision.image_size
        or vision.image_size // vision.patch_size != source_vision.image_size // source_vision.patch_size
    ):
        raise ValueError(
            f"`init_from` needs the same patch grid at an integer multiple of the source's size: source "
            f"{source_vision.image_size} px / patch {source_vision.patch_size}, this teacher {vision.image_size} px / "
            f"patch {vision.patch_size}. Scale both by the same factor (e.g. 448 / 64 from 224 / 32)."
        )
    state = source.state_dict()
    kernel = state[PATCH_EMBEDDING]  # (hidden, 3, P, P)
    fresh = model.state_dict()[PATCH_EMBEDDING]  # (hidden, 3, kP, kP), CLIP's random initialisation
    block_means = (
        torch.nn.functional.avg_pool2d(fresh, factor).repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    )
    state[PATCH_EMBEDDING] = (
        kernel.repeat_interleave(factor, 2).repeat_interleave(factor, 3) / factor**2 + fresh - block_means
    )
    source_vocab, vocab = source_tokenizer.get_vocab(), tokenizer.get_vocab()
    rows = model.state_dict()[TOKEN_EMBEDDING].clone()
    shared = [word for word in vocab if word in source_vocab]
    rows[[vocab[w] for w in shared]] = state[TOKEN_EMBEDDING][[source_vocab[w] for w in shared]]
    state[TOKEN_EMBEDDING] = rows
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not name.endswith("position_ids") for name in missing):
        raise ValueError(
            f"`init_from` {source_dir}: the teachers differ in more than size ({missing}, {unexpected}); "
            "use a source with the same widths and depths."
        )
    return {"factor": factor, "copied_words": len(shared), "new_words": sorted(set(vocab) - set(source_vocab))}


__all__ = ["init_from_smaller_teacher"]
