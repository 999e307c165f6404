"""Cheaper LM heads for drafters: a draft vocabulary (other tokens impossible) or a pruned head.

A SmolLM2 drafter's tied 49k × 576 head is a fifth of its weights and stays dense under the
layer recipes; these options cut it, and MACs (`sd2_hf.evaluation.macs`) count the zeros:

- `restrict_vocab`: keep the rows of the N tokens most frequent in the distilled data (the
  target's own outputs) and make every other token impossible for the drafter —
  FR-Spec's / EAGLE-3's `draft_vocab_size` idea, kept as a standard checkpoint. Zeroed rows
  alone would give logit 0, not −∞: at T > 0 the drafter would put real probability on the
  dropped tokens (and speculative sampling computes `min(1, p/q)` against that q), and when
  every kept logit is negative even its argmax is a dropped token. Llama/Qwen heads have no
  bias, so the bias is built from one hidden channel (`floor_channel`): the channel that
  carries the least activation energy on the calibration data is cut from every decoder
  layer (no layer reads it, none writes it), the embeddings hold a positive constant there,
  so after the final norm it is positive for every token; the dropped rows are zero but for
  a large negative weight on it, which puts their logits below `LOGIT_FLOOR` — probability
  0 at every practical temperature. Target and drafter keep the same tokenizer, vocabulary
  size and architecture, so transformers assisted generation and vLLM's `draft_model` load
  it unchanged and verification stays lossless; a kernel may still gather the kept rows.
- `prune_head`: llm-compressor's SparseGPT on the (untied) head, calibrated on the final
  hidden states like any other layer.

Both untie the head first: the input embeddings stay dense and are not a cost (lookups).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def untie_head(model: nn.Module) -> nn.Linear:
    """Give `model` its own copy of the output embeddings (no-op when already untied)."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear output head to restrict or prune")
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone())
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    # transformers re-ties on save/load through this attribute when it is set.
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    return head


def token_frequencies(token_ids: Iterable[Iterable[int]]) -> Counter:
    counts: Counter = Counter()
    for ids in token_ids:
        counts.update(ids)
    return counts


def draft_vocabulary(
    counts: Counter, size: int, vocab_size: int, always: Iterable[int] = ()
) -> list[int]:
    """The `size` token ids to keep: every id in `always` (special tokens), then the most
    frequent ones (ties broken by the smaller id, so the choice is reproducible)."""
    if not 0 < size <= vocab_size:
        raise ValueError(
            f"draft_vocab_size must be in 1..{vocab_size} (the vocabulary), got {size}"
        )
    keep = sorted({int(i) for i in always if 0 <= int(i) < vocab_size})
    if len(keep) > size:
        raise ValueError(
            f"draft_vocab_size {size} is smaller than the {len(keep)} special tokens it must keep"
        )
    chosen = set(keep)
    for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(chosen) == size:
            break
        if 0 <= token < vocab_size:
            chosen.add(token)
    if len(chosen) < size:
        logger.warning(
            "the data has only %d distinct tokens; the draft vocabulary keeps %d, not %d",
            len(chosen),
            len(chosen),
            size,
        )
    return sorted(chosen)


# Dropped tokens' logits stay below this (10x below on the calibration data): exp(LOGIT_FLOOR / T)
# is 0 in fp32 for every T <= 100.
LOGIT_FLOOR = -1e4
# Modules whose output is added to the residual stream (Llama, Qwen2, Mistral, Gemma names).
_RESIDUAL_WRITERS = ("o_proj", "down_proj")


def final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is None or getattr(norm, "weight", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no final norm with a weight (`model.norm`): the draft "
            "vocabulary needs one to carry its logit floor"
        )
    return norm


def _calibration_passes(model: nn.Module, calibration: list[list[int]]):
    """Per calibration sample (at most 16): the residual stream's states before the final norm
    (one per layer) and the final norm's output."""
    norm, normed = final_norm(model), []
    hook = norm.register_forward_hook(lambda module, args, out: normed.append(out))
    device = model.get_input_embeddings().weight.device
    try:
        for ids in calibration[:16] or [[0]]:
            out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True)
            yield out.hidden_states[:-1], normed.pop()
    finally:
        hook.remove()


@torch.no_grad()
def floor_channel(model: nn.Module, calibration: list[list[int]]) -> tuple[int, float]:
    """Cut the hidden channel with the least activation energy (relative to each state's mean,
    over every layer and calibration token) from every decoder layer and hold a positive
    constant there; returns the channel and a lower bound of its value after the final norm
    (a tenth of the smallest value on the calibration data)."""
    hidden = model.config.get_text_config().hidden_size
    energy = torch.zeros(hidden, dtype=torch.float64)
    for states, _ in _calibration_passes(model, calibration):
        for h in states:
            h = h[0].double().pow(2)
            energy += (h / h.mean(-1, keepdim=True).clamp(min=1e-12)).mean(0).cpu()
    channel = int(energy.argmin())
    for name, module in model.get_decoder().named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[0] != "layers":
            continue
        if name.endswith(_RESIDUAL_WRITERS) and module.out_features == hidden:
            module.weight[channel] = 0
            if module.bias is not None:
                module.bias[channel] = 0
        elif module.in_features == hidden and not name.endswith(_RESIDUAL_WRITERS):
            module.weight[:, channel] = 0
    embed = model.get_input_embeddings().weight
    embed[:, channel] = embed.float().pow(2).mean().sqrt().to(embed.dtype)
    # A positive gain under both conventions (w and 1 + w).
    final_norm(model).weight[channel] = 1.0
    lowest = min(
        float(normed[0, :, channel].min()) for _, normed in _calibration_passes(model, calibration)
    )
    if lowest <= 0:
        raise ValueError(
            f"{type(model).__name__}: the constant hidden channel {channel} is not positive after "
            "the final norm; this architecture cannot carry the draft vocabulary's logit floor"
        )
    return channel, lowest / 10


@torch.no_grad()
def find_floor_channel(model: nn.Module) -> int | None:
    """The draft vocabulary's floor channel of a drafter (`restrict_vocab`), found in its weights
    (a config attribute did not survive llm-compressor's save): the hidden channel whose
    embedding column is one positive constant and whose head column is negative or zero."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or not isinstance(head, nn.Linear) or embed.weight.dim() != 2:
        return None
    e, h = embed.weight, head.weight
    if e.shape[0] < 2 or h.data_ptr() == e.data_ptr():
        return None
    constant = (e == e[0]).all(0) & (e[0] > 0) & (h <= 0).all(0) & (h < 0).any(0)
    found = constant.nonzero().flatten().tolist()
    return found[0] if len(found) == 1 else None


@torch.no_grad()
def restrict_vocab(model: nn.Module, keep: list[int], calibration: list[list[int]] = ()) -> dict:
    """Make every token not in `keep` impossible for the drafter (its logit below
    `LOGIT_FLOOR`); returns what was done (for the report)."""
    head = untie_head(model)
    mask = torch.zeros(head.weight.shape[0], dtype=torch.bool, device=head.weight.device)
    mask[torch.tensor(keep, device=head.weight.device)] = True
    channel, lowest = floor_channel(model, calibration)
    head.weight[~mask] = 0
    head.weight[mask, channel] = 0
    head.weight[~mask, channel] = LOGIT_FLOOR / lowest
    if getattr(head, "bias", None) is not None:
        head.bias[~mask] = 0
    return {
        "draft_vocab_size": int(mask.sum()),
        "vocab_size": int(mask.numel()),
        "floor_channel": channel,
        "logit_floor": LOGIT_FLOOR,
    }


def prune_head(model: nn.Module, tokenizer, sparsity: float, calibration, max_seq_length: int):
    """SparseGPT (unstructured) on the untied head, through llm-compressor's `oneshot`."""
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    from sd2_hf.pruning.oneshot import run_oneshot

    untie_head(model)
    name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    recipe = [SparseGPTModifier(sparsity=sparsity, mask_structure="0:0", targets=[name])]
    run_oneshot(model, tokenizer, recipe, calibration, max_seq_length)
    return {"head_sparsity": sparsity, "head_module": name}


def head_summary(report: dict) -> dict:
    """A head report without its kept token ids (those stay in the pruning stage's JSON)."""
    return {k: v for k, v in report.items() if k != "kept_token_ids"}


def sparse_head_name(model: nn.Module, min_zero_fraction: float = 0.05) -> str | None:
    """Name of the output head when it is untied and sparse (a draft vocabulary or a pruned
    head), else None: such a head's zeros must be held during fine-tuning like any layer's."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or embed is None:
        return None
    if head.weight.data_ptr() == embed.weight.data_ptr() or head.weight.numel() == 0:
        return None
    if (head.weight == 0).float().mean().item() < min_zero_fraction:
        return None
    return next(n for n, m in model.named_modules() if m is head)


def assistant_token_counts(source: str, tokenizer) -> Counter:
    """Token frequencies over every assistant turn of `source` (the target's own outputs when
    it is an `sd2 distill` dataset)."""
    from sd2_hf.data.loaders import load_conversations

    texts = [
        m["content"]
        for row in load_conversations(source).rows
        for m in row["messages"]
        if m["role"] == "assistant" and m["content"]
    ]
    return token_frequencies(tokenizer(texts, add_special_tokens=False)["input_ids"])


def apply_head_options(config, model, tokenizer, calibration) -> dict:
    """The prune stage's `draft_vocab_size` and `head_sparsity`, in that order; the report."""
    if config.draft_vocab_size is None and config.head_sparsity is None:
        return {}
    report: dict = {}
    # Head sparsity first: SparseGPT must not prune the draft vocabulary's floor weights.
    if config.head_sparsity is not None:
        report.update(
            prune_head(model, tokenizer, config.head_sparsity, calibration, config.max_seq_length)
        )
    if config.draft_vocab_size is not None:
        counts = assistant_token_counts(config.dataset, tokenizer)
        vocab_size = model.get_output_embeddings().weight.shape[0]
        keep = draft_vocabulary(
            counts, config.draft_vocab_size, vocab_size, tokenizer.all_special_ids
        )
        report.update(restrict_vocab(model, keep, calibration))
        total = sum(counts.values())
        report["coverage"] = sum(counts[t] for t in keep) / total if total else 0.0
        report["kept_token_ids"] = keep
    weight = model.get_output_embeddings().weight
    report["zero_fraction"] = (weight == 0).float().mean().item()
    return report
