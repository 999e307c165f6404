"""SparseGPT vs magnitude (and Wanda, and the layer-dropping baseline) on a real model.

Prunes SmolLM2-135M-Instruct to 50% with each recipe, calibrating on ShareGPT conversations,
and measures perplexity on held-out ShareGPT assistant replies (other conversations; only the
assistant tokens are scored) for the dense model and each pruned one, side by side in one run.

    .venv/bin/python bench/pruning_quality.py      # about 1 h on the shared 2-core CPU

Writes bench/results/pruning_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sd2_hf.evaluation.macs import count_macs
from sd2_hf.pruning.config import PruneConfig
from sd2_hf.pruning.runner import run_prune, versions
from sd2_hf.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def assistant_token_ids(tokenizer, messages: list[dict], max_length: int):
    """Token ids of the rendered conversation and a same-length 0/1 mask of assistant tokens.

    The chat template of SmolLM2 has no `{% generation %}` markers, so assistant spans are
    found by rendering prefixes: the reply to turn k spans from the end of
    `render(messages[:k], add_generation_prompt=True)` to the end of `render(messages[:k+1])`.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:k], tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            return None  # template is not prefix-consistent for this conversation
        spans.append((len(before), len(through)))
    encoded = tokenizer(
        text,
        add_special_tokens=False,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
    )
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


@torch.no_grad()
def assistant_perplexity(model_path: str, rows: list[dict], max_length: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    nll, tokens, skipped = 0.0, 0, 0
    start = time.perf_counter()
    for row in tqdm(rows, desc=f"perplexity {Path(model_path).name}", unit="conv"):
        found = assistant_token_ids(tokenizer, row["messages"], max_length)
        if found is None or sum(found[1][1:]) == 0:
            skipped += 1
            continue
        ids = torch.tensor([found[0]])
        scored = torch.tensor(found[1][1:], dtype=torch.bool)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        nll += losses[scored].sum().item()
        tokens += int(scored.sum())
    return {
        "perplexity": math.exp(nll / tokens),
        "scored_tokens": tokens,
        "conversations": len(rows) - skipped,
        "skipped": skipped,
        "eval_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="asset:smollm2-135m-instruct")
    parser.add_argument("--data", default="asset:sharegpt")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument(
        "--recipes", nargs="+", default=["sparsegpt-50", "magnitude-50", "wanda-50"]
    )
    parser.add_argument(
        "--drop-layers",
        type=int,
        default=15,
        help="also run the layer-dropping baseline with this many blocks dropped (0: skip); "
        "15 of SmolLM2's 30 gives about the MACs of 50%% sparsity",
    )
    parser.add_argument("--workdir", default=None, help="where pruned checkpoints go (temp)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; on the shared, oversubscribed 2-core machine one thread ran "
        "SparseGPT 5x faster than two (OpenMP threads waiting on each other)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sd2_hf.assets import resolve_model
    from sd2_hf.data.loaders import load_conversations

    rows = load_conversations(args.data, limit=args.calibration_samples + args.eval_samples).rows
    calibration, held_out = rows[: args.calibration_samples], rows[args.calibration_samples :]
    assert not {r["id"] for r in calibration} & {r["id"] for r in held_out}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sd2-pruning-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    calib_file = workdir / "calibration.jsonl"
    calib_file.write_text("".join(json.dumps(r) + "\n" for r in calibration))

    dense_path = resolve_model(args.model)
    dense_macs = count_macs(dense_path).total
    report = {
        "model": args.model,
        "data": args.data,
        "calibration_samples": len(calibration),
        "eval_conversations": len(held_out),
        "max_seq_length": args.max_seq_length,
        "torch_threads": args.threads,
        "eval": "perplexity of assistant tokens of held-out conversations (disjoint ids)",
        "macs_context_length": 512,
        "runs": [],
        "versions": versions(),
    }

    def evaluate(run: dict, path: str) -> None:
        run.update(assistant_perplexity(path, held_out, args.max_seq_length))
        run["relative_macs"] = count_macs(path).total / dense_macs
        run["perplexity_vs_dense"] = run["perplexity"] / report["runs"][0]["perplexity"]
        print(f"{run['name']}: perplexity {run['perplexity']:.3f}", flush=True)
        # Written after every model, so a long run that is stopped still reports.
        RESULTS.mkdir(exist_ok=True)
        atomic_write_json(RESULTS / "pruning_quality.json", report)
        atomic_write_text(RESULTS / "pruning_quality.md", markdown(report))

    dense = {"name": "dense", "prune_seconds": 0.0, "global_sparsity": 0.0}
    report["runs"].append(dense)
    evaluate(dense, dense_path)
    configs = [(name, dict(method="oneshot", recipe=name)) for name in args.recipes]
    if args.drop_layers:
        configs.append(
            (f"layers-drop{args.drop_layers}", dict(method="layers", drop=args.drop_layers))
        )
    for name, options in configs:
        config = PruneConfig(
            model=args.model,
            output=str(workdir / name),
            dataset=str(calib_file),
            num_samples=args.calibration_samples,
            max_seq_length=args.max_seq_length,
            overwrite=True,
            **options,
        )
        result = run_prune(config)
        print(result.summary(), flush=True)
        run = {
            "name": name,
            "prune_seconds": result.prune_seconds,
            "total_seconds": result.seconds,
            "global_sparsity": result.global_sparsity,
            "dropped_layers": result.dropped_layers,
        }
        report["runs"].append(run)
        evaluate(run, config.output)
    print(markdown(report))


def markdown(report: dict) -> str:
    dense = report["runs"][0]
    lines = [
        "# Pruning quality: one-shot 50% pruning of "
        f"{report['model']} (calibration: {report['calibration_samples']} ShareGPT "
        f"conversations, max {report['max_seq_length']} tokens)",
        "",
        f"Perplexity on the assistant tokens of {report['eval_conversations']} held-out ShareGPT "
        "conversations (disjoint from calibration). Times measured in the same run on a shared "
        "2-core CPU (noisy). MACs: one decoding step at context 512, zeros not counted.",
        "",
        f"Scored: {dense['conversations']} conversations, {dense['scored_tokens']} assistant "
        f"tokens ({dense['skipped']} skipped: no assistant token within the first "
        f"{report['max_seq_length']} tokens). Layer-dropped rows are before any healing "
        "fine-tuning.",
        "",
        "| model | sparsity | relative MACs | perplexity | vs dense | prune time (s) "
        "| eval time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['name']} | {run['global_sparsity']:.1%} | {run['relative_macs']:.3f} | "
            f"{run['perplexity']:.3f} | {run['perplexity_vs_dense']:.2f}x | "
            f"{run['prune_seconds']:.1f} | {run['eval_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
