"""sd2-hf: Self-Distilled Sparse Drafters (SD²) for speculative decoding on the Hugging Face stack."""

from __future__ import annotations

__version__ = "0.1.0"

# Registers the `asset:<name>` resolver of `sd2_hf.utils.models.resolve_model_path`: every
# import of a submodule runs this first, so an asset name resolves wherever a model is named.
from sd2_hf import assets as _assets  # noqa: E402, F401

# Public API, imported lazily so `import sd2_hf` (and the `sd2` CLI) stays fast.
_LAZY = {
    "SD2Config": "sd2_hf.training.sd2_config",
    "SD2Trainer": "sd2_hf.training.trainer",
    "SparsityMaskCallback": "sd2_hf.training.callbacks",
    "get_sparse_peft_model": "sd2_hf.training.sparse_lora",
    "load_sparse_adapter": "sd2_hf.training.sparse_lora",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sd2_hf' has no attribute {name!r}")
