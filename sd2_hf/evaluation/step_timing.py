"""One forward step of a causal LM over a cached context, timed as an engine runs it.

`step_seconds` times `width` new tokens for each of `batch` sequences after `context` cached
tokens: width 1 is a decoding step (the drafter's, or the target's alone), width K + 1 the
target's verify step of speculative decoding. The cache is transformers' `StaticCache` (fixed
shapes, written in place at the same positions every step, so no per-step copy), and on CUDA the
step can be captured once in a CUDA graph and replayed, as vLLM and `torch.compile`'s
"reduce-overhead" mode run decoding: eager PyTorch at batch 1 is dominated by kernel launches
(measured on an H200: a 1B-shaped step 13.7 ms eager against 2.6 ms from a graph).

Written here because neither transformers nor accelerate times a bare forward step; vLLM's own
benchmarks time whole requests, which mix the steps this cost model separates
(`sd2_hf.evaluation.cost_model`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _causal_mask(
    batch: int, start: int, width: int, length: int, device: torch.device
) -> torch.Tensor:
    """A prepared boolean 4-D mask (True: attend) over the static cache's `length` slots: the
    query at position start + i sees the slots up to itself. transformers passes a prepared
    4-D mask through as it is, so no mask is built (and no host synchronisation happens)
    inside a captured graph."""
    keys = torch.arange(length, device=device)
    queries = torch.arange(start, start + width, device=device)
    return (keys[None, :] <= queries[:, None]).expand(batch, 1, width, length)


@torch.no_grad()
def prepare_step(
    model: torch.nn.Module, batch: int, context: int, width: int
) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """A static cache filled with `context` random tokens per sequence, and `forward()`: the
    step of `width` further random tokens over it, returning their logits (the same slots of
    the cache written each call). Also returns all the ids, context and step, (batch,
    context + width)."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    cache = StaticCache(config=model.config, max_cache_len=context + width)
    ids = torch.randint(0, vocab, (batch, context + width), device=device)
    model(
        input_ids=ids[:, :context],
        attention_mask=_causal_mask(batch, 0, context, context + width, device),
        past_key_values=cache,
        cache_position=torch.arange(context, device=device),
        use_cache=True,
    )
    step = ids[:, context:].clone()
    position = torch.arange(context, context + width, device=device)
    mask = _causal_mask(batch, context, width, context + width, device)

    # transformers 5's StaticCache writes at its own counter (`cumulative_length`, a device
    # tensor), not at `cache_position`: each step rewinds it to the context first, in place, so
    # the step writes the same slots every time, also when replayed from a CUDA graph.
    counters = [layer.cumulative_length for layer in cache.layers]

    def forward() -> torch.Tensor:
        for counter in counters:
            counter.fill_(context)
        return model(
            input_ids=step,
            attention_mask=mask,
            past_key_values=cache,
            cache_position=position,
            use_cache=True,
        ).logits

    return forward, ids


@torch.no_grad()
def step_seconds(
    model: torch.nn.Module,
    *,
    batch: int = 1,
    context: int = 512,
    width: int = 1,
    repeats: int = 20,
    graph: bool = False,
    warmup: int = 3,
) -> float:
    """Median seconds of one forward step of `width` new tokens per sequence, `batch` sequences,
    over a static cache holding `context` tokens (random ids; `warmup` untimed steps first).
    `graph`: capture the step in a CUDA graph and time its replays (CUDA only)."""
    device = next(model.parameters()).device
    if graph and device.type != "cuda":
        raise ValueError(f"graph=True needs a model on CUDA; this one is on {device}")
    forward, _ = prepare_step(model, batch, context, width)
    run = forward
    if graph:
        # PyTorch's recipe: warm up on a side stream, then capture; replays reuse the same
        # input, cache and output buffers.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            forward()
        run = captured.replay
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])
