"""Which linear layers a sparsity method targets, and how sparse they are.

Target syntax follows llm-compressor's: a module class name (`"Linear"`), an exact module
name, or `"re:<regex>"` matched against module names (not parameter names: SPEC §4).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

DEFAULT_TARGETS: tuple[str, ...] = ("Linear",)
# Embeddings are not nn.Linear; lm_head is, and must stay dense (SPEC §2).
DEFAULT_IGNORE: tuple[str, ...] = ("re:.*lm_head",)


def _matches(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name or pattern == type(module).__name__:
            return True
    return False


def _is_adapter_internal(name: str) -> bool:
    """PEFT's parts of an adapted layer: the wrapper (named like the original module, exposing the
    base `weight`) stands for the layer, so its `base_layer` and `lora_*` children are skipped."""
    parts = name.split(".")
    return parts[-1] == "base_layer" or any(p.startswith("lora_") for p in parts)


def find_target_linears(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> dict[str, nn.Module]:
    """Modules with a 2-D `weight` that match `targets` and none of `ignore`, by module name."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if isinstance(module, nn.Embedding) or _is_adapter_internal(name):
            continue
        # an adapter wrapper matches by its base layer's class (`Linear`), not its own
        typed = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if _matches(name, typed, targets) and not _matches(name, typed, ignore):
            found[name] = module
    return found


def weight_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).sum().item()) / max(weight.numel(), 1)


def is_n_m_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of `m` consecutive weights along the input dimension has >= n zeros."""
    if weight.shape[-1] % m:
        return False
    zeros = (weight.detach().reshape(-1, m) == 0).sum(dim=-1)
    return bool((zeros >= n).all().item())


def layer_structure(weight: torch.Tensor) -> str:
    """ "dense", "2:4" or "unstructured" for one weight matrix."""
    if not bool((weight == 0).any().item()):
        return "dense"
    return "2:4" if is_n_m_sparse(weight, 2, 4) else "unstructured"


@torch.no_grad()
def sparsity_report(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> dict:
    """Per-layer and global sparsity of the targeted layers, and the overall structure.

    Returns {"global_sparsity", "structure", "num_layers", "targets", "ignore",
    "layers": {name: {"shape", "sparsity", "structure"}}}; global sparsity is weighted by size.
    """
    layers = {}
    zeros = total = 0
    for name, module in find_target_linears(model, targets, ignore).items():
        w = module.weight
        z = int((w == 0).sum().item())
        zeros += z
        total += w.numel()
        layers[name] = {
            "shape": list(w.shape),
            "sparsity": z / w.numel(),
            "structure": layer_structure(w),
        }
    kinds = {info["structure"] for info in layers.values()}
    if not layers or kinds == {"dense"}:
        structure = "dense"
    elif kinds == {"2:4"}:
        structure = "2:4"
    else:
        structure = "unstructured"
    return {
        "global_sparsity": zeros / total if total else 0.0,
        "structure": structure,
        "num_layers": len(layers),
        "targets": list(targets),
        "ignore": list(ignore),
        "layers": layers,
    }
