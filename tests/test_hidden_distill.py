"""Layer-wise hidden-state distillation (SquareHead) in SD2Trainer."""

from __future__ import annotations

import pytest
import tiny
import torch
from datasets import Dataset

from sd2_hf import SD2Config, SD2Trainer
from sd2_hf.pruning.masks import find_target_linears

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_args(tmp_path, **overrides) -> SD2Config:
    kwargs = dict(
        max_steps=30,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        distill_loss="fkl",
        hidden_distill_weight=1.0,
    )
    kwargs.update(overrides)
    return SD2Config(**tiny.trainer_kwargs(tmp_path / "out", **kwargs))


def test_square_head_by_hand():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    student = [t + 0.1 * torch.randn(t.shape, generator=g) for t in teacher]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = SD2Trainer._square_head(student, teacher, {"attention_mask": mask})
    # layer 0 (the embeddings) is not a decoder layer's output and is left out
    per_layer = []
    for s, t in zip(student[1:], teacher[1:], strict=True):
        keep = mask.bool()
        per_layer.append(((s - t)[keep] ** 2).sum() / (t[keep] ** 2).sum())
    assert torch.allclose(got, torch.stack(per_layer).mean())
    assert SD2Trainer._square_head(teacher, teacher, {"attention_mask": mask}) == 0


def _trained_distance(tmp_path, tokenizer, weight: float) -> tuple[float, bool]:
    """SquareHead distance to the teacher after training with `weight`, and masks exact."""
    teacher = tiny.build_model(tokenizer, seed=6)
    drafter = tiny.build_model(tokenizer, seed=6)
    drafter.load_state_dict(teacher.state_dict())
    tiny.magnitude_sparsify(drafter, 0.5)  # the drafter pruned from the teacher
    zeros = {n: (m.weight == 0).clone() for n, m in find_target_linears(drafter).items()}
    rows = tiny.conversations(8, seed=2)
    trainer = SD2Trainer(
        drafter,
        args=make_args(tmp_path / str(weight), hidden_distill_weight=weight),
        teacher_model=teacher,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    if weight:
        assert any("hidden_distill_loss" in h for h in trainer.state.log_history)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        s = drafter.eval()(**batch, output_hidden_states=True).hidden_states
        t = teacher(**batch, output_hidden_states=True).hidden_states
    after = {n: (m.weight == 0) for n, m in find_target_linears(drafter).items()}
    exact = all(torch.equal(zeros[n], after[n]) for n in zeros)
    return float(SD2Trainer._square_head(s, t, batch)), exact


def test_hidden_distillation_pulls_the_drafter_to_the_teacher(tmp_path, tiny_tokenizer):
    without, exact_without = _trained_distance(tmp_path, tiny_tokenizer, 0.0)
    with_, exact_with = _trained_distance(tmp_path, tiny_tokenizer, 5.0)
    assert exact_without and exact_with
    assert with_ < 0.5 * without, (with_, without)


def test_shape_mismatch_is_refused(tmp_path, tiny_tokenizer):
    drafter = tiny.build_model(tiny_tokenizer, num_layers=1)
    teacher = tiny.build_model(tiny_tokenizer, num_layers=2)
    with pytest.raises(
        ValueError, match=r"\(layers, width\) \(1, 128\) and the teacher \(2, 128\)"
    ):
        SD2Trainer(
            drafter,
            args=make_args(tmp_path),
            teacher_model=teacher,
            train_dataset=Dataset.from_list(tiny.conversations(4)),
            processing_class=tiny_tokenizer,
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_distill_weight": -1.0}, "hidden_distill_weight must be >= 0"),
        ({"distill_loss": "none", "hidden_distill_weight": 1.0}, "set distill_loss"),
    ],
)
def test_config_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)
