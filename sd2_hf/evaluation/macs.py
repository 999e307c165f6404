"""Multiply-accumulates of one decoding step, counting only the weights that are not zero.

A linear layer costs `in × out × (1 − weight sparsity)` MACs for one token (what a sparse
kernel would do); attention over a context of C positions costs `2 × num_heads × head_dim × C`
(QK^T and AV; sliding-window layers see at most their window); embeddings are lookups
(0 MACs). Norms, activations and rotary embeddings are not counted (O(hidden), negligible).

Works on a model in memory or on a checkpoint without running it: the module tree comes from
the config on the meta device (no memory), the zeros from the safetensors files, one tensor at
a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class MacReport:
    """MACs of one decoding step at `context_length` (`total` sparse-aware, `dense_total` as
    if every weight were non-zero). `sparsity` is the fraction of linear-layer MACs removed by
    zero weights; `per_module` maps linear modules and `<attention module>:attention` to MACs;
    `assumed_dense` lists linear layers whose weights were not in the checkpoint (e.g. a
    tied `lm_head`, or packed quantized weights) and were counted dense."""

    total: int
    dense_total: int
    linear: int
    attention: int
    per_module: dict[str, int]
    sparsity: float
    context_length: int
    dense_linear: int
    num_layers: int
    assumed_dense: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def per_block(self) -> dict[str, int]:
        """MACs grouped by decoder block (`layers.N`) and the remaining top-level modules."""
        groups: dict[str, int] = {}
        for name, macs in self.per_module.items():
            found = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            key = f"block {found.group(1)}" if found else name.split(":")[0]
            groups[key] = groups.get(key, 0) + macs
        return groups

    def table(self) -> str:
        """A one-screen text table: per block, then totals."""
        rows = [f"{'module':<28}{'MACs':>16}"]
        rows += [f"{name:<28}{macs:>16,}" for name, macs in self.per_block().items()]
        rows += [
            "-" * 44,
            f"{'linear (sparse-aware)':<28}{self.linear:>16,}",
            f"{'linear (dense)':<28}{self.dense_linear:>16,}",
            f"{'attention':<28}{self.attention:>16,}",
            f"{'total':<28}{self.total:>16,}",
            f"{'dense total':<28}{self.dense_total:>16,}",
            f"linear sparsity {self.sparsity:.2%}, {self.num_layers} decoder layers, "
            f"context length {self.context_length}",
        ]
        if self.assumed_dense:
            rows.append(f"counted dense (weights not in checkpoint): {self.assumed_dense}")
        return "\n".join(rows)


def count_macs(model_or_path: nn.Module | str | Path, context_length: int = 512) -> MacReport:
    """MACs of one decoding step of a model (in memory) or a checkpoint (dir, Hub id, asset)."""
    if context_length <= 0:
        raise ValueError(
            f"context_length must be a positive number of tokens, got {context_length}"
        )
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        zeros = {
            name: _zero_count(module.weight)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        }
        return _count(model, zeros, context_length, assumed_dense=[])
    return _count_checkpoint(str(model_or_path), context_length)


def _count_checkpoint(name_or_path: str, context_length: int) -> MacReport:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = _local_dir(name_or_path)
    config = AutoConfig.from_pretrained(directory)
    # Quantized checkpoints carry a quantization_config that from_config would act on;
    # only the module tree is needed.
    config.quantization_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    wanted = {f"{name}.weight": name for name in linears}
    output_embeddings = model.get_output_embeddings()
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    zeros: dict[str, int] = {}
    for key, count in _checkpoint_zero_counts(directory, wanted):
        zeros[wanted[key]] = count
    assumed_dense = []
    for name, module in linears.items():
        if name not in zeros:
            zeros[name] = 0
            # A tied lm_head is the (dense) embedding table: not an assumption worth listing.
            if not (tied and module is output_embeddings):
                assumed_dense.append(name)
    return _count(model, zeros, context_length, assumed_dense)


def _local_dir(name_or_path: str) -> Path:
    from sd2_hf.assets import resolve_model

    resolved = resolve_model(name_or_path)
    path = Path(resolved).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name_or_path!r} is a file; expected a checkpoint directory or Hub id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors"]))


def _checkpoint_zero_counts(directory: Path, wanted: dict[str, str]) -> Iterator[tuple[str, int]]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no *.safetensors files in {directory}; count_macs reads safetensors checkpoints"
        )
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in wanted:
                    yield key, _zero_count(f.get_tensor(key))


def _zero_count(weight: torch.Tensor) -> int:
    return int((weight == 0).sum().item())


def _count(
    model: nn.Module, zeros: dict[str, int], context_length: int, assumed_dense: list[str]
) -> MacReport:
    config = model.config.get_text_config()
    per_module: dict[str, int] = {}
    linear = dense_linear = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            dense = module.in_features * module.out_features
            macs = dense - zeros[name]
            per_module[name] = macs
            linear += macs
            dense_linear += dense
    attention = 0
    num_heads = config.num_attention_heads
    for name, module in model.named_modules():
        if hasattr(module, "layer_idx") and hasattr(module, "head_dim"):
            window = getattr(module, "sliding_window", None)
            positions = min(context_length, window) if window else context_length
            macs = 2 * num_heads * module.head_dim * positions
            per_module[f"{name}:attention"] = macs
            attention += macs
    return MacReport(
        total=linear + attention,
        dense_total=dense_linear + attention,
        linear=linear,
        attention=attention,
        per_module=per_module,
        sparsity=1 - linear / dense_linear if dense_linear else 0.0,
        context_length=context_length,
        dense_linear=dense_linear,
        num_layers=config.num_hidden_layers,
        assumed_dense=assumed_dense,
    )
