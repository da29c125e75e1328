"""Tests for `WaveCLIPImageProcessor`: an independent numpy / pywt reference, inversion, every input kind, the
error messages, save / load, and the subband-pyramid plot. Real photos come from scikit-image."""

import ast
import functools
import io
import json
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import numpy as np
import PIL.Image
import pytest
import pywt
import skimage.data
import torch
import torch.nn.functional as F

from waveclip_hf.figures.diagrams import plot_subband_pyramid
from waveclip_hf.models.waveclip import image_decoding_waveclip, image_processing_waveclip
from waveclip_hf.models.waveclip.image_processing_waveclip import (
    WAVECLIP_YCBCR_MEAN,
    WAVECLIP_YCBCR_STD,
    WaveCLIPImageProcessor,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
LEVELS = (1, 2, 3)
SIZE = 224

# Written out again on purpose (not imported): the reference must not share the code under test.
JPEG_RGB_TO_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float64
)


@functools.cache
def photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 scikit-image sample photo (read-only, cached)."""
    image = getattr(skimage.data, name)()
    image.setflags(write=False)
    return image


def center_crop_224(image: np.ndarray) -> np.ndarray:
    top, left = (image.shape[0] - SIZE) // 2, (image.shape[1] - SIZE) // 2
    return image[top : top + SIZE, left : left + SIZE]


def reference_resize(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 RGB → (224, 224, 3): shortest side to 224 (transformers' rounding), antialiased
    bicubic on the float image, centre crop, clamp."""
    height, width = rgb.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(SIZE * long / short)
    target = (new_long, SIZE) if height > width else (SIZE, new_long)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    resized = F.interpolate(image, size=target, mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (target[0] - SIZE) // 2, (target[1] - SIZE) // 2
    return resized[:, top : top + SIZE, left : left + SIZE].clamp(0, 1).permute(1, 2, 0).double().numpy()


def reference_pixel_values(rgb: np.ndarray, levels: int, mean=WAVECLIP_YCBCR_MEAN, std=WAVECLIP_YCBCR_STD):
    """(S, S, 3) float RGB in [0, 1] → (3, S, S) float64: JPEG YCbCr, normalised, pywt DWT, pywt packing."""
    ycbcr = rgb @ JPEG_RGB_TO_YCBCR.T + np.array([0.0, 0.5, 0.5])
    normalised = ((ycbcr - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    coefficients = pywt.wavedec2(normalised, "haar", level=levels, axes=(-2, -1))
    packed, _ = pywt.coeffs_to_array(coefficients, axes=(-2, -1))
    return packed


def pixel_values(images, **settings) -> torch.Tensor:
    return WaveCLIPImageProcessor(**settings)(images=images, return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------------------------------------------------------
# Numbers against an independent reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", LEVELS)
def test_224_crops_match_numpy_pywt_reference(levels):
    """Crops already 224 x 224 skip the resize: this isolates colour, normalisation, DWT and packing."""
    crops = [center_crop_224(photo(name)) for name in PHOTOS]
    output = pixel_values(crops, levels=levels)
    assert output.shape == (4, 3, SIZE, SIZE) and output.dtype == torch.float32
    reference = np.stack([reference_pixel_values(crop / 255.0, levels) for crop in crops])
    error = np.abs(output.double().numpy() - reference).max()
    assert error < 1e-5, error
    # The approximation band is 2^L x the block mean: sanity-check its scale so the test cannot pass on zeros.
    assert np.abs(reference).max() > 2**levels


@pytest.mark.parametrize("levels", LEVELS)
def test_resize_and_crop_match_reference(levels):
    """Full-size photos (451 x 300 to 640 x 427, landscape and square) through resize + crop."""
    images = [photo(name) for name in PHOTOS]
    output = pixel_values(images, levels=levels).double().numpy()
    for image, packed in zip(images, output):
        reference = reference_pixel_values(reference_resize(image / 255.0), levels)
        assert np.abs(packed - reference).max() < 1e-5


def test_resize_is_pillow_bicubic_in_float():
    """The torch resize uses Pillow's kernel: compare with Pillow's own float ("F" mode) resize, per channel."""
    image = photo("coffee") / 255.0  # 400 x 600 → 224 x 336 → crop
    processor = WaveCLIPImageProcessor()
    rgb = processor.inverse(processor(images=image.astype(np.float32))["pixel_values"])[0].numpy()
    pillow = np.stack(
        [
            np.asarray(PIL.Image.fromarray(image[..., c].astype(np.float32)).resize((336, 224), PIL.Image.BICUBIC))
            for c in range(3)
        ]
    )
    pillow = np.clip(pillow[:, :, 56 : 56 + SIZE], 0, 1)
    assert np.abs(rgb - pillow).max() < 1e-4


def test_colour_functions_known_values_and_round_trip():
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    ycbcr = rgb_to_ycbcr(colours[:, :, None, None])[:, :, 0, 0]
    expected = torch.tensor(
        [[1.0, 0.5, 0.5], [0.0, 0.5, 0.5], [0.299, 0.331264, 1.0], [0.114, 1.0, 0.418688]], dtype=torch.float64
    )
    assert torch.allclose(ycbcr, expected, atol=1e-12)
    rgb = torch.rand(2, 5, 3, 8, 8, dtype=torch.float64)
    assert (ycbcr_to_rgb(rgb_to_ycbcr(rgb)) - rgb).abs().max() < 1e-12
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3, H, W\)"):
        rgb_to_ycbcr(torch.rand(4, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# Inversion
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", LEVELS)
def test_inverse_reconstructs_the_resized_photo(levels):
    images = [photo(name) for name in PHOTOS]
    processor = WaveCLIPImageProcessor(levels=levels)
    outputs = processor(images=images, return_tensors="pt")
    resized = torch.from_numpy(np.stack([reference_resize(image / 255.0) for image in images])).permute(0, 3, 1, 2)
    rgb = processor.inverse(outputs["pixel_values"], to="rgb")
    assert rgb.shape == (4, 3, SIZE, SIZE) and rgb.dtype == torch.float32
    assert (rgb.double() - resized).abs().max() < 1e-4
    ycbcr = processor.inverse(outputs, to="ycbcr")  # a BatchFeature works too
    assert (ycbcr.double() - rgb_to_ycbcr(resized)).abs().max() < 1e-4
    single = processor.inverse(outputs["pixel_values"][0])  # (3, S, S) in, (3, S, S) out
    assert single.shape == (3, SIZE, SIZE) and torch.equal(single, rgb[0])


def test_unpack_gives_the_subbands_in_ptwt_order():
    processor = WaveCLIPImageProcessor(levels=3)
    crop = center_crop_224(photo("astronaut"))
    coefficients = processor.unpack(processor(images=crop)["pixel_values"])
    assert [tuple(coefficients[0].shape)] + [tuple(d[0].shape) for d in coefficients[1:]] == [
        (1, 3, 28, 28),
        (1, 3, 28, 28),
        (1, 3, 56, 56),
        (1, 3, 112, 112),
    ]
    ycbcr = crop / 255.0 @ JPEG_RGB_TO_YCBCR.T + np.array([0.0, 0.5, 0.5])
    normalised = ((ycbcr - np.array(WAVECLIP_YCBCR_MEAN)) / np.array(WAVECLIP_YCBCR_STD)).transpose(2, 0, 1)
    expected = pywt.wavedec2(normalised, "haar", level=3, axes=(-2, -1))
    assert np.abs(coefficients[0][0].numpy() - expected[0]).max() < 1e-5
    for ours, theirs in zip(coefficients[1:], expected[1:]):  # (H, V, D) = pywt's (cH, cV, cD)
        for band, expected_band in zip(ours, theirs):
            assert np.abs(band[0].numpy() - expected_band).max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Input kinds
# ---------------------------------------------------------------------------------------------------------------


def test_grayscale_is_replicated_and_has_no_chroma():
    camera = photo("camera")  # (512, 512) uint8
    levels = 2
    gray = pixel_values(camera, levels=levels)
    as_rgb = pixel_values(np.repeat(camera[..., None], 3, axis=-1), levels=levels)
    assert torch.equal(gray, as_rgb)
    assert torch.equal(pixel_values(PIL.Image.fromarray(camera), levels=levels), gray)  # PIL "L"
    assert torch.equal(pixel_values(camera[..., None], levels=levels), gray)  # (H, W, 1)
    # Cb = Cr = 0.5 everywhere: the chroma approximation is the constant 2^L (0.5 - mean) / std, details vanish.
    for channel in (1, 2):
        approximation = gray[0, channel, :56, :56]
        expected = 2**levels * (0.5 - WAVECLIP_YCBCR_MEAN[channel]) / WAVECLIP_YCBCR_STD[channel]
        assert (approximation - expected).abs().max() < 1e-5
        details = gray[0, channel].clone()
        details[:56, :56] = 0
        assert details.abs().max() < 1e-5


def test_alpha_is_composited_on_white():
    logo = photo("logo")  # (500, 500, 4), fully opaque
    assert torch.equal(pixel_values(logo), pixel_values(np.ascontiguousarray(logo[..., :3])))
    rgb = center_crop_224(photo("astronaut"))
    alpha = np.tile(np.linspace(0, 255, SIZE).round().astype(np.uint8), (SIZE, 1))  # transparent on the left
    rgba = np.dstack([rgb, alpha])
    composited = (rgb / 255.0) * (alpha[..., None] / 255.0) + (1 - alpha[..., None] / 255.0)
    reference = reference_pixel_values(composited, levels=1)
    for image in (rgba, PIL.Image.fromarray(rgba)):
        assert np.abs(pixel_values(image)[0].double().numpy() - reference).max() < 1e-5
    # Gray + alpha ("LA") likewise.
    gray = rgb[..., 0]
    la = PIL.Image.fromarray(np.dstack([gray, alpha]))
    assert la.mode == "LA"
    expected = (gray / 255.0) * (alpha / 255.0) + (1 - alpha / 255.0)
    reference = reference_pixel_values(np.repeat(expected[..., None], 3, axis=-1), levels=1)
    assert np.abs(pixel_values(la)[0].double().numpy() - reference).max() < 1e-5


def test_palette_images_with_and_without_transparency():
    image = PIL.Image.fromarray(photo("chelsea"))
    palette = image.convert("P")
    assert palette.mode == "P"
    assert torch.equal(pixel_values(palette), pixel_values(np.asarray(palette.convert("RGB"))))
    # A transparent palette index shows white.
    tiny = PIL.Image.new("P", (SIZE, SIZE), 0)
    tiny.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    tiny.info["transparency"] = 0
    white = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    assert (pixel_values(tiny) - pixel_values(white)).abs().max() < 1e-5


def test_16_bit_inputs_are_scaled_not_clipped():
    rng = np.random.default_rng(0)
    image8 = center_crop_224(photo("astronaut"))
    # 257 * v maps 0..255 onto 0..65535 exactly, so the 16-bit image equals the 8-bit one.
    exact16 = image8.astype(np.uint16) * 257
    assert (pixel_values(exact16) - pixel_values(image8)).abs().max() < 1e-5
    # With real sub-8-bit content, the 16-bit and the 8-bit versions differ by quantisation only.
    fine16 = (exact16.astype(np.int64) + rng.integers(-128, 128, exact16.shape)).clip(0, 65535).astype(np.uint16)
    coarse8 = np.round(fine16 / 257).astype(np.uint8)
    processor = WaveCLIPImageProcessor()
    rgb16 = processor.inverse(processor(images=fine16)["pixel_values"])
    rgb8 = processor.inverse(processor(images=coarse8)["pixel_values"])
    assert (rgb16 - rgb8).abs().max() < 0.6 / 255  # half an 8-bit step plus float error
    assert (rgb16 - torch.from_numpy(fine16 / 65535).permute(2, 0, 1)).abs().max() < 1e-4  # 16-bit precision kept
    # Pillow's 16-bit grayscale modes: I;16 (16-bit PNG), I;16B (big-endian) and I (32-bit, some TIFF / PGM).
    gray16 = fine16[..., 0]
    expected = pixel_values(gray16)
    for image in (
        PIL.Image.fromarray(gray16),
        PIL.Image.frombytes("I;16B", gray16.shape[::-1], gray16.astype(">u2").tobytes()),
        PIL.Image.fromarray(gray16.astype(np.int32)),  # mode "I"
    ):
        assert (pixel_values(image) - expected).abs().max() < 1e-5, image.mode
    # A clipped reading (values / 255 clamped to 1) would make the whole image white: Y ≈ 1 everywhere.
    y_mean = processor.inverse(expected, to="ycbcr")[0, 0].mean().item()
    assert abs(y_mean - gray16.mean() / 65535) < 1e-3


def test_cmyk_and_other_pil_modes():
    image = PIL.Image.fromarray(photo("rocket"))
    reference = pixel_values(image)
    # Pillow's RGB → CMYK → RGB is lossless (K = 0), so the CMYK image must give the same result.
    assert torch.equal(pixel_values(image.convert("CMYK")), reference)
    assert torch.equal(pixel_values(image.convert("RGBX")), reference)
    gray = (photo("camera") / 255.0).astype(np.float32)
    float_image = PIL.Image.fromarray(gray)
    assert float_image.mode == "F"
    assert torch.equal(pixel_values(float_image), pixel_values(gray))
    binary = PIL.Image.fromarray(photo("camera") > 128)
    assert binary.mode == "1"
    assert torch.equal(pixel_values(binary), pixel_values((photo("camera") > 128).astype(np.uint8) * 255))


def test_tiny_and_huge_images():
    red = np.zeros((1, 1, 3), dtype=np.uint8)
    red[..., 0] = 255
    processor = WaveCLIPImageProcessor(levels=2)
    rgb = processor.inverse(processor(images=red)["pixel_values"])
    assert rgb.shape == (1, 3, SIZE, SIZE)
    assert (rgb[0] - torch.tensor([1.0, 0.0, 0.0])[:, None, None]).abs().max() < 1e-4
    huge = np.random.default_rng(0).integers(0, 256, (3000, 5000, 3), dtype=np.uint8)
    output = processor(images=huge)["pixel_values"]
    assert output.shape == (1, 3, SIZE, SIZE) and torch.isfinite(output).all()
    # Random pixels average out under a 13x downscale: mid-gray, so Y ≈ 0.5 with small spread.
    y = processor.inverse(output, to="ycbcr")[0, 0]
    assert abs(y.mean().item() - 0.5) < 0.01 and y.std().item() < 0.05
    # Extreme aspect ratios are cut to their centre before resizing, not blown up to 224 x 280000.
    strip = np.random.default_rng(1).integers(0, 256, (4, 5000, 3), dtype=np.uint8)
    assert processor(images=[strip, strip.transpose(1, 0, 2)])["pixel_values"].shape == (2, 3, SIZE, SIZE)


def test_channels_first_tensors_dtypes_and_batches():
    image = photo("astronaut")
    reference = pixel_values(image)
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    assert torch.equal(pixel_values(chw), reference)  # uint8 (3, H, W) tensor
    assert torch.equal(pixel_values(np.ascontiguousarray(image.transpose(2, 0, 1))), reference)  # numpy (3, H, W)
    assert (pixel_values(chw.float() / 255) - reference).abs().max() < 1e-5  # float tensor in [0, 1]
    assert (pixel_values(image / 255.0) - reference).abs().max() < 1e-5  # float64 array
    assert torch.equal(pixel_values(chw.long()), reference)  # int64 (torch.randint's default) read as 8-bit
    # The input is not modified in place.
    float_image = chw.float() / 255
    before = float_image.clone()
    pixel_values(float_image)
    assert torch.equal(float_image, before)
    # A 4-D array / tensor is a batch.
    batch = np.stack([center_crop_224(photo(name)) for name in PHOTOS])
    assert pixel_values(batch).shape == (4, 3, SIZE, SIZE)
    assert torch.equal(pixel_values(torch.from_numpy(batch).permute(0, 3, 1, 2))[2], pixel_values(batch[2])[0])


def test_list_of_mixed_kinds_and_sizes(tmp_path):
    path = tmp_path / "coffee.png"
    PIL.Image.fromarray(photo("coffee")).save(path)
    images = [
        PIL.Image.fromarray(photo("astronaut")),  # 512 x 512 PIL
        photo("chelsea"),  # 451 x 300 numpy
        photo("camera"),  # 512 x 512 gray
        np.zeros((1, 1, 3), np.uint8),  # 1 x 1
        torch.from_numpy(np.ascontiguousarray(photo("rocket"))).permute(2, 0, 1),  # (3, 427, 640) tensor
        str(path),  # str path
        path,  # pathlib.Path
    ]
    output = WaveCLIPImageProcessor(levels=3)(images=images, return_tensors="np")["pixel_values"]
    assert isinstance(output, np.ndarray) and output.shape == (7, 3, SIZE, SIZE) and output.dtype == np.float32
    alone = pixel_values(photo("coffee"), levels=3)[0].numpy()
    assert np.array_equal(output[5], alone) and np.array_equal(output[6], alone)
    assert np.array_equal(output[1], pixel_values(photo("chelsea"), levels=3)[0].numpy())


def test_files_are_turned_upright_by_their_exif_orientation(tmp_path):
    image = PIL.Image.fromarray(photo("chelsea"))  # 451 x 300, landscape
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    upright = np.asarray(image.transpose(PIL.Image.Transpose.ROTATE_270))  # portrait, as a viewer shows it
    assert torch.equal(pixel_values(path), pixel_values(upright))


def test_resample_filters_and_aspect_options():
    image = photo("coffee")
    bicubic = pixel_values(image)
    processor = WaveCLIPImageProcessor()
    for resample in (PIL.Image.Resampling.NEAREST, PIL.Image.Resampling.BILINEAR, PIL.Image.Resampling.LANCZOS):
        other = processor(images=image, resample=resample)["pixel_values"]
        rgb = processor.inverse(other)
        # Another kernel, same picture: RGB within a few 8-bit levels on average, never identical.
        difference = (rgb - processor.inverse(bicubic)).abs()
        assert 0 < difference.mean() < 0.02, (resample, difference.mean())
    # do_center_crop=False squeezes the whole image to S x S: the left and right edges survive.
    squeezed = processor.inverse(processor(images=image, do_center_crop=False)["pixel_values"])[0]
    edges = F.interpolate(
        torch.from_numpy(image / 255.0).permute(2, 0, 1)[None], size=(SIZE, SIZE), mode="bicubic", antialias=True
    )[0].clamp(0, 1)
    assert (squeezed - edges).abs().max() < 1e-4


@hypothesis.settings(max_examples=25, deadline=None, database=None)
@hypothesis.given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    channels=st.sampled_from([None, 1, 2, 3, 4]),
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32]),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_any_valid_image_gives_an_invertible_packed_image(height, width, channels, dtype, levels, seed):
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels is None else (height, width, channels)
    if dtype is np.float32:
        image = rng.random(shape, dtype=np.float32)
    else:
        image = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    processor = WaveCLIPImageProcessor(image_size=64, levels=levels)
    packed = processor(images=image)["pixel_values"]
    assert packed.shape == (1, 3, 64, 64) and packed.dtype == torch.float32 and torch.isfinite(packed).all()
    rgb = processor.inverse(packed)
    assert rgb.min() > -1e-4 and rgb.max() < 1 + 1e-4  # the resize output is clamped to [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def _truncated_png(tmp_path: Path) -> Path:
    buffer = io.BytesIO()
    PIL.Image.fromarray(photo("astronaut")).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    return path


BAD_INPUTS = {
    "nan": (lambda tmp: np.full((32, 32, 3), np.nan, dtype=np.float32), r"Image 0: the image contains NaN or inf"),
    "inf": (lambda tmp: torch.full((3, 32, 32), float("inf")), r"Image 0: the image contains NaN or inf"),
    "empty array": (lambda tmp: np.zeros((0, 10, 3), np.uint8), r"Image 0: the image is empty \(shape \(0, 10, 3\)\)"),
    "zero-size PIL": (lambda tmp: PIL.Image.new("RGB", (0, 0)), r"Image 0: the image is empty \(0 x 0\)"),
    "1-D": (lambda tmp: np.zeros(10, np.uint8), r"expected an image of shape .* got 1-D shape \(10,\)"),
    "5-D": (lambda tmp: np.zeros((1, 2, 8, 8, 3), np.uint8), r"got 5-D shape \(1, 2, 8, 8, 3\)"),
    "0-D": (lambda tmp: np.array(0.5, dtype=np.float32), r"got 0-D shape \(\)"),
    "5 channels": (lambda tmp: np.zeros((32, 32, 5), np.uint8), r"unsupported channel count in shape \(32, 32, 5\)"),
    "float 0-255": (lambda tmp: np.full((8, 8, 3), 200.0), r"float images must hold values in \[0, 1\], got 200\.\.2"),
    "negative ints": (lambda tmp: np.full((8, 8), -3, np.int32), r"integer image with values -3\.\.-3"),
    "complex": (lambda tmp: np.zeros((8, 8), np.complex64), r"unsupported dtype complex64"),
    "strings": (lambda tmp: np.array([["a"]]), r"unsupported dtype <U1"),
    "text file": (lambda tmp: str(_text_file(tmp)), r"Cannot read image file '.*notes\.png': cannot identify image"),
    "truncated PNG": (lambda tmp: _truncated_png(tmp), r"Cannot read image file '.*truncated\.png'"),
    "missing file": (lambda tmp: str(tmp / "nope.jpg"), r"Cannot read image file '.*nope\.jpg': no such file"),
    "empty list": (lambda tmp: [], r"Empty batch"),
    "None": (lambda tmp: None, r"No images given"),
    "dict": (lambda tmp: {"pixel_values": 1}, r"Image 0: unsupported type dict"),
    "nested list": (lambda tmp: [photo("camera"), [photo("camera")]], r"Image 1: unsupported type list"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_problem(case, tmp_path):
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        WaveCLIPImageProcessor()(images=make(tmp_path))


def test_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match=r"size 100 cannot be packed with 3 DWT levels: .* by 2\*\*levels = 8"):
        WaveCLIPImageProcessor(image_size=100, levels=3)
    with pytest.raises(ValueError, match=r"Unknown wavelet 'nope'"):
        WaveCLIPImageProcessor(wavelet="nope")
    with pytest.raises(ValueError, match=r"Wavelet 'db2' has 4-tap filters: .* Use a two-tap wavelet: .*'haar'"):
        WaveCLIPImageProcessor(wavelet="db2")
    with pytest.raises(ValueError, match=r"`image_std` must be positive"):
        WaveCLIPImageProcessor(image_std=(0.2, 0.0, 0.1))
    with pytest.raises(ValueError, match=r"`image_mean` must be one finite number or three"):
        WaveCLIPImageProcessor(image_mean=(0.5, 0.5))
    processor = WaveCLIPImageProcessor()
    with pytest.raises(ValueError, match=r"divisible by 2\*\*levels = 64"):
        processor(images=photo("camera"), levels=6)  # per-call overrides are checked too
    with pytest.raises(ValueError, match=r"must be exactly 224 x 224, got 300 x 200"):
        processor(images=np.zeros((200, 300), np.uint8), do_resize=False, do_center_crop=False)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['levls'\]"):
        processor(images=photo("camera"), levls=2)


def test_per_call_overrides_and_other_wavelets():
    image = photo("astronaut")
    assert pixel_values(image, image_size=64, levels=3).shape == (1, 3, 64, 64)
    processor = WaveCLIPImageProcessor()
    assert torch.equal(processor(images=image, levels=2)["pixel_values"], pixel_values(image, levels=2))
    assert processor.levels == 1  # the override did not stick
    # db1 is Haar under another name.
    assert torch.equal(pixel_values(image, wavelet="db1", levels=2), pixel_values(image, levels=2))
    # do_resize=False crops a large enough image as is.
    crop = processor(images=image, do_resize=False)["pixel_values"]
    assert torch.equal(crop, pixel_values(image[144:368, 144:368]))


# ---------------------------------------------------------------------------------------------------------------
# Save / load, remote-code constraints, plot
# ---------------------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    processor = WaveCLIPImageProcessor(image_size=128, levels=2, image_mean=(0.4, 0.5, 0.6), image_std=(0.3, 0.1, 0.2))
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_size"] == 128 and saved["levels"] == 2 and saved["wavelet"] == "haar"
    assert saved["image_mean"] == [0.4, 0.5, 0.6] and saved["image_std"] == [0.3, 0.1, 0.2]
    assert saved["resample"] == 3 and saved["image_processor_type"] == "WaveCLIPImageProcessor"
    loaded = WaveCLIPImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    images = [photo("chelsea"), photo("camera")]
    assert torch.equal(loaded(images=images)["pixel_values"], processor(images=images)["pixel_values"])
    # from_pretrained overrides, as for any transformers processor.
    assert WaveCLIPImageProcessor.from_pretrained(tmp_path, levels=3).levels == 3
    # The defaults survive a round trip too.
    WaveCLIPImageProcessor().save_pretrained(tmp_path / "default")
    default = WaveCLIPImageProcessor.from_pretrained(tmp_path / "default")
    assert default.image_mean == WAVECLIP_YCBCR_MEAN and default.image_std == WAVECLIP_YCBCR_STD


@pytest.mark.parametrize("module", [image_processing_waveclip, image_decoding_waveclip])
def test_module_imports_only_what_remote_code_may_import(module):
    tree = ast.parse(Path(module.__file__).read_text())
    allowed = {"torch", "numpy", "PIL", "ptwt", "pywt", "transformers", "__future__"}
    stdlib = {"collections", "contextlib", "math", "numbers", "os", "threading", "typing", "warnings"}
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    for node in top_level:
        if isinstance(node, ast.ImportFrom) and node.level:
            # relative sibling imports only
            assert node.module in ("wavelet_layout", "image_decoding_waveclip") and node.level == 1
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
        for name in names:
            assert name.split(".")[0] in allowed | stdlib, name
    # Not even lazily: the subband-pyramid picture lives in waveclip_hf.figures, outside the shipped files.
    imported = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not [node for node in imported if "matplotlib" in ast.unparse(node)]


@pytest.mark.parametrize("levels", (1, 3))
def test_plot_subband_pyramid_writes_a_labelled_png(tmp_path, levels):
    packed = pixel_values(photo("astronaut"), levels=levels)
    path = tmp_path / f"pyramid_L{levels}.png"
    figure = plot_subband_pyramid(packed[0], levels, path=path, channel="Cb")
    assert path.is_file() and path.stat().st_size > 10_000
    with PIL.Image.open(path) as png:
        assert png.size == (600, 600)
    labels = sorted(text.get_text() for text in figure.axes[0].texts)
    expected = [f"${kind}_{{{level}}}$" for level in range(1, levels + 1) for kind in "HVD"] + [f"$A_{{{levels}}}$"]
    assert labels == sorted(expected) and len(labels) == 1 + 3 * levels
    # Separator lines: two per level.
    assert len(figure.axes[0].lines) == 2 * levels
    assert "Cb" in figure.texts[0].get_text()
    with pytest.raises(ValueError, match="one image"):
        plot_subband_pyramid(pixel_values([photo("camera")] * 2, levels=levels), levels)
