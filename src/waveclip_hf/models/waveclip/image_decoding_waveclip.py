"""Input decoding for WaveCLIP's image processors: any accepted image → (3, H, W) float32 RGB in [0, 1].

Two steps, so that the fast processor can move the raw data (uint8 stays uint8, 4x less to copy) to the model's
device before the float work:

- `decode_image`: one image of any accepted kind → `DecodedImage`, a channels-first (C, H, W) CPU tensor in its
  source dtype where torch has one (uint8, bool; wider types as float32), with what it takes to scale it to [0, 1];
- `decoded_to_rgb`: that tensor (on any device) → RGB in [0, 1], alpha composited on white.

What comes from `transformers.image_utils`: URLs and `data:image/...;base64,` strings are fetched and decoded by
its `load_image`. What stays here, because image_utils does something else (tested in
modeling_tests/test_image_processing_waveclip.py and test_robustness_processor.py):

- 16-bit data (PNG `I;16`, TIFF / PGM `I`, uint16 arrays) keeps its precision: image_utils converts PIL images
  to 8-bit RGB and reads arrays as 8-bit;
- alpha, palettes with transparency and CMYK give the same floats under every supported transformers release
  (image_utils' RGB conversion drops alpha in some releases and composites it in 8 bits in others);
- two-channel (gray + alpha) images, integer arrays of unknown bit depth, and float ranges are checked, and every
  failure is a `ValueError` naming the image and the fix.

This file ships with saved checkpoints as remote code and imports only torch, numpy, PIL and transformers.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch


# A float image outside [0, 1] by more than this is taken to be in another range (0-255, or already normalised)
# and rejected; inside it, small overshoots (from an upstream bicubic resize, say) are clamped.
FLOAT_RANGE_TOLERANCE = 0.05


class DecodedImage(NamedTuple):
    """One image read but not yet converted to float.

    Attributes:
        values: (C, H, W) tensor, C in 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA); uint8 or bool as the source
            had it (possibly sharing its memory: never modified in place), other types as float32. A view of a
            channels-last source stays channels-last in memory (the resize reads either layout).
        kind: the source dtype's kind ("bool", "uint8", "uint16", "int", "float"), which sets the scale to [0, 1].
        scale: factor to [0, 1] of integer data when the source says its bit depth (PIL modes) or its values do
            (other integer types), else None (the dtype's: 1/255 for uint8, 1/65535 for uint16).
        what: how error messages name the image ("Image 3 ('cat.png')").
    """

    values: torch.Tensor
    kind: str
    scale: float | None
    what: str

    def to(self, device: torch.device | str) -> DecodedImage:
        """The same image with `values` on `device` (a copy of the raw data, before it is widened to float)."""
        return self._replace(values=self.values.to(device, non_blocking=True))


def flatten_images(images) -> list:
    """One image, a list / tuple of images, or a 4-D batch array / tensor → flat list of single images."""
    if images is None:
        raise ValueError("No images given: pass a PIL image, an array, a tensor, a path, or a list of them.")
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    flat = []
    for item in items:
        if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
            flat.extend(item[i] for i in range(item.shape[0]))
        else:
            flat.append(item)
    if not flat:
        raise ValueError("Empty batch: got an empty list (or a 4-D array with zero images); pass at least one image.")
    return flat


def decode_image(image: Any, index: int) -> DecodedImage:
    """Read one image of any accepted kind (see `WaveCLIPImageProcessor`) into a channels-first CPU tensor, its
    values checked (NaN, inf, range): every `ValueError` for an image is raised here."""
    what = f"Image {index}"
    if isinstance(image, (str, os.PathLike)):
        what = f"Image {index} ('{_shorten(os.fspath(image))}')"
        image = _open_image(image)
    if isinstance(image, PIL.Image.Image):
        array, scale = _pil_to_array(image, what)
        values, kind = _numpy_to_tensor(array, what)
        return _checked(DecodedImage(_channels_first(values, prefer_first=False, what=what), kind, scale, what))
    if isinstance(image, np.ndarray):
        values, kind = _numpy_to_tensor(image, what)
        return _checked(DecodedImage(_channels_first(values, prefer_first=False, what=what), kind, None, what))
    if isinstance(image, torch.Tensor):
        values, kind = _torch_to_tensor(image, what)
        return _checked(DecodedImage(_channels_first(values, prefer_first=True, what=what), kind, None, what))
    raise ValueError(
        f"{what}: unsupported type {type(image).__name__}. Pass a PIL image, a numpy array, a torch tensor or a "
        "path to an image file (or a list of them)."
    )


def stack_decoded(images: list[DecodedImage]) -> DecodedImage:
    """Images of one shape, dtype and scale as one `DecodedImage` with (N, C, H, W) values, named by the first.

    Channels-last views stay channels-last in memory (a stack of their (H, W, C) data, seen as (N, C, H, W)), so
    stacking does not pay for the transposing copy that `_to_unit_float` avoids."""
    values = [image.values for image in images]
    if len(values) == 1:
        return images[0]._replace(values=values[0][None])
    if all(value.permute(1, 2, 0).is_contiguous() for value in values):
        stacked = torch.stack([value.permute(1, 2, 0) for value in values]).permute(0, 3, 1, 2)
    else:
        stacked = torch.stack(values)
    return images[0]._replace(values=stacked)


def decoded_to_rgb(decoded: DecodedImage) -> torch.Tensor:
    """`DecodedImage` with (C, H, W) or (N, C, H, W) values → (3, H, W) or (N, 3, H, W) float32 RGB in [0, 1], on
    the device of `decoded.values`.

    Gray is replicated; alpha is composited on white (the colour under fully transparent pixels is arbitrary,
    while transparent logos and icons are drawn to be seen on white pages), in float so 16-bit alpha keeps its
    precision.
    """
    values = _to_unit_float(decoded.values, decoded.kind, decoded.scale)
    rgb_shape = (*values.shape[:-3], 3, *values.shape[-2:])
    channels = values.shape[-3]
    if channels == 1:
        return values.expand(rgb_shape)
    if channels == 3:
        return values
    colour, alpha = values[..., :-1, :, :], values[..., -1:, :, :]
    return (colour * alpha + (1 - alpha)).expand(rgb_shape)


def _shorten(text: str, limit: int = 80) -> str:
    """A path as error messages show it; a base64 string is cut, not printed whole."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _open_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open and fully decode an image file, URL or data URI; turn every failure into a `ValueError` naming it."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path.startswith(("http://", "https://", "data:image/")):
        from transformers.image_utils import load_image

        try:
            return load_image(path)
        except Exception as error:  # network and decoding errors alike: the source is what the user can fix
            raise ValueError(f"Cannot load image from '{_shorten(path)}': {error}") from error
    if not os.path.isfile(path):
        raise ValueError(f"Cannot read image file '{_shorten(path)}': no such file.")
    try:
        with PIL.Image.open(path) as image:
            # `load()` decodes now, so a truncated file fails here and not later inside numpy.
            image.load()
            # Upright by the EXIF orientation, as `transformers.image_utils.load_image` does; the mode is kept
            # (load_image converts to 8-bit RGB, which would drop 16-bit precision and alpha).
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as error:
        # PIL.UnidentifiedImageError is an OSError; SyntaxError is what some plugins raise for corrupt headers.
        raise ValueError(
            f"Cannot read image file '{path}': {error}. Check that it is a complete image in a format Pillow "
            "reads (PNG, JPEG, WebP, TIFF, ...)."
        ) from error


def _pil_to_array(image: PIL.Image.Image, what: str) -> tuple[np.ndarray, float | None]:
    """PIL image → (H, W) or (H, W, C) array and the scale to [0, 1] (None: infer from the dtype)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{what}: the image is empty ({image.width} x {image.height}).")
    mode = image.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA", "F"):
        return np.asarray(image), None
    if mode.startswith("I;16"):
        # Pillow's 16-bit grayscale (e.g. 16-bit PNG); any byte order, converted by astype later.
        return np.asarray(image), 1 / 65535
    if mode == "I":
        # 32-bit signed; Pillow opens 16-bit data of some formats (TIFF, PGM, older PNG plugins) in this mode.
        array = np.asarray(image)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"{what}: mode 'I' image with values {low}..{high}; only 0..65535 (16-bit) is supported. "
                "Rescale it to 0..65535 or to a float image in [0, 1]."
            )
        return array, 1 / 65535
    if mode in ("P", "PA"):
        # A palette may carry transparency (a transparent index or an alpha palette): keep it to composite.
        has_alpha = mode == "PA" or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB")), None
    if mode == "La":
        return np.asarray(image.convert("LA")), None
    if mode == "RGBa":
        return np.asarray(image.convert("RGBA")), None
    try:
        # CMYK (Pillow's naive, profile-free conversion), RGBX, YCbCr, HSV, LAB, ...
        return np.asarray(image.convert("RGB")), None
    except (ValueError, OSError) as error:
        raise ValueError(f"{what}: cannot convert a PIL image of mode {mode!r} to RGB: {error}") from error


def _numpy_to_tensor(array: np.ndarray, what: str) -> tuple[torch.Tensor, str]:
    """numpy → (torch tensor, kind of the source dtype: "bool" / "uint8" / "uint16" / "int" / "float").

    Wider types are cast to float32 here (torch has few kernels for uint16 / uint32, and float32 holds every
    integer up to 2**24 exactly); uint8 and bool are shared with the array without a copy.
    """
    dtype = array.dtype
    if dtype.kind == "b":
        return shared_tensor(array), "bool"
    if dtype.kind == "u" and dtype.itemsize == 1:
        return shared_tensor(array), "uint8"
    if dtype.kind in "iu":
        kind = "uint16" if dtype.kind == "u" and dtype.itemsize == 2 else "int"
    elif dtype.kind == "f":
        kind = "float"
        if dtype.itemsize > 4 and array.size:
            # Check before the cast: float32 turns values beyond ±3.4e38 into inf, which the later check would
            # misreport as "NaN or inf" for an image that merely has the wrong range.
            _check_float_values(bool(np.isfinite(array).all()), float(np.min(array)), float(np.max(array)), what)
    else:
        raise ValueError(
            f"{what}: unsupported dtype {dtype}; use bool, uint8, uint16, another integer type or a real float."
        )
    # astype also brings byte-swapped data (e.g. Pillow's big-endian 'I;16B') to native order.
    return shared_tensor(array.astype(np.float32, copy=False)), kind


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """`torch.from_numpy` without its warning for read-only arrays (np.asarray of a PIL image is one): the
    tensor is only ever read, every later step works out of place.

    Arrays with negative strides (`image[::-1]`, OpenCV's BGR -> RGB `image[..., ::-1]`) are copied first: torch
    tensors cannot have negative strides. (`copy`, not `np.ascontiguousarray`: numpy calls an array with a negative
    stride on a length-1 axis contiguous and would return it unchanged.)"""
    if any(stride < 0 for stride in array.strides):
        array = array.copy()
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _torch_to_tensor(tensor: torch.Tensor, what: str) -> tuple[torch.Tensor, str]:
    """torch → (CPU tensor, kind of its dtype), as `_numpy_to_tensor`."""
    if tensor.device.type == "meta":
        raise ValueError(
            f"{what}: the tensor is on the meta device and holds no data; pass a tensor with real values."
        )
    tensor = tensor.detach().cpu()
    if tensor.layout != torch.strided:  # sparse and other layouts: the checks below need dense values
        tensor = tensor.to_dense()
    dtype = tensor.dtype
    if dtype == torch.bool:
        return tensor, "bool"
    if dtype == torch.uint8:
        return tensor, "uint8"
    if dtype.is_complex:
        raise ValueError(f"{what}: unsupported dtype {dtype}; use an integer or real floating-point type.")
    if dtype.is_floating_point:
        if dtype == torch.float64 and tensor.numel():  # check before float32 overflows huge values to inf
            finite = bool(torch.isfinite(tensor).all())
            low, high = (v.item() for v in torch.aminmax(tensor)) if finite else (0.0, 0.0)
            _check_float_values(finite, low, high, what)
        return tensor.to(torch.float32), "float"
    return tensor.to(torch.float32), "uint16" if dtype == torch.uint16 else "int"


def _channels_first(values: torch.Tensor, prefer_first: bool, what: str) -> torch.Tensor:
    """(H, W), (H, W, C) or (C, H, W) → a (C, H, W) view; `prefer_first` decides when both ends could be channels
    (torch tensors: channels-first, the torchvision convention; numpy and PIL: channels-last)."""
    shape = tuple(values.shape)
    if values.ndim not in (2, 3):
        raise ValueError(
            f"{what}: expected an image of shape (H, W), (H, W, C) or (C, H, W) (or a 4-D batch), got "
            f"{values.ndim}-D shape {shape}."
        )
    if values.numel() == 0:
        raise ValueError(f"{what}: the image is empty (shape {shape}); every side must be at least 1 pixel.")
    if values.ndim == 2:
        return values[None]
    first_is_channel, last_is_channel = shape[0] <= 4, shape[-1] <= 4
    if first_is_channel and (prefer_first or not last_is_channel):
        return values
    if last_is_channel:
        return values.permute(2, 0, 1)
    raise ValueError(
        f"{what}: unsupported channel count in shape {shape}. Expected 1 (gray), 2 (gray + alpha), "
        "3 (RGB) or 4 (RGBA) channels, as (H, W, C) or (C, H, W)."
    )


def _checked(decoded: DecodedImage) -> DecodedImage:
    """Reject NaN / inf and out-of-range values now, while the image is read (so the first bad image of a batch is
    the one named, and the float work after never fails); resolve the bit depth of integers that do not say it."""
    values, kind, scale, what = decoded
    if kind == "float" and values.numel():
        finite = bool(torch.isfinite(values).all())
        low, high = (v.item() for v in torch.aminmax(values)) if finite else (0.0, 0.0)
        _check_float_values(finite, low, high, what)
    if kind == "int" and scale is None:
        # An integer type that does not say its bit depth (int32 / int64, e.g. from torch.randint): infer it.
        low, high = (v.item() for v in torch.aminmax(values))
        if low < 0 or high > 65535:
            raise ValueError(
                f"{what}: integer image with values {low:.0f}..{high:.0f}; expected 0..255 (8-bit) or 0..65535 "
                "(16-bit). Rescale it, or pass a float image in [0, 1]."
            )
        return decoded._replace(scale=1 / 255 if high <= 255 else 1 / 65535)
    return decoded


def _to_unit_float(values: torch.Tensor, kind: str, scale: float | None) -> torch.Tensor:
    """Integer levels or float values (already checked by `_checked`) → float32 in [0, 1].

    The result keeps the memory layout of `values`: a (C, H, W) view of a channels-last (H, W, C) array stays
    channels-last. Casting it to channels-first would be a transposing copy (for a 512 x 512 photo, most of the
    conversion's time), while the resize reads either layout and gives the same numbers.
    """
    if kind == "bool":
        return values.to(torch.float32)
    if kind == "float":
        # Out of place: `values` may be the caller's own tensor or array.
        return values.clamp(0, 1)
    if scale is None:
        scale = 1 / 255 if kind == "uint8" else 1 / 65535
    # In place is safe here: uint8 is copied by the cast, and wider integers were already copied to float32.
    return values.to(torch.float32).mul_(scale)


def _check_float_values(finite: bool, low: float, high: float, what: str) -> None:
    """Reject float images with NaN / inf, or with values outside [0, 1] beyond the clamping tolerance."""
    if not finite:
        raise ValueError(f"{what}: the image contains NaN or inf values; replace them before processing.")
    if low < -FLOAT_RANGE_TOLERANCE or high > 1 + FLOAT_RANGE_TOLERANCE:
        raise ValueError(
            f"{what}: float images must hold values in [0, 1], got {low:.4g}..{high:.4g}. Divide 0-255 data "
            "by 255 (or pass it as uint8), and pass images before any normalisation."
        )


__all__ = ["DecodedImage", "decode_image", "decoded_to_rgb", "flatten_images", "shared_tensor", "stack_decoded"]
