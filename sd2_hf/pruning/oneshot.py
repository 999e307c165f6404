"""Apply an llm-compressor pruning recipe to a model in one shot."""

from __future__ import annotations

import logging
import time

from torch import nn

from sd2_hf.pruning.config import PruneInputError
from sd2_hf.pruning.recipes import LoadedRecipe

logger = logging.getLogger(__name__)


def apply_recipe(
    model: nn.Module,
    tokenizer,
    loaded: LoadedRecipe,
    calibration: list[list[int]] | None,
    max_seq_length: int,
) -> float:
    """Prune `model` in place with the recipe; returns the seconds spent pruning.

    Afterwards `model.save_pretrained` is llm-compressor's wrapper (compressed-tensors
    format when the recipe quantizes; dense safetensors with exact zeros for pure sparsity)
    that also writes the recipe as run to `recipe.yaml`.
    """
    from llmcompressor.transformers.compression.compressed_tensors_utils import (
        modify_save_pretrained,
    )

    start = time.perf_counter()
    if loaded.scheduled:
        _apply_schedule_once(model, loaded)
    else:
        if loaded.needs_calibration and not calibration:
            raise PruneInputError(
                f"recipe {loaded.path} needs calibration data "
                f"({', '.join(type(m).__name__ for m in loaded.modifiers)}); pass `dataset`"
            )
        run_oneshot(model, tokenizer, loaded.recipe, calibration, max_seq_length)
    seconds = time.perf_counter() - start
    modify_save_pretrained(model)
    return seconds


def run_oneshot(model, tokenizer, recipe, calibration, max_seq_length) -> None:
    """llm-compressor's `oneshot` on token ids (a recipe object, file or list of modifiers)."""
    from datasets import Dataset
    from llmcompressor import oneshot

    dataset = None
    if calibration:
        dataset = Dataset.from_dict(
            {"input_ids": calibration, "attention_mask": [[1] * len(ids) for ids in calibration]}
        )
    oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=recipe,
        dataset=dataset,
        num_calibration_samples=len(calibration) if calibration else 0,
        max_seq_length=max_seq_length,
        # Keep the order the caller chose: the same samples on every run.
        shuffle_calibration_samples=False,
    )


def _apply_schedule_once(model: nn.Module, loaded: LoadedRecipe) -> None:
    """Run a training-time pruning schedule for a single step with no optimizer.

    llm-compressor 0.14 has no one-shot magnitude modifier: `MagnitudePruningModifier`
    computes its masks when the schedule starts but writes them into the weights only on
    optimizer-step events, which `oneshot` never sends. Sending one step's events through
    llm-compressor's own session applies the masks (at init_sparsity = final_sparsity)
    exactly once; no weight is otherwise changed.
    """
    from llmcompressor.core import active_session, callbacks

    session = active_session()
    session.reset()
    session.initialize(model=model, recipe=loaded.recipe, start=0)
    callbacks.batch_start()
    callbacks.optim_pre_step()
    callbacks.optim_post_step()
    callbacks.batch_end()
    session.finalize()
