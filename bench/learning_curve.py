"""Learning curves of SD² fine-tuning: MAL against optimizer steps and CPU minutes.

    .venv/bin/python bench/learning_curve.py --drafter PRUNED_DIR --data DISTILL_DIR \
        [--method sft:distill_loss=none --method kd:distill_loss=fkl ...] [--steps 120]

From one pruned drafter, each method fine-tunes a fresh copy with `SD2Trainer` on the same
self-distilled conversations, for the same optimizer steps, in this process. Every
`--eval-every` steps (and before the first) a callback measures greedy MAL at K = 4 on two
fixed prompt sets, from the target's own greedy output (`sd2_hf.evaluation.forced`: one
teacher-forced drafter pass per prompt, the acceptance rule of transformers assisted
generation replayed on it):

- `select`: ShareGPT first turns the training data never contains (conversations from
  `--select-offset` on): the split on which settings are chosen;
- `mtbench`: MT-Bench first turns spread over the categories: the reported numbers.

CPU minutes are the training process's CPU time (`time.process_time`, all threads) with the
measurements' own time taken out, so a curve shows what a training budget buys. At T = 1 the
same callback reports DistillSpec's expected MAL from the per-token acceptance rate
α = 1 − TVD(target, drafter) along the target's greedy text, `(1 − α^(K+1)) / (1 − α)` (an
estimate that assumes independent positions; sampled MAL itself is measured by `sd2 eval`).

With `--measure N`, every method's final drafter and the pruned one are then measured for real
by `sd2 eval` on N MT-Bench first turns (transformers assisted generation: greedy, checked
lossless, and speculative sampling at `--temperatures`), next to the teacher-forced estimate
of the same drafters on the same prompts.

Results: bench/results/learning_curve.{json,md,png} (or `--name`). A finished method is kept
in the JSON and skipped on a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TARGET = "asset:smollm2-135m-instruct"
TEMPLATE = str(REPO / "recipes" / "chat_templates" / "smollm2-training.jinja")
DEFAULT_METHODS = [
    "sft:distill_loss=none",
    "kd:distill_loss=fkl",
    "onpolicy:distill_loss=fkl,on_policy_fraction=0.5",
]


def _log(message: str) -> None:
    print(f"[learning_curve {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", required=True, help="the pruned drafter (sd2 prune output)")
    parser.add_argument("--data", required=True, help="training conversations (sd2 distill output)")
    parser.add_argument("--target", default=TARGET)
    parser.add_argument("--method", action="append", help="NAME:key=value,... (SD2Config)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument(
        "--conversations",
        type=int,
        default=None,
        help="train on the first N conversations of --data only (default: all)",
    )
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--scheduler", default="constant_with_warmup")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--mtbench", type=int, default=40, help="MT-Bench first turns measured")
    parser.add_argument("--select", type=int, default=40, help="held-out ShareGPT prompts")
    parser.add_argument("--select-offset", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="outputs/learning_curve")
    parser.add_argument("--name", default="learning_curve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--measure",
        type=int,
        default=0,
        help="after training, measure the pruned drafter and every method's final drafter with "
        "`sd2 eval` (transformers assisted generation, K, greedy and --temperatures) on this many "
        "MT-Bench first turns; 0: skip",
    )
    parser.add_argument("--temperatures", type=float, nargs="*", default=[1.0])
    return parser.parse_args(argv)


# ----- the fixed prompt sets and the target's greedy output on them ---------------------------


def mtbench_prompts(tokenizer, n: int) -> list[list[int]]:
    from sd2_hf.evaluation.config import EvalConfig
    from sd2_hf.evaluation.prompts import conversation, load_questions, render

    questions, _ = load_questions(EvalConfig(target="x", prompts="asset:mtbench", limit=n))
    return [render(tokenizer, conversation(q, 0, [])) for q in questions]


def select_prompts(tokenizer, n: int, offset: int, max_prompt_tokens: int = 128) -> list[list[int]]:
    """First user turns of ShareGPT conversations `offset`, `offset + 1`, ... (up to `n`,
    prompts over `max_prompt_tokens` skipped, as the demo's distillation does)."""
    from sd2_hf.data.loaders import load_conversations
    from sd2_hf.evaluation.prompts import render

    rows = load_conversations("asset:sharegpt", limit=offset + 20 * n).rows[offset:]
    prompts = []
    for row in rows:
        user = next((m for m in row["messages"] if m["role"] == "user"), None)
        if user is None or not user["content"].strip():
            continue
        ids = render(tokenizer, [{"role": "user", "content": user["content"]}])
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
        if len(prompts) == n:
            break
    return prompts


@torch.inference_mode()
def greedy_outputs(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outputs = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def reference_sets(args, target, tokenizer, work: Path) -> dict[str, list[tuple]]:
    sets = {}
    for name, make in (
        ("select", lambda: select_prompts(tokenizer, args.select, args.select_offset)),
        ("mtbench", lambda: mtbench_prompts(tokenizer, args.mtbench)),
    ):
        path = work / f"reference-{name}-{args.max_new_tokens}.json"
        if path.is_file():
            saved = read_json(path)
        else:
            _log(f"target greedy output on the {name} prompts")
            prompts = make()
            saved = {
                "prompts": prompts,
                "outputs": greedy_outputs(target, prompts, args.max_new_tokens),
            }
            atomic_write_json(path, saved)
        sets[name] = list(zip(saved["prompts"], saved["outputs"], strict=True))
    return sets


# ----- measurements -------------------------------------------------------------------------


@torch.inference_mode()
def expected_sampled_mal(drafter, target, sequences, k: int) -> float:
    """DistillSpec's estimate at T = 1: α = mean(1 − TVD) over the target's greedy tokens."""
    total, count = 0.0, 0
    for prompt, out in sequences:
        ids = torch.tensor([list(prompt) + list(out)])
        sl = slice(len(prompt) - 1, len(prompt) - 1 + len(out))
        q = torch.softmax(drafter(input_ids=ids).logits[0, sl].float(), -1)
        p = torch.softmax(target(input_ids=ids).logits[0, sl].float(), -1)
        total += (1 - 0.5 * (p - q).abs().sum(-1)).sum().item()
        count += len(out)
    alpha = total / max(count, 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else float(k + 1)


def measure(drafter, target, sets, args) -> dict[str, float]:
    from sd2_hf.evaluation.forced import forced_greedy_mal

    was_training = drafter.training
    drafter.eval()
    row = {}
    for name, sequences in sets.items():
        total, _ = forced_greedy_mal(drafter, sequences, args.k, args.max_new_tokens)
        row[f"{name}_mal"] = round(total.mal, 4)
    row["mtbench_expected_mal_t1"] = round(
        expected_sampled_mal(drafter, target, sets["mtbench"], args.k), 4
    )
    if was_training:
        drafter.train()
    return row


# ----- one method ---------------------------------------------------------------------------


def run_method(name: str, options: dict, args, target, tokenizer, sets, data_rows) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from sd2_hf import SD2Config, SD2Trainer

    drafter = AutoModelForCausalLM.from_pretrained(args.drafter, dtype=torch.float32)
    curve: list[dict] = []
    clock = {"start_cpu": 0.0, "start_wall": 0.0}

    class Curve(TrainerCallback):
        def _point(self, state, model):
            cpu0, wall0 = time.process_time(), time.time()
            point = {
                "step": state.global_step,
                "cpu_minutes": round((cpu0 - clock["start_cpu"]) / 60, 3),
                "wall_minutes": round((wall0 - clock["start_wall"]) / 60, 3),
                **measure(model, target, sets, args),
            }
            # The measurement's own time is not training time: move the start past it.
            clock["start_cpu"] += time.process_time() - cpu0
            clock["start_wall"] += time.time() - wall0
            curve.append(point)
            _log(f"{name} {json.dumps(point)}")

        def on_train_begin(self, a, state, control, model=None, **kw):
            clock["start_cpu"], clock["start_wall"] = time.process_time(), time.time()
            self._point(state, model)

        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step % args.eval_every == 0 or state.global_step == state.max_steps:
                self._point(state, model)

    config = dict(
        output_dir=str(Path(args.work) / name),
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        seed=args.seed,
        chat_template_path=TEMPLATE,
        use_cpu=True,
        # Full precision, as `sd2 train` runs on CPU (the demo): TRL's configs default to bf16
        # autocast, which runs on CPU too and trains a different model than the recipe does.
        bf16=False,
    )
    config.update(options)
    trainer = SD2Trainer(
        drafter,
        args=SD2Config(**config),
        teacher_model=target if config.get("distill_loss", "none") != "none" else None,
        train_dataset=Dataset.from_list(data_rows),
        processing_class=tokenizer,
        callbacks=[Curve()],
    )
    trainer.train()
    if args.measure:
        trainer.save_model(str(Path(args.work) / name / "final"))
        tokenizer.save_pretrained(str(Path(args.work) / name / "final"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"name": name, "options": options, "curve": curve, "losses": losses}


def measured(args, methods: list[dict], target, tokenizer) -> dict:
    """Real assisted generation: greedy and sampled MAL of the pruned and the final drafters,
    next to the teacher-forced greedy MAL of the same drafters on the same prompts."""
    from transformers import AutoModelForCausalLM

    from sd2_hf.evaluation.config import EvalConfig
    from sd2_hf.evaluation.forced import forced_greedy_mal
    from sd2_hf.evaluation.runner import run_eval
    from sd2_hf.utils.models import resolve_model_path

    drafters = {"pruned": args.drafter}
    drafters.update({m["name"]: str(Path(args.work) / m["name"] / "final") for m in methods})
    config = EvalConfig(
        target=args.target,
        drafters=[f"{n}={p}" for n, p in drafters.items()],
        prompts="asset:mtbench",
        limit=args.measure,
        num_draft_tokens=args.k,
        max_new_tokens=args.max_new_tokens,
        baselines=["none"],
        sampled_temperatures=args.temperatures,
        output=str(Path(args.work) / "eval"),
    )
    saved = Path(config.output) / "eval.json"
    if saved.is_file() and read_json(saved)["config"] == json.loads(config.model_dump_json()):
        _log(f"reusing the measured drafters of {saved}")
        report = read_json(saved)
    else:
        report = run_eval(config)
    # The same prompts (MT-Bench first turns, spread the same way) for the teacher-forced check,
    # answered by a freshly loaded target: the one that served as teacher in training generated
    # other greedy text afterwards (seen here: forced MAL 2.320 instead of the 2.226 that the
    # fresh target gives, and equals assisted generation on, for the same pruned drafter).
    del target
    target = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(args.target), dtype=torch.float32
    ).eval()
    prompts = mtbench_prompts(tokenizer, args.measure)
    sequences = list(
        zip(prompts, greedy_outputs(target, prompts, args.max_new_tokens), strict=True)
    )
    rows = {}
    for d in report["drafters"]:
        if d["name"] == "none":
            continue
        model = AutoModelForCausalLM.from_pretrained(
            drafters[d["name"]], dtype=torch.float32
        ).eval()
        forced, _ = forced_greedy_mal(model, sequences, args.k, args.max_new_tokens)
        rows[d["name"]] = {
            "mal_greedy": d["mal"],
            "mal_greedy_teacher_forced": forced.mal,
            "lossless_mismatches": d["lossless_mismatches"],
            **{f"mal_t{t:g}": d["sampled"][f"{t:g}"]["mal"] for t in args.temperatures},
            "per_prompt": d["per_prompt"],
            "per_prompt_sampled": {t: d["sampled"][t]["per_prompt"] for t in d["sampled"]},
        }
    return {"num_prompts": report["num_prompts"], "drafters": rows}


# ----- report -------------------------------------------------------------------------------


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# {result['name']}: MAL against training budget",
        "",
        f"Drafter `{s['drafter']}`, target `{s['target']}`, data `{s['data']}` "
        f"({result['num_conversations']} conversations). Batch {s['batch']}, lr {s['lr']} "
        f"({s['scheduler']}, warm-up {s['warmup']}), max length {s['max_length']}, "
        f"{s['threads']} torch threads. Greedy MAL at K = {s['k']} (teacher-forced, "
        f"{s['max_new_tokens']} new tokens) on {s['select']} held-out ShareGPT first turns "
        f"(`select`, where settings are chosen) and {s['mtbench']} MT-Bench first turns "
        "(`mtbench`); `t1 est.` is DistillSpec's expected MAL at T = 1 from 1 − TVD on MT-Bench. "
        f"Machine: {result['machine']}.",
        "",
        "| method | options | step | CPU min | wall min | select MAL | MT-Bench MAL | MT-Bench t1 est. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["methods"]:
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items())
        for p in m["curve"]:
            lines.append(
                f"| {m['name']} | {opts} | {p['step']} | {p['cpu_minutes']:.1f} | "
                f"{p['wall_minutes']:.1f} | {p['select_mal']:.3f} | {p['mtbench_mal']:.3f} | "
                f"{p['mtbench_expected_mal_t1']:.3f} |"
            )
    if result.get("measured"):
        from sd2_hf.evaluation.report import mal_ratio_interval

        m = result["measured"]
        temps = [k for k in next(iter(m["drafters"].values())) if k.startswith("mal_t")]
        lines += [
            "",
            f"## Measured with `sd2 eval` on {m['num_prompts']} MT-Bench first turns",
            "",
            "transformers assisted generation, K = "
            f"{s['k']}, {s['max_new_tokens']} new tokens; greedy (checked lossless) and speculative "
            "sampling at " + ", ".join(t.replace("mal_t", "T = ") for t in temps) + ". "
            "`teacher-forced` is this bench's greedy estimate of the same drafter on the same "
            "prompts; `vs pruned` is the ratio to the pruned drafter with its 95% paired-bootstrap "
            "interval over prompts.",
            "",
            "| drafter | MAL greedy | teacher-forced | vs pruned (greedy) | "
            + " | ".join(f"MAL {t.replace('mal_t', 'T=')} | vs pruned" for t in temps)
            + " | lossless mismatches |",
            "|---|---|---|---|" + "---|---|" * len(temps) + "---|",
        ]
        base = m["drafters"]["pruned"]
        for name, d in m["drafters"].items():
            ci = mal_ratio_interval(d["per_prompt"], base["per_prompt"])
            cells = [
                name,
                f"{d['mal_greedy']:.3f}",
                f"{d['mal_greedy_teacher_forced']:.3f}",
                _ci(ci),
            ]
            for t in temps:
                key = t.removeprefix("mal_t")
                ci_t = mal_ratio_interval(
                    d["per_prompt_sampled"][key], base["per_prompt_sampled"][key]
                )
                cells += [f"{d[t]:.3f}", _ci(ci_t)]
            cells.append(str(d["lossless_mismatches"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ci(ci) -> str:
    return "-" if ci is None else f"x{ci[0]:.3f} ({ci[1]:.3f}-{ci[2]:.3f})"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for m in result["methods"]:
        c = m["curve"]
        axes[0].plot(
            [p["step"] for p in c], [p["mtbench_mal"] for p in c], marker="o", label=m["name"]
        )
        axes[1].plot(
            [p["cpu_minutes"] for p in c],
            [p["mtbench_mal"] for p in c],
            marker="o",
            label=m["name"],
        )
        axes[2].plot(
            [p["step"] for p in c], [p["select_mal"] for p in c], marker="o", label=m["name"]
        )
    axes[0].set(xlabel="optimizer steps", ylabel="greedy MAL (MT-Bench)")
    axes[1].set(xlabel="CPU minutes of training", ylabel="greedy MAL (MT-Bench)")
    axes[2].set(xlabel="optimizer steps", ylabel="greedy MAL (held-out ShareGPT)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd2_hf.data.loaders import load_conversations
    from sd2_hf.utils.models import resolve_model_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    target_path = resolve_model_path(args.target)
    tokenizer = AutoTokenizer.from_pretrained(args.drafter)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    sets = reference_sets(args, target, tokenizer, work)
    rows = [{"messages": r["messages"]} for r in load_conversations(args.data).rows]
    rows = rows[: args.conversations]
    settings = {
        k: getattr(args, k)
        for k in (
            "drafter",
            "data",
            "conversations",
            "target",
            "steps",
            "eval_every",
            "lr",
            "batch",
            "max_length",
            "scheduler",
            "warmup",
            "k",
            "max_new_tokens",
            "mtbench",
            "select",
            "select_offset",
            "threads",
            "seed",
        )
    }
    # Trained in full precision (before, TRL's default bf16 autocast): not comparable.
    settings["precision"] = "fp32"
    out_json = RESULTS / f"{args.name}.json"
    previous = read_json(out_json) if out_json.is_file() else {}
    done = {
        m["name"]: m for m in previous.get("methods", []) if previous.get("settings") == settings
    }
    result = {
        "name": args.name,
        "settings": settings,
        "num_conversations": len(rows),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "methods": [],
    }
    for text in args.method or DEFAULT_METHODS:
        name, options = parse_method(text)
        final = Path(args.work) / name / "final" / "model.safetensors"
        if (
            name in done
            and done[name]["options"] == options
            and (not args.measure or final.is_file())
        ):
            _log(f"{name}: kept from the previous run")
            result["methods"].append(done[name])
        else:
            _log(f"{name}: training {args.steps} steps with {options}")
            result["methods"].append(run_method(name, options, args, target, tokenizer, sets, rows))
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_json, result)
        atomic_write_text(RESULTS / f"{args.name}.md", to_markdown(result))
        plot(result, RESULTS / f"{args.name}.png")
    if args.measure:
        result["measured"] = measured(args, result["methods"], target, tokenizer)
        atomic_write_json(out_json, result)
        atomic_write_text(RESULTS / f"{args.name}.md", to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
