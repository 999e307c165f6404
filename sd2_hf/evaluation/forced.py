"""Greedy MAL from one teacher-forced forward pass of the drafter over the target's own output.

Under greedy verification the committed text is the target's greedy output `y` (lossless), and
a step that starts after `t` committed tokens accepts the drafter's greedy drafts for as long
as they equal `y[t], y[t+1], ...`: while they match, the drafter's own prefix *is* `y[:t+i]`, so
draft `i` is the drafter's argmax after `y[:t+i]`, which a single forward pass over
`prompt + y` gives for every position at once. Replaying the steps on those argmaxes gives the
same counters as transformers assisted generation (same step rule: the assistant drafts at
most `max_new_tokens - t - 1` tokens, a step without drafts is plain decoding), without running
it: one drafter forward per prompt instead of one target and K drafter passes per step.

It is a measurement tool for training (learning curves, choosing settings on held-out data),
not a replacement of `sd2 eval`: a full forward and incremental decoding with a KV cache can
round a near-tie differently, so the two can differ by a token here and there (the learning-
curve bench reports the difference on its final checkpoints). Same tokenizer only.

Written here because neither transformers nor TRL computes acceptance without generating.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sd2_hf.serving.metrics import SpecDecodeCounters


def replay_greedy_steps(
    matches: Sequence[bool], k: int, max_new_tokens: int | None = None
) -> SpecDecodeCounters:
    """Counters of greedy assisted generation from `matches[j]`: whether the drafter's argmax
    after the prompt and `y[:j]` is `y[j]` (`len(matches)` = tokens the target generated)."""
    n_out = len(matches)
    limit = n_out if max_new_tokens is None else max_new_tokens
    t = drafts = draft_tokens = accepted = 0
    per_position = [0] * k
    while t < n_out:
        k_t = min(k, limit - t - 1)
        if k_t <= 0:
            t += 1  # plain decoding step, not a draft step
            continue
        n = 0
        while n < k_t and t + n < n_out and matches[t + n]:
            n += 1
        drafts += 1
        draft_tokens += k_t
        accepted += n
        for i in range(n):
            per_position[i] += 1
        t += n + 1
    return SpecDecodeCounters(drafts, draft_tokens, accepted, per_position)


@torch.inference_mode()
def greedy_matches(
    drafter: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
) -> list[list[bool]]:
    """For each `(prompt_ids, output_ids)`: per output token, does the drafter's argmax after the
    preceding tokens equal it. Right-padded batches; one forward pass per batch."""
    device = next(drafter.parameters()).device
    result: list[list[bool]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        rows = [list(p) + list(o) for p, o in chunk]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits = drafter(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        predicted = logits.argmax(-1).cpu()
        for i, (p, o) in enumerate(chunk):
            if not o:
                result.append([])
                continue
            pred = predicted[i, len(p) - 1 : len(p) - 1 + len(o)]
            result.append((pred == torch.tensor(list(o))).tolist())
    return result


def forced_greedy_mal(
    drafter: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    k: int,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
) -> tuple[SpecDecodeCounters, list[SpecDecodeCounters]]:
    """Total and per-sequence greedy counters (see the module docstring)."""
    from sd2_hf.evaluation.backend import add_counters

    per_sequence = [
        replay_greedy_steps(m, k, max_new_tokens)
        for m in greedy_matches(drafter, sequences, batch_size)
    ]
    return add_counters(per_sequence, positions=k), per_sequence


def counters_by_draft_length(
    matches: Sequence[Sequence[bool]], ks: Sequence[int], max_new_tokens: int | None = None
) -> dict[int, SpecDecodeCounters]:
    """Greedy counters at every draft length of `ks` from the same per-prompt `matches`
    (`greedy_matches`): the drafter's argmaxes do not depend on K, only the steps do."""
    from sd2_hf.evaluation.backend import add_counters

    return {
        k: add_counters((replay_greedy_steps(m, k, max_new_tokens) for m in matches), positions=k)
        for k in sorted(set(ks))
    }
