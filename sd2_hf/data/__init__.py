"""Conversation schema, seed-data loaders and self-data distillation."""

from __future__ import annotations

from sd2_hf.data.loaders import LoadResult, load_conversations, load_mtbench
from sd2_hf.data.schema import MalformedRow, normalize_messages

__all__ = ["LoadResult", "MalformedRow", "load_conversations", "load_mtbench", "normalize_messages"]
