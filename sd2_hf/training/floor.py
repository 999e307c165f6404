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

from sd2_hf.pruning.head import final_norm, find_floor_channel


def floor_channel_of(model) -> int | None:
    model = extract_model_from_parallel(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return find_floor_channel(model)


class FloorChannelCallback(TrainerCallback):
    """Records the floor channel's embedding column, final-norm gain and head column at train
    begin and writes them back after every optimizer step."""

    def __init__(self, channel: int):
        self.channel = channel
        self._held: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = extract_model_from_parallel(model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
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
