import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from waveclip_hf.data.synthetic import AXES, generate_benchmark, sample_caption
from waveclip_hf.evaluation.zero_shot import zero_shot_accuracy_per_axis
from waveclip_hf.training.teacher import (
    TeacherTrainingConfig,
    evaluate_clip_zero_shot,
    init_patch_projection_dct,
    multi_positive_clip_loss,
    read_training_info,
    train_clip_teacher,
)
from waveclip_hf.training.teacher_data import build_image_processor, normalize_pixels, pixel_cache


TINY = TeacherTrainingConfig(
    # 64-px inputs (the processor resizes the 224-px images) keep this test at a few seconds.
    image_size=64,
    patch_size=16,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_num_layers=1,
    vision_num_heads=2,
    text_hidden_size=32,
    text_intermediate_size=64,
    text_num_layers=1,
    text_num_heads=2,
    projection_dim=16,
    batch_size=8,
    num_epochs=6,
    learning_rate=3e-3,
    warmup_fraction=0.0,
    # Full captions only: with 8 pairs a batch, subset captions make the loss too noisy to see it fall.
    full_caption_probability=1.0,
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "bench"
    return generate_benchmark(root, num_train=32, num_validation=8, num_test=8, seed=1, num_workers=1, progress=False)


def test_pixel_cache_matches_image_processor(tiny_data):
    processor = build_image_processor(224)
    cache = pixel_cache(tiny_data, "validation", processor, num_workers=1, progress=False)
    assert cache.shape == (8, 3, 224, 224) and cache.dtype == np.uint8
    images = [Image.open(tiny_data / "validation" / f"{i:05d}.png") for i in range(3)]
    expected = processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalize_pixels(torch.from_numpy(np.array(cache[:3])), processor), expected)
    # Second call reads the file back.
    again = pixel_cache(tiny_data, "validation", processor, num_workers=1, progress=False)
    assert again.filename == cache.filename


@pytest.fixture
def one_thread():
    # The tiny model gains nothing from a second thread, and on a busy 2-core machine
    # OpenMP threads waiting on each other made this test 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_training_lowers_loss_and_reloads(tiny_data, tmp_path, one_thread):
    out = tmp_path / "teacher"
    config = dataclasses.replace(TINY, report_to=["tensorboard"])
    result = train_clip_teacher(tiny_data, out, config, num_workers=1, progress=False, evaluate_split=None)
    losses = result.info["losses"]
    assert not result.skipped and len(losses) == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
    # accelerate's TensorBoard tracker saw every step's loss, beside the folder (which a save replaces whole).
    logged = tensorboard_scalars(tmp_path / "teacher-logs", "loss")
    assert [step for step, _ in logged] == list(range(1, 25))
    assert np.allclose([value for _, value in logged], losses, atol=5e-5)  # info.json rounds to 4 decimals

    model = CLIPModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.vision_config.image_size == 64
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    inputs = processor(images=Image.open(tiny_data / "test" / "00000.png"), return_tensors="pt")
    text = tokenizer(AXES["shape"].prompts(), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, **text).logits_per_image
    assert logits.shape == (1, len(AXES["shape"].class_names))

    # Same config + same data: the finished teacher is reused, not retrained.
    again = train_clip_teacher(tiny_data, out, TINY, num_workers=1, progress=False, evaluate_split=None)
    assert again.skipped and again.info == read_training_info(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher", "teacher-logs"]

    accuracies = evaluate_clip_zero_shot(model, tokenizer, processor, tiny_data, "test", num_workers=1, progress=False)
    assert set(accuracies) == set(AXES) and all(0.0 <= a <= 1.0 for a in accuracies.values())


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every `tag` scalar in the TensorBoard event files under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return sorted(values)


def test_zero_shot_accuracy_per_axis():
    text = {"a": torch.eye(3), "b": torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])}
    images = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 5.0], [0.1, 3.0, 0.0], [0.0, 1.0, 0.0]])
    labels = {"a": torch.tensor([0, 2, 1, 0]), "b": torch.tensor([0, 1, 0, 1])}
    assert zero_shot_accuracy_per_axis(images, labels, text) == {"a": 0.75, "b": 0.75}
    with pytest.raises(ValueError, match="labels"):
        zero_shot_accuracy_per_axis(images, {"a": torch.tensor([0, 1])}, text)


def test_multi_positive_clip_loss():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    torch.manual_seed(0)
    logits = torch.randn(5, 5) * 3
    # One positive per row: exactly CLIP's loss.
    torch.testing.assert_close(
        multi_positive_clip_loss(logits, torch.eye(5, dtype=torch.bool)), image_text_contrastive_loss(logits.T)
    )
    # Captions 0 and 1 are both true of images 0 and 1: the target spreads over them.
    matches = torch.eye(5, dtype=torch.bool)
    matches[0, 1] = matches[1, 0] = True
    expected_row0 = -(logits[0].log_softmax(0)[:2].mean())
    image_loss = -(matches / matches.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1)
    torch.testing.assert_close(image_loss[0], expected_row0)


def test_new_recipe_fields_keep_the_default_config_hash():
    """Fields added later are hashed only when set: the default teacher's cache key is the one it always had (its
    precision was bf16 before "auto" became the default; "auto" resolves per machine, see the next test)."""
    assert TeacherTrainingConfig(mixed_precision="bf16").config_hash({"a": 1}) == "add01cc01df2bc62"
    bf16 = {"mixed_precision": "bf16"}
    assert TeacherTrainingConfig(dct_patch_rows=8, **bf16).config_hash({"a": 1}) != "add01cc01df2bc62"
    assert TeacherTrainingConfig(single_axis_captions=True, **bf16).config_hash({"a": 1}) != "add01cc01df2bc62"
    # Where the run is logged to is not part of the teacher.
    assert TeacherTrainingConfig(report_to=["tensorboard"], **bf16).config_hash({"a": 1}) == "add01cc01df2bc62"


def test_auto_precision_resolves_when_the_config_is_made(monkeypatch):
    """The default precision is "auto": bf16 where it runs natively, float32 where a CPU would emulate it (about
    8x slower on AVX2). It resolves at construction, so the cache key holds the precision that ran: a default
    config on a bf16 machine keys like an explicit bf16 one, and an unknown value is refused."""
    from waveclip_hf.training import teacher as teacher_module

    for resolved in ("bf16", "no"):
        monkeypatch.setattr(teacher_module, "auto_mixed_precision", lambda resolved=resolved: resolved)
        config = TeacherTrainingConfig()
        assert config.mixed_precision == resolved
        assert config.config_hash({"a": 1}) == TeacherTrainingConfig(mixed_precision=resolved).config_hash({"a": 1})
    assert TeacherTrainingConfig(mixed_precision="bf16").config_hash({"a": 1}) != TeacherTrainingConfig(
        mixed_precision="no"
    ).config_hash({"a": 1})
    with pytest.raises(ValueError, match="'auto', 'no', 'bf16' or 'fp16'"):
        TeacherTrainingConfig(mixed_precision="float16")


def test_dct_patch_projection_rows_are_an_orthonormal_low_frequency_basis():
    weight = torch.randn(16, 3, 8, 8)
    random_rows = weight[10:].clone()
    init_patch_projection_dct(weight, 10)
    rows = weight[:10].reshape(10, -1)
    torch.testing.assert_close(rows @ rows.T, torch.eye(10), atol=1e-5, rtol=0)
    # Row c is the constant (DC) function of channel c; rows 3-5 the lowest vertical frequency of each channel.
    for channel in range(3):
        torch.testing.assert_close(weight[channel, channel], torch.full((8, 8), 1 / 8))
        assert weight[channel].abs().sum() == weight[channel, channel].abs().sum()
    assert torch.equal(weight[10:], random_rows)
    with pytest.raises(ValueError, match="dct_patch_rows"):
        init_patch_projection_dct(weight, 17)


def test_single_axis_captions_name_one_axis():
    labels = {"color": "red", "shape": "star", "texture": "dots", "glyph": "7"}
    rng = np.random.default_rng(0)
    named = [sample_caption(labels, rng, p_full=0.0, return_axes=True, single_axis=True)[1] for _ in range(200)]
    assert all(len(axes) == 1 for axes in named) and {axes[0] for axes in named} == set(labels)


def test_init_from_a_smaller_teacher_reads_the_2x_upsample_like_the_source(tmp_path):
    """A 2x teacher (image and patch doubled) started from a trained one gives the source's image embedding on a
    2x nearest-upsampled image, and the source's text embedding for words both vocabularies hold."""
    from waveclip_hf.data.text_tokenizer import build_word_level_tokenizer
    from waveclip_hf.training.teacher import build_clip_config
    from waveclip_hf.training.teacher_init import init_from_smaller_teacher

    small = TeacherTrainingConfig(
        image_size=32,
        patch_size=8,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_layers=1,
        text_hidden_size=32,
        text_intermediate_size=64,
        text_num_layers=1,
        projection_dim=16,
    )
    source_tokenizer = build_word_level_tokenizer(["a red star", "a blue ring"], max_length=small.max_text_length)
    torch.manual_seed(0)
    source = CLIPModel(build_clip_config(small, source_tokenizer)).eval()
    source.save_pretrained(tmp_path / "source")
    source_tokenizer.save_pretrained(tmp_path / "source")
    big = dataclasses.replace(small, image_size=64, patch_size=16)
    tokenizer = build_word_level_tokenizer(["a red star", "the letter e"], max_length=small.max_text_length)
    model = CLIPModel(build_clip_config(big, tokenizer)).eval()
    info = init_from_smaller_teacher(model, tokenizer, tmp_path / "source")
    assert info["factor"] == 2 and {"letter", "e", "the"} <= set(info["new_words"]) and "star" not in info["new_words"]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(
                pixel_values=pixels.repeat_interleave(2, 2).repeat_interleave(2, 3)
            ).pooler_output,
            source.get_image_features(pixel_values=pixels).pooler_output,
            atol=1e-5,
            rtol=1e-5,
        )

        def text(m, tok):
            return m.get_text_features(**tok(["a red star"], return_tensors="pt")).pooler_output

        torch.testing.assert_close(text(model, tokenizer), text(source, source_tokenizer))
        # ... while a zero-mean 2x2 pattern (the micro scale) moves the grown teacher's embedding from step 0.
        grain = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(32, 32)
        upsampled = pixels.repeat_interleave(2, 2).repeat_interleave(2, 3)
        moved = (
            (
                model.get_image_features(pixel_values=upsampled + grain).pooler_output
                - model.get_image_features(pixel_values=upsampled).pooler_output
            )
            .abs()
            .max()
        )
        assert moved > 1e-2, moved
    with pytest.raises(ValueError, match="same patch grid"):
        init_from_smaller_teacher(
            CLIPModel(build_clip_config(dataclasses.replace(small, patch_size=16, image_size=64 * 2), tokenizer)),
            tokenizer,
            tmp_path / "source",
        )
    assert TeacherTrainingConfig(init_from="x").config_hash({"a": 1}) != TeacherTrainingConfig().config_hash({"a": 1})
