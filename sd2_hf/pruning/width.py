"""Structured width pruning of the MLPs, in the spirit of NVIDIA's Minitron (Muralidharan et
al., arXiv 2407.14679): every MLP keeps its `keep` intermediate channels (neurons) with the
largest activation on the calibration data, and the model's `intermediate_size` shrinks to
`keep`. The result is a standard, smaller checkpoint of the same architecture: transformers and
vLLM load it as it is, and it costs less time on any engine (unlike zeros, which CPUs and, at
decoding sizes, GPUs compute like any weight).

Importance of channel `j` of a block's MLP: the mean over calibration tokens of `|a_j|`, where
`a = act(gate(x)) * up(x)` is the input of `down_proj` (Minitron's activation-based neuron
importance, aggregated with a mean). Channels are ranked per block; every block keeps the same
number, because transformers and vLLM configs have one `intermediate_size`.

Written here because the maintained structured pruners do not fit: NVIDIA Model Optimizer's
Minitron runs on Megatron-Core / Megatron-Bridge models (GPU), not on a transformers checkpoint
on CPU; Torch-Pruning traces a dependency graph and ranks by weight magnitude, and its LLM
example patches the config by hand afterwards. Attention heads are not pruned: vLLM's Qwen2
derives `head_dim` from `hidden_size / num_attention_heads` (vllm 0.32), so a checkpoint with
fewer heads would not load there as a standard config.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from sd2_hf.pruning.config import PruneInputError
from sd2_hf.pruning.layers import decoder_layers

# Kept channel counts are rounded to a multiple of this (matrix kernels prefer it).
CHANNEL_MULTIPLE = 32


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Every decoder block's MLP, checked to be the gated form (gate_proj, up_proj, down_proj)
    of Llama, Qwen, Mistral and Gemma."""
    mlps = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(
            isinstance(getattr(mlp, n, None), nn.Linear)
            for n in ("gate_proj", "up_proj", "down_proj")
        ):
            raise PruneInputError(
                f"block {i} of {type(model).__name__} has no gated MLP (mlp.gate_proj, "
                "mlp.up_proj, mlp.down_proj as nn.Linear): method 'width' supports Llama, Qwen2, "
                "Mistral and Gemma-style blocks"
            )
        mlps.append(mlp)
    return mlps


def kept_channels(intermediate_size: int, keep_fraction: float) -> int:
    """Channels each MLP keeps for `keep_fraction`, rounded to CHANNEL_MULTIPLE (at least one
    multiple, at most all of them)."""
    if keep_fraction >= 1:
        return intermediate_size
    keep = round(intermediate_size * keep_fraction / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    return min(max(keep, CHANNEL_MULTIPLE), intermediate_size)


@torch.no_grad()
def mlp_channel_importance(model: nn.Module, samples: list[list[int]]) -> list[torch.Tensor]:
    """Mean |activation| of every intermediate channel of every MLP over the tokens of
    `samples` (float32, one `[intermediate_size]` tensor per block)."""
    mlps = gated_mlps(model)
    sums = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]
    count = 0

    def hook(index: int):
        def accumulate(_module, args):
            activation = args[0].detach().abs().double().reshape(-1, args[0].shape[-1])
            sums[index] += activation.sum(dim=0).cpu()

        return accumulate

    hooks = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    device = next(model.parameters()).device
    try:
        for ids in tqdm(samples, desc="channel importance", unit="sample"):
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            count += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return [(s / max(count, 1)).float() for s in sums]


def _keep_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, index).clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone())
    linear.out_features = len(index)


def _keep_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, index).clone())
    linear.in_features = len(index)


def prune_mlp_channels(
    model: nn.Module, importance: list[torch.Tensor], keep: int
) -> list[list[int]]:
    """Keep the `keep` most important channels of every MLP (in their original order) and set
    the config's `intermediate_size`; returns the kept channel indices per block."""
    mlps = gated_mlps(model)
    config = model.config.get_text_config()
    if not 0 < keep <= config.intermediate_size:
        raise PruneInputError(
            f"cannot keep {keep} MLP channels of {config.intermediate_size}: allowed "
            f"1..{config.intermediate_size}"
        )
    kept = []
    for mlp, scores in zip(mlps, importance, strict=True):
        index = torch.topk(scores, keep).indices.sort().values
        device_index = index.to(mlp.down_proj.weight.device)
        _keep_rows(mlp.gate_proj, device_index)
        _keep_rows(mlp.up_proj, device_index)
        _keep_columns(mlp.down_proj, device_index)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
        kept.append(index.tolist())
    config.intermediate_size = keep
    return kept
