"""`training/optimization.py`: the one learning-rate schedule and the one weight-decay rule both trainers use."""

import pytest
import torch
from conftest import reset_accelerate_state
from test_distillation import fresh_accelerate_state, images_dir, teacher_dir, tiny_config  # noqa: F401 (fixtures)
from transformers import CLIPModel, get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from waveclip_hf import WaveCLIPModel
from waveclip_hf.conversion import convert_clip_to_waveclip
from waveclip_hf.training.config import DistillationConfig
from waveclip_hf.training.distillation import distill
from waveclip_hf.training.models import freeze_text_side, load_teacher, student_from_teacher
from waveclip_hf.training.optimization import (
    cosine_schedule_with_warmup,
    decays,
    fresh_parameter_names,
    lr_at,
    optimizer_groups,
    parameter_groups,
    set_learning_rate,
)


def _scheduler_lrs(make_scheduler, lr: float, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup, total, min_lr_rate", [(10, 100, 0.1), (0, 37, 0.0), (7, 50, 0.0), (3, 4, 0.25)])
def test_schedule_is_transformers_cosine_with_min_lr_bit_for_bit(warmup, total, min_lr_rate):
    """Equal (==, not approx) to transformers' scheduler at every step, at a real peak learning rate; with
    min_lr_rate 0 also to `get_cosine_schedule_with_warmup`, the CLIP teacher's schedule before the unification."""
    peak = 7e-4
    ours = [peak * cosine_schedule_with_warmup(step, warmup, total, min_lr_rate) for step in range(total + 1)]
    theirs = _scheduler_lrs(
        lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr_rate=min_lr_rate),
        peak,
        total + 1,
    )
    assert ours == theirs
    if min_lr_rate == 0.0:
        assert ours == _scheduler_lrs(lambda o: get_cosine_schedule_with_warmup(o, warmup, total), peak, total + 1)
    assert ours[min(warmup, total)] == peak and ours[total] == pytest.approx(peak * min_lr_rate)
    assert cosine_schedule_with_warmup(total + 5, warmup, total, min_lr_rate) == pytest.approx(min_lr_rate)


def test_distiller_learning_rate_warms_up_from_zero_then_decays_to_the_floor():
    config = DistillationConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config, 100) == 0.0
    assert lr_at(5, config, 100) == pytest.approx(0.5)
    assert lr_at(10, config, 100) == pytest.approx(1.0)
    assert lr_at(55, config, 100) == pytest.approx(0.55)
    assert lr_at(100, config, 100) == pytest.approx(0.1)
    assert lr_at(0, DistillationConfig(learning_rate=1.0, warmup_ratio=0.05), 100) == 0.0  # 5 warmup steps


def test_weight_decay_rule_is_clips_on_the_teacher_and_the_student(teacher_dir):
    """No decay on biases, norms, the logit scale and anything in the embeddings (CLIP's rule, the teacher's
    before the unification); decay on the attention, MLP and projection matrices."""
    teacher = CLIPModel.from_pretrained(teacher_dir)
    decayed = {name for name, p in teacher.named_parameters() if decays(name, p)}
    assert decayed == {name for name, p in teacher.named_parameters() if p.ndim >= 2 and "embedding" not in name}
    assert {
        "visual_projection.weight",
        "text_projection.weight",
        "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.encoder.layers.1.mlp.fc2.weight",
    } <= decayed
    for name in (
        "logit_scale",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.position_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
        "vision_model.post_layernorm.weight",
        "vision_model.encoder.layers.0.mlp.fc1.bias",
    ):
        assert name not in decayed and name in dict(teacher.named_parameters())
    groups = parameter_groups(teacher, 0.1)
    assert sorted((g["weight_decay"], len(g["params"])) for g in groups) == [
        (0.0, len(list(teacher.parameters())) - len(decayed)),
        (0.1, len(decayed)),
    ]

    student = convert_clip_to_waveclip(teacher, levels=1, cell_size=16)
    freeze_text_side(student)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed = sorted(
        names[id(p)] for g in parameter_groups(student, 0.05) if g["weight_decay"] == 0.05 for p in g["params"]
    )
    layer_matrices = [
        f"vision_model.encoder.layers.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "mlp.fc1",
            "mlp.fc2",
            "self_attn.k_proj",
            "self_attn.out_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
        )
    ]
    assert decayed == sorted(layer_matrices + ["visual_projection.weight"])  # class tokens, patch projections: no


def test_set_learning_rate_applies_each_groups_scale():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [a], "lr_scale": 10.0}, {"params": [b]}], lr=1.0)
    set_learning_rate(optimizer, 0.003)
    assert [g["lr"] for g in optimizer.param_groups] == [0.003 * 10.0, 0.003]


def test_fresh_parameters_get_their_own_learning_rate(teacher_dir, images_dir, tmp_path):
    """The detail projection and band embeddings (random at conversion) run at `fresh_lr_multiplier` x the
    schedule; everything copied from the teacher at 1x; the frozen text side is in no group."""
    student = convert_clip_to_waveclip(CLIPModel.from_pretrained(teacher_dir), levels=1, cell_size=16)
    freeze_text_side(student)
    assert sorted(fresh_parameter_names(student)) == [
        "vision_model.embeddings.band_embedding.weight",
        "vision_model.embeddings.patch_embeddings.1.bias",
        "vision_model.embeddings.patch_embeddings.1.weight",
    ]
    config = tiny_config(teacher_dir, images_dir, tmp_path, fresh_lr_multiplier=10.0, weight_decay=0.05)
    groups = optimizer_groups(student, config)
    names = {id(p): n for n, p in student.named_parameters()}
    by_scale = {}
    for group in groups:
        by_scale.setdefault(group["lr_scale"], []).extend(group["params"])
        assert all(decays(names[id(p)], p) == (group["weight_decay"] == 0.05) for p in group["params"])
    assert sorted(names[id(p)] for p in by_scale[10.0]) == sorted(fresh_parameter_names(student))
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len({id(p) for g in groups for p in g["params"]})
    assert not any(names[id(p)].startswith("text_") for g in groups for p in g["params"])
    with pytest.raises(ValueError, match="fresh_lr_multiplier"):
        tiny_config(teacher_dir, images_dir, tmp_path, fresh_lr_multiplier=0.0)

    # In a run, the fresh parameters move further from their (seeded, identical) start than at multiplier 1.
    from accelerate.utils import set_seed

    set_seed(config.seed)  # as `distill` does before building the student
    teacher, teacher_processor, _ = load_teacher(str(teacher_dir))
    start, _ = student_from_teacher(teacher, teacher_processor, levels=1, wavelet="haar", cell_size=16)
    moved = {}
    for multiplier in (1.0, 10.0):
        reset_accelerate_state()
        result = distill(
            tiny_config(
                teacher_dir, images_dir, tmp_path / f"m{multiplier}", max_steps=3, fresh_lr_multiplier=multiplier
            )
        )
        trained = WaveCLIPModel.from_pretrained(result.final_dir)
        moved[multiplier] = float(
            (
                trained.vision_model.embeddings.patch_embeddings[1].weight.detach()
                - start.vision_model.embeddings.patch_embeddings[1].weight.detach()
            )
            .abs()
            .mean()
        )
    assert moved[1.0] > 0 and moved[10.0] > 3 * moved[1.0], moved
