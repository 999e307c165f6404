"""How much the libraries under sd2 print: their chatter only with `sd2 -v`.

llm-compressor logs through loguru to stdout, by default at INFO, with its per-layer
"Sparsifying model.layers.N..." lines and two METRIC lines (level 38, above WARNING) for
every pruned linear layer: about 700 lines for SmolLM2-135M, which bury sd2's own summary.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager


def verbose() -> bool:
    """Whether sd2 logs at DEBUG: `sd2 -v`, or a caller's `logging` set-up."""
    return logging.getLogger("sd2_hf").isEnabledFor(logging.DEBUG)


@contextmanager
def llmcompressor_logging() -> Iterator[None]:
    """While inside, llm-compressor's console log shows only errors, or everything (INFO and
    its per-layer METRIC lines) when `verbose()`; its previous configuration is restored after.

    Uses llm-compressor's own switch, `configure_logger`, so its environment variables keep
    priority: `LLM_COMPRESSOR_LOG_LEVEL=INFO` (or `LLM_COMPRESSOR_LOG_DISABLED`) still decides.
    """
    # The module itself: `llmcompressor.logger` as an attribute is loguru's logger object.
    llmcompressor_logger = importlib.import_module("llmcompressor.logger")
    previous = dataclasses.replace(llmcompressor_logger.LOGGER_CONFIG)
    # ERROR, not WARNING: METRIC (38) sits above WARNING, so WARNING would keep the per-layer
    # lines; the warnings it does print here are noise ("No accelerator available!").
    level = "INFO" if verbose() else "ERROR"
    llmcompressor_logger.configure_logger(dataclasses.replace(previous, console_log_level=level))
    try:
        yield
    finally:
        llmcompressor_logger.configure_logger(previous)
