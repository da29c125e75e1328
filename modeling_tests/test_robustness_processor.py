"""Property-based robustness of `WaveCLIPImageProcessor`: any image either gives correct coefficients or a
`ValueError` that names the image and the problem; never another exception type, never a silent NaN.

Hypothesis draws PIL images of every common mode, numpy arrays and torch tensors of every common dtype, channel
layout and memory order (C, Fortran, negative strides), sizes from 1 x 1 to 4096 x 300, in-range values,
out-of-range values, NaN and inf, and batches mixing them.
Pixel data comes from a seeded numpy generator (hypothesis draws only the seed), so a 4096 x 300 example costs a
few MB and no shrinking time. Each success is checked three ways:

- shape (B, 3, S, S), float32, finite;
- invertibility of the packed output: `inverse(pixel_values)` gives (3, S, S) RGB images that, fed back to the
  processor (already S x S: no resize), give the same `pixel_values` within 1e-4;
- where the image is already S x S and its layout unambiguous, `inverse` reproduces an RGB reference computed here
  independently (scaling per dtype / mode, gray replication, alpha composited on white) within 1e-4.

`test_image_processing_waveclip.py` checks the numbers against a numpy / pywt reference on real photos and has a
smaller property test over valid uint8 / uint16 / float32 arrays; this file covers the failure side.
"""

import re
from dataclasses import dataclass

import hypothesis
import hypothesis.strategies as st
import numpy as np
import PIL.Image
import pytest
import torch

from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor, WaveCLIPImageProcessorFast


SIZE = 32  # output side S: small, so each example is cheap; divisible by 2**3 for levels 1..3
PIL_MODES = ("L", "LA", "RGB", "RGBA", "P", "I;16", "I", "F", "CMYK", "1")
DTYPES = ("uint8", "uint16", "int32", "int64", "float16", "float32", "float64", "bool")
# "HWC" (channels last), "CHW" (channels first), "HW" (2-D gray).
LAYOUTS = ("HW", "HWC", "CHW")
# Anomalies only apply to some dtypes / modes (uint8 cannot be out of range), so they are drawn as often as valid data.
VALUES = ("valid", "out_of_range", "nan", "inf")

NAN_MESSAGE = r"the image contains NaN or inf values"
FLOAT_RANGE_MESSAGE = r"float images must hold values in \[0, 1\], got"
INT_RANGE_MESSAGE = r"integer image with values .* expected 0\.\.255 \(8-bit\) or 0\.\.65535 \(16-bit\)"
MODE_I_MESSAGE = r"mode 'I' image with values .* only 0\.\.65535 \(16-bit\) is supported"


@dataclass
class Case:
    """One drawn image, what the processor must do with it, and (when known) the RGB it must reconstruct."""

    image: object
    error: str | None  # regex of the expected ValueError, None when the image is valid
    reference: np.ndarray | None  # (3, S, S) float64 RGB in [0, 1], when the image is S x S and unambiguous
    description: str


@st.composite
def sizes(draw) -> tuple[int, int]:
    """(height, width): exactly S x S, small (1..80), or long and thin up to 4096 x 300 either way round."""
    kind = draw(st.sampled_from(["exact", "small", "large"]))
    if kind == "exact":
        return SIZE, SIZE
    if kind == "small":
        return draw(st.integers(1, 80)), draw(st.integers(1, 80))
    long, short = draw(st.integers(301, 4096)), draw(st.integers(1, 300))
    return (long, short) if draw(st.booleans()) else (short, long)


def to_rgb(unit: np.ndarray) -> np.ndarray:
    """(H, W, C) values in [0, 1], C = 1..4 → (3, H, W) RGB: gray replicated, alpha composited on white."""
    channels = unit.shape[-1]
    if channels in (2, 4):
        colour, alpha = unit[..., :-1], unit[..., -1:]
        unit = colour * alpha + (1 - alpha)
    if unit.shape[-1] == 1:
        unit = np.repeat(unit, 3, axis=-1)
    return unit.transpose(2, 0, 1)


def plant(array: np.ndarray, value, rng) -> np.ndarray:
    """A copy of `array` with `value` at one random position."""
    array = array.copy()
    array[tuple(int(rng.integers(0, n)) for n in array.shape)] = value
    return array


def with_memory_layout(array: np.ndarray, memory: str) -> np.ndarray:
    """The same values in another memory layout: C order, Fortran order, or a negative-stride view (what
    `image[::-1]` or OpenCV's BGR -> RGB `image[..., ::-1]` give)."""
    if memory == "fortran":
        return np.asfortranarray(array)
    if memory == "negative":
        return np.flip(np.flip(array, axis=0).copy(), axis=0)
    return array


def make_array_case(height, width, dtype, layout, channels, container, values, seed, memory="c") -> Case:
    """A numpy array or torch tensor of `dtype` in `layout`, with `values` valid or one planted anomaly."""
    rng = np.random.default_rng(seed)
    channels = 1 if layout == "HW" else channels
    unit = rng.random((height, width, channels))
    error = None
    if dtype == "bool":
        array = unit > 0.5
        unit = array.astype(np.float64)
    elif dtype in ("uint8", "uint16"):
        top = 255 if dtype == "uint8" else 65535
        array = np.round(unit * top).astype(dtype)
        unit = array / top
    elif dtype in ("int32", "int64"):
        top = int(rng.choice([255, 65535]))
        array = np.round(unit * top).astype(dtype)
        # The processor infers the bit depth from the values: 8-bit if they all fit in 0..255.
        unit = array / (255 if array.max() <= 255 else 65535)
        if values == "out_of_range":
            array, error = plant(array, int(rng.choice([-1, 65536, 2**31 - 1])), rng), INT_RANGE_MESSAGE
    else:
        array = unit.astype(dtype)
        unit = array.astype(np.float64)
        if values == "out_of_range":
            array, error = plant(array, rng.choice([-0.5, 1.5, 255.0, -1e4]), rng), FLOAT_RANGE_MESSAGE
        elif values in ("nan", "inf"):
            bad = np.nan if values == "nan" else rng.choice([np.inf, -np.inf])
            array, error = plant(array, bad, rng), NAN_MESSAGE

    if layout == "HW":
        array = array[..., 0]
    elif layout == "CHW":
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
    # numpy reads ambiguous shapes channels-last, torch channels-first: only compare against the reference when
    # the layout cannot be misread.
    ambiguous = (layout == "CHW" and container == "numpy" and width <= 4) or (
        layout == "HWC" and container == "torch" and height <= 4
    )
    if container == "torch":
        # torch has no negative strides; a transposed view stands in for "not contiguous".
        image = torch.from_numpy(array)
        if memory != "c" and image.ndim >= 2:
            image = image.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        image = with_memory_layout(array, memory)
    exact = (height, width) == (SIZE, SIZE)
    reference = to_rgb(unit) if exact and error is None and not ambiguous else None
    return Case(image, error, reference, f"{container} {dtype} {layout} {memory} {tuple(array.shape)} {values}")


def make_pil_case(height, width, mode, values, seed) -> Case:
    """A PIL image of `mode`; modes I and F may carry one planted anomaly (the others cannot hold one)."""
    rng = np.random.default_rng(seed)
    shape = (height, width)
    error = None
    if mode in ("L", "LA", "RGB", "RGBA"):
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
        array = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
        image = PIL.Image.fromarray(array[..., 0] if channels == 1 else array)
        unit = array / 255
    elif mode in ("P", "CMYK"):
        # Pillow's own (profile-free) conversion to RGB is the reference for palette and CMYK.
        if mode == "P":
            image = PIL.Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).convert("P")
        else:
            image = PIL.Image.frombytes("CMYK", (width, height), rng.integers(0, 256, (*shape, 4), np.uint8).tobytes())
        unit = np.asarray(image.convert("RGB")) / 255
    elif mode == "1":
        array = rng.random(shape) > 0.5
        image, unit = PIL.Image.fromarray(array), array[..., None].astype(np.float64)
    elif mode == "I;16":
        array = rng.integers(0, 65536, shape, dtype=np.uint16)
        image, unit = PIL.Image.fromarray(array), array[..., None] / 65535
    elif mode == "I":
        array = rng.integers(0, 65536, shape).astype(np.int32)
        if values == "out_of_range":
            array, error = plant(array, int(rng.choice([-7, 70000])), rng), MODE_I_MESSAGE
        image, unit = PIL.Image.fromarray(array), array[..., None] / 65535
    else:  # "F"
        array = rng.random(shape, dtype=np.float32)
        if values == "out_of_range":
            array, error = plant(array, rng.choice([-2.0, 3.0]), rng), FLOAT_RANGE_MESSAGE
        elif values in ("nan", "inf"):
            array, error = plant(array, np.nan if values == "nan" else np.inf, rng), NAN_MESSAGE
        image, unit = PIL.Image.fromarray(array), array[..., None].astype(np.float64)
    assert image.mode == mode, (image.mode, mode)
    if unit.ndim == 2:
        unit = unit[..., None]
    exact = (height, width) == (SIZE, SIZE)
    reference = to_rgb(unit) if exact and error is None else None
    return Case(image, error, reference, f"PIL {mode} {width}x{height} {values}")


seeds = st.integers(0, 2**32 - 1)


@st.composite
def array_cases(draw) -> Case:
    height, width = draw(sizes())
    return make_array_case(
        height,
        width,
        draw(st.sampled_from(DTYPES)),
        draw(st.sampled_from(LAYOUTS)),
        draw(st.integers(1, 4)),
        draw(st.sampled_from(["numpy", "torch"])),
        draw(st.sampled_from(VALUES)),
        draw(seeds),
        draw(st.sampled_from(["c", "fortran", "negative"])),
    )


@st.composite
def pil_cases(draw) -> Case:
    height, width = draw(sizes())
    return make_pil_case(height, width, draw(st.sampled_from(PIL_MODES)), draw(st.sampled_from(VALUES)), draw(seeds))


any_case = st.one_of(array_cases(), pil_cases())


def check_batch(cases: list[Case], levels: int) -> None:
    """The whole contract for one call on a batch of drawn images, by the slow processor; the fast one raises the
    same error or gives the same `pixel_values` (within 1e-5)."""
    processor = WaveCLIPImageProcessor(image_size=SIZE, levels=levels)
    fast = WaveCLIPImageProcessorFast(image_size=SIZE, levels=levels)
    images = [case.image for case in cases]
    before = [
        image.copy() if isinstance(image, np.ndarray) else image.clone()
        for image in images
        if isinstance(image, (np.ndarray, torch.Tensor))
    ]
    first_bad = next((i for i, case in enumerate(cases) if case.error), None)
    if hypothesis.currently_in_test_context():  # shown by `pytest --hypothesis-show-statistics`
        hypothesis.event("error" if first_bad is not None else "valid")
        hypothesis.event(f"compared with the reference: {any(case.reference is not None for case in cases)}")
    if first_bad is not None:
        for checked in (processor, fast):
            with pytest.raises(ValueError) as raised:
                checked(images=images)
            # The message names the image (its index in the batch) and the problem.
            assert re.search(rf"^Image {first_bad}: .*{cases[first_bad].error}", str(raised.value)), (
                type(checked).__name__,
                cases[first_bad].description,
                str(raised.value),
            )
        return

    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert (fast(images=images, return_tensors="pt")["pixel_values"] - pixel_values).abs().max() <= 1e-5
    assert pixel_values.shape == (len(cases), 3, SIZE, SIZE) and pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()
    # The caller's arrays and tensors are never modified.
    after = [image for image in images if isinstance(image, (np.ndarray, torch.Tensor))]
    for old, new in zip(before, after):
        assert np.array_equal(np.asarray(old), np.asarray(new), equal_nan=True)

    rgb = processor.inverse(pixel_values)
    assert rgb.shape == (len(cases), 3, SIZE, SIZE)
    assert rgb.min() > -1e-4 and rgb.max() < 1 + 1e-4  # the resized image is clamped to [0, 1]
    again = processor(images=list(rgb), return_tensors="pt")["pixel_values"]
    assert (again - pixel_values).abs().max() < 1e-4
    for case, reconstructed in zip(cases, rgb):
        if case.reference is not None:
            error = np.abs(reconstructed.double().numpy() - case.reference).max()
            assert error < 1e-4, (case.description, error)


@hypothesis.settings(max_examples=80, deadline=None, database=None)
@hypothesis.given(case=any_case, levels=st.integers(1, 3))
def test_any_single_image_gives_correct_coefficients_or_a_named_value_error(case, levels):
    check_batch([case], levels)


def test_every_mode_dtype_and_layout_at_the_output_size_matches_the_independent_reference():
    """The space hypothesis samples from, swept exhaustively at S x S, where the reference RGB is known. Valid images
    go in batches (one call per dtype and container); each anomaly alone."""
    check_batch([make_pil_case(SIZE, SIZE, mode, "valid", seed=1) for mode in PIL_MODES], levels=2)
    layouts = [("HW", 1)] + [(layout, channels) for layout in ("HWC", "CHW") for channels in (1, 2, 3, 4)]
    for dtype in DTYPES:
        for container in ("numpy", "torch"):
            cases = [
                make_array_case(SIZE, SIZE, dtype, layout, channels, container, "valid", seed=2, memory=memory)
                for layout, channels in layouts
                for memory in ("c", "fortran", "negative")
            ]
            assert all(case.reference is not None for case in cases)
            check_batch(cases, levels=1)
    anomalies = [make_pil_case(SIZE, SIZE, mode, values, seed=3) for mode in ("I", "F") for values in VALUES[1:]]
    anomalies += [
        make_array_case(SIZE, SIZE, dtype, "HWC", 3, "torch" if i % 2 else "numpy", values, seed=4)
        for i, dtype in enumerate(DTYPES)
        for values in VALUES[1:]
    ]
    for case in anomalies:
        check_batch([case], levels=1)
    # mode I out of range, mode F x 3 anomalies, 3 float dtypes x 3 anomalies, 2 wide int dtypes out of range
    assert sum(case.error is not None for case in anomalies) == 1 + 3 + 3 * 3 + 2


@hypothesis.settings(max_examples=30, deadline=None, database=None)
@hypothesis.given(cases=st.lists(any_case, min_size=2, max_size=4), levels=st.integers(1, 3))
def test_batches_mixing_kinds_sizes_and_bad_images(cases, levels):
    """Mixed batches: all good gives one row per image; one bad image fails the call and is named by index."""
    check_batch(cases, levels)


@hypothesis.settings(max_examples=60, deadline=None, database=None)
@hypothesis.given(
    image_size=st.integers(-2, 300),
    levels=st.integers(-1, 9),
    wavelet=st.sampled_from(["haar", "db1", "bior1.1", "db2", "sym4", "nope"]),
)
def test_any_settings_either_work_or_name_the_problem(image_size, levels, wavelet):
    valid = image_size >= 1 and levels >= 1 and image_size % 2**levels == 0 and wavelet in ("haar", "db1", "bior1.1")
    image = np.zeros((5, 7, 3), np.uint8)
    if not valid:
        with pytest.raises(ValueError, match=r"image_size|levels|wavelet|Wavelet|cannot be packed"):
            WaveCLIPImageProcessor(image_size=image_size, levels=levels, wavelet=wavelet)
        with pytest.raises(ValueError, match=r"image_size|levels|wavelet|Wavelet|cannot be packed"):
            WaveCLIPImageProcessor()(images=image, image_size=image_size, levels=levels, wavelet=wavelet)
        return
    processor = WaveCLIPImageProcessor(image_size=image_size, levels=levels, wavelet=wavelet)
    pixel_values = processor(images=image)["pixel_values"]
    assert pixel_values.shape == (1, 3, image_size, image_size) and torch.isfinite(pixel_values).all()


# ---------------------------------------------------------------------------------------------------------------
# Regressions found by the properties above (each failed before the fix in image_processing_waveclip.py)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", ["bgr_to_rgb", "upside_down", "mirrored", "length_one_axis"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, bool])
def test_arrays_with_negative_strides_are_accepted(flip, dtype):
    """OpenCV users write `image[..., ::-1]` (BGR -> RGB): a negative-stride view that torch cannot wrap."""
    rng = np.random.default_rng(0)
    image = rng.random((40, 50, 3))
    if dtype is bool:
        image = image > 0.5
    else:
        image = (image * 255).astype(np.uint8) if dtype is np.uint8 else image.astype(dtype)
    view = {
        "bgr_to_rgb": image[..., ::-1],
        "upside_down": image[::-1],
        "mirrored": image[:, ::-1],
        # numpy calls this one contiguous (the negative stride is on a length-1 axis); torch still refuses it.
        "length_one_axis": np.ascontiguousarray(image[..., :1].transpose(2, 0, 1))[::-1],
    }[flip]
    assert any(stride < 0 for stride in view.strides)
    processor = WaveCLIPImageProcessor(image_size=SIZE)
    assert torch.equal(processor(images=view)["pixel_values"], processor(images=view.copy())["pixel_values"])


@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_huge_float64_values_are_reported_as_out_of_range_not_as_inf(container):
    """float64 values beyond float32's range used to overflow to inf in the cast and be misreported."""
    image = np.full((8, 8, 3), 0.5)
    image[0, 0, 0] = 1e300
    image = torch.from_numpy(image) if container == "torch" else image
    with pytest.raises(ValueError, match=r"Image 0: float images must hold values in \[0, 1\], got 0\.5\.\.1e\+300"):
        WaveCLIPImageProcessor(image_size=SIZE)(images=image)


def test_meta_and_sparse_tensors():
    processor = WaveCLIPImageProcessor(image_size=SIZE)
    with pytest.raises(ValueError, match=r"Image 0: the tensor is on the meta device and holds no data"):
        processor(images=torch.empty(3, 8, 8, device="meta"))
    dense = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(processor(images=dense.to_sparse())["pixel_values"], processor(images=dense)["pixel_values"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8, torch.int16, torch.uint16, torch.uint32])
def test_torch_only_dtypes(dtype):
    """dtypes numpy lacks (bfloat16) or that torch handles with few kernels: read like their numpy cousins."""
    rng = np.random.default_rng(5)
    processor = WaveCLIPImageProcessor(image_size=SIZE)
    if dtype.is_floating_point:
        image = torch.from_numpy(rng.random((3, 40, 50), dtype=np.float32))
        expected = processor(images=image.to(dtype).float())["pixel_values"]
    else:
        # Fits every integer type. uint16 means 16-bit (/ 65535) in both libraries; the others are inferred from
        # the values (here 8-bit).
        levels = rng.integers(0, 128, (3, 40, 50))
        image = torch.from_numpy(levels)
        cousin = np.dtype(str(dtype).removeprefix("torch."))
        expected = processor(images=levels.astype(cousin))["pixel_values"]  # numpy reads (3, 40, 50) channels-first
    assert torch.equal(processor(images=image.to(dtype))["pixel_values"], expected)


def test_a_batch_array_with_zero_images_is_an_empty_batch():
    with pytest.raises(ValueError, match=r"Empty batch: .* 4-D array with zero images"):
        WaveCLIPImageProcessor(image_size=SIZE)(images=np.zeros((0, 8, 8, 3), np.uint8))


@pytest.mark.parametrize(
    "mode, via",
    [
        ("PA", "RGBA"),
        ("La", "LA"),
        ("RGBa", "RGBA"),
        ("YCbCr", "RGB"),
        ("LAB", "RGB"),
        ("HSV", "RGB"),
        ("RGBX", "RGB"),
    ],
)
def test_rarer_pil_modes_convert_as_pillow_does(mode, via):
    rng = np.random.default_rng(6)
    base = PIL.Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8))  # RGBA
    image = base.convert("P").convert("PA") if mode == "PA" else base.convert(mode)
    assert image.mode == mode
    processor = WaveCLIPImageProcessor(image_size=SIZE)
    expected = processor(images=np.asarray(image.convert(via)))["pixel_values"]
    assert torch.equal(processor(images=image)["pixel_values"], expected)
