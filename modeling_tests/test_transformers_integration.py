"""WaveCLIP under transformers' machinery beyond the common tests: `torch.export`, gradient checkpointing, and the
initialisation transformers runs on a fresh model.

(transformers' own export harness is not in its sdist, see `transformers_sdist.py`; these tests stand in for it.)
"""

import pytest
import torch
from conftest import tiny_config
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from waveclip_hf import WaveCLIPModel, WaveCLIPVisionModel
from waveclip_hf.models.waveclip.modeling_waveclip import block_causal_mask


# transformers 5.24 renamed `gradient_checkpointing_enable` (the only name at the supported floor).
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def vision_model(levels: int = 2, seed: int = 0) -> WaveCLIPVisionModel:
    torch.manual_seed(seed)
    return WaveCLIPVisionModel(tiny_config(levels).vision_config).eval()


def pixels(batch: int, seed: int = 1, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_block_causal_mask_is_none_for_one_new_stage_and_block_causal_otherwise():
    config = tiny_config(levels=2).vision_config
    for first in range(config.num_stages):
        assert block_causal_mask(config, first, first + 1, torch.float32) is None
    mask = block_causal_mask(config, 1, 3, torch.float32)[0, 0]
    offsets = config.stage_offsets  # [0, 17, 66, 115]
    assert mask.shape == (offsets[3] - offsets[1], offsets[3])
    allowed = mask == 0
    assert allowed[: offsets[2] - offsets[1], : offsets[2]].all()  # stage 1 sees stages 0 and 1
    assert not allowed[: offsets[2] - offsets[1], offsets[2] :].any()  # ... but not stage 2
    assert allowed[offsets[2] - offsets[1] :].all()  # stage 2 sees everything
    assert mask.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch"])
def test_vision_model_exports_and_matches_eager(dynamic):
    model = vision_model()
    example = pixels(2)
    dynamic_shapes = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=16)}} if dynamic else None
    exported = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    check = pixels(5 if dynamic else 2, seed=2)
    with torch.no_grad():
        expected = model(check)
    got = exported.module()(check)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.stage_pooler_outputs, expected.stage_pooler_outputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch"])
def test_dual_encoder_exports_and_matches_eager(dynamic):
    torch.manual_seed(0)
    model = WaveCLIPModel(tiny_config(levels=2)).eval()
    input_ids = torch.randint(4, 99, (3, 6))
    inputs = {"input_ids": input_ids, "pixel_values": pixels(2)}
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = {
            "input_ids": {0: torch.export.Dim("texts", min=2, max=16)},
            "pixel_values": {0: torch.export.Dim("images", min=2, max=16)},
        }
    exported = torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes, strict=False)
    check = {
        "input_ids": torch.randint(4, 99, (4 if dynamic else 3, 6)),
        "pixel_values": pixels(5 if dynamic else 2, seed=3),
    }
    with torch.no_grad():
        expected = model(**check)
    got = exported.module()(**check)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, rtol=1e-5, atol=1e-4)


def _gradients(model, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(pixels(2), **kwargs).pooler_output.square().sum().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_and_no_cache(use_reentrant):
    model = vision_model().train()
    reference = _gradients(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.encoder.gradient_checkpointing and all(layer.gradient_checkpointing for layer in model.encoder.layers)
    checkpointed = _gradients(model, use_cache=True)
    output = model(pixels(2), use_cache=True)
    assert output.cache is None  # as transformers' models: caching is off under gradient checkpointing
    assert reference.keys() == checkpointed.keys() and len(reference) == len(list(model.parameters()))
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_refuses_to_continue_from_a_cache():
    model = vision_model()
    with torch.no_grad():
        cache = model(pixels(2), num_stages=1, use_cache=True).cache
    model.train().gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="Gradient checkpointing cannot continue from a cache"):
        model(pixels(2), cache=cache)
    with torch.no_grad():  # without gradients nothing is recomputed, so the cache works as in eval
        assert model(pixels(2), cache=cache).pooler_output.shape == (2, 32)


def _std(linear: torch.nn.Linear) -> float:
    return linear.weight.std().item()


def test_fresh_weights_follow_clips_scheme_in_both_towers():
    config = tiny_config(levels=1, hidden_size=64, intermediate_size=256, num_hidden_layers=4)
    config.text_config.hidden_size, config.text_config.intermediate_size = 64, 256
    torch.manual_seed(0)
    model = WaveCLIPModel(config)
    for tower in (model.vision_model, model.text_model):
        layers, width = tower.config.num_hidden_layers, tower.config.hidden_size
        attention = next(m for m in tower.modules() if isinstance(m, CLIPAttention))
        mlp = next(m for m in tower.modules() if isinstance(m, CLIPMLP))
        # CLIP's stds: q/k/v width^-0.5 (2 layers)^-0.5, out width^-0.5, fc1 (2 width)^-0.5,
        # fc2 width^-0.5 (2 layers)^-0.5; the generic init would give 0.02 everywhere.
        assert _std(attention.q_proj) == pytest.approx(width**-0.5 * (2 * layers) ** -0.5, rel=0.1)
        assert _std(attention.out_proj) == pytest.approx(width**-0.5, rel=0.1)
        assert _std(mlp.fc1) == pytest.approx((2 * width) ** -0.5, rel=0.1)
        assert _std(mlp.fc2) == pytest.approx(width**-0.5 * (2 * layers) ** -0.5, rel=0.1)
    assert model.logit_scale.item() == pytest.approx(config.logit_scale_init_value)


def test_from_pretrained_without_a_checkpoint_initialises_what_the_state_dict_leaves_out():
    config = tiny_config(levels=1)
    torch.manual_seed(0)
    reference = WaveCLIPModel(config)
    partial = {name: tensor for name, tensor in reference.state_dict().items() if name.startswith("vision_model.")}
    model = WaveCLIPModel.from_pretrained(None, config=config, state_dict=partial)
    for name, tensor in partial.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert not any(param.device.type == "meta" for param in model.parameters())
    assert model.logit_scale.item() == pytest.approx(config.logit_scale_init_value)
