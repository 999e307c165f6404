"""The speculative-decoding cost model on measured step times.

One speculative step of assisted generation runs the drafter K times (one token each, batch 1)
and the target once over K + 1 tokens (the verify step), and commits MAL tokens on average;
plain decoding commits one token per target step. So, in time,

    speed-up(K) = MAL(K) · t_target / (K · t_draft + t_verify(K + 1))

where `t_target` is one target decoding step (one token), `t_draft` one drafter step, and
`t_verify(K + 1)` one target step over K + 1 new tokens. With `t_verify = t_target` and
`t_draft / t_target = c` it is the improvement factor MAL / (K c + 1) of Leviathan et al.; the
measured verify step is what the MACs model leaves out (on a CPU, K + 1 tokens cost more than
one; on a GPU at batch 1 nearly the same).

It projects the speed-up of a drafter whose MAL per K was measured (`sd2 eval`'s draft-length
sweep) on hardware whose step times were measured (`sd2 eval`'s step-cost runs, or
`bench/gpu_check.py` on a GPU), without running assisted generation there.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def projected_speedup(
    mal: float, k: int, draft_step: float, target_step: float, verify_step: float
) -> float:
    """Tokens per second with drafting / without, from one speculative step's times."""
    if min(draft_step, target_step, verify_step) < 0 or target_step == 0 or k < 1:
        raise ValueError(
            f"step times must be >= 0 with target_step > 0, and K >= 1; got K={k}, "
            f"draft {draft_step}, target {target_step}, verify {verify_step}"
        )
    return mal * target_step / (k * draft_step + verify_step)


def verify_ratios(
    forward_seconds: Callable[[list[int], list[int]], Mapping[int, float]],
    runs: Sequence[tuple[list[int], int]],
    ks: Sequence[int],
) -> dict[int, float]:
    """The target's forward time over K + 1 new tokens / over one new token, after the prompt
    of each of `runs`, for every K of `ks`: the median over the runs. `forward_seconds(prompt,
    widths)` is a backend's timing of one forward per width over the cached prompt."""
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    widths = [1, *(k + 1 for k in ks)]
    for prompt_ids, _ in runs:
        seconds = forward_seconds(prompt_ids, widths)
        for k in ks:
            ratios[k].append(seconds[k + 1] / seconds[1])
    return {k: statistics.median(r) for k, r in ratios.items()}


def projected_sweep(
    mal_by_k: Mapping[int, float],
    draft_step: float,
    target_step: float,
    verify_by_k: Mapping[int, float],
) -> dict[int, float]:
    """`projected_speedup` at every K with both a MAL and a verify-step time."""
    return {
        k: projected_speedup(mal, k, draft_step, target_step, verify_by_k[k])
        for k, mal in sorted(mal_by_k.items())
        if k in verify_by_k and mal is not None
    }


def project_study(
    study: Mapping[str, Any],
    draft_step: float,
    target_step: float,
    verify_by_k: Mapping[int, float],
) -> dict[str, dict[str, Any]]:
    """For every row with a draft-length sweep in a study report (`sd2 compare`'s study.json),
    as "evaluation/drafter": the speed-up its MAL per K would give with these step times, its
    best K, and beside them the K and speed-up its own run measured (on its own hardware)."""
    out = {}
    for name, evaluation in study["evaluations"].items():
        for row in evaluation["drafters"]:
            mal = {s["num_draft_tokens"]: s["mal"] for s in row.get("draft_length_sweep") or []}
            by_k = projected_sweep(mal, draft_step, target_step, verify_by_k)
            if by_k:
                best = max(by_k, key=by_k.__getitem__)
                out[f"{name}/{row['name']}"] = {
                    "by_k": by_k,
                    "best_k": best,
                    "best": by_k[best],
                    "own_run_k": evaluation["num_draft_tokens"],
                    "own_run_speedup": row.get("speedup"),
                }
    return out
