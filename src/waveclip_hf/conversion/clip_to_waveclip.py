"""Build a WaveCLIP student from a transformers `CLIPModel` teacher, ready to distil.

Kept beside the model, not inside it (as timm's `checkpoint_filter_fn` and transformers' `convert_*.py` are): the
shipped model files never need it, and it needs the image processor's colour maths, which the model does not.

What the student takes from the teacher (docs/model.md, "Built from a teacher"):

- copied unchanged: the text tower, text projection, logit scale, visual projection, and the vision transformer's
  pre-layernorm, blocks and post-layernorm (parameter names match one to one);
- resampled: the teacher's patch-position embeddings onto the G x G cell grid (antialiased bicubic, as timm's
  `resample_abs_pos_embed`); the class position is folded into every stage's class token;
- folded: the approximation band's patch projection (stage 0's in the default coarse-to-fine order; the last
  stage's with `band_order="fine_to_coarse"`) is the teacher's patch convolution, resampled to the approximation
  patch size and composed with the exact affine map from our normalised YCbCr approximation coefficients back to
  the teacher's normalised RGB (colour matrix, both normalisations, the 2^L Haar gain), so that at initialisation
  the coarse stage is the teacher looking at a 2^L-times downsampled image;
- fresh: the detail-stage projections and the detail band embeddings (the teacher has no counterpart).
"""

import torch
from torch import nn
from transformers import CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..models.waveclip.configuration_waveclip import WaveCLIPConfig, WaveCLIPVisionConfig
from ..models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor, rgb_to_ycbcr
from ..models.waveclip.modeling_waveclip import WaveCLIPModel


# The teacher's vision-config fields that mean the same in `WaveCLIPVisionConfig`.
SHARED_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
)


def convert_clip_to_waveclip(
    teacher: CLIPModel,
    teacher_image_mean=None,
    teacher_image_std=None,
    image_processor: WaveCLIPImageProcessor | None = None,
    **vision_overrides,
) -> WaveCLIPModel:
    """A WaveCLIP student initialised from `teacher` (see the module docstring for what is copied, resampled,
    folded and fresh).

    Args:
        teacher: a `CLIPModel` (e.g. `CLIPModel.from_pretrained("openai/clip-vit-base-patch16")`).
        teacher_image_mean, teacher_image_std: the teacher processor's RGB normalisation (default: OpenAI CLIP's).
        image_processor: the student's [`WaveCLIPImageProcessor`] (default: one with the default YCbCr
            normalisation and the student's geometry).
        **vision_overrides: student geometry, e.g. `levels=2`, `cell_size=32`, `wavelet="haar"`, and the ablation
            options `attention` and `band_order` (see `WaveCLIPVisionConfig`).

    Returns:
        A `WaveCLIPModel` in the teacher's dtype.
    """
    if not isinstance(teacher, CLIPModel):
        raise TypeError(
            f"`convert_clip_to_waveclip` needs a transformers `CLIPModel` teacher, got {type(teacher).__name__}. "
            "Load it with `CLIPModel.from_pretrained(<hub id or folder>)`."
        )
    config = student_config_from_clip(teacher, **vision_overrides)
    student = WaveCLIPModel(config).to(teacher.logit_scale.dtype)
    vision = config.vision_config
    if image_processor is None:
        image_processor = WaveCLIPImageProcessor(
            image_size=vision.image_size, wavelet=vision.wavelet, levels=vision.levels
        )
    with torch.no_grad():
        copy_shared_weights(teacher, student)
        resample_position_embeddings(teacher, student)
        fold_stage0_projection(teacher, student, image_processor, teacher_image_mean, teacher_image_std)
    return student


def student_config_from_clip(teacher: CLIPModel, **vision_overrides) -> WaveCLIPConfig:
    """The teacher's text config and width/depth, with the wavelet geometry of `vision_overrides`."""
    teacher_vision = teacher.config.vision_config
    vision_config = {name: getattr(teacher_vision, name) for name in SHARED_VISION_FIELDS}
    vision_config["projection_dim"] = teacher.config.projection_dim
    vision_config.update(vision_overrides)
    return WaveCLIPConfig(
        text_config=teacher.config.text_config.to_dict(),
        vision_config=vision_config,
        projection_dim=teacher.config.projection_dim,
        logit_scale_init_value=float(teacher.logit_scale.detach()),
    )


def copy_shared_weights(teacher: CLIPModel, student: WaveCLIPModel) -> None:
    """Text side, projections, logit scale and the vision transformer body, unchanged."""
    student.text_model.load_state_dict(teacher.text_model.state_dict())
    student.text_projection.load_state_dict(teacher.text_projection.state_dict())
    student.visual_projection.load_state_dict(teacher.visual_projection.state_dict())
    student.logit_scale.copy_(teacher.logit_scale)
    teacher_tower, student_tower = teacher.vision_model, student.vision_model
    student_tower.pre_layrnorm.load_state_dict(teacher_tower.pre_layrnorm.state_dict())
    student_tower.encoder.load_state_dict(teacher_tower.encoder.state_dict())
    student_tower.post_layernorm.load_state_dict(teacher_tower.post_layernorm.state_dict())


def resample_position_embeddings(teacher: CLIPModel, student: WaveCLIPModel) -> None:
    """Teacher patch positions (1 + N^2, hidden) -> the student's G x G cell positions; class position folded into
    every stage's class token; the approximation band embedding zeroed (the approximation tokens add nothing the
    teacher lacks)."""
    embeddings, teacher_embeddings = student.vision_model.embeddings, teacher.vision_model.embeddings
    positions = teacher_embeddings.position_embedding.weight
    class_position, patch_positions = positions[0], positions[1:]
    teacher_grid = int(round(patch_positions.shape[0] ** 0.5))
    grid = student.config.vision_config.grid_size
    patch_positions = patch_positions.T.reshape(1, -1, teacher_grid, teacher_grid)
    patch_positions = nn.functional.interpolate(
        patch_positions.float(), size=(grid, grid), mode="bicubic", antialias=True, align_corners=False
    )
    embeddings.position_embedding.weight.copy_(patch_positions.reshape(-1, grid * grid).T)
    embeddings.class_embedding.copy_(
        (teacher_embeddings.class_embedding + class_position).expand_as(embeddings.class_embedding)
    )
    embeddings.band_embedding.weight[0].zero_()


def coefficient_to_teacher_input(
    image_processor: WaveCLIPImageProcessor,
    vision: WaveCLIPVisionConfig,
    teacher_image_mean=None,
    teacher_image_std=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact affine map x = A a + b from our approximation coefficients to the teacher's input.

    Our approximation coefficient is a = 2^L * blockmean((ycc - mean_s) / std_s) with ycc = M rgb + offset, and the
    teacher reads x = (rgb - mean_t) / std_t.

    Returns:
        A of shape (3 teacher channels, 3 coefficient channels) and b of shape (3,), float64.
    """
    dtype = torch.float64
    zero = torch.zeros(1, 3, 1, 1, dtype=dtype)
    offset = rgb_to_ycbcr(zero).reshape(3)
    colour = torch.stack(
        [rgb_to_ycbcr(torch.eye(3, dtype=dtype)[i].reshape(1, 3, 1, 1)).reshape(3) - offset for i in range(3)], dim=1
    )  # (3, 3): ycc = colour @ rgb + offset
    mean_t = torch.tensor(teacher_image_mean or OPENAI_CLIP_MEAN, dtype=dtype)
    std_t = torch.tensor(teacher_image_std or OPENAI_CLIP_STD, dtype=dtype)
    mean_s = torch.tensor(image_processor.image_mean, dtype=dtype)
    std_s = torch.tensor(image_processor.image_std, dtype=dtype)
    inverse_colour = torch.linalg.inv(colour)
    gain = 2.0**vision.levels
    affine = torch.diag(1 / std_t) @ inverse_colour @ torch.diag(std_s) / gain
    shift = (inverse_colour @ (mean_s - offset) - mean_t) / std_t
    return affine, shift


def fold_stage0_projection(
    teacher: CLIPModel,
    student: WaveCLIPModel,
    image_processor: WaveCLIPImageProcessor,
    teacher_image_mean=None,
    teacher_image_std=None,
) -> None:
    """The approximation band's patch projection (`patch_embeddings[0]`, whichever stage reads it) := the teacher's
    patch convolution composed with `coefficient_to_teacher_input`."""
    vision = student.config.vision_config
    affine, shift = coefficient_to_teacher_input(image_processor, vision, teacher_image_mean, teacher_image_std)
    kernel = teacher.vision_model.embeddings.patch_embedding.weight.to(torch.float64)  # (hidden, 3, P_t, P_t)
    patch = vision.band_group_patch_sizes[0]
    if kernel.shape[-1] != patch:
        # Keep the response to smooth inputs: resample the kernel and rescale by the area ratio.
        area_ratio = (kernel.shape[-1] / patch) ** 2
        kernel = nn.functional.interpolate(kernel, size=(patch, patch), mode="bicubic", antialias=True) * area_ratio
    approximation = student.vision_model.embeddings.patch_embeddings[0]
    approximation.weight.copy_(torch.einsum("dcij,ce->deij", kernel, affine))
    approximation.bias.copy_(torch.einsum("dcij,c->d", kernel, shift))


__all__ = ["convert_clip_to_waveclip", "student_config_from_clip"]
