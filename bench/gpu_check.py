"""GPU check: the CUDA path users take, on random-weight models of real shapes (no Hub).

1. `SD2Trainer` bf16 steps on CUDA of a 2:4-pruned Llama-3.2-1B-shaped drafter; the zeros must
   be exactly where they were (masks held by SparsityMaskCallback).
2. The drafter's forward time (one decoding step of B sequences over a cached context) with its
   2:4 weights through PyTorch's semi-structured sparse kernels
   (`torch.sparse.to_sparse_semi_structured`, CUTLASS/cuSPARSELt, SM8x/9x) against the same
   drafter dense, at batch 1 and 8, measured side by side. Also the Llama-3.1-8B-shaped target's
   dense step, for the cost ratio the speculative-decoding cost model needs.

    python bench/gpu_check.py                 # on a CUDA machine (a few minutes)
    python bench/gpu_check.py --tiny --device cpu   # the same code on tiny shapes (tests)

Writes bench/results/gpu_check.{json,md} (or --output).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tiny  # noqa: E402

from sd2_hf import SD2Config, SD2Trainer  # noqa: E402
from sd2_hf.pruning.masks import find_target_linears, is_n_m_sparse  # noqa: E402
from sd2_hf.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

# (hidden, intermediate, layers, heads, kv heads, tied embeddings) of the public configs
# (Llama-3.2-1B, Llama-3.1-8B; weights random), and tiny ones for --tiny: the same code paths in
# seconds (head_dim 64, widths that 2:4 kernels take).
_SHAPE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "tie_word_embeddings",
)  # fmt: skip
SHAPES = {
    name: dict(zip(_SHAPE_FIELDS, values))
    for name, values in {
        "llama-3.2-1b": (2048, 8192, 16, 32, 8, True),
        "llama-3.1-8b": (4096, 14336, 32, 32, 8, False),
        "tiny-drafter": (128, 256, 2, 2, 1, True),
        "tiny-target": (256, 512, 2, 4, 2, False),
    }.items()
}
FULL_VOCAB = 128256


def build(shape: str, vocab_size: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=4096, rope_theta=500000.0, **SHAPES[shape]
    )
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def train_check(drafter: LlamaForCausalLM, tokenizer, steps: int, bf16: bool, out: Path) -> dict:
    """SD2Trainer steps on the 2:4 drafter; zeros compared before/after, exactly."""
    before = {n: (m.weight == 0).cpu() for n, m in find_target_linears(drafter).items()}
    args = SD2Config(
        **tiny.trainer_kwargs(
            out / "train",
            max_steps=steps,
            learning_rate=1e-4,
            weight_decay=0.1,
            bf16=bf16,
            logging_steps=1,
            max_length=128,
            mask_check_interval=1,
            use_cpu=not torch.cuda.is_available(),
        )
    )
    trainer = SD2Trainer(
        drafter.train(),
        args=args,
        train_dataset=Dataset.from_list(tiny.conversations(64)),
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = {n: (m.weight == 0).cpu() for n, m in find_target_linears(drafter).items()}
    two_four = all(is_n_m_sparse(m.weight) for m in find_target_linears(drafter).values())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "bf16": bf16,
        "zeros_exact": all(torch.equal(before[n], after[n]) for n in before),
        "still_2of4": two_four,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def semi_structured_supported(device: str) -> str | None:
    """None if the 2:4 kernels can run here, else why not."""
    if device != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA GPU (torch's semi-structured sparse kernels are CUDA-only)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"needs compute capability 8.x/9.x, this GPU is {major}.x"
    return None


@torch.no_grad()
def to_semi_structured(model: LlamaForCausalLM) -> int:
    """Swap every 2:4 decoder linear weight for its compressed semi-structured form."""
    from torch.sparse import to_sparse_semi_structured

    swapped = 0
    for module in find_target_linears(model).values():
        if is_n_m_sparse(module.weight):
            module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight), False)
            swapped += 1
    return swapped


@torch.no_grad()
def step_seconds(model, batch: int, context: int, repeats: int, device: str) -> float:
    """Median time of one decoding step: `batch` sequences, one new token each, over a cached
    context of `context` tokens."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), device=device)
    past = model(input_ids=ids, use_cache=True).past_key_values
    step = torch.randint(0, vocab, (batch, 1), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 3):
        cache = _copy_cache(past)
        sync()
        start = time.perf_counter()
        model(input_ids=step, past_key_values=cache, use_cache=True)
        sync()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _copy_cache(past):
    import copy

    return copy.deepcopy(past)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a test of the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    drafter_shape, target_shape = (
        ("tiny-drafter", "tiny-target") if args.tiny else ("llama-3.2-1b", "llama-3.1-8b")
    )
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = tiny.build_tokenizer()
    vocab = len(tokenizer) if args.tiny else FULL_VOCAB
    torch.manual_seed(0)

    # 1. Training: fp32 master weights (Trainer's bf16 is autocast), 2:4 by magnitude.
    drafter = build(drafter_shape, vocab, torch.float32, args.device)
    tiny.magnitude_sparsify(drafter, structure="2:4")
    train = train_check(drafter, tokenizer, args.train_steps, bf16=cuda, out=out / "gpu_check")

    # 2. Forward time of one decoding step, dense vs semi-structured 2:4, same weights.
    drafter = drafter.to(dtype).eval()
    target = build(target_shape, vocab, dtype, args.device)
    timings = {}
    for batch in (1, 8):
        row = {
            "drafter_dense_ms": step_seconds(
                drafter, batch, args.context, args.repeats, args.device
            )
            * 1e3,
            "target_dense_ms": step_seconds(target, batch, args.context, args.repeats, args.device)
            * 1e3,
        }
        timings[batch] = row
    unsupported = semi_structured_supported(args.device)
    if unsupported is None:
        swapped = to_semi_structured(drafter)
        for batch, row in timings.items():
            row["drafter_2of4_ms"] = (
                step_seconds(drafter, batch, args.context, args.repeats, args.device) * 1e3
            )
            row["speedup_2of4_vs_dense"] = row["drafter_dense_ms"] / row["drafter_2of4_ms"]
    else:
        swapped = 0
    for row in timings.values():
        row["drafter_vs_target_cost"] = row["drafter_dense_ms"] / row["target_dense_ms"]

    report = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shapes": {"drafter": drafter_shape, "target": target_shape, "vocab": vocab},
        "dtype": str(dtype).removeprefix("torch."),
        "context": args.context,
        "train": train,
        "semi_structured": {"unsupported": unsupported, "layers_swapped": swapped},
        "step_timings": timings,
    }
    atomic_write_json(out / "gpu_check.json", report)
    atomic_write_text(out / "gpu_check.md", render(report))
    print(render(report))
    return report


def render(report: dict) -> str:
    train = report["train"]
    lines = [
        f"# GPU check ({report['device']}, torch {report['torch']}, {report['dtype']})",
        "",
        f"Drafter {report['shapes']['drafter']}, target {report['shapes']['target']} "
        f"(random weights, vocab {report['shapes']['vocab']}); one decoding step over a cached "
        f"context of {report['context']} tokens, median.",
        "",
        f"- SD2Trainer: {train['steps']} steps (bf16 {train['bf16']}) in {train['seconds']} s, "
        f"loss {train['first_loss']} -> {train['last_loss']}; zeros exact: "
        f"{train['zeros_exact']}; still 2:4: {train['still_2of4']}",
    ]
    unsupported = report["semi_structured"]["unsupported"]
    if unsupported:
        lines.append(f"- 2:4 semi-structured kernels not measured: {unsupported}")
    lines += [
        "",
        "| batch | drafter dense ms | drafter 2:4 ms | 2:4 speed-up | target ms | drafter/target |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for batch, row in report["step_timings"].items():
        sparse = f"{row['drafter_2of4_ms']:.3f}" if "drafter_2of4_ms" in row else "-"
        speedup = f"{row['speedup_2of4_vs_dense']:.2f}x" if "speedup_2of4_vs_dense" in row else "-"
        lines.append(
            f"| {batch} | {row['drafter_dense_ms']:.3f} | {sparse} | {speedup} | "
            f"{row['target_dense_ms']:.3f} | {row['drafter_vs_target_cost']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
