"""What both backends that run transformers assisted generation share: the in-process one and
the ONNX Runtime worker (`onnx_worker.py`, in an environment with transformers 4.57). This module
imports only torch and transformers, so the worker, which never imports the `sd2_hf` package,
imports it as a sibling file."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.generation.streamers import BaseStreamer


def mean_forward_seconds(forward: Callable[[int], float], widths: list[int]) -> dict[int, float]:
    """The verify-step timing both backends use for the cost model: one untimed pass of the
    widest width, then per width the mean of two timed passes (`forward(width)` returns one
    pass's seconds, the prompt's cache left as it was)."""
    forward(max(widths))
    return {w: (forward(w) + forward(w)) / 2 for w in widths}


def set_draft_length(model, num_draft_tokens: int) -> None:
    """Make the assistant draft exactly K tokens per step (SPEC §4: transformers reads the draft
    length from the assistant's generation_config, and the default confidence threshold of 0.4
    stops weak drafts early)."""
    config = model.generation_config
    config.num_assistant_tokens = num_draft_tokens
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = 0.0


class StepRecorder(BaseStreamer):
    """Drafted and committed tokens of each verification step of one assisted generation: the
    target's input ids of each call (`record_target_input`, or as a forward pre-hook
    `on_target_forward`) and the streamer's chunks (`put`)."""

    def __init__(self) -> None:
        self.prompt_length: int | None = None
        self.drafted: list[list[int]] = []
        self.committed: list[list[int]] = []

    def record_target_input(self, ids: torch.Tensor) -> None:
        start = self.prompt_length if not self.drafted else 1
        self.drafted.append(ids[0, start:].tolist())

    def on_target_forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        self.record_target_input(args[0] if ids is None else ids)

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_length is None:
            self.prompt_length = value.shape[-1]
        else:
            self.committed.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass

    def steps(self) -> list[tuple[list[int], list[int]]]:
        if len(self.drafted) != len(self.committed):
            raise RuntimeError(
                f"verification accounting out of step: {len(self.drafted)} target forward passes "
                f"but {len(self.committed)} committed chunks; this transformers version calls the "
                "target or the streamer differently from 5.17 and the counts would be wrong"
            )
        return list(zip(self.drafted, self.committed, strict=True))
