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
from collections.abc import Sequence

import numpy as np
import PIL.Image
import ptwt
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType, logging

from .image_decoding_waveclip import decode_image, decoded_to_rgb, flatten_images, shared_tensor, stack_decoded
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

    def preprocess(self, images=None, return_tensors=None, device=None, **kwargs) -> BatchFeature:
        r"""
        Turn one image or a batch of images into packed wavelet coefficients.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str`, `os.PathLike`, or a list of them):
                The images; see the class docstring for the accepted kinds. Sizes may differ within a batch.
            return_tensors (`str` or `TensorType`, *optional*):
                `"pt"` or `"np"`; by default `pixel_values` is a torch tensor.
            device (`str` or `torch.device`, *optional*):
                Where `pixel_values` is returned (with `"pt"`). This processor works on the CPU and copies the
                result; [`WaveCLIPImageProcessorFast`] does the work on the device.
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
        flat = flatten_images(images)
        rgb = [
            _resize_and_crop(decoded_to_rgb(decode_image(image, index)), index, **settings["geometry"])
            for index, image in enumerate(flat)
        ]
        pixel_values = self._encode(torch.stack(rgb), **settings["transform"])
        return _batch_feature(pixel_values, device, return_tensors)

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
        matrix = torch.from_numpy(np.asarray(_RGB_TO_YCBCR) / std[:, None]).to(rgb.device, rgb.dtype)
        bias = torch.from_numpy((np.asarray(_YCBCR_OFFSET) - np.asarray(image_mean)) / std).to(rgb.device, rgb.dtype)
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

    def to_dict(self) -> dict:
        """The settings as saved. Both classes save the same file, as transformers' own backends do: the base
        class name as `image_processor_type`, and in `auto_map` the pair (this class, the fast one), from which
        `AutoImageProcessor` picks by `backend` / `use_fast`."""
        output = super().to_dict()
        output["image_processor_type"] = "WaveCLIPImageProcessor"
        auto_map = output.get("auto_map") or {}
        if "AutoImageProcessor" in auto_map:
            entry = auto_map["AutoImageProcessor"]
            module = (entry[0] if isinstance(entry, (list, tuple)) else entry).rsplit(".", 1)[0]
            auto_map["AutoImageProcessor"] = [f"{module}.{name}" for name in ("WaveCLIPImageProcessor", _FAST_NAME)]
        return output


_FAST_NAME = "WaveCLIPImageProcessorFast"


class WaveCLIPImageProcessorFast(WaveCLIPImageProcessor):
    r"""
    [`WaveCLIPImageProcessor`] batched and on a device: the same settings, files and `pixel_values` (equal within
    1e-5), made where the model runs.

    Each image is read on the CPU as the slow processor reads it (same inputs accepted, same errors), but kept in
    its source dtype; images of one size and kind are stacked and copied to `device` together (uint8: a quarter of
    float32's bytes), and there widened to float, resized and cropped in one call per size; the colour transform
    and the DWT run on the whole batch on the device. The tensors are the (C, H, W) tensors torchvision's
    transforms take, resized by the antialiased interpolation that torchvision's `resize` calls for float tensors;
    torch is all it needs.

    It is the model's torchvision-backend ("fast") image processor: `AutoImageProcessor.from_pretrained(folder,
    trust_remote_code=True, backend="torchvision")` (or `use_fast=True`) returns it, and transformers picks it by
    default where torchvision is installed; `backend="pil"` (or `use_fast=False`) gives [`WaveCLIPImageProcessor`].

    Example:

    ```python
    processor = WaveCLIPImageProcessorFast(levels=2)
    inputs = processor(images, return_tensors="pt", device=model.device)  # made on the model's GPU
    outputs = model(**inputs)
    ```
    """

    def preprocess(self, images=None, return_tensors=None, device=None, **kwargs) -> BatchFeature:
        r"""
        [`WaveCLIPImageProcessor.preprocess`], with the work done on `device` (default: the CPU).

        Returns:
            `BatchFeature` with `pixel_values` of shape (B, 3, S, S), float32, on `device` (with `"pt"`).
        """
        settings = self._resolve_settings(kwargs)
        device = torch.device("cpu") if device is None else torch.device(device)
        decoded = [decode_image(image, index) for index, image in enumerate(flatten_images(images))]
        crops: list = [None] * len(decoded)
        # On the CPU one image at a time: batching the resize measured no faster there (docs/benchmarks.md,
        # preprocessing), and one image at a time holds one full-size float image instead of the whole batch. On an
        # accelerator, one call per size.
        for indices in _batchable_groups(decoded, max_size=1 if device.type == "cpu" else len(decoded)):
            batch = stack_decoded([decoded[index] for index in indices]).to(device)
            resized = _resize_and_crop(decoded_to_rgb(batch), indices[0], **settings["geometry"])
            for position, index in enumerate(indices):
                crops[index] = resized[position]
        pixel_values = self._encode(torch.stack(crops), **settings["transform"])
        return _batch_feature(pixel_values, device, return_tensors)


def _batchable_groups(decoded: list, max_size: int) -> list[list[int]]:
    """Indices of images that can be widened, resized and cropped as one batch (same shape, dtype, kind and
    scale), at most `max_size` to a batch."""
    groups: dict = {}
    for index, image in enumerate(decoded):
        key = (tuple(image.values.shape), image.values.dtype, image.kind, image.scale)
        groups.setdefault(key, []).append(index)
    return [group[start : start + max_size] for group in groups.values() for start in range(0, len(group), max_size)]


def _batch_feature(pixel_values: torch.Tensor, device, return_tensors) -> BatchFeature:
    """`pixel_values` as a `BatchFeature`, on `device` for torch tensors (numpy arrays live on the CPU)."""
    if device is not None and return_tensors not in ("np", TensorType.NUMPY):
        pixel_values = pixel_values.to(device)
    elif return_tensors in ("np", TensorType.NUMPY):
        pixel_values = pixel_values.cpu()
    return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


def as_packed_tensor(pixel_values) -> torch.Tensor:
    """Accept a tensor, array or `BatchFeature`; check it is (..., 3, S, S); return a float torch tensor."""
    if isinstance(pixel_values, (BatchFeature, dict)):
        pixel_values = pixel_values["pixel_values"]
    if isinstance(pixel_values, np.ndarray):
        pixel_values = shared_tensor(pixel_values)
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise ValueError(
            f"Expected packed `pixel_values` as a float tensor or array, got {type(pixel_values).__name__}."
        )
    shape = tuple(pixel_values.shape)
    if len(shape) not in (3, 4) or shape[-3] != 3 or shape[-1] != shape[-2]:
        raise ValueError(f"Expected packed `pixel_values` of shape (B, 3, S, S) or (3, S, S), got {shape}.")
    return pixel_values


def _resize_and_crop(
    image: torch.Tensor, index: int, *, size: int, resample: PILImageResampling, do_resize: bool, do_center_crop: bool
) -> torch.Tensor:
    """(..., 3, H, W) float RGB → (..., 3, size, size): resize the shortest side to `size`, centre-crop, clamp to
    [0, 1]. A batch of images of one size is resized in one call; `index` names the first in errors."""
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
    """Resize (..., 3, H, W) float32 images to `target` = (height, width) with Pillow's kernels, in float32."""
    mode = _TORCH_INTERPOLATION.get(resample)
    if mode is not None:
        # torch's antialiased bilinear / bicubic use Pillow's kernels (bicubic a = -0.5); measured within 2e-5 of
        # Pillow's float ("F") resize, and ~3x faster than it. torchvision's `resize` calls the same function for
        # float tensors.
        kwargs = {} if mode == "nearest-exact" else {"antialias": True, "align_corners": False}
        resized = F.interpolate(image if image.ndim == 4 else image[None], size=target, mode=mode, **kwargs)
        return resized if image.ndim == 4 else resized[0]
    channels = [
        np.asarray(PIL.Image.fromarray(channel.numpy()).resize(target[::-1], resample=resample))
        for channel in image.reshape(-1, *image.shape[-2:]).cpu().contiguous()
    ]
    return torch.from_numpy(np.stack(channels)).reshape(*image.shape[:-2], *target).to(image.device)


__all__ = [
    "WAVECLIP_YCBCR_MEAN",
    "WAVECLIP_YCBCR_STD",
    "WaveCLIPImageProcessor",
    "WaveCLIPImageProcessorFast",
    "rgb_to_ycbcr",
    "ycbcr_to_rgb",
]


# Saved processors carry `auto_map` and this file, so `AutoImageProcessor` loads them with trust_remote_code.
WaveCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
WaveCLIPImageProcessorFast.register_for_auto_class("AutoImageProcessor")
