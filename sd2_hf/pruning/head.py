"""Cheaper LM heads for drafters: a draft vocabulary (rows of the head zeroed) or a pruned head.

A SmolLM2 drafter's tied 49k × 576 head is a fifth of its weights and stays dense under the
layer recipes; these options cut it, and MACs (`sd2_hf.evaluation.macs`) count the zeros:

- `restrict_vocab`: keep the rows of the N tokens most frequent in the distilled data (the
  target's own outputs), zero the rest — FR-Spec's / EAGLE-3's `draft_vocab_size` idea, kept as
  a standard checkpoint: the zeroed rows give logit 0, so the drafter (almost) never proposes
  those tokens, and a row-sparse head is a smaller dense matmul for any kernel (gather the kept
  rows). Target and drafter keep the same tokenizer and vocabulary size, so transformers
  assisted generation and vLLM's `draft_model` load it unchanged and verification stays
  lossless.
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


@torch.no_grad()
def restrict_vocab(model: nn.Module, keep: list[int]) -> dict:
    """Zero the head rows of every token not in `keep`; returns what was done (for the report)."""
    head = untie_head(model)
    mask = torch.zeros(head.weight.shape[0], dtype=torch.bool, device=head.weight.device)
    mask[torch.tensor(keep, device=head.weight.device)] = True
    head.weight[~mask] = 0
    if getattr(head, "bias", None) is not None:
        head.bias[~mask] = 0
    return {"draft_vocab_size": int(mask.sum()), "vocab_size": int(mask.numel())}


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
    if config.draft_vocab_size is not None:
        counts = assistant_token_counts(config.dataset, tokenizer)
        vocab_size = model.get_output_embeddings().weight.shape[0]
        keep = draft_vocabulary(
            counts, config.draft_vocab_size, vocab_size, tokenizer.all_special_ids
        )
        report.update(restrict_vocab(model, keep))
        total = sum(counts.values())
        report["coverage"] = sum(counts[t] for t in keep) / total if total else 0.0
        report["kept_token_ids"] = keep
    if config.head_sparsity is not None:
        report.update(
            prune_head(model, tokenizer, config.head_sparsity, calibration, config.max_seq_length)
        )
    weight = model.get_output_embeddings().weight
    report["zero_fraction"] = (weight == 0).float().mean().item()
    return report
