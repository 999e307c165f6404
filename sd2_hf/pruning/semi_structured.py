"""Running a 2:4-pruned model through PyTorch's semi-structured sparse kernels.

`torch.sparse.to_sparse_semi_structured` compresses a 2:4 weight for the cuSPARSELt or CUTLASS
kernels, which run on CUDA only, on compute capability 8.x or later (CUTLASS: 8.x only), and
support 2-D matmuls only. This module picks the backend a GPU can use and swaps a model's 2:4
linears for `FlatLinear` layers over compressed weights:

    backend, why_not = semi_structured_backend("cuda")
    if backend is not None:
        to_semi_structured(drafter, semi_structured_converter(backend))

The swap is for inference (weights frozen); the model's outputs stay those of its dense 2:4
weights up to the kernels' rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sd2_hf.pruning.masks import find_target_linears, is_n_m_sparse

BACKENDS: tuple[str, ...] = ("auto", "cusparselt", "cutlass")
"""Backends `choose_backend` takes: auto = cuSPARSELt where available, else CUTLASS (8.x only)."""


def choose_backend(
    capability: tuple[int, int], cusparselt_available: bool, requested: str = "auto"
) -> tuple[str | None, str | None]:
    """(backend, None) for the semi-structured kernels on a GPU of this compute capability, or
    (None, why not). CUTLASS's 2:4 kernels refuse 9.x ("Supported only on GPUs with compute
    capability 8.x"), so 9.x and later take cuSPARSELt. Raises ValueError for a `requested`
    backend not in `BACKENDS`."""
    major, minor = capability
    if major < 8:
        return None, f"needs compute capability 8.x or later, this GPU is {major}.{minor}"
    if requested not in BACKENDS:
        raise ValueError(f"unknown semi-structured backend {requested!r}: one of {BACKENDS}")
    if requested in ("auto", "cusparselt") and cusparselt_available:
        return "cusparselt", None
    if requested == "cusparselt":
        return None, "cuSPARSELt is not available in this torch build"
    if major == 8:
        return "cutlass", None
    why = "was not requested" if cusparselt_available else "is not available in this build"
    return None, (
        f"the CUTLASS 2:4 kernels run only on compute capability 8.x (this GPU is "
        f"{major}.{minor}) and cuSPARSELt {why}"
    )


def semi_structured_backend(
    device: str | torch.device, requested: str = "auto"
) -> tuple[str | None, str | None]:
    """(backend, None) if the 2:4 kernels can run on `device` with this torch build and GPU,
    else (None, why not); `requested` is one of `BACKENDS`."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, "needs CUDA (torch's semi-structured sparse kernels are CUDA-only)"
    cusparselt = bool(torch.backends.cusparselt.is_available())
    return choose_backend(torch.cuda.get_device_capability(device), cusparselt, requested)


def semi_structured_converter(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The dense -> compressed 2:4 conversion of one backend ("cusparselt" or "cutlass"):
    `from_dense` of `torch.sparse.SparseSemiStructuredTensorCUSPARSELT` or `...CUTLASS` (no
    global `_FORCE_CUTLASS`)."""
    return getattr(torch.sparse, f"SparseSemiStructuredTensor{backend.upper()}").from_dense


class FlatLinear(nn.Module):
    """A linear layer that gives its weight 2-D input only: leading dims flattened, `F.linear`,
    reshaped back. Torch's semi-structured weights support 2-D matmuls only; a 3-D input through
    `nn.Linear` reaches ops they lack ("SparseSemiStructuredTensorCUSPARSELT only supports a
    specific set of operations ... expand.default"). Weight and bias are frozen."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def to_semi_structured(
    model: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> int:
    """Replace, in place, every 2:4 linear that `find_target_linears` finds (lm_head stays) by a
    `FlatLinear` over its converted weight (by default `torch.sparse.to_sparse_semi_structured`;
    see `semi_structured_converter` for one backend's); returns how many were replaced."""
    convert = convert or torch.sparse.to_sparse_semi_structured
    swapped = 0
    for name, module in find_target_linears(model).items():
        if is_n_m_sparse(module.weight):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FlatLinear(convert(module.weight.detach()), module.bias))
            swapped += 1
    return swapped
