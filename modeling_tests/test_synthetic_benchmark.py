import dataclasses
import hashlib
import subprocess

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from waveclip_hf.data.synthetic import (
    AXES,
    GRAIN_TILES,
    THREE_SCALE_AXES,
    benchmark_axes,
    caption_for,
    generate_benchmark,
    image_params,
    label_ids,
    labels_of,
    load_benchmark_split,
    read_benchmark_info,
    render_image,
    render_three_scale_image,
    sample_caption,
    three_scale_image_params,
    three_scale_labels_of,
)
from waveclip_hf.models.waveclip.image_processing_waveclip import WaveCLIPImageProcessor


def haar_approximation(image: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H/2, W/2, C): the 2x2 block mean, i.e. the Haar level-1 approximation up to a factor 2."""
    h, w, c = image.shape
    return image.astype(np.float64).reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "synthetic"
    return generate_benchmark(root, num_train=12, num_validation=4, num_test=6, seed=3, num_workers=2, progress=False)


def test_axes_are_well_formed():
    assert set(AXES) == {"color", "shape", "texture", "glyph"}
    for axis in AXES.values():
        assert 4 <= len(axis.class_names) <= 8
        assert len(set(axis.prompts())) == len(axis.class_names)
        assert axis.scale in ("coarse", "fine")
    assert AXES["color"].prompts()[1] == "a photo of an orange shape"


def test_rendering_is_deterministic():
    for index in range(3):
        a = render_image(image_params(7, "test", index))
        b = render_image(image_params(7, "test", index))
        assert a.dtype == np.uint8 and a.shape == (224, 224, 3)
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(render_image(image_params(7, "test", 0)), render_image(image_params(8, "test", 0)))


def test_generated_files_are_deterministic(tiny_benchmark, tmp_path):
    # Another run, in one process this time, writes the same bytes.
    other = generate_benchmark(
        tmp_path / "again", num_train=12, num_validation=4, num_test=6, seed=3, num_workers=1, progress=False
    )
    for split in ("train", "test"):
        for name in ("00000.png", "00003.png", "metadata.jsonl"):
            assert (tiny_benchmark / split / name).read_bytes() == (other / split / name).read_bytes()


def test_metadata_matches_captions_and_pixels(tiny_benchmark):
    info = read_benchmark_info(tiny_benchmark)
    assert info["seed"] == 3 and info["num_images"] == {"train": 12, "validation": 4, "test": 6}
    for split, count in info["num_images"].items():
        rows = load_benchmark_split(tiny_benchmark, split)
        assert [row["file_name"] for row in rows] == [f"{i:05d}.png" for i in range(count)]
        for i, row in enumerate(rows):
            labels = {axis: row[axis] for axis in AXES}
            assert labels == labels_of(image_params(3, split, i))
            assert row["caption"] == caption_for(labels)
            for axis in AXES:
                assert row[axis] in AXES[axis].class_names
                assert row[axis] in row["caption"]
        image = np.asarray(Image.open(tiny_benchmark / split / rows[0]["file_name"]))
        np.testing.assert_array_equal(image, render_image(image_params(3, split, 0)))
    ids = label_ids(load_benchmark_split(tiny_benchmark, "train"), "shape")
    assert ids.dtype == np.int64 and ids.shape == (12,) and ids.max() < len(AXES["shape"].class_names)


def test_loads_with_datasets_imagefolder(tiny_benchmark):
    ds = datasets.load_dataset("imagefolder", data_dir=str(tiny_benchmark))
    assert {name: len(split) for name, split in ds.items()} == {"train": 12, "validation": 4, "test": 6}
    row = ds["test"][0]
    assert row["image"].size == (224, 224)
    assert row == {
        **row,
        **{k: v for k, v in load_benchmark_split(tiny_benchmark, "test")[0].items() if k != "file_name"},
    }


def test_a_benchmark_written_before_the_package_layout_changed_is_reused(tiny_benchmark):
    """info.json keys the benchmark and every cache built on it (the teacher's hash holds it): it must not change
    when the generator's module moves. These are the exact contents a version-5 benchmark was written with."""
    info = read_benchmark_info(tiny_benchmark)
    assert info["generator"] == "waveclip_hf.benchmarks.synthetic" and info["generator_version"] == 5
    assert list(info) == ["generator", "generator_version", "seed", "image_size", "num_images", "axes"]
    assert info["axes"]["glyph"] == {
        "name": "glyph",
        "class_names": ["0", "1", "2", "4", "5", "7"],
        "template": "a photo of a shape with the glyph {}",
        "scale": "fine",
    }
    assert info["num_images"] == {"train": 12, "validation": 4, "test": 6} and info["seed"] == 3


def test_generation_is_cached_and_replaces_outdated(tiny_benchmark, tmp_path):
    marker = tiny_benchmark / "train" / "00000.png"
    mtime = marker.stat().st_mtime_ns
    generate_benchmark(tiny_benchmark, num_train=12, num_validation=4, num_test=6, seed=3, progress=False)
    assert marker.stat().st_mtime_ns == mtime

    root = tmp_path / "bench"
    # A temporary folder of a killed run (its pid is gone) is cleaned up by the next run.
    finished = subprocess.Popen(["true"])
    finished.wait()
    (tmp_path / f".bench.tmp-{finished.pid}" / "train").mkdir(parents=True)
    generate_benchmark(root, num_train=2, num_validation=1, num_test=1, seed=0, num_workers=1, progress=False)
    generate_benchmark(root, num_train=3, num_validation=1, num_test=1, seed=0, num_workers=1, progress=False)
    assert read_benchmark_info(root)["num_images"]["train"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]  # no temp folders left behind

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_benchmark(foreign, num_train=1, num_validation=1, num_test=1, progress=False)


def test_textures_vanish_in_the_haar_approximation():
    params = image_params(0, "test", 5)
    renders = {
        texture: render_image(dataclasses.replace(params, texture=texture, texture_amplitude=60.0))
        for texture in AXES["texture"].class_names
    }
    names = list(renders)
    for a in names:
        for b in names[names.index(a) + 1 :]:
            full = np.abs(renders[a].astype(np.float64) - renders[b]).mean()
            coarse = np.abs(haar_approximation(renders[a]) - haar_approximation(renders[b])).mean()
            # Full resolution: clearly different inside the object. 2x2 means: equal up to
            # rounding to uint8 (the noise is shared, the texture sums to 0 per block).
            assert full > 2.0, (a, b, full)
            assert coarse < 0.02 * full, (a, b, coarse, full)


def test_glyphs_vanish_in_the_haar_approximation():
    """The digit is drawn in aligned zero-mean 2x2 blocks: all six digits give the same 2x2 block means (up to
    uint8 rounding), while at full resolution they differ on the tags."""
    params = image_params(0, "test", 5)
    renders = {glyph: render_image(dataclasses.replace(params, glyph=glyph)) for glyph in AXES["glyph"].class_names}
    names = list(renders)
    for a in names:
        for b in names[names.index(a) + 1 :]:
            diff = np.abs(renders[a].astype(np.float64) - renders[b])
            coarse = np.abs(haar_approximation(renders[a]) - haar_approximation(renders[b]))
            assert diff.max() >= 60 and diff.mean() > 0.1, (a, b, diff.max(), diff.mean())  # amplitude >= 60
            assert coarse.max() <= 1.0 and coarse.mean() < 0.01 * diff.mean(), (a, b, coarse.max(), coarse.mean())


def test_sample_caption_names_only_true_labels():
    labels = labels_of(image_params(0, "train", 1))
    rng = np.random.default_rng(0)
    captions = {sample_caption(labels, rng) for _ in range(200)}
    assert caption_for(labels) in captions
    assert len(captions) > 10
    for caption in captions:
        padded = f" {caption} "
        for axis, label in labels.items():
            wrong = [name for name in AXES[axis].class_names if name != label and f" {name} " in padded]
            assert not wrong, (caption, wrong)


def block_mean(image: np.ndarray, block: int) -> np.ndarray:
    """(H, W, C) -> (H/b, W/b, C) mean of aligned b x b blocks: the Haar level-log2(b) approximation up to a
    factor b."""
    h, w, c = image.shape
    return image.astype(np.float64).reshape(h // block, block, w // block, block, c).mean(axis=(1, 3))


def test_two_scale_pixels_are_pinned():
    """The default (two-scale) benchmark must not change when other layouts are added: three images, hashed."""
    expected = {
        ("train", 0): "c6993361b28840ee",
        ("test", 5): "49629b8b44baff3f",
        ("validation", 17): "202195838d97224f",
    }
    for (split, index), digest in expected.items():
        assert hashlib.sha256(render_image(image_params(0, split, index)).tobytes()).hexdigest()[:16] == digest


def test_caption_with_three_details():
    labels = {"color": "red", "shape": "star", "texture": "dots", "glyph": "7", "grain": "row grain"}
    assert caption_for(labels, tuple(labels)) == "a red star with dots, the glyph 7 and row grain"
    assert caption_for(labels, ("shape", "grain")) == "a star with row grain"
    assert caption_for(labels, ("texture", "glyph")) == "a shape with dots and the glyph 7"
    assert THREE_SCALE_AXES["grain"].prompts()[0] == "a photo of a shape with plain grain"
    rng = np.random.default_rng(0)
    named = {
        axis for _ in range(100) for axis in sample_caption(labels, rng, return_axes=True, axes=THREE_SCALE_AXES)[1]
    }
    assert named == set(THREE_SCALE_AXES)


@pytest.fixture(scope="module")
def three_scale_benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench448") / "synthetic"
    return generate_benchmark(
        root, num_train=3, num_validation=1, num_test=2, seed=3, num_workers=1, progress=False, layout="three-scale"
    )


def test_three_scale_layout_writes_five_axes(three_scale_benchmark):
    info = read_benchmark_info(three_scale_benchmark)
    assert info["layout"] == "three-scale" and info["image_size"] == 448
    assert benchmark_axes(info) == THREE_SCALE_AXES
    assert benchmark_axes(read_benchmark_info(three_scale_benchmark)) != AXES
    rows = load_benchmark_split(three_scale_benchmark, "test")
    for i, row in enumerate(rows):
        labels = three_scale_labels_of(three_scale_image_params(3, "test", i))
        assert {axis: row[axis] for axis in THREE_SCALE_AXES} == labels
        assert row["caption"] == caption_for(labels, tuple(THREE_SCALE_AXES))
        image = np.asarray(Image.open(three_scale_benchmark / "test" / row["file_name"]))
        np.testing.assert_array_equal(image, render_three_scale_image(three_scale_image_params(3, "test", i)))
    assert label_ids(rows, "grain").tolist() == [THREE_SCALE_AXES["grain"].class_names.index(r["grain"]) for r in rows]
    with pytest.raises(ValueError, match="multiple of 64"):
        generate_benchmark(three_scale_benchmark.parent / "bad", image_size=480, layout="three-scale", progress=False)


def _three_scale_variants(axis: str) -> dict[str, np.ndarray]:
    """Renders of one three-scale image that differ only in `axis`."""
    params = three_scale_image_params(0, "test", 5)
    names = THREE_SCALE_AXES[axis].class_names
    if axis == "grain":
        return {name: render_three_scale_image(dataclasses.replace(params, grain=name)) for name in names}
    return {
        name: render_three_scale_image(
            dataclasses.replace(params, scene=dataclasses.replace(params.scene, **{axis: name}))
        )
        for name in names
    }


def _max_pairwise(renders: dict[str, np.ndarray], block: int) -> tuple[float, float]:
    """(smallest full-resolution mean |difference|, largest b x b block-mean |difference|) over all pairs."""
    names, full, coarse = list(renders), [], []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            full.append(np.abs(renders[a].astype(np.float64) - renders[b]).mean())
            coarse.append(np.abs(block_mean(renders[a], block) - block_mean(renders[b], block)).max())
    return min(full), max(coarse)


def test_micro_axis_vanishes_below_448():
    """The grains are zero-mean integer 2x2 tiles added without clipping: all six give exactly the same 2x2 block
    means (the 224-px image, the Haar level-1 approximation), while at 448 px they differ by several grey levels."""
    renders = _three_scale_variants("grain")
    assert len(renders) == len(GRAIN_TILES) == 6
    full, coarse = _max_pairwise(renders, 2)
    assert full > 5 and coarse == 0, (full, coarse)
    # Pillow's box filter is the 2x2 block mean: the 224-px downsample is the same image for every grain.
    downsampled = {
        name: np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BOX))
        for name, image in renders.items()
    }
    assert all(np.array_equal(d, downsampled["plain grain"]) for d in downsampled.values())


def test_fine_axes_vanish_in_the_level2_approximation():
    """At 448 px the scene's texture and glyph change the 2x2 block means (they are visible at 224 px) but not the
    4x4 block means (the level-2 approximation, i.e. WaveCLIP's stage 0 at 448/L=2)."""
    for axis, min_half in (("texture", 2.0), ("glyph", 0.1)):
        renders = _three_scale_variants(axis)
        names = list(renders)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                half = np.abs(block_mean(renders[a], 2) - block_mean(renders[b], 2)).mean()
                quarter = np.abs(block_mean(renders[a], 4) - block_mean(renders[b], 4))
                # Equal up to uint8 rounding, and the rare texture pixel clipped at 0 or 255 (as at 224 px).
                assert half > min_half and quarter.mean() < 0.01 * half and quarter.max() < 3, (
                    a,
                    b,
                    half,
                    quarter.max(),
                )


def test_three_scale_bands_hold_each_scale():
    """Through WaveCLIP's own processor (448 px, L=2): the grain changes only the level-1 detail bands (stage 2);
    texture changes the level-2 detail bands (stage 1) but not the level-2 approximation (stage 0); colour
    changes stage 0."""
    processor = WaveCLIPImageProcessor(image_size=448, levels=2)

    def largest_change(renders) -> list[float]:
        """Per stage (approximation, level-2 details, level-1 details): the largest change of a coefficient
        between the first render and any other."""
        pixel_values = processor(list(renders.values()), return_tensors="pt")["pixel_values"]
        approximation, level2, level1 = processor.unpack(pixel_values)
        stages = [approximation, torch.stack(list(level2), 1), torch.stack(list(level1), 1)]
        return [float((band - band[:1]).abs().max()) for band in stages]

    grains, textures, colors = (
        _three_scale_variants("grain"),
        _three_scale_variants("texture"),
        _three_scale_variants("color"),
    )
    # Grains: integer tiles added to integer pixels, so the pixels' 2x2 means do not change at all.
    stage0, stage1, stage2 = largest_change(grains)
    assert stage0 < 1e-4 and stage1 < 1e-4 and stage2 > 0.3, (stage0, stage1, stage2)
    # Textures: the 224-px scene's uint8 rounding (and a rare clipped pixel) is all that reaches stage 0.
    stage0, stage1, _ = largest_change(textures)
    assert stage0 < 0.3 and stage1 > 1, (stage0, stage1)
    assert largest_change(colors)[0] > 1
