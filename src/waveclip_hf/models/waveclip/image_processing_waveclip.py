"""Image processor for WaveCLIP: any image → RGB → YCbCr → per-channel normalisation → packed L-level DWT.

`WaveCLIPImageProcessor` turns PIL images, numpy arrays, torch tensors or image files into `pixel_values` of
shape (B, 3, S, S): the coefficients of an L-level 2-D DWT of the normalised YCbCr image, packed in the Mallat
layout of `wavelet_layout.py` (approximation top-left, then H / V / D quadrants level by level). The packed
tensor has the shape of an image, so pipelines, collators and `datasets.map` move it like any `pixel_values`.

This file ships with saved models as remote code (`trust_remote_code=True`): it imports only torch, numpy,
PIL, ptwt, pywt, transformers and its sibling `wavelet_layout.py` (relative import). Pictures of the subband
pyramid live with the other figures (`waveclip_hf.figures`), outside the shipped files.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import ptwt
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .wavelet_layout import check_packable, pack_coefficients, unpack_coefficients


# PyWavelets is imported as `pywt`, a name pip does not install: for a missing import transformers' remote-code
# check would say `pip install pywt`. It skips imports inside `try`, so the message is ours and names the package.
try:
    import pywt
except ImportError as error:
    raise ImportError(
        "WaveCLIP's image processor needs PyWavelets (imported as `pywt`): `pip install PyWavelets`."
    ) from error


logger = logging.get_logger(__name__)

# Full-range BT.601 (JPEG / JFIF) RGB → YCbCr for values in [0, 1]: ycbcr = M @ rgb + offset.
# Kept as Python floats, not tensors: transformers v5 may import remote code while a meta-device context is
# active, and a module-level tensor would then be created on the meta device.
_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
_YCBCR_OFFSET = (0.0, 0.5, 0.5)
# The exact inverse of the matrix above rather than JPEG's rounded 1.402 / 0.344136 / ...: with the rounded
# constants the round trip is off by ~1e-6, which would eat into the processor's < 1e-4 inversion budget.
_YCBCR_TO_RGB = tuple(tuple(float(v) for v in row) for row in np.linalg.inv(np.array(_RGB_TO_YCBCR)))

# Default normalisation of the Y, Cb, Cr channels.
# - Means: OpenAI CLIP's RGB normalisation mean (0.4815, 0.4578, 0.4082), web-photo statistics the teacher
#   already uses, mapped through the matrix above (a linear map sends means to means exactly). scikit-image's
#   colour photos (astronaut, coffee, chelsea, rocket) give (0.379, 0.461, 0.566) pooled: the same ballpark,
#   but four warm-toned pictures are too small a sample to set a default from.
# - Stds: Y 0.265 is CLIP's RGB std (0.269, 0.261, 0.276) through the luma row, assuming fully correlated R, G, B
#   (nearly true for natural images: luma carries almost all the variance). Chroma std cannot be derived from
#   per-channel RGB stds (it is the decorrelated part), so it is measured: pooled over the four photos above,
#   Cb 0.082 and Cr 0.093. Chroma is ~3x less spread than luma, so dividing by its own std puts the three
#   channels on the same scale for the patch projections.
WAVECLIP_YCBCR_MEAN = (0.4592, 0.4712, 0.5158)
WAVECLIP_YCBCR_STD = (0.2650, 0.0820, 0.0930)

# A float image outside [0, 1] by more than this is taken to be in another range (0-255, or already normalised)
# and rejected; inside it, small overshoots (from an upstream bicubic resize, say) are clamped.
_FLOAT_RANGE_TOLERANCE = 0.05

# Above this aspect ratio the source is cut to its centre before resizing, so that a 1 x 100000 strip does not
# become a 224 x 22 million intermediate image. Only the central square survives the crop anyway.
_MAX_ASPECT_BEFORE_PRECROP = 4

_TORCH_INTERPOLATION = {
    PILImageResampling.NEAREST: "nearest-exact",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}
CHANNEL_NAMES = ("Y", "Cb", "Cr")


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """Full-range BT.601 (JPEG) RGB → YCbCr, in floating point.

    Args:
        rgb: (..., 3, H, W) float tensor, RGB in [0, 1].

    Returns:
        (..., 3, H, W) tensor of the same dtype: Y in [0, 1], Cb and Cr in [0, 1] centred on 0.5.
    """
    _check_three_channels(rgb, "rgb_to_ycbcr")
    matrix = torch.tensor(_RGB_TO_YCBCR, dtype=rgb.dtype, device=rgb.device)
    offset = torch.tensor(_YCBCR_OFFSET, dtype=rgb.dtype, device=rgb.device)
    return torch.einsum("ij,...jhw->...ihw", matrix, rgb) + offset[:, None, None]


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_ycbcr` (exact to floating-point rounding).

    Args:
        ycbcr: (..., 3, H, W) float tensor, full-range YCbCr.

    Returns:
        (..., 3, H, W) RGB tensor of the same dtype, not clamped (clamp for display).
    """
    _check_three_channels(ycbcr, "ycbcr_to_rgb")
    matrix = torch.tensor(_YCBCR_TO_RGB, dtype=ycbcr.dtype, device=ycbcr.device)
    offset = torch.tensor(_YCBCR_OFFSET, dtype=ycbcr.dtype, device=ycbcr.device)
    return torch.einsum("ij,...jhw->...ihw", matrix, ycbcr - offset[:, None, None])


def _check_three_channels(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"{name} expects a floating-point torch tensor, got {type(tensor).__name__}.")
    if tensor.ndim < 3 or tensor.shape[-3] != 3:
        raise ValueError(f"{name} expects a tensor of shape (..., 3, H, W), got {tuple(tensor.shape)}.")


def _check_wavelet(wavelet: str) -> None:
    """Raise a `ValueError` unless `wavelet` is a discrete wavelet whose DWT halves every side exactly."""
    try:
        filter_length = pywt.Wavelet(wavelet).dec_len
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Unknown wavelet {wavelet!r}: use a discrete wavelet name from `pywt.wavelist(kind='discrete')`, "
            "e.g. 'haar'."
        ) from error
    # ptwt.wavedec2 pads by (2 * filter_length - 3) // 2 on each side (it has no 'periodization' mode), so a
    # level maps n samples to n / 2 exactly only for two-tap filters; longer filters give n / 2 + (length - 2) / 2
    # coefficients, which do not fit the image-shaped packed layout.
    if filter_length != 2:
        two_tap = [name for name in pywt.wavelist(kind="discrete") if pywt.Wavelet(name).dec_len == 2]
        raise ValueError(
            f"Wavelet {wavelet!r} has {filter_length}-tap filters: its DWT does not halve the image exactly, so the "
            f"coefficients cannot be packed into an image-shaped tensor. Use a two-tap wavelet: {two_tap}."
        )


def _check_settings(image_size, wavelet, levels, image_mean, image_std, resample) -> tuple:
    """Validate processor settings; return (image_mean, image_std, resample) in canonical form."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive integer, got {image_size!r}.")
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise ValueError(f"`levels` must be an integer, got {levels!r}.")
    check_packable(int(image_size), int(levels))
    if not isinstance(wavelet, str):
        raise ValueError(f"`wavelet` must be a wavelet name (str) such as 'haar', got {type(wavelet).__name__}.")
    _check_wavelet(wavelet)
    stats = []
    for name, value in (("image_mean", image_mean), ("image_std", image_std)):
        values = (value,) * 3 if isinstance(value, numbers.Real) else tuple(value)
        if len(values) != 3 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
            raise ValueError(f"`{name}` must be one finite number or three (Y, Cb, Cr), got {value!r}.")
        stats.append(tuple(float(v) for v in values))
    if min(stats[1]) <= 0:
        raise ValueError(f"`image_std` must be positive, got {image_std!r}.")
    try:
        resample = PILImageResampling(resample)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`resample` must be a PIL resampling filter (e.g. PILImageResampling.BICUBIC), got {resample!r}."
        ) from error
    return stats[0], stats[1], resample


class WaveCLIPImageProcessorKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus the WaveCLIP settings, so `from_pretrained(..., levels=2)` overrides them.

    Attributes:
        image_size (`int`): side S of the square output.
        wavelet (`str`): pywt name of a two-tap wavelet ('haar').
        levels (`int`): number of DWT levels L; S must be divisible by 2**L.
    """

    image_size: int
    wavelet: str
    levels: int


class WaveCLIPImageProcessor(BaseImageProcessor):
    r"""
    Constructs a WaveCLIP image processor: images → packed wavelet coefficients of their YCbCr colours.

    For each image: convert to float RGB in [0, 1] (grayscale is replicated, alpha is composited on white,
    palette / CMYK / 16-bit are converted, see below); resize the shortest side to `image_size` (antialiased,
    in float32 so 16-bit inputs keep their precision) and centre-crop to `image_size` x `image_size`; convert to
    full-range BT.601 YCbCr (in float, not Pillow's 8-bit `convert("YCbCr")`); normalise each channel with
    `image_mean` / `image_std`. Then, on the whole batch at once, a `levels`-level 2-D DWT with ptwt in float32,
    packed in the Mallat layout. `inverse` undoes all of it after the crop.

    Accepted inputs, alone or in a list (a 4-D array or tensor is a batch):
    - PIL images of any mode: 1, L, LA, P / PA, RGB, RGBA, RGBX, CMYK, YCbCr, I;16* (divided by 65535),
      I (32-bit; Pillow's mode for some 16-bit files, so also divided by 65535 and checked to lie in 0..65535),
      F (float, in [0, 1]).
    - numpy arrays and torch tensors (H, W), (H, W, C) or (C, H, W) with C = 1 (gray), 2 (gray + alpha),
      3 (RGB) or 4 (RGBA). When both ends could be channels, numpy arrays are read channels-last (the
      PIL / numpy convention) and torch tensors channels-first (the torchvision convention). dtypes: bool,
      uint8 (/ 255), uint16 (/ 65535), other integers (/ 255 if all values fit in 0..255, else / 65535 if they
      fit in 0..65535), floats (already in [0, 1]; up to 0.05 outside is clamped, more is an error).
    - paths (`str` / `os.PathLike`) to image files, opened with Pillow and turned upright with their EXIF
      orientation (as `transformers.image_utils.load_image` does); `http(s)://` URLs go to `load_image`.

    Alpha is composited on white rather than dropped: the colour under fully transparent pixels is arbitrary
    (often black or leftover paint), while transparent logos and icons are drawn to be seen on white pages.

    Args:
        image_size (`int`, *optional*, defaults to 224):
            Side S of the square image, and so of `pixel_values`. Must be divisible by `2**levels`.
        wavelet (`str`, *optional*, defaults to `"haar"`):
            pywt name of the wavelet. Only two-tap wavelets ('haar', 'db1', 'bior1.1', 'rbio1.1') are accepted:
            ptwt's `wavedec2` has no periodization mode, and with longer filters a level does not halve the
            size, so the coefficients would not pack into an S x S tensor.
        levels (`int`, *optional*, defaults to 1):
            Number of DWT levels L.
        image_mean (`float` or `tuple[float, float, float]`, *optional*, defaults to `(0.4592, 0.4712, 0.5158)`):
            Per-channel (Y, Cb, Cr) mean subtracted before the DWT; see `WAVECLIP_YCBCR_MEAN` for where it comes from.
        image_std (`float` or `tuple[float, float, float]`, *optional*, defaults to `(0.265, 0.082, 0.093)`):
            Per-channel (Y, Cb, Cr) standard deviation divided by before the DWT.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BICUBIC`):
            Resampling filter. BILINEAR and BICUBIC run in torch, antialiased with Pillow's kernels; NEAREST in
            torch too ("nearest-exact", Pillow's pixel-centre rule); LANCZOS, BOX and HAMMING run in Pillow on
            float32 ("F" mode) images, one channel at a time (slower).
        do_resize (`bool`, *optional*, defaults to `True`):
            Resize before cropping. With `do_center_crop=False` the image is resized to S x S directly
            (aspect ratio not kept); with `do_resize=False` the image must be at least S x S (crop) or exactly
            S x S (no crop).
        do_center_crop (`bool`, *optional*, defaults to `True`):
            Centre-crop to S x S after resizing the shortest side to S.

    Example:

    ```python
    >>> from PIL import Image
    >>> processor = WaveCLIPImageProcessor(levels=2)
    >>> inputs = processor(Image.new("RGB", (640, 480), "tomato"), return_tensors="pt")
    >>> inputs["pixel_values"].shape
    torch.Size([1, 3, 224, 224])
    >>> processor.inverse(inputs["pixel_values"]).shape  # RGB again
    torch.Size([1, 3, 224, 224])
    ```
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = WaveCLIPImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 224,
        wavelet: str = "haar",
        levels: int = 1,
        image_mean: float | Sequence[float] = WAVECLIP_YCBCR_MEAN,
        image_std: float | Sequence[float] = WAVECLIP_YCBCR_STD,
        resample: PILImageResampling | int = PILImageResampling.BICUBIC,
        do_resize: bool = True,
        do_center_crop: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        image_mean, image_std, resample = _check_settings(image_size, wavelet, levels, image_mean, image_std, resample)
        self.image_size = int(image_size)
        self.wavelet = wavelet
        self.levels = int(levels)
        self.image_mean = image_mean
        self.image_std = image_std
        self.resample = resample
        self.do_resize = bool(do_resize)
        self.do_center_crop = bool(do_center_crop)

    # Settings `preprocess` accepts as per-call overrides.
    _setting_names = (
        "image_size",
        "wavelet",
        "levels",
        "image_mean",
        "image_std",
        "resample",
        "do_resize",
        "do_center_crop",
    )

    def preprocess(self, images=None, return_tensors=None, **kwargs) -> BatchFeature:
        r"""
        Turn one image or a batch of images into packed wavelet coefficients.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str`, `os.PathLike`, or a list of them):
                The images; see the class docstring for the accepted kinds. Sizes may differ within a batch.
            return_tensors (`str` or `TensorType`, *optional*):
                `"pt"` or `"np"`; by default `pixel_values` is a torch tensor.
            kwargs:
                Per-call overrides of the settings: `image_size`, `wavelet`, `levels`, `image_mean`, `image_std`,
                `resample`, `do_resize`, `do_center_crop`. Other standard `ImagesKwargs` are ignored with a warning.

        Returns:
            `BatchFeature` with `pixel_values` of shape (B, 3, S, S), float32: the `levels`-level DWT of the
            normalised YCbCr images in the Mallat layout (see `wavelet_layout.py`).

        Raises:
            `ValueError`: for an empty batch, an unreadable file, an unsupported type, rank, channel count or dtype,
                an empty image, NaN / inf values, out-of-range floats, or invalid settings.
        """
        settings = self._resolve_settings(kwargs)
        flat = _flatten_images(images)
        rgb = [
            _resize_and_crop(_to_float_rgb(image, index), index, **settings["geometry"])
            for index, image in enumerate(flat)
        ]
        pixel_values = self._encode(torch.stack(rgb), **settings["transform"])
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _resolve_settings(self, overrides: dict) -> dict:
        unknown = [key for key in overrides if key not in self.valid_kwargs.__annotations__]
        if unknown:
            raise TypeError(f"WaveCLIPImageProcessor.preprocess got unexpected keyword arguments {unknown}.")
        ignored = [k for k, v in overrides.items() if k not in self._setting_names and v is not None]
        if ignored:
            logger.warning_once(f"WaveCLIPImageProcessor ignores the arguments {ignored}.")
        values = {name: overrides.get(name) for name in self._setting_names}
        values = {name: getattr(self, name) if value is None else value for name, value in values.items()}
        image_mean, image_std, resample = _check_settings(
            values["image_size"],
            values["wavelet"],
            values["levels"],
            values["image_mean"],
            values["image_std"],
            values["resample"],
        )
        return {
            "geometry": {
                "size": int(values["image_size"]),
                "resample": resample,
                "do_resize": bool(values["do_resize"]),
                "do_center_crop": bool(values["do_center_crop"]),
            },
            "transform": {
                "wavelet": values["wavelet"],
                "levels": int(values["levels"]),
                "image_mean": image_mean,
                "image_std": image_std,
            },
        }

    @staticmethod
    def _encode(rgb: torch.Tensor, wavelet: str, levels: int, image_mean, image_std) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] → (B, 3, S, S) float32 packed DWT of the normalised YCbCr image."""
        # Colour transform and normalisation are one affine map, (M rgb + offset - mean) / std, applied in one
        # pass over the batch instead of three; its coefficients are folded in float64.
        std = np.asarray(image_std, dtype=np.float64)
        matrix = torch.from_numpy(np.asarray(_RGB_TO_YCBCR) / std[:, None]).to(rgb.dtype)
        bias = torch.from_numpy((np.asarray(_YCBCR_OFFSET) - np.asarray(image_mean)) / std).to(rgb.dtype)
        batch, _, height, width = rgb.shape
        normalised = torch.baddbmm(
            bias[None, :, None].expand(batch, 3, 1),
            matrix[None].expand(batch, 3, 3),
            rgb.reshape(batch, 3, height * width),
        ).view(batch, 3, height, width)
        # ptwt computes in the input dtype and has no fp16 / bf16 kernels: the DWT stays in float32, and a model
        # in half precision casts `pixel_values` after. With two-tap filters there is no padding, so `mode` does
        # not change the result; "zero" just makes that explicit.
        coefficients = ptwt.wavedec2(normalised, wavelet, level=levels, mode="zero")
        return pack_coefficients(coefficients).contiguous()

    def unpack(self, pixel_values, levels: int | None = None) -> list:
        """Split packed `pixel_values` into their subbands.

        Args:
            pixel_values: (B, 3, S, S) or (3, S, S) tensor / array, or the processor's `BatchFeature`.
            levels: number of DWT levels L it holds; defaults to `self.levels`.

        Returns:
            `[A_L, (H_L, V_L, D_L), ..., (H_1, V_1, D_1)]` (the `ptwt.wavedec2` structure): torch views of shape
            (..., 3, S / 2**j, S / 2**j) for level j, coarsest first.
        """
        return unpack_coefficients(as_packed_tensor(pixel_values), self.levels if levels is None else levels)

    def inverse(
        self,
        pixel_values,
        to: str = "rgb",
        levels: int | None = None,
        wavelet: str | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Undo the processor after the resize and crop: inverse DWT, undo the normalisation, back to RGB.

        Args:
            pixel_values: (B, 3, S, S) or (3, S, S) packed coefficients (tensor / array / `BatchFeature`).
            to: `"rgb"` for RGB in [0, 1] (up to reconstruction error, not clamped) or `"ycbcr"` for
                full-range YCbCr.
            levels, wavelet, image_mean, image_std: the settings used to make `pixel_values`, if they were
                overridden in the call; default to the processor's.

        Returns:
            Float tensor of the same shape as `pixel_values` (float32 unless given float64). Reconstruction error on
            real photos is ~1e-6 in float32.
        """
        if to not in ("rgb", "ycbcr"):
            raise ValueError(f"`to` must be 'rgb' or 'ycbcr', got {to!r}.")
        levels = self.levels if levels is None else levels
        wavelet = self.wavelet if wavelet is None else wavelet
        packed = as_packed_tensor(pixel_values)
        image_mean, image_std, _ = _check_settings(
            packed.shape[-1],
            wavelet,
            levels,
            self.image_mean if image_mean is None else image_mean,
            self.image_std if image_std is None else image_std,
            self.resample,
        )
        if packed.dtype != torch.float64:
            packed = packed.to(torch.float32)
        normalised = ptwt.waverec2(unpack_coefficients(packed, levels), wavelet)
        mean = torch.tensor(image_mean, dtype=packed.dtype, device=packed.device)[:, None, None]
        std = torch.tensor(image_std, dtype=packed.dtype, device=packed.device)[:, None, None]
        ycbcr = normalised * std + mean
        return ycbcr_to_rgb(ycbcr) if to == "rgb" else ycbcr


def as_packed_tensor(pixel_values) -> torch.Tensor:
    """Accept a tensor, array or `BatchFeature`; check it is (..., 3, S, S); return a float torch tensor."""
    if isinstance(pixel_values, (BatchFeature, dict)):
        pixel_values = pixel_values["pixel_values"]
    if isinstance(pixel_values, np.ndarray):
        pixel_values = _shared_tensor(pixel_values)
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise ValueError(
            f"Expected packed `pixel_values` as a float tensor or array, got {type(pixel_values).__name__}."
        )
    shape = tuple(pixel_values.shape)
    if len(shape) not in (3, 4) or shape[-3] != 3 or shape[-1] != shape[-2]:
        raise ValueError(f"Expected packed `pixel_values` of shape (B, 3, S, S) or (3, S, S), got {shape}.")
    return pixel_values


# ---------------------------------------------------------------------------------------------------------------
# Input conversion: anything → (3, H, W) float32 RGB in [0, 1]
# ---------------------------------------------------------------------------------------------------------------


def _flatten_images(images) -> list:
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


def _to_float_rgb(image: Any, index: int) -> torch.Tensor:
    """Convert one image of any accepted kind to a (3, H, W) float32 RGB tensor in [0, 1]."""
    what = f"Image {index}"
    if isinstance(image, (str, os.PathLike)):
        what = f"Image {index} ('{os.fspath(image)}')"
        image = _open_image(image)
    if isinstance(image, PIL.Image.Image):
        array, scale = _pil_to_array(image, what)
        values, kind = _numpy_to_tensor(array, what)
        return _array_to_rgb(values, kind, scale=scale, channels_first=False, what=what)
    if isinstance(image, np.ndarray):
        values, kind = _numpy_to_tensor(image, what)
        return _array_to_rgb(values, kind, scale=None, channels_first=False, what=what)
    if isinstance(image, torch.Tensor):
        values, kind = _torch_to_tensor(image, what)
        return _array_to_rgb(values, kind, scale=None, channels_first=True, what=what)
    raise ValueError(
        f"{what}: unsupported type {type(image).__name__}. Pass a PIL image, a numpy array, a torch tensor or a "
        "path to an image file (or a list of them)."
    )


def _open_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open and fully decode an image file (or URL); turn every failure into a `ValueError` naming the path."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path.startswith(("http://", "https://")):
        from transformers.image_utils import load_image

        try:
            return load_image(path)
        except Exception as error:  # network and decoding errors alike: the URL is what the user can fix
            raise ValueError(f"Cannot load image from URL '{path}': {error}") from error
    if not os.path.isfile(path):
        raise ValueError(f"Cannot read image file '{path}': no such file.")
    try:
        with PIL.Image.open(path) as image:
            # `load()` decodes now, so a truncated file fails here and not later inside numpy.
            image.load()
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
        return _shared_tensor(array), "bool"
    if dtype.kind == "u" and dtype.itemsize == 1:
        return _shared_tensor(array), "uint8"
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
    return _shared_tensor(array.astype(np.float32, copy=False)), kind


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
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


def _array_to_rgb(
    values: torch.Tensor, kind: str, *, scale: float | None, channels_first: bool, what: str
) -> torch.Tensor:
    """(H, W), (H, W, C) or (C, H, W) tensor → (3, H, W) float32 RGB in [0, 1].

    Args:
        values: the image (may share memory with the caller's input: never modified in place).
        kind: the source dtype kind ("bool", "uint8", "uint16", "int", "float"), which sets the scale to [0, 1].
        scale: factor to [0, 1] for integer data when the caller knows the bit depth (PIL modes), else None.
        channels_first: prefer (C, H, W) when both the first and the last axis could be channels.
        what: how error messages name the image.
    """
    shape = tuple(values.shape)
    if values.ndim not in (2, 3):
        raise ValueError(
            f"{what}: expected an image of shape (H, W), (H, W, C) or (C, H, W) (or a 4-D batch), got "
            f"{values.ndim}-D shape {shape}."
        )
    if values.numel() == 0:
        raise ValueError(f"{what}: the image is empty (shape {shape}); every side must be at least 1 pixel.")
    if values.ndim == 2:
        values = values[None]
    else:
        first_is_channel, last_is_channel = shape[0] <= 4, shape[-1] <= 4
        if first_is_channel and (channels_first or not last_is_channel):
            pass
        elif last_is_channel:
            values = values.permute(2, 0, 1)
        else:
            raise ValueError(
                f"{what}: unsupported channel count in shape {shape}. Expected 1 (gray), 2 (gray + alpha), "
                "3 (RGB) or 4 (RGBA) channels, as (H, W, C) or (C, H, W)."
            )
    values = _to_unit_float(values, kind, scale, what)

    channels = values.shape[0]
    if channels == 1:
        return values.expand(3, -1, -1)
    if channels == 3:
        return values
    # Alpha is composited on white (see the class docstring for why), in float so 16-bit alpha keeps its precision.
    colour, alpha = values[:-1], values[-1:]
    return (colour * alpha + (1 - alpha)).expand(3, -1, -1)


def _to_unit_float(values: torch.Tensor, kind: str, scale: float | None, what: str) -> torch.Tensor:
    """Integer levels or float values → float32 in [0, 1]; reject NaN / inf and out-of-range data.

    The result keeps the memory layout of `values`: a (C, H, W) view of a channels-last (H, W, C) array stays
    channels-last. Casting it to channels-first would be a transposing copy (for a 512 x 512 photo, most of the
    conversion's time), while the resize reads either layout and gives the same numbers.
    """
    if kind == "bool":
        return values.to(torch.float32)
    if kind == "float":
        finite = bool(torch.isfinite(values).all())
        low, high = (v.item() for v in torch.aminmax(values)) if finite else (0.0, 0.0)
        _check_float_values(finite, low, high, what)
        # Out of place: `values` may be the caller's own tensor or array.
        return values.clamp(0, 1)
    if scale is None and kind == "uint8":
        scale = 1 / 255
    elif scale is None and kind == "uint16":
        scale = 1 / 65535
    elif scale is None:
        # An integer type that does not say its bit depth (int32 / int64, e.g. from torch.randint): infer it.
        low, high = (v.item() for v in torch.aminmax(values))
        if low < 0 or high > 65535:
            raise ValueError(
                f"{what}: integer image with values {low:.0f}..{high:.0f}; expected 0..255 (8-bit) or 0..65535 "
                "(16-bit). Rescale it, or pass a float image in [0, 1]."
            )
        scale = 1 / 255 if high <= 255 else 1 / 65535
    # In place is safe here: uint8 is copied by the cast, and wider integers were already copied to float32.
    return values.to(torch.float32).mul_(scale)


def _check_float_values(finite: bool, low: float, high: float, what: str) -> None:
    """Reject float images with NaN / inf, or with values outside [0, 1] beyond the clamping tolerance."""
    if not finite:
        raise ValueError(f"{what}: the image contains NaN or inf values; replace them before processing.")
    if low < -_FLOAT_RANGE_TOLERANCE or high > 1 + _FLOAT_RANGE_TOLERANCE:
        raise ValueError(
            f"{what}: float images must hold values in [0, 1], got {low:.4g}..{high:.4g}. Divide 0-255 data "
            "by 255 (or pass it as uint8), and pass images before any normalisation."
        )


def _resize_and_crop(
    image: torch.Tensor, index: int, *, size: int, resample: PILImageResampling, do_resize: bool, do_center_crop: bool
) -> torch.Tensor:
    """(3, H, W) float RGB → (3, size, size): resize the shortest side to `size`, centre-crop, clamp to [0, 1]."""
    height, width = image.shape[-2:]
    if do_resize and do_center_crop:
        short, long = min(height, width), max(height, width)
        if long > _MAX_ASPECT_BEFORE_PRECROP * short:
            # Keep the central square plus the widest kernel's reach on each side (Lanczos: 3 output pixels,
            # i.e. 3 * short / size source pixels when downscaling, 3 when upscaling) and a pixel of slack. The
            # crop then covers the same centre up to a sub-pixel shift.
            keep = min(long, short + 2 * math.ceil(3 * max(1.0, short / size)) + 2)
            start = (long - keep) // 2
            image = image[..., start : start + keep, :] if height > width else image[..., start : start + keep]
            height, width = image.shape[-2:]
            long = keep
        # Same rounding as transformers' `get_resize_output_image_size`, so sizes match CLIPImageProcessor's.
        new_long = max(size, int(size * long / short))
        target = (new_long, size) if height > width else (size, new_long)
    elif do_resize:
        target = (size, size)
    else:
        target = (height, width)
        needed = "at least" if do_center_crop else "exactly"
        if height < size or width < size or not do_center_crop and (height, width) != (size, size):
            raise ValueError(
                f"Image {index}: with do_resize=False the image must be {needed} {size} x {size}, got "
                f"{width} x {height}. Enable do_resize or resize it first."
            )
    if target != (height, width):
        image = _resize(image, target, resample)
        # Bicubic rings past the input range; clamp so the colour transform sees a valid RGB image, as it would
        # after an 8-bit resize.
        image = image.clamp_(0, 1)
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[..., top : top + size, left : left + size]


def _resize(image: torch.Tensor, target: tuple[int, int], resample: PILImageResampling) -> torch.Tensor:
    """Resize a (3, H, W) float32 image to `target` = (height, width) with Pillow's kernels, in float32."""
    mode = _TORCH_INTERPOLATION.get(resample)
    if mode is not None:
        # torch's antialiased bilinear / bicubic use Pillow's kernels (bicubic a = -0.5); measured within 2e-5 of
        # Pillow's float ("F") resize, and ~3x faster than it.
        kwargs = {} if mode == "nearest-exact" else {"antialias": True, "align_corners": False}
        return F.interpolate(image[None], size=target, mode=mode, **kwargs)[0]
    channels = [
        np.asarray(PIL.Image.fromarray(channel.numpy()).resize(target[::-1], resample=resample))
        for channel in image.contiguous()
    ]
    return torch.from_numpy(np.stack(channels))


__all__ = [
    "WAVECLIP_YCBCR_MEAN",
    "WAVECLIP_YCBCR_STD",
    "WaveCLIPImageProcessor",
    "rgb_to_ycbcr",
    "ycbcr_to_rgb",
]


# Saved processors carry `auto_map` and this file, so `AutoImageProcessor` loads them with trust_remote_code.
WaveCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
