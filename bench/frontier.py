"""The MAL–MACs frontier of SmolLM2 self-drafters: the paper's figure, at several costs.

    .venv/bin/python bench/frontier.py --data DISTILL_DIR [--steps 20] [--only NAME ...]

From SmolLM2-135M-Instruct (the target), every drafter below is pruned with `sd2 prune`
(`run_prune`, the same options a recipe's `prune` section takes), then fine-tuned with the same
recipe and budget (SFT + token-level forward KL to the target, the demo's small-budget recipe,
`--steps` optimizer steps of batch `--batch` on the same self-distilled conversations, fp32) and
measured before and after:

- relative MACs `c` = drafter / target MACs of one decoding step at context 512, zeros not
  counted (`sd2_hf.evaluation.macs`: sparse-aware, the head and attention included);
- greedy MAL at every K = 1..8 from one teacher-forced drafter pass per prompt over the
  target's own greedy output, with the step rule of transformers assisted generation replayed
  at each K (`sd2_hf.evaluation.forced.counters_by_draft_length`; tests/test_draft_length.py
  checks it equals measured assisted generation at K = 1, 2, 3, 5) — measured per K, not
  derived from K = 8's per-position acceptance;
- the improvement factor `MAL / (K·c + 1)` per K, and each drafter's best K, chosen on held-out
  ShareGPT prompts (`select`) and reported on MT-Bench first turns.

Results: bench/results/frontier.{json,md,png}. Every drafter's result is kept in the JSON as
soon as it is measured and skipped on a rerun with the same settings; pruned checkpoints are
reused from `--work`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_curve import greedy_outputs, mtbench_prompts, select_prompts  # noqa: E402

from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TARGET = "asset:smollm2-135m-instruct"
TEMPLATE = str(REPO / "recipes" / "chat_templates" / "smollm2-training.jinja")
KS = list(range(1, 9))

# name -> (curve, what, chain of `sd2 prune` options applied one after the other)
SGPT = {"method": "oneshot", "recipe": "sparsegpt-50"}
DRAFTERS: dict[str, tuple[str, str, list[dict[str, Any]]]] = {
    "sgpt50": ("sparsegpt", "SparseGPT 50% unstructured", [SGPT]),
    "sgpt60": ("sparsegpt", "SparseGPT 60%", [{**SGPT, "sparsity": 0.6}]),
    "sgpt70": ("sparsegpt", "SparseGPT 70%", [{**SGPT, "sparsity": 0.7}]),
    "sgpt80": ("sparsegpt", "SparseGPT 80%", [{**SGPT, "sparsity": 0.8}]),
    "2of4": ("other", "SparseGPT 2:4", [{"method": "oneshot", "recipe": "sparsegpt-2of4"}]),
    "drop10": ("layers", "10 of 30 blocks dropped", [{"method": "layers", "drop": 10}]),
    "drop15": ("layers", "15 of 30 blocks dropped", [{"method": "layers", "drop": 15}]),
    "drop20": ("layers", "20 of 30 blocks dropped", [{"method": "layers", "drop": 20}]),
    "drop10+sgpt50": (
        "other",
        "10 blocks dropped, then SparseGPT 50%",
        [{"method": "layers", "drop": 10}, SGPT],
    ),
    # The draft vocabulary is counted on the distilled data: 119 conversations of the default
    # bench hold only 2033 distinct tokens, so the vocabularies stay below that.
    "sgpt50+vocab2000": (
        "head",
        "SparseGPT 50% + draft vocabulary 2000",
        [{**SGPT, "draft_vocab_size": 2000}],
    ),
    "sgpt50+vocab1k": (
        "head",
        "SparseGPT 50% + draft vocabulary 1024",
        [{**SGPT, "draft_vocab_size": 1024}],
    ),
    "sgpt50+head50": (
        "head",
        "SparseGPT 50% + head SparseGPT 50%",
        [{**SGPT, "head_sparsity": 0.5}],
    ),
    "drop10+sgpt50+head50": (
        "other",
        "10 blocks dropped, then SparseGPT 50% + head SparseGPT 50%",
        [{"method": "layers", "drop": 10}, {**SGPT, "head_sparsity": 0.5}],
    ),
}


# The order drafters are run in when `--only` is not given: both curves first (SparseGPT and
# blocks dropped at matching MACs), then the cheaper heads and combinations, then the rest.
ORDER = [
    "sgpt50",
    "sgpt70",
    "drop10",
    "drop15",
    "sgpt80",
    "drop20",
    "sgpt50+head50",
    "drop10+sgpt50",
    "drop10+sgpt50+head50",
    "2of4",
    "sgpt60",
    "sgpt50+vocab2000",
    "sgpt50+vocab1k",
]
assert sorted(ORDER) == sorted(DRAFTERS)


def _log(message: str) -> None:
    print(f"[frontier {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="self-distilled conversations (sd2 distill)")
    parser.add_argument("--only", nargs="*", default=None, help=f"drafters, of {list(DRAFTERS)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--calibration", type=int, default=32, help="pruning calibration rows")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--mtbench", type=int, default=24)
    parser.add_argument("--select", type=int, default=24)
    parser.add_argument("--select-offset", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="outputs/frontier")
    parser.add_argument("--name", default="frontier")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the .md and .png from the saved .json; measures nothing",
    )
    args = parser.parse_args(argv)
    if args.data is None and not args.report_only:
        parser.error("--data is required (self-distilled conversations from sd2 distill)")
    return args


def settings(args) -> dict[str, Any]:
    keys = ("data", "steps", "lr", "batch", "max_length", "calibration", "max_new_tokens")
    keys += ("mtbench", "select", "select_offset")
    return {k: getattr(args, k) for k in keys}


# ----- pruning, MACs, measuring ----------------------------------------------------------------


def prune(name: str, chain: list[dict], args) -> Path:
    from sd2_hf.pruning.config import PruneConfig
    from sd2_hf.pruning.runner import run_prune

    source, out = TARGET, Path(args.work) / "prune" / name
    if out.is_dir():
        return out
    for i, options in enumerate(chain):
        step_out = out if i == len(chain) - 1 else Path(args.work) / "prune" / f"{name}.step{i}"
        if not step_out.is_dir():
            run_prune(
                PruneConfig(
                    model=source,
                    output=str(step_out),
                    dataset=args.data,
                    num_samples=args.calibration,
                    max_seq_length=256,
                    **options,
                )
            )
        source = str(step_out)
    return out


def mal_by_k(drafter, sequences, max_new_tokens: int) -> dict[str, float]:
    from sd2_hf.evaluation.forced import counters_by_draft_length, greedy_matches

    drafter.eval()
    counters = counters_by_draft_length(greedy_matches(drafter, sequences), KS, max_new_tokens)
    return {str(k): round(c.mal, 4) for k, c in counters.items()}


def measure(drafter, sets, args) -> dict[str, dict[str, float]]:
    was_training = drafter.training
    with torch.inference_mode():
        row = {name: mal_by_k(drafter, seqs, args.max_new_tokens) for name, seqs in sets.items()}
    if was_training:
        drafter.train()
    return row


def finetune(drafter, target, tokenizer, rows, name: str, args):
    from datasets import Dataset

    from sd2_hf import SD2Config, SD2Trainer

    config = SD2Config(
        output_dir=str(Path(args.work) / "train" / name),
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, args.steps // 10),
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        distill_loss="fkl",
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        disable_tqdm=True,
        seed=0,
        chat_template_path=TEMPLATE,
        use_cpu=True,
        bf16=False,  # as `sd2 train` runs on CPU
    )
    trainer = SD2Trainer(
        drafter,
        args=config,
        teacher_model=target,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    began = time.process_time()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.model, (time.process_time() - began) / 60, losses


def improvement(mal: dict[str, float], c: float) -> dict[str, float]:
    return {k: round(v / (int(k) * c + 1), 4) for k, v in mal.items()}


def best_k(select_mal: dict[str, float], c: float) -> int:
    factors = improvement(select_mal, c)
    return int(max(factors, key=lambda k: (factors[k], -int(k))))


def run_drafter(name, args, target, tokenizer, sets, rows, target_macs) -> dict:
    from transformers import AutoModelForCausalLM

    from sd2_hf.evaluation.macs import count_macs

    curve, what, chain = DRAFTERS[name]
    began = time.time()
    path = prune(name, chain, args)
    prune_minutes = (time.time() - began) / 60
    macs = count_macs(path, 512)
    c = macs.total / target_macs
    drafter = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    result: dict[str, Any] = {
        "name": name,
        "curve": curve,
        "what": what,
        "prune": chain,
        "relative_macs": round(c, 4),
        "macs": macs.total,
        "prune_minutes": round(prune_minutes, 2),
        "head_macs": macs.per_module.get("lm_head", 0),
    }
    for stage in ("noft", "ft"):
        if stage == "ft":
            drafter, minutes, losses = finetune(drafter, target, tokenizer, rows, name, args)
            result["train_cpu_minutes"] = round(minutes, 2)
            result["losses"] = losses
        measured = measure(drafter, sets, args)
        k = best_k(measured["select"], c)
        result[stage] = {
            "mal": measured["mtbench"],
            "select_mal": measured["select"],
            "improvement": improvement(measured["mtbench"], c),
            "best_k": k,
        }
        _log(
            f"{name} {stage}: c={c:.3f} MAL K=4 {measured['mtbench']['4']:.3f}, best K {k}, "
            f"improvement factor there {result[stage]['improvement'][str(k)]:.3f}"
        )
    return result


# ----- report -------------------------------------------------------------------------------


def to_markdown(result: dict) -> str:
    s = result["settings"]
    drafters = sorted(result["drafters"].values(), key=lambda d: -d["relative_macs"])
    lines = [
        "# The MAL–MACs frontier (SmolLM2-135M-Instruct self-drafters)",
        "",
        f"Target `{TARGET}`; every drafter pruned from it, then fine-tuned with the same recipe "
        f"and budget: SFT + token-level forward KL to the target, {s['steps']} steps of batch "
        f"{s['batch']} (lr {s['lr']}, constant after warm-up, max length {s['max_length']}, "
        f"fp32) on {result['num_conversations']} self-distilled conversations (`{s['data']}`). "
        f"Pruning calibration: {s['calibration']} of the same conversations. Greedy MAL on "
        f"{s['mtbench']} MT-Bench first turns ({s['max_new_tokens']} new tokens), teacher-forced "
        "replay of transformers' assisted-generation steps at each K (measured per K, not "
        "derived; equal to measured assisted generation in tests/test_draft_length.py). "
        "`c` = drafter / target MACs of one decoding step at context 512 (zeros not counted, "
        "head and attention included). Best K: the K with the highest improvement factor "
        f"`MAL / (K·c + 1)` on {s['select']} held-out ShareGPT prompts (`select`), reported "
        f"on MT-Bench. Machine: {result['machine']}.",
        "",
        "| drafter | what | c | head MACs | MAL K=4 before FT | MAL K=4 after FT | FT gain | "
        "best K | improvement factor at best K | train CPU min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in drafters:
        before, after = d["noft"], d["ft"]
        gain = after["mal"]["4"] / before["mal"]["4"] - 1
        lines.append(
            f"| {d['name']} | {d['what']} | {d['relative_macs']:.3f} | "
            f"{d['head_macs'] / 1e6:.1f}M | {before['mal']['4']:.3f} | {after['mal']['4']:.3f} | "
            f"{gain:+.1%} | {after['best_k']} | {after['improvement'][str(after['best_k'])]:.3f} "
            f"| {d.get('train_cpu_minutes', 0):.1f} |"
        )
    best = {d["name"]: d["ft"]["best_k"] for d in drafters}
    lines += _per_k_table(
        "MAL per K after fine-tuning (MT-Bench)",
        drafters,
        lambda d, k: f"{d['ft']['mal'][str(k)]:.3f}",
    )
    lines += _per_k_table(
        "Improvement factor MAL / (K·c + 1) per K after fine-tuning (MT-Bench)",
        drafters,
        lambda d, k: (
            f"**{d['ft']['improvement'][str(k)]:.3f}**"
            if k == best[d["name"]]
            else f"{d['ft']['improvement'][str(k)]:.3f}"
        ),
    )
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _per_k_table(title: str, drafters: list[dict], cell) -> list[str]:
    rows = ["", f"## {title}", "", "| drafter | " + " | ".join(f"K={k}" for k in KS) + " |"]
    rows.append("|---|" + "---|" * len(KS))
    rows += [f"| {d['name']} | " + " | ".join(cell(d, k) for k in KS) + " |" for d in drafters]
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"sparsegpt": ("C0", "o"), "layers": ("C3", "s"), "other": ("C2", "^")}
    styles["head"] = ("C1", "D")
    for curve, (color, marker) in styles.items():
        points = sorted(
            (d for d in result["drafters"].values() if d["curve"] == curve),
            key=lambda d: d["relative_macs"],
        )
        if not points:
            continue
        xs = [d["relative_macs"] for d in points]
        # Only the one-knob curves are lines; "other"/"head" points are distinct recipes.
        line = "-" if curve in ("sparsegpt", "layers") else "none"
        for stage, alpha in (("noft", 0.35), ("ft", 1.0)):
            ys = [d[stage]["mal"]["4"] for d in points]
            label = f"{curve} ({'fine-tuned' if stage == 'ft' else 'before FT'})"
            left.plot(xs, ys, linestyle=line, marker=marker, color=color, alpha=alpha, label=label)
        best = [d["ft"]["improvement"][str(d["ft"]["best_k"])] for d in points]
        right.plot(xs, best, linestyle=line, marker=marker, color=color, label=curve)
        for d in points:
            left.annotate(d["name"], (d["relative_macs"], d["ft"]["mal"]["4"]), fontsize=7)
            right.annotate(
                f"{d['name']} K={d['ft']['best_k']}",
                (d["relative_macs"], d["ft"]["improvement"][str(d["ft"]["best_k"])]),
                fontsize=7,
            )
    left.set(xlabel="relative MACs c (drafter / target)", ylabel="greedy MAL at K = 4")
    left.set_title("MAL vs MACs (MT-Bench first turns)")
    right.axhline(1.0, color="grey", lw=0.8)
    right.axhline(1.2, color="grey", lw=0.8, ls="--")
    right.set(xlabel="relative MACs c", ylabel="MAL / (K·c + 1) at best K")
    right.set_title("Improvement factor at each drafter's best K")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd2_hf.data.loaders import load_conversations
    from sd2_hf.evaluation.macs import count_macs
    from sd2_hf.utils.models import resolve_model_path

    args = parse_args(argv)
    if args.report_only:
        result = read_json(RESULTS / f"{args.name}.json")
        atomic_write_text(RESULTS / f"{args.name}.md", to_markdown(result))
        plot(result, RESULTS / f"{args.name}.png")
        return 0
    torch.set_num_threads(args.threads)
    names = args.only or ORDER
    unknown = set(names) - set(DRAFTERS)
    if unknown:
        raise SystemExit(f"unknown drafters {sorted(unknown)}; known: {list(DRAFTERS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{args.name}.json"
    result = read_json(json_path) if json_path.is_file() else {}
    if result.get("settings") != settings(args):
        result = {"settings": settings(args), "drafters": {}}
    path = resolve_model_path(TARGET)
    tokenizer = AutoTokenizer.from_pretrained(path)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    target_macs = count_macs(target, 512).total
    rows = [{"messages": r["messages"]} for r in load_conversations(args.data).rows]
    sets = {}
    for name, make in (
        ("select", lambda: select_prompts(tokenizer, args.select, args.select_offset)),
        ("mtbench", lambda: mtbench_prompts(tokenizer, args.mtbench)),
    ):
        ref = work / f"reference-{name}-{args.max_new_tokens}-{getattr(args, name)}.json"
        if not ref.is_file():
            _log(f"target greedy output on the {name} prompts")
            prompts = make()
            atomic_write_json(
                ref,
                {
                    "prompts": prompts,
                    "outputs": greedy_outputs(target, prompts, args.max_new_tokens),
                },
            )
        saved = read_json(ref)
        sets[name] = list(zip(saved["prompts"], saved["outputs"], strict=True))
    result.update(
        name=args.name,
        num_conversations=len(rows),
        machine=f"{platform.machine()}, {args.threads} torch threads",
        command="python bench/frontier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    for name in names:
        if name in result["drafters"]:
            _log(f"{name}: kept from the earlier run")
            continue
        _log(f"{name}: {DRAFTERS[name][1]}")
        result["drafters"][name] = run_drafter(
            name, args, target, tokenizer, sets, rows, target_macs
        )
        atomic_write_json(json_path, result)
        atomic_write_text(RESULTS / f"{args.name}.md", to_markdown(result))
        plot(result, RESULTS / f"{args.name}.png")
    _log(f"results in {json_path}")
    print(json.dumps({n: d["ft"]["best_k"] for n, d in result["drafters"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
