"""Per-row seeded sampling for batched transformers `generate`.

transformers 5.17 samples a batch with one `torch.multinomial` call on the global RNG
(`GenerationMixin._sample`), and `generate` takes no per-row generator. A row's sample then
depends on its batch neighbours and on the batch size, which a resumed distillation may
change, and rows could not be reproduced one by one. The processors below keep one batched
forward pass per step and move only the draw into a logits processor with one
`torch.Generator` per row; `generate` runs in greedy mode and its argmax picks the drawn token.
The draw is O(batch × vocabulary) per step, negligible next to the forward pass; generating
rows one at a time with their own seed would give up batching instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)


class PerRowSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores) with that row's own generator.

    Returns scores that are `-inf` everywhere except at the drawn token, so greedy decoding
    selects it. Row `i` consumes only `generators[i]`, one draw per step, so its tokens depend
    on its own prompt and seed only.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(
                f"PerRowSampler has {len(self.generators)} generators for a batch of "
                f"{scores.shape[0]} rows (beam search and num_return_sequences > 1 are not "
                "supported)"
            )
        probs = scores.float().softmax(dim=-1)
        tokens = torch.cat(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)]
        )
        drawn = torch.full_like(scores, -float("inf"))
        return drawn.scatter_(1, tokens[:, None], 0.0)


def per_row_sampling_processors(
    seeds: Sequence[int], temperature: float, top_p: float, device: torch.device | str = "cpu"
) -> LogitsProcessorList:
    """transformers' own temperature and top-p warpers, then the per-row draw (no top-k, as in
    vLLM). Pass to `generate(..., do_sample=False, logits_processor=...)`."""
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(PerRowSampler(seeds, device))
    return processors
