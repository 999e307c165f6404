"""GPU check: the CUDA path users take, on random-weight models of real shapes (no Hub).

1. `SD2Trainer` bf16 steps on CUDA of a 2:4-pruned Llama-3.2-1B-shaped drafter; the zeros must
   be exactly where they were (masks held by SparsityMaskCallback).
2. One forward step over a static cache (`sd2_hf.evaluation.step_timing`), eager and on CUDA
   replayed from a CUDA graph: the drafter's and the Llama-3.1-8B-shaped target's decoding step
   at batch 1 and 8, and the target's verify step over K + 1 tokens at batch 1.
3. The same drafter with its 2:4 weights through PyTorch's semi-structured kernels
   (`sd2_hf.pruning.semi_structured`: cuSPARSELt on 8.x/9.x, CUTLASS on 8.x only; each swapped
   layer a 2-D-input `FlatLinear`), against its dense time.
4. The cost model (`sd2_hf.evaluation.cost_model`) on these step times: the speed-up the MAL per
   K of each committed study row (`--mal-from`) would give here, beside its own run's.

Each part's result is written (atomically) as soon as it is measured; a failed part is recorded
with its error and the rest still run (exit status 1 at the end).

    python bench/gpu_check.py                 # on a CUDA machine (a few minutes)
    python bench/gpu_check.py --tiny --device cpu   # the same code on tiny shapes (tests)

Writes bench/results/gpu_check.{json,md} (or --output; the trainer's scratch under gpu_check/).
"""

from __future__ import annotations

import argparse
import json
import platform
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
from sd2_hf.evaluation.cost_model import project_study  # noqa: E402
from sd2_hf.evaluation.report import _table as table  # noqa: E402
from sd2_hf.evaluation.step_timing import step_seconds  # noqa: E402
from sd2_hf.pruning import semi_structured as semi_kernels  # noqa: E402
from sd2_hf.pruning.masks import find_target_linears, is_n_m_sparse  # noqa: E402
from sd2_hf.utils.io import PartReport  # noqa: E402

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
COLUMNS = [
    (f"{name}{' graph' if graph else ''} ms", f"{key}{'_graph' if graph else ''}_ms", "{:.3f}")
    for name, key in (("drafter", "drafter_dense"), ("drafter 2:4", "drafter_2of4"))
    + (("target", "target_dense"),)
    for graph in (False, True)
] + [
    ("2:4 speed-up", "speedup_2of4_vs_dense", "{:.2f}x"),
    ("drafter/target", "drafter_vs_target_cost", "{:.3f}"),
    ("graphs", "drafter_vs_target_cost_graph", "{:.3f}"),
]
# Derived step_timings keys: numerator / denominator, set as soon as both times are in.
RATIOS = {
    "drafter_vs_target_cost": ("drafter_dense_ms", "target_dense_ms"),
    "drafter_vs_target_cost_graph": ("drafter_dense_graph_ms", "target_dense_graph_ms"),
    "speedup_2of4_vs_dense": ("drafter_dense_ms", "drafter_2of4_ms"),
}
VERIFY_K = (1, 2, 3, 4, 6, 8)  # the target's verify step over K + 1 tokens, batch 1
MAL_FROM = ROOT / "bench" / "results" / "studies" / "qwen-coder" / "study.json"


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
    args = SD2Config(**tiny.trainer_kwargs(out / "train", max_steps=steps, learning_rate=1e-4,
        weight_decay=0.1, bf16=bf16, logging_steps=1, max_length=128, mask_check_interval=1,
        use_cpu=not torch.cuda.is_available()))  # fmt: skip
    data = Dataset.from_list(tiny.conversations(64))
    trainer = SD2Trainer(drafter.train(), args=args, train_dataset=data, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds, after = time.perf_counter() - start, zero_masks(drafter)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step, "seconds": round(seconds, 2), "bf16": bf16,
        "zeros_exact": all(torch.equal(before[n], after[n]) for n in before),
        "still_2of4": all(is_n_m_sparse(m.weight) for m in find_target_linears(drafter).values()),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
    }  # fmt: skip


def add_ratios(data: dict) -> None:
    """Each timing row's RATIOS, as soon as both of their times are in."""
    for row in data["step_timings"].values():
        row.update({k: row[a] / row[b] for k, (a, b) in RATIOS.items() if a in row and b in row})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a test of the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", choices=semi_kernels.BACKENDS, default="auto", help="semi-"
        "structured kernels: auto = cuSPARSELt where available, else CUTLASS (8.x only)")  # fmt: skip
    parser.add_argument("--mal-from", default=str(MAL_FROM), help="a study.json whose rows' MAL "
        "per K the cost model projects (part 4)")  # fmt: skip
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
    backend, unsupported = semi_kernels.semi_structured_backend(args.device, args.backend)
    semi = {"backend": backend, "unsupported": unsupported, "layers_swapped": 0}
    timings: dict[int, dict] = {batch: {} for batch in BATCHES}
    report = PartReport(out / "gpu_check", render=render, prepare=add_ratios, data={
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shapes": {"drafter": drafter_shape, "target": target_shape, "vocab": vocab},
        "dtype": str(dtype).removeprefix("torch."), "context": args.context,
        "train": None, "semi_structured": semi, "step_timings": timings,
        "projection": {},
    })  # fmt: skip

    def time_step(model, name: str, batch: int, key: str, width: int = 1) -> None:
        """Eager, and on CUDA also replayed from a CUDA graph (`key` with `_graph_ms`)."""
        for graph in (False, True) if cuda else (False,):
            with report.part(f"{name}, batch {batch}{', graph' if graph else ''}"):
                seconds = step_seconds(
                    model, batch=batch, context=args.context, width=width,
                    repeats=args.repeats, graph=graph,
                )  # fmt: skip
                timings[batch][key.replace("_ms", "_graph_ms") if graph else key] = seconds * 1e3

    # 1. Training: fp32 master weights (Trainer's bf16 is autocast), 2:4 by magnitude.
    drafter = build(drafter_shape, vocab, torch.float32, args.device)
    tiny.magnitude_sparsify(drafter, structure="2:4")
    with report.part("train"):
        report.data["train"] = train_check(
            drafter, tokenizer, args.train_steps, bf16=cuda, out=out / "gpu_check"
        )

    # 2. Forward time of one step, dense: the drafter and the target; the target's verify step.
    drafter = drafter.to(dtype).eval()
    target = None
    with report.part("target build"):
        target = build(target_shape, vocab, dtype, args.device)
    for batch in BATCHES:
        time_step(drafter, "drafter dense", batch, "drafter_dense_ms")
        if target is not None:
            time_step(target, "target dense", batch, "target_dense_ms")
    for k in VERIFY_K if target is not None else ():
        time_step(target, f"target verify K={k}", 1, f"target_verify_k{k}_ms", width=k + 1)
    del target

    # 3. The same drafter through the semi-structured 2:4 kernels (same weights).
    if backend is not None:
        with report.part("2:4 swap"):
            semi["layers_swapped"] = semi_kernels.to_semi_structured(
                drafter, semi_kernels.semi_structured_converter(backend)
            )
        for batch in BATCHES if semi["layers_swapped"] else ():
            time_step(drafter, "drafter 2:4", batch, "drafter_2of4_ms")

    # 4. The cost model on these step times, for the MAL per K of a committed study's rows.
    with report.part("projection"):
        report.data["projection"] = project(report.data, Path(args.mal_from))
        report.data["mal_from"] = Path(args.mal_from).resolve().relative_to(ROOT).as_posix()
    print(render(report.data))
    return report.data


def project(data: dict, study_json: Path) -> dict:
    """`project_study` at batch 1 with this run's step times: graph replays where measured."""
    row = data["step_timings"][1]
    mode = "graph" if "target_verify_k1_graph_ms" in row else "eager"
    key = "_graph_ms" if mode == "graph" else "_ms"
    verify = {
        k: row[f"target_verify_k{k}{key}"] for k in VERIFY_K if f"target_verify_k{k}{key}" in row
    }
    study = json.loads(study_json.read_text())
    rows = project_study(study, row[f"drafter_dense{key}"], row[f"target_dense{key}"], verify)
    return {name: {"steps": mode, **p} for name, p in rows.items()}


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
    ]
    lines += table(
        ["batch", *(header for header, _, _ in COLUMNS)],
        [
            [str(b), *(fmt.format(row[key]) if key in row else "-" for _, key, fmt in COLUMNS)]
            for b, row in report["step_timings"].items()
        ],
    )
    row = report["step_timings"].get(1) or report["step_timings"].get("1") or {}
    for mode, key in (("eager", "_ms"), ("graph", "_graph_ms")):
        times = [(k, row.get(f"target_verify_k{k}{key}")) for k in VERIFY_K]
        verify = ", ".join(f"K+1={k + 1}: {ms:.3f}" for k, ms in times if ms is not None)
        lines += ["", f"Target verify step ({mode}), batch 1, ms: {verify}"] if verify else []
    if report["projection"]:
        lines += [
            "",
            f"Cost model on these step times (batch 1) for the MAL per K of `{report['mal_from']}`"
            ": projected speed-up over the target alone, beside the speed-up each row measured "
            "in its own run (its shapes and engine, not these).",
            "",
        ]
        lines += table(
            ["row", "steps", "best K", "projected at best K", "own run: K", "own run: speed-up"],
            [
                [n, p["steps"], str(p["best_k"]), f"{p['best']:.2f}x", str(p["own_run_k"])]
                + [f"{p['own_run_speedup']:.2f}x" if p["own_run_speedup"] else "-"]
                for n, p in report["projection"].items()
            ],
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
