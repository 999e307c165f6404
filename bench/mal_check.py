"""Real-model MAL check (issue 5): SmolLM2-135M-Instruct drafting for itself truncated to its
first 6 layers, on MT-Bench first turns, transformers and vLLM side by side, K=4; and UAG with
Gemma-3-270M as target and SmolLM2-135M-Instruct as drafter.

    .venv/bin/python bench/mal_check.py [--limit 80] [--max-new-tokens 128] [--threads 1] [--runs ...]

Writes bench/results/mal_check.{json,md} and each run's eval.md and plots under
bench/results/mal_check/<run>/ (its eval.json and server logs, which name local paths, stay in
$SD2_HOME/bench/mal_check/<run>/). The truncated drafter is built once into the sd2 cache
($SD2_HOME, default ~/.cache/sd2-hf).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.evaluation.runner import run_eval
from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = "asset:smollm2-135m-instruct"
GEMMA = "asset:gemma-3-270m"
KEEP_LAYERS = 6
RUNS = ("smollm2-transformers", "smollm2-vllm", "gemma-uag-transformers", "gemma-uag-vllm")


def truncated_drafter(keep: int = KEEP_LAYERS) -> str:
    """SmolLM2 with only its first `keep` decoder blocks (the pruning stage's layer dropping)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd2_hf.assets import home, resolve_model
    from sd2_hf.pruning.layers import decoder_layers, drop_layers

    out = home() / "bench" / f"smollm2-135m-instruct-first{keep}"
    if (out / "config.json").is_file():
        return str(out)
    source = resolve_model(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
    total = len(decoder_layers(model))
    drop_layers(model, keep, total - keep)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


def _run(name: str, runs: dict, **config) -> None:
    from sd2_hf.assets import home

    # eval.json and the vLLM logs name this machine's paths: they stay in the work directory;
    # the repository gets the markdown report and the plots.
    work = home() / "bench" / "mal_check" / name
    started = time.perf_counter()
    try:
        report = run_eval(EvalConfig(output=str(work), **config))
    except Exception as err:  # a failing run is reported, the others still run
        runs[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"{name} failed: {err}")
        return
    published = RESULTS / "mal_check" / name
    published.mkdir(parents=True, exist_ok=True)
    for path in [work / "eval.md", *work.glob("*.png")]:
        shutil.copy2(path, published / path.name)
    runs[name] = {
        "backend": report["backend"],
        "target": report["target"],
        "num_prompts": report["num_prompts"],
        "seconds": round(time.perf_counter() - started, 1),
        # Paths are left out: they name the machine the bench ran on.
        "drafters": {
            d["name"]: {key: value for key, value in d.items() if key not in ("name", "path")}
            for d in report["drafters"]
        },
        "versions": report["versions"],
    }


def _markdown(result: dict) -> str:
    from sd2_hf.evaluation.report import fmt

    lines = [
        "# MAL check on real models",
        "",
        f"K = {result['num_draft_tokens']}, MT-Bench first turns ({result['limit']} of 80 "
        f"questions, spread over the 8 categories), max {result['max_new_tokens']} new "
        "tokens, greedy. Drafter `first6` = SmolLM2-135M-Instruct truncated to its first 6 of 30 "
        "layers; `smollm2` drafting for Gemma-3-270M is universal assisted generation "
        "(different tokenizers). Speedup: tokens/s vs the target alone in the same run.",
        "",
        "| run | backend | target | drafter | MAL | acceptance per position | relative MACs "
        "| improvement factor | tokens/s | speedup | lossless mismatches |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        if "error" in run:
            lines.append(f"| {name} | - | - | - | failed: {run['error'][:200]} | | | | | | |")
            continue
        for drafter, d in run["drafters"].items():
            acceptance = " / ".join(f"{a:.2f}" for a in d["acceptance_per_position"]) or "-"
            lines.append(
                f"| {name} | {run['backend']} | {run['target']} | {drafter} | {fmt(d['mal'])} "
                f"| {acceptance} | {fmt(d['relative_macs'], 4)} | {fmt(d['improvement_factor'])} "
                f"| {fmt(d['tokens_per_second'], 1)} | {fmt(d['speedup'])} "
                f"| {d['lossless_mismatches'] if d['lossless_checked'] else '-'} |"
            )
    hf, vllm = result["runs"].get("smollm2-transformers"), result["runs"].get("smollm2-vllm")
    if hf and vllm and "error" not in hf and "error" not in vllm:
        a, b = hf["drafters"]["first6"]["mal"], vllm["drafters"]["first6"]["mal"]
        lines += ["", f"first6 MAL: transformers {a:.3f}, vLLM {b:.3f}, ratio {b / a:.3f}."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=80, help="MT-Bench questions (of 80)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help=f"comma-separated subset of {','.join(RUNS)}; results of other runs with the same "
        "settings already in mal_check.json are kept",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the transformers runs (on a busy machine 1 avoids the "
        "oversubscription that made 2 threads 4x slower than 1 here)",
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    common = dict(
        prompts="asset:mtbench",
        turns="first",
        limit=args.limit,
        num_draft_tokens=args.num_draft_tokens,
        max_new_tokens=args.max_new_tokens,
    )
    settings = {
        "num_draft_tokens": args.num_draft_tokens,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
    }
    previous = RESULTS / "mal_check.json"
    runs: dict = {}
    if previous.is_file():
        old = read_json(previous)
        if {key: old.get(key) for key in settings} == settings:
            runs = old["runs"]
    pairs = {
        "smollm2": dict(target=SMOLLM2, drafters=[f"first6={truncated_drafter()}"], **common),
        # The SmolLM2-vs-itself baselines are in the smollm2 runs; here only the target alone.
        "gemma-uag": dict(
            target=GEMMA, drafters=[f"smollm2={SMOLLM2}"], baselines=["none"], **common
        ),
    }
    for name in args.runs.split(","):
        if name not in RUNS:
            parser.error(f"unknown run {name!r}: choose from {','.join(RUNS)}")
        pair, backend = name.rsplit("-", 1)
        _run(name, runs, backend=backend, **pairs[pair])

    result = {**settings, "runs": {name: runs[name] for name in RUNS if name in runs}}
    atomic_write_json(RESULTS / "mal_check.json", result)
    atomic_write_text(RESULTS / "mal_check.md", _markdown(result))
    print(_markdown(result))
    print(json.dumps({name: run.get("seconds") for name, run in runs.items()}))


if __name__ == "__main__":
    main()
