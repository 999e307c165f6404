"""What the two evaluation backends share: the drafter plan they run and what one generation
returns. Both count speculative decoding with vLLM's counters (`SpecDecodeCounters`), so MAL
and per-position acceptance have one implementation and one meaning on both backends."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sd2_hf.serving.metrics import SpecDecodeCounters


@dataclass(frozen=True)
class DrafterPlan:
    """A drafter as a backend runs it: a model (same tokenizer or UAG) or the ngram baseline."""

    name: str
    kind: Literal["model", "ngram"]
    path: str = ""
    uag: bool = False
    tokenizer: Any = None  # the drafter's tokenizer, needed by transformers UAG


@dataclass
class Generation:
    """One prompt's output: new token ids, wall time, and (drafted runs) its draft counters."""

    token_ids: list[int]
    seconds: float
    counters: SpecDecodeCounters | None = None
    # transformers only: target forward passes during decoding (verification steps).
    target_steps: int | None = None


Generate = Callable[[list[int]], Generation]
# A model decoding alone: (prompt ids, n) -> (seconds, new tokens), exactly n tokens, EOS ignored.
Decode = Callable[[list[int], int], tuple[float, int]]


class Backend(Protocol):
    name: str

    def session(self, drafter: DrafterPlan | None) -> AbstractContextManager[Generate]:
        """A generate function for the target alone (`None`) or with `drafter`."""
        ...

    def decoder(self, drafter: DrafterPlan | None) -> AbstractContextManager[Decode]:
        """A decode function for `drafter`'s model (the target with None) alone."""
        ...

    def versions(self) -> dict[str, str]: ...


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def counters_from_steps(steps: Iterable[tuple[Sequence[int], Sequence[int]]]) -> SpecDecodeCounters:
    """Counters, as vLLM keeps them, from `(drafted, committed)` token lists per verification step.

    A step's accepted count is the length of the common prefix of its drafted and committed
    tokens. Greedily, a rejected position commits the target's own token, which differs from the
    draft by construction; with speculative sampling the replacement is drawn from the residual
    distribution, which gives the rejected token zero mass. Steps without drafts are not draft
    steps (vLLM does not count them either).
    """
    drafts = draft_tokens = accepted = 0
    per_position: list[int] = []
    for drafted, committed in steps:
        if not drafted:
            continue
        n = min(common_prefix(drafted, committed), len(drafted))
        drafts += 1
        draft_tokens += len(drafted)
        accepted += n
        per_position += [0] * (max(len(drafted), len(per_position)) - len(per_position))
        for i in range(n):
            per_position[i] += 1
    return SpecDecodeCounters(drafts, draft_tokens, accepted, per_position)


def add_counters(counters: Iterable[SpecDecodeCounters], positions: int = 0) -> SpecDecodeCounters:
    """The sum of several readings (e.g. of the prompts of one category)."""
    drafts = draft_tokens = accepted = 0
    per_position = [0] * positions
    for c in counters:
        drafts += c.num_drafts
        draft_tokens += c.num_draft_tokens
        accepted += c.num_accepted_tokens
        per_position += [0] * (len(c.accepted_per_position) - len(per_position))
        for i, a in enumerate(c.accepted_per_position):
            per_position[i] += a
    return SpecDecodeCounters(drafts, draft_tokens, accepted, per_position)
