"""Sparsity-preserving LoRA (SparsePEFT of SQFT, arXiv 2410.03750) on PEFT's own LoRA layers.

A plain LoRA merge `W + s·BA` fills every pruned zero of a sparse drafter. Here the adapter's
delta is masked with the base weight's zero pattern, `W + M ⊙ (s·BA)`, in the forward pass *and*
in the merge, so the function trained is the function merged and `merge_and_unload()` keeps
every zero exact (2:4 stays 2:4).

PEFT has no hook for a masked delta: its LoRA variants (DoRA, ...) are selected by fields of
`LoraConfig`, not registrable from outside, so this module uses PEFT's documented (experimental)
custom-layer API, `LoraConfig._register_custom_module`, with a subclass of PEFT's own
`lora.Linear` that overrides only `get_delta_weight` (used by PEFT's merge/unmerge) and the
forward. Everything else — adapter creation, `merge_and_unload`, `save_pretrained`,
`PeftModel.from_pretrained`, Trainer checkpoints and resume — is PEFT's.

The mapping is not serialized into `adapter_config.json`, so a saved adapter must be loaded with
`load_sparse_adapter` (plain `PeftModel.from_pretrained` would rebuild unmasked layers).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn


class SparseLoraLinear(LoraLinear):
    """PEFT's `lora.Linear` with the delta masked by the base weight's zero pattern.

    The mask (`base weight != 0`) is recorded once, when the first adapter is added, as a
    non-persistent buffer (it is a function of the frozen base weight, so a reload recomputes it);
    a layer without zeros stores none and behaves exactly as plain LoRA.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any
    ) -> None:
        if kwargs.pop("parameter_name", None) is not None:
            raise ValueError("sparse LoRA adapts whole nn.Linear layers; unset `target_parameters`")
        base = base_layer.get_base_layer() if isinstance(base_layer, LoraLayer) else base_layer
        # Quantized layers subclass nn.Linear too; their `weight` is not the dense matrix the
        # mask and the merged forward need.
        if type(base) is not nn.Linear:
            raise ValueError(
                f"sparse LoRA supports unquantized torch.nn.Linear layers, got {type(base).__name__}"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        mask = base.weight.detach() != 0
        self.register_buffer("sparsity_mask", None if bool(mask.all()) else mask, persistent=False)

    def update_layer(self, adapter_name: str, *args: Any, config: LoraConfig, **kwargs: Any):
        super().update_layer(adapter_name, *args, config=config, **kwargs)
        if adapter_name in self.lora_variant:
            raise ValueError(
                f"sparse LoRA is plain LoRA with a masked delta; the LoRA variant "
                f"{type(self.lora_variant[adapter_name]).__name__} (use_dora, ...) is not supported"
            )
        if self.lora_bias[adapter_name]:
            raise ValueError("sparse LoRA does not support `lora_bias=True`; leave it False")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        return delta if self.sparsity_mask is None else delta * self.sparsity_mask

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("sparse LoRA layers do not support mixed-adapter batches")
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return super().forward(x, *args, **kwargs)
        kwargs.pop("alora_offsets", None)
        base = self.get_base_layer()
        # As PEFT's own layers: the adapter computes in its dtype (fp32 by default, also on a
        # bf16/fp16 base), and the layer returns the dtype the base layer would have returned.
        result_dtype = x.dtype
        adapter_dtype = self.lora_A[active[0]].weight.dtype
        if all(isinstance(self.lora_dropout[a], nn.Identity) for a in active):
            # One matmul with W + M ⊙ ΔW: the operation the merged layer runs (so adapter and
            # merged logits agree to rounding) at the cost of full fine-tuning's forward, instead
            # of a second dense matmul for the masked delta.
            weight = base.weight.to(adapter_dtype) + sum(self.get_delta_weight(a) for a in active)
            x = self._cast_input_dtype(x, adapter_dtype)
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return F.linear(x, weight.to(x.dtype), bias).to(result_dtype)
        # With dropout the adapter sees another input than the base layer: two matmuls.
        result = self.base_layer(x, *args, **kwargs)
        x = self._cast_input_dtype(x, adapter_dtype)
        for a in active:
            delta = F.linear(self.lora_dropout[a](x), self.get_delta_weight(a).to(x.dtype))
            result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "sparse_" + super().__repr__()


def sparse_lora_config(config: LoraConfig) -> LoraConfig:
    """A copy of `config` whose nn.Linear targets become `SparseLoraLinear` layers."""
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"sparse fine-tuning with PEFT needs a peft.LoraConfig, got {type(config).__name__}"
        )
    if config.target_parameters:
        raise ValueError("sparse LoRA adapts whole nn.Linear layers; unset `target_parameters`")
    config = copy.deepcopy(config)
    config._register_custom_module({nn.Linear: SparseLoraLinear})
    return config


def get_sparse_peft_model(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default"
) -> PeftModel:
    """`peft.get_peft_model` with sparsity-preserving LoRA layers."""
    peft_model = get_peft_model(model, sparse_lora_config(config), adapter_name=adapter_name)
    check_sparse_adapters(peft_model)
    return peft_model


def load_sparse_adapter(
    model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False
) -> PeftModel:
    """Load an adapter saved from a sparse LoRA run onto its (sparse) base model.

    The masking layers are not recorded in `adapter_config.json`; this rebuilds them.
    """
    config = LoraConfig.from_pretrained(str(adapter_dir))
    return PeftModel.from_pretrained(
        model, str(adapter_dir), config=sparse_lora_config(config), is_trainable=is_trainable
    )


def unmasked_adapter_layers(model: nn.Module) -> list[str]:
    """LoRA layers on a weight with exact zeros whose delta is not masked (their merge would
    fill the zeros)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or isinstance(module, SparseLoraLinear):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and bool((weight == 0).any()):
            if not isinstance(module.get_base_layer(), nn.Embedding):
                found.append(name)
    return found


def check_sparse_adapters(model: nn.Module) -> None:
    """Raise when a LoRA layer on a sparse weight would fill its zeros at merge."""
    if unmasked := unmasked_adapter_layers(model):
        raise ValueError(
            f"{len(unmasked)} LoRA layers adapt sparse weights without masking the delta, so "
            f"merging would fill their pruned zeros (e.g. {unmasked[:3]}). Pass the LoraConfig as "
            "SD2Trainer(..., peft_config=...) or wrap the model with "
            "sd2_hf.training.sparse_lora.get_sparse_peft_model instead of peft.get_peft_model."
        )
