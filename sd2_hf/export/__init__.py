"""Export a drafter for use: compressed-tensors checkpoint, `sd2_drafter.json`, model card, Hub push.

Imported lazily so the `sd2` CLI and recipe loading stay fast; torch, transformers and
llm-compressor load only when an export or push runs.
"""

from __future__ import annotations

_LAZY = {
    "ExportConfig": "sd2_hf.export.config",
    "ExportResult": "sd2_hf.export.export",
    "run_export": "sd2_hf.export.export",
    "available_formats": "sd2_hf.export.export",
    "render_model_card": "sd2_hf.export.card",
    "PushConfig": "sd2_hf.export.push",
    "run_push": "sd2_hf.export.push",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sd2_hf.export' has no attribute {name!r}")
