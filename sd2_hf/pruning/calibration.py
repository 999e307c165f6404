"""Calibration samples for pruning: conversations rendered with the model's chat template."""

from __future__ import annotations

import logging

from sd2_hf.pruning.config import PruneInputError

logger = logging.getLogger(__name__)


def calibration_token_ids(
    source: str, tokenizer, num_samples: int, max_seq_length: int
) -> list[list[int]]:
    """Token ids of the first `num_samples` usable conversations of `source`, each rendered
    with the tokenizer's chat template and truncated to `max_seq_length` tokens."""
    from sd2_hf.data.loaders import load_conversations

    if not getattr(tokenizer, "chat_template", None):
        raise PruneInputError(
            f"the tokenizer of this model ({tokenizer.name_or_path or type(tokenizer).__name__}) "
            "has no chat template; calibration renders conversations with it, so use a chat "
            "model's tokenizer or set `tokenizer.chat_template`"
        )
    loaded = load_conversations(source, limit=num_samples)
    if loaded.skipped:
        logger.info("calibration data %s: skipped rows %s", source, dict(loaded.skipped))
    samples = []
    for row in loaded.rows:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        # The template already writes BOS/special tokens where the model expects them.
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_seq_length)[
            "input_ids"
        ]
        if ids:
            samples.append(ids)
    if not samples:
        raise PruneInputError(
            f"calibration source {source!r} gave no usable conversations "
            f"(read {loaded.total}, skipped {dict(loaded.skipped)}); expected rows with "
            "`messages` (role/content turns) or another format the loaders accept"
        )
    if len(samples) < num_samples:
        logger.warning(
            "asked for %d calibration samples, %s gave %d", num_samples, source, len(samples)
        )
    return samples
