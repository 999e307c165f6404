"""Training-step overhead of SparsityMaskCallback on a ~35M-parameter Llama (CPU).

Runs SD2Trainer with and without the mask callback, alternating in rounds within one process
so machine noise hits both alike, and reports the ratio of median step times.

    .venv/bin/python bench/mask_overhead.py [--rounds 5 --steps 12]

Writes bench/results/mask_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tiny  # noqa: E402

from sd2_hf import SD2Config, SD2Trainer, SparsityMaskCallback  # noqa: E402
from sd2_hf.utils.io import atomic_write_json, atomic_write_text  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward/backward of all micro-batches + mask work)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


def run(
    model, tok, dataset, out_dir: Path, steps: int, with_masks: bool, batch: int, max_length: int
) -> list[float]:
    args = SD2Config(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        max_length=max_length,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1000,
        mask_check_interval=50,
    )
    timer = StepTimer()
    trainer = SD2Trainer(
        model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer]
    )
    if not with_masks:
        trainer.remove_callback(SparsityMaskCallback)
    trainer.train()
    return timer.times[2:]  # first steps warm up allocators and caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    tok = tiny.build_tokenizer()
    base = tiny.build_model(
        tok,
        num_layers=opts.layers,
        hidden_size=512,
        intermediate_size=1536,
        num_heads=8,
        num_kv_heads=8,
    )
    tiny.magnitude_sparsify(base, 0.5)
    n_params = sum(p.numel() for p in base.parameters())
    rows = tiny.conversations(64, seed=7)
    for r in rows:  # longer replies so sequences approach max_length
        r["messages"][1]["content"] = " ".join([r["messages"][1]["content"]] * 6)
    dataset = Dataset.from_list(rows)

    times = {"with": [], "without": []}
    order = []
    tmp = ROOT / "bench" / ".tmp-mask-overhead"
    for i in range(opts.rounds):
        # alternate which variant goes first, so drift over time does not favour one
        variants = ("with", "without") if i % 2 == 0 else ("without", "with")
        for v in variants:
            order.append(v)
            times[v] += run(
                copy.deepcopy(base),
                tok,
                dataset,
                tmp,
                opts.steps,
                v == "with",
                opts.batch,
                opts.max_length,
            )
        print(
            f"round {i + 1}/{opts.rounds}: median with {statistics.median(times['with']):.4f}s, without {statistics.median(times['without']):.4f}s",
            flush=True,
        )

    med_with, med_without = statistics.median(times["with"]), statistics.median(times["without"])
    ratio = med_with / med_without
    result = {
        "benchmark": "mask_overhead",
        "params": n_params,
        "sparsity": 0.5,
        "rounds": opts.rounds,
        "steps_per_run_measured": opts.steps - 2,
        "batch": f"{opts.batch} x {opts.max_length} tokens",
        "threads": torch.get_num_threads(),
        "median_step_s_with_callback": med_with,
        "median_step_s_without_callback": med_without,
        "steps_per_s_with": 1 / med_with,
        "steps_per_s_without": 1 / med_without,
        "time_ratio_with_over_without": ratio,
        "overhead_percent": (ratio - 1) * 100,
        "goal_percent": 3.0,
        "order": order,
        "samples": times,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__},
    }
    out = ROOT / "bench" / "results"
    atomic_write_json(out / "mask_overhead.json", result)
    md = (
        "# Mask callback overhead\n\n"
        f"SD2Trainer on a {n_params / 1e6:.1f}M-parameter Llama (50% sparse), CPU ({torch.get_num_threads()} threads), "
        f"batch {opts.batch} x {opts.max_length} tokens; "
        f"{opts.rounds} alternating rounds of {opts.steps - 2} measured steps per variant.\n\n"
        "| variant | median step (s) | steps/s |\n|---|---|---|\n"
        f"| with SparsityMaskCallback | {med_with:.4f} | {1 / med_with:.3f} |\n"
        f"| without | {med_without:.4f} | {1 / med_without:.3f} |\n\n"
        f"Overhead: **{(ratio - 1) * 100:+.2f}%** (time ratio {ratio:.4f}; goal <= 3%).\n\n"
        f"Command: `.venv/bin/python bench/mask_overhead.py {' '.join(sys.argv[1:])}`\n"
    )
    atomic_write_text(out / "mask_overhead.md", md)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "params",
                    "median_step_s_with_callback",
                    "median_step_s_without_callback",
                    "overhead_percent",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
