"""Full fine-tuning vs sparse LoRA of the same SD² drafter: cost of training and MAL after it.

    .venv/bin/python bench/lora_vs_full.py [--steps 20] [--prompts 8] [--threads 1]

One `sd2 run` recipe builds the drafter: SmolLM2-135M-Instruct (`asset:smollm2-135m-instruct`)
answers ShareGPT first turns (self-data distillation) and a copy is pruned to 50% with the
shipped SparseGPT recipe, calibrated on those replies. The pruned drafter is then fine-tuned
twice on the same replies for the same number of optimizer steps, each with an `sd2 run`
recipe that has only a `train` section, in its own process: `full` (every weight, masks held
by the callback) and `lora` (`train.peft`: sparse LoRA on every linear layer, merged at the
end). Per run: trainable parameters, the peak resident memory of the training process
(`ru_maxrss` from `wait4`, so it includes Python, torch, the tokenizer and the loaded model),
optimizer steps per second over the training loop (Trainer's `train_runtime`, model loading
excluded) and the system load average around it. Both merged drafters and the pruned one are
then evaluated side by side in one `run_eval` (transformers backend, greedy, K = 4, one
MT-Bench first turn per category by default): MAL and losslessness.

Every step resumes: rerunning skips the finished recipes and evaluation rows (the memory and
speed of a training run are kept in `<work>/<run>.bench.json`). Results:
bench/results/lora_vs_full.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from sd2_hf.assets import home
from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SMOLLM2 = "asset:smollm2-135m-instruct"
TEMPLATE = str(REPO / "recipes" / "chat_templates" / "smollm2-training.jinja")
PRUNING = str(REPO / "recipes" / "pruning" / "sparsegpt-50.yaml")
VARIANTS = ("full", "lora")
# Seconds spent per phase, summed over invocations (a resumed bench adds to them).
PHASES_FILE = "phase_seconds.json"


def _log(message: str) -> None:
    print(f"[lora_vs_full {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        default=str(home() / "bench" / "lora_vs_full"),
        help="run directories (default: under $SD2_HOME)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--distill-limit", type=int, default=64, help="ShareGPT conversations")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--full-lr", type=float, default=2e-4, help="learning rate, full FT")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate, sparse LoRA")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--prompts", type=int, default=8, help="MT-Bench first turns")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    return parser.parse_args(argv)


@contextmanager
def phase(work: Path, name: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        path = work / PHASES_FILE
        spent = read_json(path) if path.is_file() else {}
        spent[name] = round(spent.get(name, 0.0) + time.perf_counter() - started, 1)
        atomic_write_json(path, spent)


def build_drafter(args: argparse.Namespace, work: Path) -> Path:
    """Distilled data and the SparseGPT-50 drafter, as one pipeline run; its run dir."""
    from sd2_hf.pipeline import run_pipeline
    from sd2_hf.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "name": "data",
            "output": str(work / "data"),
            "threads": args.threads,
            "target": SMOLLM2,
            "dataset": "asset:sharegpt",
            "distill": {
                "limit": args.distill_limit,
                "max_turns": 1,
                "max_prompt_tokens": 128,
                "max_new_tokens": 128,
                "filter_truncated": False,
                "batch_size": 16,
                "backend": "transformers",
            },
            "prune": {"recipe": PRUNING, "num_samples": 32, "max_seq_length": 256},
        },
        source="lora_vs_full data",
    )
    result = run_pipeline(recipe, command=sys.argv)
    _log(f"data: {'ran ' + ', '.join(result.ran) if result.ran else 'complete'}")
    return work / "data"


def train_recipe(args: argparse.Namespace, work: Path, variant: str) -> dict[str, Any]:
    train: dict[str, Any] = {
        "max_steps": args.steps,
        "learning_rate": args.lora_lr if variant == "lora" else args.full_lr,
        "warmup_steps": 0.1,
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.max_length,
        "logging_steps": 2,
        "save_steps": 10_000,  # no checkpoint inside the measured loop
        "trainer_args": {"chat_template_path": TEMPLATE},
    }
    if variant == "lora":
        train["peft"] = {"r": args.rank, "lora_alpha": 2 * args.rank}
    return {
        "name": variant,
        "output": str(work / variant),
        "threads": args.threads,
        "target": SMOLLM2,
        "drafter": str(work / "data" / "prune"),
        "dataset": str(work / "data" / "distill"),
        "train": train,
    }


def train(args: argparse.Namespace, work: Path, variant: str) -> dict[str, Any]:
    """Run one training recipe in its own process; its memory and speed figures."""
    run = work / variant
    # beside the run dir: `sd2 run` only writes into an empty or its own directory
    record_file, recipe_file = work / f"{variant}.bench.json", work / f"{variant}.recipe.yaml"
    recipe = train_recipe(args, work, variant)
    if record_file.is_file() and read_json(record_file).get("recipe") == recipe:
        _log(f"{variant}: complete")
        return read_json(record_file)
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sd2_hf.cli", "run", str(recipe_file)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}: `sd2 run {recipe_file}` exited with {proc.returncode}")
    report = read_json(run / "train" / "train_report.json")
    final = next(h for h in reversed(report["log_history"]) if "train_runtime" in h)
    record = {
        "recipe": recipe,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "process_seconds": time.perf_counter() - started,
        "train_runtime_s": final["train_runtime"],
        "steps": report["global_step"],
        "steps_per_second": report["global_step"] / final["train_runtime"],
        "resumed_from": report["resumed_from"],
        "trainable_parameters": report["trainable_parameters"],
        "first_logged_loss": report["first_logged_loss"],
        "last_logged_loss": report["last_logged_loss"],
        "sparsity_before": report["sparsity_before"],
        "sparsity_after": report["sparsity_after"],
        "structure": report["structure"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    atomic_write_json(record_file, record)
    _log(
        f"{variant}: {record['steps']} steps, {record['steps_per_second']:.3f} steps/s, "
        f"peak RSS {record['peak_rss_mib']:.0f} MiB"
    )
    return record


def evaluate(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from sd2_hf.evaluation.config import EvalConfig
    from sd2_hf.evaluation.runner import run_eval

    drafters = [f"pruned={work / 'data' / 'prune'}"]
    drafters += [f"{v}={work / v / 'train'}" for v in VARIANTS]
    config = EvalConfig(
        target=SMOLLM2,
        prompts="asset:mtbench",
        turns="first",
        limit=args.prompts,
        backend="transformers",
        num_draft_tokens=args.num_draft_tokens,
        max_new_tokens=args.max_new_tokens,
        drafters=drafters,
        baselines=["none"],
        output=str(work / "eval"),
    )
    # run_eval's journal is gone once its report is written: reuse a report of the same
    # evaluation that is newer than every drafter it measured.
    done = work / "eval" / "eval.json"
    trained = [work / v / "train" / "train_report.json" for v in VARIANTS]
    if (
        done.is_file()
        and read_json(done)["config"] == config.model_dump(mode="json")
        and all(done.stat().st_mtime > t.stat().st_mtime for t in trained)
    ):
        _log("eval: complete")
        return read_json(done)
    return run_eval(config)


def total_parameters(path: Path) -> int:
    """Parameters of a saved checkpoint (counted from the safetensors headers)."""
    import math

    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def _portable(value: Any, work: Path) -> Any:
    """`value` with this machine's paths written as `<work>/...` and repo-relative."""
    text = json.dumps(value).replace(str(work), "<work>").replace(str(REPO) + "/", "")
    return json.loads(text)


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    runs, mal = result["runs"], result["mal"]
    lines = [
        "# Sparse LoRA vs full fine-tuning of an SD² drafter",
        "",
        f"Drafter: `{SMOLLM2}` pruned with SparseGPT 50% (unstructured), fine-tuned on "
        f"{result['conversations']} self-distilled ShareGPT replies for **{s['steps']} optimizer "
        f"steps** each (batch {s['batch_size']}, max length {s['max_length']}, warm-up 10%, "
        f"cosine): `full` lr {s['full_lr']:g}, `lora` lr {s['lora_lr']:g}, r = {s['rank']}, "
        f"alpha = {2 * s['rank']}, every linear layer but the head. Each run in its own process, "
        f"{s['threads']} torch thread(s), one after the other. MAL: transformers assisted "
        f"generation, greedy, K = {s['num_draft_tokens']}, {s['prompts']} MT-Bench first turns "
        f"(one per category) × {s['max_new_tokens']} new tokens, target `{SMOLLM2}`, all three "
        f"drafters in one evaluation. Measured {result['date']} on {result['machine']}.",
        "",
        "| run | trainable parameters | share of all | peak RSS (MiB) | steps/s | loss first → last "
        "| sparsity after (structure) | load avg during | MAL | lossless | eval tokens/s |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---|---:|",
    ]
    for name in ("pruned", *VARIANTS):
        row = mal[name]
        lossless = (
            "yes" if row["lossless_mismatches"] == 0 else f"{row['lossless_mismatches']} differ"
        )
        if name == "pruned":
            lines.append(
                f"| pruned (before FT) | – | – | – | – | – | – | – | {row['mal']:.3f} | "
                f"{lossless} | {row['tokens_per_second']:.1f} |"
            )
            continue
        r = runs[name]
        share = r["trainable_parameters"] / result["total_parameters"]
        load = f"{r['load_average_before'][0]:.1f} → {r['load_average_after'][0]:.1f}"
        lines.append(
            f"| {name} | {r['trainable_parameters']:,} | {share:.2%} | {r['peak_rss_mib']:.0f} | "
            f"{r['steps_per_second']:.4f} | {r['first_logged_loss']:.3f} → "
            f"{r['last_logged_loss']:.3f} | {r['sparsity_after']:.2%} ({r['structure']}) | "
            f"{load} | {row['mal']:.3f} | {lossless} | {row['tokens_per_second']:.1f} |"
        )
    ratios = result["ratios"]
    lines += [
        "",
        f"LoRA / full: trainable parameters **{ratios['trainable_parameters']:.4f}**, peak RSS "
        f"**{ratios['peak_rss']:.3f}**, steps/s **{ratios['steps_per_second']:.3f}**, MAL "
        f"**{ratios['mal']:.3f}** (full {mal['full']['mal']:.3f}, LoRA {mal['lora']['mal']:.3f}, "
        f"pruned before fine-tuning {mal['pruned']['mal']:.3f}).",
        "",
        "How to read it:",
        "- Peak RSS is the whole training process (`ru_maxrss`): Python, torch, the tokenizer "
        "and the fp32 model (≈ 520 MiB of weights) are in both. What full fine-tuning adds is a "
        "gradient and two AdamW moments per weight (12 bytes per trainable parameter: "
        f"{ratios['full_state_mib']:.0f} MiB here, {ratios['lora_state_mib']:.1f} MiB for the "
        "adapter). Sparse LoRA adds instead, per adapted layer, a bool mask of its base weight "
        "(shared with the mask callback) and, saved for the backward pass, the dense "
        "`W + M ⊙ (BA)` it multiplies by (the price of masking: plain LoRA never builds it).",
        "- Steps/s over the training loop (model loading excluded). A sparse LoRA layer runs "
        "one matmul with `W + M ⊙ (BA)`, as the full layer does, plus the rank-r product and "
        "its gradient; what it skips is the AdamW update of every weight and the weight "
        "gradients of what it does not adapt — here the tied 49k × 576 embedding / LM head, "
        "which full fine-tuning trains.",
        "- MAL after "
        f"{s['steps']} steps on {result['conversations']} conversations moves little for either "
        f"method; {s['prompts']} prompts are a smoke-scale comparison, not a quality ranking.",
        "- The machine was shared with other jobs while this ran (load averages above, for the "
        "training runs; the two runs did not overlap): steps/s are noisy. The evaluation's "
        "drafting speed (last column, three drafters of the same size) shows how much the load "
        "varied during it; MAL does not depend on it.",
        "",
        f"Budget: sized to stay under ~25 minutes on 2 CPU cores ({s['distill_limit']} "
        f"distilled prompts, {s['steps']} steps per run, {s['prompts']} evaluation prompts). "
        f"This run took {result['wall_seconds'] / 60:.1f} min: "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in result["phase_seconds"].items())
        + " min (summed over the invocations of the bench).",
        "",
        f"Command: `{result['command']}`",
        "",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v and k != "vllm")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    from sd2_hf.pipeline import package_versions

    with phase(work, "data"):
        build_drafter(args, work)
    runs = {}
    for variant in VARIANTS:
        with phase(work, variant):
            runs[variant] = train(args, work, variant)
    with phase(work, "eval"):
        report = evaluate(args, work)
    mal = {d["name"]: d for d in report["drafters"]}
    full, lora = runs["full"], runs["lora"]
    result = {
        "bench": "lora_vs_full",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["bench/lora_vs_full.py", *(argv or sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k != "work"},
        "conversations": read_json(work / "full" / "train" / "train_report.json")[
            "num_conversations"
        ],
        "total_parameters": total_parameters(work / "full" / "train"),
        "runs": _portable(runs, work),
        "mal": {
            name: {
                k: mal[name][k]
                for k in (
                    "mal",
                    "acceptance_per_position",
                    "lossless_mismatches",
                    "relative_macs",
                    "tokens_per_second",
                )
            }
            for name in ("pruned", *VARIANTS)
        },
        "ratios": {
            "trainable_parameters": lora["trainable_parameters"] / full["trainable_parameters"],
            "peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
            "steps_per_second": lora["steps_per_second"] / full["steps_per_second"],
            "mal": mal["lora"]["mal"] / mal["full"]["mal"],
            "full_state_mib": 12 * full["trainable_parameters"] / 2**20,
            "lora_state_mib": 12 * lora["trainable_parameters"] / 2**20,
        },
        "phase_seconds": read_json(work / PHASES_FILE),
        "wall_seconds": sum(read_json(work / PHASES_FILE).values()),
        "versions": package_versions(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "lora_vs_full.json", result)
    markdown = to_markdown(result)
    atomic_write_text(RESULTS / "lora_vs_full.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
