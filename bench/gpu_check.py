"""GPU check: the CUDA path users take, on random-weight models of real shapes (no Hub).

1. `SD2Trainer` bf16 steps on CUDA of a 2:4-pruned Llama-3.2-1B-shaped drafter; the zeros must
   be exactly where they were (masks held by SparsityMaskCallback).
2. The drafter's forward time (one decoding step of B sequences over a cached context) dense, and
   the Llama-3.1-8B-shaped target's dense step, for the cost ratio the speculative-decoding cost
   model needs, at batch 1 and 8.
3. The same drafter with its 2:4 weights through PyTorch's semi-structured sparse kernels
   (`torch.sparse.to_sparse_semi_structured`; cuSPARSELt on compute capability 8.x/9.x, CUTLASS
   on 8.x only), measured against its dense time; each swapped layer is a `FlatLinear` (2-D
   input only): `sd2_hf.pruning.semi_structured`, the library code a user runs a 2:4 drafter with.

Each part's result is written (atomically) to the JSON and Markdown files as soon as it is
measured; a part that fails is recorded with its error and the script goes on to the next one
(exit status 1 at the end), so one failure never loses the results measured before it.

    python bench/gpu_check.py                 # on a CUDA machine (a few minutes)
    python bench/gpu_check.py --tiny --device cpu   # the same code on tiny shapes (tests)

Writes bench/results/gpu_check.{json,md} (or --output; the trainer's scratch under gpu_check/).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tiny  # noqa: E402

from sd2_hf import SD2Config, SD2Trainer  # noqa: E402
from sd2_hf.pruning.masks import find_target_linears, is_n_m_sparse  # noqa: E402
from sd2_hf.pruning.semi_structured import (  # noqa: E402
    BACKENDS,
    semi_structured_backend,
    semi_structured_converter,
    to_semi_structured,
)
from sd2_hf.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

# (hidden, intermediate, layers, heads, kv heads, tied embeddings) of the public configs
# (Llama-3.2-1B, Llama-3.1-8B; weights random), and tiny ones for --tiny: the same code paths in
# seconds (head_dim 64, widths that 2:4 kernels take).
_SHAPE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "tie_word_embeddings",
)  # fmt: skip
SHAPES = {
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, False),
    "tiny-drafter": (128, 256, 2, 2, 1, True),
    "tiny-target": (256, 512, 2, 4, 2, False),
}
FULL_VOCAB = 128256
BATCHES = (1, 8)
# The timing table's columns after the batch: (header, step_timings key, format).
COLUMNS = (
    ("drafter dense ms", "drafter_dense_ms", "{:.3f}"),
    ("drafter 2:4 ms", "drafter_2of4_ms", "{:.3f}"),
    ("2:4 speed-up", "speedup_2of4_vs_dense", "{:.2f}x"),
    ("target ms", "target_dense_ms", "{:.3f}"),
    ("drafter/target", "drafter_vs_target_cost", "{:.3f}"),
)
# Derived step_timings keys: numerator / denominator, set as soon as both times are in.
RATIOS = {
    "drafter_vs_target_cost": ("drafter_dense_ms", "target_dense_ms"),
    "speedup_2of4_vs_dense": ("drafter_dense_ms", "drafter_2of4_ms"),
}


def build(shape: str, vocab_size: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    shape_config = dict(zip(_SHAPE_FIELDS, SHAPES[shape], strict=True))
    config = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=4096, rope_theta=500000.0, **shape_config
    )
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def zero_masks(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    return {n: (m.weight == 0).cpu() for n, m in find_target_linears(model).items()}


def train_check(drafter: LlamaForCausalLM, tokenizer, steps: int, bf16: bool, out: Path) -> dict:
    """SD2Trainer steps on the 2:4 drafter; zeros compared before/after, exactly."""
    before = zero_masks(drafter)
    args = SD2Config(
        **tiny.trainer_kwargs(
            out / "train", max_steps=steps, learning_rate=1e-4, weight_decay=0.1, bf16=bf16,
            logging_steps=1, max_length=128, mask_check_interval=1,
            use_cpu=not torch.cuda.is_available(),
        )
    )  # fmt: skip
    data = Dataset.from_list(tiny.conversations(64))
    trainer = SD2Trainer(drafter.train(), args=args, train_dataset=data, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = zero_masks(drafter)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "bf16": bf16,
        "zeros_exact": all(torch.equal(before[n], after[n]) for n in before),
        "still_2of4": all(is_n_m_sparse(m.weight) for m in find_target_linears(drafter).values()),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


@torch.no_grad()
def step_seconds(model, batch: int, context: int, repeats: int, device: str) -> float:
    """Median time of one decoding step: `batch` sequences, one new token each, over a cached
    context of `context` tokens (a fresh copy of the cache per step; 3 warm-up steps)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), device=device)
    past = model(input_ids=ids, use_cache=True).past_key_values
    step = torch.randint(0, vocab, (batch, 1), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 3):
        cache = copy.deepcopy(past)
        sync()
        start = time.perf_counter()
        model(input_ids=step, past_key_values=cache, use_cache=True)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


class Report:
    """The report, written to `out/gpu_check.{json,md}` (atomic writes) at the start and after
    every part, with each timing row's RATIOS as soon as both of their times are in."""

    def __init__(self, out: Path, data: dict):
        self.out, self.data = out, data
        self.save()

    def save(self) -> None:
        for row in self.data["step_timings"].values():
            row.update(
                {k: row[a] / row[b] for k, (a, b) in RATIOS.items() if a in row and b in row}
            )
        atomic_write_json(self.out / "gpu_check.json", self.data)
        atomic_write_text(self.out / "gpu_check.md", render(self.data))

    @contextlib.contextmanager
    def part(self, name: str):
        """Run one part; on an error record it under `errors[name]`, save, and go on."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - recorded, and the exit status says so
            traceback.print_exc()
            self.data["errors"][name] = f"{type(error).__name__}: {error}"
        self.save()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a test of the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="semi-structured kernels: auto = cuSPARSELt where available, else CUTLASS (8.x only)",
    )
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
    backend, unsupported = semi_structured_backend(args.device, args.backend)
    semi = {"backend": backend, "unsupported": unsupported, "layers_swapped": 0}
    timings: dict[int, dict] = {batch: {} for batch in BATCHES}
    report = Report(out, {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shapes": {"drafter": drafter_shape, "target": target_shape, "vocab": vocab},
        "dtype": str(dtype).removeprefix("torch."), "context": args.context,
        "train": None, "semi_structured": semi, "step_timings": timings, "errors": {},
    })  # fmt: skip

    def time_step(model: LlamaForCausalLM, name: str, batch: int, key: str) -> None:
        with report.part(f"{name} step, batch {batch}"):
            seconds = step_seconds(model, batch, args.context, args.repeats, args.device)
            timings[batch][key] = seconds * 1e3

    # 1. Training: fp32 master weights (Trainer's bf16 is autocast), 2:4 by magnitude.
    drafter = build(drafter_shape, vocab, torch.float32, args.device)
    tiny.magnitude_sparsify(drafter, structure="2:4")
    with report.part("train"):
        report.data["train"] = train_check(
            drafter, tokenizer, args.train_steps, bf16=cuda, out=out / "gpu_check"
        )

    # 2. Forward time of one decoding step, dense: the drafter and the target.
    drafter = drafter.to(dtype).eval()
    target = None
    with report.part("target build"):
        target = build(target_shape, vocab, dtype, args.device)
    for batch in BATCHES:
        time_step(drafter, "drafter dense", batch, "drafter_dense_ms")
        if target is not None:
            time_step(target, "target dense", batch, "target_dense_ms")
    del target

    # 3. The same drafter through the semi-structured 2:4 kernels (same weights).
    if backend is not None:
        with report.part("2:4 swap"):
            semi["layers_swapped"] = to_semi_structured(drafter, semi_structured_converter(backend))
        for batch in BATCHES if semi["layers_swapped"] else ():
            time_step(drafter, "drafter 2:4", batch, "drafter_2of4_ms")
    print(render(report.data))
    return report.data


def render(report: dict) -> str:
    train, semi, shapes = report["train"], report["semi_structured"], report["shapes"]
    lines = [
        f"# GPU check ({report['device']}, torch {report['torch']}, {report['dtype']})",
        "",
        f"Drafter {shapes['drafter']}, target {shapes['target']} (random weights, vocab "
        f"{shapes['vocab']}); one decoding step over a cached context of {report['context']} "
        "tokens, median.",
        "",
        f"- SD2Trainer: {train['steps']} steps (bf16 {train['bf16']}) in {train['seconds']} s, "
        f"loss {train['first_loss']} -> {train['last_loss']}; zeros exact: "
        f"{train['zeros_exact']}; still 2:4: {train['still_2of4']}"
        if train
        else "- SD2Trainer: not measured (yet)",
        f"- 2:4 semi-structured kernels not measured: {semi['unsupported']}"
        if semi["unsupported"]
        else f"- 2:4 semi-structured kernels: {semi['backend']}, {semi['layers_swapped']} layers "
        "swapped (`FlatLinear`: 2-D input)",
        *(f"- FAILED: {part}: {error}" for part, error in report.get("errors", {}).items()),
        "",
        "| batch | " + " | ".join(header for header, _, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for batch, row in report["step_timings"].items():
        cells = [fmt.format(row[key]) if key in row else "-" for _, key, fmt in COLUMNS]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
