"""Holds a draft-vocabulary drafter's floor channel fixed during fine-tuning.

`sd2 prune --draft-vocab-size` makes the dropped tokens impossible through one hidden channel
(`sd2_hf.pruning.head.floor_channel`): a positive constant in the embeddings, a unit gain in the
final norm, and a large negative head weight on the dropped rows. The sparsity masks hold the
layers' zeros that keep the channel constant; this callback holds those three values, which
are not zeros (Adam would move the constant by about the learning rate per step whatever its
gradient, and weight decay would shrink it).
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback

from sd2_hf.pruning.head import LOGIT_FLOOR, final_norm, find_floor_channel


def _base(model):
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT


def floor_channel_of(model) -> int | None:
    return find_floor_channel(_base(model))


def dropped_token_ids(model, channel: int) -> torch.Tensor:
    """The token ids a draft-vocabulary drafter can never propose: the head rows with a negative
    weight on the floor channel."""
    head = _base(model).get_output_embeddings().weight
    return (head.detach()[:, channel] < 0).nonzero().flatten()


# A draft-vocabulary drafter trains on its own vocabulary. Without it a dropped label, or the
# teacher's mass on dropped tokens, meets the drafter's logit below -1e4: losses of thousands
# whose gradients wreck the drafter in a few steps (measured: top-1 agreement with the target
# 0.73 -> 0.08 after 20 steps of SFT + forward KL).


def ignore_dropped_labels(labels: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """`labels` with the dropped tokens ignored (-100)."""
    return labels.masked_fill(torch.isin(labels, dropped.to(labels.device)), -100)


def renormalize_teacher(teacher_logits: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """The teacher's logits over the kept tokens only: the dropped ones set to `LOGIT_FLOOR`
    (probability exactly 0 in float32)."""
    return teacher_logits.index_fill(-1, dropped.to(teacher_logits.device), LOGIT_FLOOR)


class FloorChannelCallback(TrainerCallback):
    """Records the floor channel's embedding column, final-norm gain and head column at train
    begin and writes them back after every optimizer step."""

    def __init__(self, channel: int):
        self.channel = channel
        self._held: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _base(model)
        j = self.channel
        places = [
            (model.get_input_embeddings().weight, (slice(None), j)),
            (final_norm(model).weight, (j,)),
            (model.get_output_embeddings().weight, (slice(None), j)),
        ]
        if any(type(p).__name__ == "DTensor" for p, _ in places):
            raise ValueError(
                "a draft-vocabulary drafter (sd2 prune --draft-vocab-size) cannot be fine-tuned "
                "with sharded parameters (FSDP): train it with DDP or on one process"
            )
        self._held = [(p, index, p.detach()[index].clone()) for p, index in places]

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        for param, index, value in self._held:
            param[index] = value
