import dataclasses
import subprocess

import datasets
import numpy as np
import pytest
from PIL import Image

from waveclip_hf.data.synthetic import (
    AXES,
    caption_for,
    generate_benchmark,
    image_params,
    label_ids,
    labels_of,
    load_benchmark_split,
    read_benchmark_info,
    render_image,
    sample_caption,
)


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
    other = generate_benchmark(tmp_path / "again", num_train=12, num_validation=4, num_test=6, seed=3, num_workers=1, progress=False)
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
    assert row == {**row, **{k: v for k, v in load_benchmark_split(tiny_benchmark, "test")[0].items() if k != "file_name"}}


def test_a_benchmark_written_before_the_package_layout_changed_is_reused(tiny_benchmark):
    """info.json keys the benchmark and every cache built on it (the teacher's hash holds it): it must not change
    when the generator's module moves. These are the exact contents a version-5 benchmark was written with."""
    info = read_benchmark_info(tiny_benchmark)
    assert info["generator"] == "waveclip_hf.benchmarks.synthetic" and info["generator_version"] == 5
    assert list(info) == ["generator", "generator_version", "seed", "image_size", "num_images", "axes"]
    assert info["axes"]["glyph"] == {"name": "glyph", "class_names": ["0", "1", "2", "4", "5", "7"],
                                     "template": "a photo of a shape with the glyph {}", "scale": "fine"}
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
