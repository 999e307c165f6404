"""Layer-pruned baseline: drop the consecutive decoder blocks that change the residual stream
least, by angular distance (Gromov et al., arXiv 2403.17887).

`d(l, l+n) = arccos(cos_sim(h_l, h_{l+n})) / pi` on the last-token hidden states, where
`h_l` is the input of block `l` (`h_L` the output of the last block); the blocks
`l*..l*+n-1` with the smallest mean distance over the calibration samples are dropped.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from sd2_hf.pruning.config import PruneInputError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (`model.model.layers` for Llama, Gemma, Qwen...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise PruneInputError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected a "
            "`layers` ModuleList on its decoder (as in Llama, Gemma, Qwen, Mistral)"
        )
    return layers


@torch.no_grad()
def last_token_hidden_states(model: nn.Module, samples: list[list[int]]) -> torch.Tensor:
    """Residual stream at the last token before every block and after the last one.

    Returns float32 `[num_samples, num_layers + 1, hidden]`. Read with hooks rather than
    `output_hidden_states`, because transformers replaces the last of those with the
    final-normed state, which is not the residual stream the distance compares.
    """
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def _input(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden[0, -1].float())

    def _output(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[0, -1].float())

    hooks = [layer.register_forward_pre_hook(_input, with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(_output))
    device = next(model.parameters()).device
    states = []
    try:
        # One sample at a time: no padding, so the last position is the last real token.
        for ids in tqdm(samples, desc="hidden states", unit="sample"):
            captured.clear()
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            states.append(torch.stack(captured).cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(states)


def angular_distances(states: torch.Tensor, n: int) -> list[float]:
    """Mean `d(l, l+n)` over samples for every start block `l` in `0..L-n`."""
    num_layers = states.shape[1] - 1
    cos = torch.nn.functional.cosine_similarity(
        states[:, : num_layers - n + 1], states[:, n:], dim=-1
    )
    distance = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    return distance.mean(dim=0).tolist()


def best_start(distances: list[float]) -> int:
    return min(range(len(distances)), key=distances.__getitem__)


def drop_layers(model: nn.Module, start: int, n: int) -> list[int]:
    """Remove blocks `start..start+n-1` in place and fix the config; returns dropped indices.

    Remaining blocks keep their weights; their `layer_idx` is renumbered so the KV cache
    (indexed by layer) lines up, and per-layer config lists (`layer_types`, ...) are trimmed.
    """
    layers = decoder_layers(model)
    num_layers = len(layers)
    dropped = list(range(start, start + n))
    kept = [layer for i, layer in enumerate(layers) if i not in dropped]
    base = model.get_decoder()
    base.layers = nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config.get_text_config()
    for key, value in list(vars(config).items()):
        # Lists indexed by decoder block (`layer_types` in Gemma-3/Qwen3, `no_rope_layers`...).
        per_layer = key == "layer_types" or key.endswith("_layers")
        if per_layer and isinstance(value, list) and len(value) == num_layers:
            setattr(config, key, [v for i, v in enumerate(value) if i not in dropped])
    config.num_hidden_layers = len(kept)
    return dropped


def plot_distances(distances: dict[int, list[float]], chosen_n: int, chosen_start: int, path):
    """Distance of every candidate start block, one curve per block count (chosen one bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, values in distances.items():
        bold = n == chosen_n
        ax.plot(
            range(len(values)),
            values,
            marker="o" if bold else None,
            linewidth=2.5 if bold else 0.8,
            alpha=1.0 if bold else 0.35,
            label=f"n={n}" if bold or len(distances) <= 8 else None,
        )
    ax.scatter(
        [chosen_start],
        [distances[chosen_n][chosen_start]],
        s=140,
        facecolors="none",
        edgecolors="red",
        linewidths=2,
        zorder=5,
        label=f"dropped: blocks {chosen_start}..{chosen_start + chosen_n - 1}",
    )
    ax.set_xlabel("start block l")
    ax.set_ylabel("angular distance d(l, l+n)")
    ax.set_title("Layer-pruning candidates (Gromov et al.)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
