"""Speculative-decoding counters from a vLLM server's Prometheus `/metrics` page.

vLLM exports (checked in vllm 0.32 `v1/spec_decode/metrics.py` and on a live server):
`vllm:spec_decode_num_drafts_total`, `vllm:spec_decode_num_draft_tokens_total`,
`vllm:spec_decode_num_accepted_tokens_total` and
`vllm:spec_decode_num_accepted_tokens_per_pos_total{position="i"}`, one series per engine
(label `engine`), all cumulative since the server started. MAL over a stretch of requests is
the delta of two readings: `(after - before).mal`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

DRAFTS = "vllm:spec_decode_num_drafts_total"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens_total"
ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens_total"
ACCEPTED_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"

# The main environment has no `prometheus_client` (it is a vLLM-env dependency only), and
# adding one for a few counter lines is not worth a pin: this parses the text exposition
# format's sample lines (`name{label="value",...} value [timestamp]`, with label escapes).
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_prometheus_text(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """Yield `(name, labels, value)` for every sample line of a Prometheus text page."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        labels = {}
        raw = match["labels"] or ""
        pos = 0
        while pos < len(raw):
            label = _LABEL.match(raw, pos)
            if label is None:
                raise ValueError(f"bad label set in Prometheus line: {line!r}")
            labels[label[1]] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m[0]], label[2])
            pos = label.end()
        yield match["name"], labels, float(match["value"])


@dataclass(frozen=True)
class SpecDecodeCounters:
    """Cumulative speculative-decoding counters of a vLLM server (summed over engines)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @classmethod
    def from_prometheus_text(cls, text: str) -> SpecDecodeCounters:
        totals = {DRAFTS: 0.0, DRAFT_TOKENS: 0.0, ACCEPTED_TOKENS: 0.0}
        per_position: dict[int, float] = {}
        for name, labels, value in parse_prometheus_text(text):
            if name in totals:
                totals[name] += value
            elif name == ACCEPTED_PER_POSITION:
                position = int(labels["position"])
                per_position[position] = per_position.get(position, 0.0) + value
        positions = max(per_position, default=-1) + 1
        return cls(
            num_drafts=int(totals[DRAFTS]),
            num_draft_tokens=int(totals[DRAFT_TOKENS]),
            num_accepted_tokens=int(totals[ACCEPTED_TOKENS]),
            accepted_per_position=[int(per_position.get(i, 0)) for i in range(positions)],
        )

    def __sub__(self, earlier: SpecDecodeCounters) -> SpecDecodeCounters:
        """The counts between two readings of the same server (`later - earlier`)."""
        if not isinstance(earlier, SpecDecodeCounters):
            return NotImplemented
        n = max(len(self.accepted_per_position), len(earlier.accepted_per_position))
        mine = self.accepted_per_position + [0] * (n - len(self.accepted_per_position))
        theirs = earlier.accepted_per_position + [0] * (n - len(earlier.accepted_per_position))
        delta = SpecDecodeCounters(
            num_drafts=self.num_drafts - earlier.num_drafts,
            num_draft_tokens=self.num_draft_tokens - earlier.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens - earlier.num_accepted_tokens,
            accepted_per_position=[a - b for a, b in zip(mine, theirs, strict=True)],
        )
        if min(delta.num_drafts, delta.num_draft_tokens, delta.num_accepted_tokens) < 0:
            raise ValueError(
                "counters went down between readings: subtract an earlier reading of the "
                "same server (vLLM counters only grow while the server runs)"
            )
        return delta

    @property
    def mal(self) -> float:
        """Mean accepted length, bonus token included (`1 + accepted / drafts`); NaN without drafts."""
        if self.num_drafts == 0:
            return math.nan
        return 1.0 + self.num_accepted_tokens / self.num_drafts

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of drafts whose i-th draft token was accepted; NaN entries without drafts."""
        if self.num_drafts == 0:
            return [math.nan] * len(self.accepted_per_position)
        return [a / self.num_drafts for a in self.accepted_per_position]

    def summary(self) -> str:
        """A few lines for a terminal: counts, MAL and per-position acceptance."""
        if self.num_drafts == 0:
            return "speculative decoding: no drafts yet (no generation requests were served)"
        per_position = "  ".join(
            f"{i}:{rate:.3f}" for i, rate in enumerate(self.acceptance_per_position)
        )
        return (
            f"drafts {self.num_drafts}  draft tokens {self.num_draft_tokens}  "
            f"accepted {self.num_accepted_tokens}\n"
            f"MAL {self.mal:.3f}  (1 + accepted / drafts)\n"
            f"acceptance per position  {per_position}"
        )
