"""`WaveCLIPImageProcessorFast`: the slow processor's `pixel_values` (within 1e-5) made on the given device, one
saved file for both, and `AutoImageProcessor` choosing between them by `backend` / `use_fast`.

Every input kind, dtype, layout and bad image of the slow processor's robustness suite is also run through the fast
one there (`test_robustness_processor.check_batch`): same errors, same numbers.
"""

import json

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from transformers import AutoImageProcessor

from waveclip_hf import WaveCLIPImageProcessor, WaveCLIPImageProcessorFast
from waveclip_hf.models.waveclip.image_processing_waveclip import PILImageResampling


PHOTOS = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]


def photo_batch() -> list:
    """Real photos of four sizes, twice each (so images of one size form batches), as PIL, numpy and torch."""
    return [
        *(PIL.Image.fromarray(photo) for photo in PHOTOS),
        *PHOTOS,
        torch.from_numpy(PHOTOS[0]).permute(2, 0, 1),
        PIL.Image.fromarray(PHOTOS[1]).convert("RGBA"),
    ]


@pytest.mark.parametrize("levels", (1, 2, 3))
@pytest.mark.parametrize(
    "resample", (PILImageResampling.BICUBIC, PILImageResampling.BILINEAR, PILImageResampling.LANCZOS)
)
def test_fast_gives_the_slow_processors_pixel_values(levels, resample):
    images = photo_batch()
    slow = WaveCLIPImageProcessor(levels=levels, resample=resample)(images, return_tensors="pt")["pixel_values"]
    fast = WaveCLIPImageProcessorFast(levels=levels, resample=resample)(images, return_tensors="pt")["pixel_values"]
    assert fast.shape == slow.shape == (len(images), 3, 224, 224)
    assert (fast - slow).abs().max() <= 1e-5


def test_per_call_overrides_and_numpy_output():
    images = photo_batch()[:3]
    overrides = {"image_size": 96, "levels": 2, "do_center_crop": False}
    slow = WaveCLIPImageProcessor()(images, return_tensors="np", **overrides)["pixel_values"]
    fast = WaveCLIPImageProcessorFast()(images, return_tensors="np", device="cpu", **overrides)["pixel_values"]
    assert isinstance(fast, np.ndarray) and fast.shape == (3, 3, 96, 96)
    assert np.abs(fast - slow).max() <= 1e-5


def test_the_work_happens_on_the_device(monkeypatch):
    """The resize and the colour transform see tensors on `device`: the fast processor copies the raw images
    there first; the slow one works on the CPU and copies the result. (The meta device stands in for a GPU: any
    step left on the CPU would show up in the record.)"""
    seen = []
    interpolate, baddbmm = torch.nn.functional.interpolate, torch.baddbmm

    def record_interpolate(image, *args, **kwargs):
        seen.append(("resize", image.device.type))
        return interpolate(image, *args, **kwargs)

    def record_baddbmm(bias, matrix, image, *args, **kwargs):
        seen.append(("colour", image.device.type))
        return baddbmm(bias, matrix, image, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", record_interpolate)
    monkeypatch.setattr(torch, "baddbmm", record_baddbmm)
    images = photo_batch()
    pixel_values = WaveCLIPImageProcessorFast(levels=2)(images, device="meta")["pixel_values"]
    assert pixel_values.device.type == "meta" and pixel_values.shape == (len(images), 3, 224, 224)
    assert set(seen) == {("resize", "meta"), ("colour", "meta")}
    seen.clear()
    pixel_values = WaveCLIPImageProcessor(levels=2)(images, device="meta")["pixel_values"]
    assert pixel_values.device.type == "meta"
    assert set(seen) == {("resize", "cpu"), ("colour", "cpu")}


def test_images_of_one_size_are_resized_together_on_an_accelerator(monkeypatch):
    """One resize call per size off the CPU (here: 4 sizes, 10 images); one per image on the CPU, which holds one
    full-size float image at a time instead of the batch."""
    calls = []
    interpolate = torch.nn.functional.interpolate

    def count(image, *args, **kwargs):
        calls.append(image.shape[0])
        return interpolate(image, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", count)
    images = photo_batch()
    WaveCLIPImageProcessorFast()(images, device="meta")
    # astronaut x3 (PIL, numpy, torch), coffee x2 uint8 RGB + 1 RGBA (another channel count), chelsea x2, rocket x2
    assert sorted(calls) == [1, 2, 2, 2, 3]
    calls.clear()
    WaveCLIPImageProcessorFast()(images, device="cpu")
    assert calls == [1] * len(images)


def test_both_classes_save_the_same_file_and_auto_picks_by_backend(tmp_path):
    WaveCLIPImageProcessor(levels=2).save_pretrained(tmp_path / "slow")
    WaveCLIPImageProcessorFast(levels=2).save_pretrained(tmp_path / "fast")
    saved = [json.loads((tmp_path / name / "preprocessor_config.json").read_text()) for name in ("slow", "fast")]
    assert saved[0] == saved[1]
    assert saved[0]["image_processor_type"] == "WaveCLIPImageProcessor"
    assert saved[0]["auto_map"]["AutoImageProcessor"] == [
        "image_processing_waveclip.WaveCLIPImageProcessor",
        "image_processing_waveclip.WaveCLIPImageProcessorFast",
    ]
    for backend, expected in (("torchvision", WaveCLIPImageProcessorFast), ("pil", WaveCLIPImageProcessor)):
        loaded = AutoImageProcessor.from_pretrained(tmp_path / "slow", trust_remote_code=True, backend=backend)
        assert type(loaded) is expected and loaded.levels == 2
