"""How each export format treats a sparse drafter: size, surviving zeros, acceptance, losslessness.

    .venv/bin/python bench/export_formats.py            # SmolLM2-135M, SparseGPT 50%
    .venv/bin/python bench/export_formats.py --vllm     # also serve each format with vLLM

The drafter is SmolLM2-135M-Instruct (`asset:smollm2-135m-instruct`) pruned to 50% with the
shipped SparseGPT recipe (calibrated on ShareGPT), drafting for the dense SmolLM2 (the target);
each format is exported from that one checkpoint with `sd2 export`, then measured side by side:
checkpoint size relative to the dense export, sparsity before export and after a decompress
round-trip, the share of pruned zeros still exactly zero, and greedy assisted generation on
MT-Bench prompts in transformers (output vs the target alone, MAL from counted target forward
passes). With `--vllm`, each format is also the draft model of a vLLM server: start or the exact
error, greedy output vs vLLM's plain greedy output, MAL from the server's counters.
Wall-clock at batch 1 (one request at a time, after one warm-up request) on each engine:
tokens/s of assisted decoding and its speed-up over the target alone on the same engine,
measured in the same run.

Writes bench/results/export_formats.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sd2_hf.assets import home, resolve_model
from sd2_hf.data.loaders import load_mtbench
from sd2_hf.export.export import ExportConfig, run_export
from sd2_hf.pruning.config import PruneConfig
from sd2_hf.pruning.runner import run_prune, versions
from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json

RESULTS = Path(__file__).parent / "results"
FORMATS = ("dense", "w8a8", "w4a16", "fp8")
EXPORT_MEASURES = ("checkpoint_bytes", "sparsity_before", "sparsity_after", "zeros_kept")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="asset:smollm2-135m-instruct")
    parser.add_argument("--recipe", default="sparsegpt-50", help="shipped pruning recipe")
    parser.add_argument(
        "--calibration", default="asset:sharegpt", help="pruning calibration data ('' for none)"
    )
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--prompts", type=int, default=8, help="MT-Bench first turns")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--vllm", action="store_true", help="serve each format with vLLM too")
    parser.add_argument(
        "--work",
        default=str(home() / "bench" / "export_formats"),
        help="where the pruned drafter and the exports go (default: under $SD2_HOME)",
    )
    return parser.parse_args(argv)


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        for q in load_mtbench()[:n]
    ]


def greedy(model, ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


def mismatches(outputs: list[list[int]], reference: list[list[int]]) -> int:
    """How many greedy outputs differ from the reference's (0: lossless)."""
    return sum(got != expected for got, expected in zip(outputs, reference, strict=True))


def transformers_check(target, drafter_dir: str, prompts, reference, max_new_tokens) -> dict:
    """Assisted generation with the export as loaded by plain `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    drafter = AutoModelForCausalLM.from_pretrained(drafter_dir).eval()
    load_seconds = time.perf_counter() - started
    greedy(target, prompts[0], 8, assistant_model=drafter)  # warm-up, not timed
    steps = []
    hook = target.register_forward_hook(lambda *_: steps.append(1))
    started = time.perf_counter()
    try:
        outputs = [greedy(target, ids, max_new_tokens, assistant_model=drafter) for ids in prompts]
    finally:
        hook.remove()
    seconds = time.perf_counter() - started
    new_tokens = sum(map(len, outputs))
    return {
        "load_seconds": load_seconds,
        "lossless_mismatches": mismatches(outputs, reference),
        "target_steps": len(steps),
        "new_tokens": new_tokens,
        # Every target forward pass verifies one draft (the prefill is part of the first).
        "mal": new_tokens / len(steps),
        "tokens_per_second": new_tokens / seconds,
    }


def vllm_check(target: str, drafter_dir: str | None, prompts, max_new_tokens, log: Path) -> dict:
    from sd2_hf.serving import OpenAIClient, VLLMServer

    server = VLLMServer(
        target, drafter=drafter_dir, dtype="float32", max_model_len=2048, log_path=str(log)
    )
    try:
        with server, OpenAIClient(server.url, server.model_name) as client:
            opts = {"max_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
            client.completion(prompts[0], **{**opts, "max_tokens": 8})  # warm-up, not timed
            before = server.spec_counters() if drafter_dir else None
            started = time.perf_counter()
            outputs = [
                client.completion(ids, **opts, return_token_ids=True)["choices"][0]["token_ids"]
                for ids in prompts
            ]
            seconds = time.perf_counter() - started
            delta = server.spec_counters() - before if drafter_dir else None
    except RuntimeError as err:  # ServerError (start-up) and RequestFailed (engine died)
        # The root cause is the first exception line of the server log (later ones are
        # EngineDeadError and the API server's wrappers).
        return {"ok": False, "error": root_cause(log.read_text()) or str(err)[-500:]}
    return {
        "ok": True,
        "startup_seconds": server.startup_seconds,
        "outputs": outputs,
        "tokens_per_second": sum(map(len, outputs)) / seconds,
        "mal": delta.mal if delta else None,
        "acceptance_per_position": delta.acceptance_per_position if delta else None,
    }


def root_cause(log_text: str) -> str | None:
    """The first exception line of a server log, WARNING lines excluded (vLLM warns about
    `OSError: [Errno 24]` fd limits at start-up without any error happening)."""
    lines = [line for line in log_text.splitlines() if " WARNING " not in line]
    causes = re.findall(r"\b\w+(?:Error|Exception): .*", "\n".join(lines))
    return causes[0].strip() if causes else None


def lossless(mismatches: int) -> str:
    return "yes" if mismatches == 0 else f"no ({mismatches} differ)"


def speed(row: dict, alone: dict | None) -> str:
    """`1.23× (45.6)`: tokens/s over the target alone's, with the tokens/s; `–` when either
    side was not timed (results of runs before the wall-clock columns)."""
    if not alone or not alone.get("tokens_per_second") or not row.get("tokens_per_second"):
        return "–"
    return f"{row['tokens_per_second'] / alone['tokens_per_second']:.2f}× ({row['tokens_per_second']:.1f})"


def _speed_note(report: dict[str, Any]) -> list[str]:
    alone = [
        f"{engine} {timed['tokens_per_second']:.1f} tokens/s"
        for engine, timed in (
            ("transformers", report.get("target_alone")),
            ("vLLM", report.get("vllm_target_alone")),
        )
        if timed and timed.get("tokens_per_second")
    ]
    if not alone:
        return []
    return [
        "",
        "Speed-up = assisted tokens/s at batch 1 over the target alone on the same engine in the "
        f"same run (tokens/s in parentheses); the target alone: {', '.join(alone)}.",
    ]


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Export formats of a sparse drafter",
        "",
        f"Drafter: `{report['model']}` pruned with `{report['recipe']}` "
        f"({report['prune']['global_sparsity']:.2%} {report['prune']['structure']}); target: the "
        f"dense `{report['model']}`. K = {report['num_draft_tokens']}, greedy, "
        f"{report['num_prompts']} MT-Bench prompts × {report['max_new_tokens']} new tokens. "
        f"Measured {report['date']} on {report['machine']}.",
        "",
        "| format | compressed-tensors | size (MiB) | size vs dense | sparsity before | "
        "sparsity after round-trip | pruned zeros kept | transformers load (s) | "
        "transformers lossless | transformers MAL | transformers speed-up |"
        + (" vLLM | vLLM lossless | vLLM MAL | vLLM speed-up |" if report["vllm"] else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"
        + ("---|---|---:|---:|" if report["vllm"] else ""),
    ]
    for row in report["formats"]:
        hf = row["transformers"]
        cells = [
            row["format"],
            row["compressed_tensors_format"] or "–",
            f"{row['checkpoint_bytes'] / 2**20:.1f}",
            f"{row['size_vs_dense']:.3f}",
            *(f"{row[key]:.2%}" for key in ("sparsity_before", "sparsity_after", "zeros_kept")),
            f"{hf['load_seconds']:.1f}",
            lossless(hf["lossless_mismatches"]),
            f"{hf['mal']:.2f}",
            speed(hf, report.get("target_alone")),
        ]
        if report["vllm"]:
            served = row["vllm"]
            if served["ok"]:
                cells += ["serves", lossless(served["lossless_mismatches"]), f"{served['mal']:.2f}"]
                cells.append(speed(served, report["vllm_target_alone"]))
            else:
                cells += [f"fails: `{served['error'][:160]}`", "–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Size vs dense compares the whole checkpoint (embeddings and `lm_head` stay unquantized, "
        "so the ratio is above the weight-only ratio). MAL in transformers = new tokens / target "
        "forward passes; vLLM MAL from its spec-decode counters. Lossless = greedy output equals "
        "the target's own greedy output "
        + ("(transformers target; vLLM target served alone)." if report["vllm"] else "."),
        *_speed_note(report),
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    work = Path(args.work)
    target_path = resolve_model(args.model)
    sparse_dir = work / f"sparse-{args.recipe}"
    if not (sparse_dir / "sparsity_report.json").is_file():
        pruned = run_prune(
            PruneConfig(
                model=args.model,
                output=str(sparse_dir),
                recipe=args.recipe,
                dataset=args.calibration or None,
                num_samples=args.calibration_samples,
                max_seq_length=256,
                overwrite=True,
            )
        )
        print(pruned.summary())
    prune_report = read_json(sparse_dir / "sparsity_report.json")

    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    prompts = prompt_ids(tokenizer, args.prompts)
    greedy(target, prompts[0], 8)  # warm-up, not timed
    started = time.perf_counter()
    reference = [greedy(target, ids, args.max_new_tokens) for ids in tqdm(prompts, desc="target")]
    target_alone = {"tokens_per_second": sum(map(len, reference)) / (time.perf_counter() - started)}

    def serve(drafter: str | None, name: str) -> dict:
        log = work / f"vllm-{name}.log"
        return vllm_check(target_path, drafter, prompts, args.max_new_tokens, log)

    vllm_reference = serve(None, "target") if args.vllm else None
    rows = []
    for fmt in args.formats:
        result = run_export(
            ExportConfig(
                drafter=str(sparse_dir),
                output=str(work / fmt),
                format=fmt,
                target=args.model,
                num_draft_tokens=args.num_draft_tokens,
                overwrite=True,
            )
        )
        quantization = read_json(work / fmt / "sd2_drafter.json")["quantization"] or {}
        row = {
            "format": fmt,
            "compressed_tensors_format": quantization.get("compressed_tensors_format"),
            **{measure: getattr(result, measure) for measure in EXPORT_MEASURES},
            "transformers": transformers_check(
                target, result.output, prompts, reference, args.max_new_tokens
            ),
        }
        if args.vllm:
            row["vllm"] = served = serve(result.output, fmt)
            if served["ok"] and vllm_reference and vllm_reference["ok"]:
                outputs = served.pop("outputs")
                served["lossless_mismatches"] = mismatches(outputs, vllm_reference["outputs"])
        rows.append(row)
        print(json.dumps(row, default=str))
    dense_bytes = next((r["checkpoint_bytes"] for r in rows if r["format"] == "dense"), None)
    for row in rows:
        row["size_vs_dense"] = row["checkpoint_bytes"] / dense_bytes if dense_bytes else None

    report = {
        "model": args.model,
        "recipe": args.recipe,
        "prune": {k: prune_report.get(k) for k in ("global_sparsity", "structure")},
        "num_draft_tokens": args.num_draft_tokens,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "vllm": args.vllm,
        "target_alone": target_alone,
        "vllm_target_alone": {k: v for k, v in (vllm_reference or {}).items() if k != "outputs"},
        "formats": rows,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "command": " ".join(["bench/export_formats.py", *(argv or sys.argv[1:])]),
        "versions": versions(),
    }
    atomic_write_json(RESULTS / "export_formats.json", report)
    markdown = to_markdown(report)
    atomic_write_text(RESULTS / "export_formats.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
