"""Cost of per-row seeded sampling in the transformers distillation backend (CPU).

Three ways to sample a batch of prompts with SmolLM2-135M-Instruct, alternating in rounds
within one process so machine noise hits all alike (median wall time of each):
- `transformers`: `generate(do_sample=True)`, one global RNG for the whole batch (the rows
  then depend on their batch neighbours: what sd2 did before);
- `per-row`: greedy `generate` with sd2's per-row sampling processors (one generator per row;
  sd2_hf/data/sampling.py), the same batch;
- `one-by-one`: each row generated alone with its own seed, the other way to seed per row.
Every variant generates exactly `--max-new-tokens` per row (`min_new_tokens`), so the times
compare the same work.

    .venv/bin/python bench/sampling_overhead.py [--batch 8 --max-new-tokens 64 --rounds 3]

Writes bench/results/sampling_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tiny  # noqa: E402

from sd2_hf.assets import resolve_model  # noqa: E402
from sd2_hf.data.sampling import per_row_sampling_processors  # noqa: E402
from sd2_hf.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

TARGET = "asset:smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    path = resolve_model(TARGET)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template(
            r["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for r in tiny.conversations(opts.batch)
    ]
    seeds = list(range(opts.batch))
    n = opts.max_new_tokens
    common = {
        "max_new_tokens": n,
        "min_new_tokens": n,
        "pad_token_id": tok.pad_token_id,
        "repetition_penalty": 1.0,
    }

    def generate(rows: list[list[int]], **kwargs) -> None:
        batch = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        with torch.inference_mode():
            model.generate(**batch, **common, **kwargs)

    def transformers_sampler() -> None:
        torch.manual_seed(0)
        generate(prompts, do_sample=True, temperature=1.0, top_p=0.9, top_k=0)

    def per_row() -> None:
        processors = per_row_sampling_processors(seeds, 1.0, 0.9)
        generate(prompts, do_sample=False, logits_processor=processors)

    def one_by_one() -> None:
        for prompt, seed in zip(prompts, seeds, strict=True):
            processors = per_row_sampling_processors([seed], 1.0, 0.9)
            generate([prompt], do_sample=False, logits_processor=processors)

    variants = {"transformers": transformers_sampler, "per-row": per_row, "one-by-one": one_by_one}
    per_row()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(opts.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": TARGET,
        "batch": opts.batch,
        "max_new_tokens": n,
        "rounds": opts.rounds,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "median_seconds": median,
        "per_row_over_transformers": median["per-row"] / median["transformers"],
        "one_by_one_over_per_row": median["one-by-one"] / median["per-row"],
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    out = ROOT / "bench" / "results"
    atomic_write_json(out / "sampling_overhead.json", result)
    rows = "\n".join(
        f"| {name} | {median[name]:.3f} | {opts.batch * n / median[name]:.1f} |" for name in names
    )
    command = " ".join(["bench/sampling_overhead.py", *sys.argv[1:]])
    md = (
        "# Per-row seeded sampling: cost\n\n"
        f"SmolLM2-135M-Instruct (fp32), batch {opts.batch}, {n} new tokens per row, "
        f"temperature 1, top_p 0.9, CPU ({torch.get_num_threads()} threads), "
        f"{opts.rounds} alternating rounds.\n\n"
        "| variant | median (s) | tokens/s |\n|---|---|---|\n"
        f"{rows}\n\n"
        f"Per-row processors vs transformers' batch sampler: time ratio "
        f"**{result['per_row_over_transformers']:.3f}**; one row at a time vs per-row "
        f"processors: **{result['one_by_one_over_per_row']:.2f}x** the time.\n\n"
        f"Command: `.venv/bin/python {command}`\n"
    )
    atomic_write_text(out / "sampling_overhead.md", md)
    print(md)


if __name__ == "__main__":
    main()
