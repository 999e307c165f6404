"""What an on-policy step of `SD2Trainer` costs against an off-policy step, on CPU.

    .venv/bin/python bench/on_policy_cost.py [--before REV] [--steps 6] [--threads 2]

One `SD2Trainer` run per row, each in its own process: SmolLM2-135M-Instruct as drafter and
as teacher (`asset:smollm2-135m-instruct`), forward KL, batch 4 of ShareGPT conversations cut
to 256 tokens, on-policy continuations of 64 new tokens at T = 1. Each setting runs twice,
with `on_policy_fraction` 0 (every step off-policy) and 1 (every step on-policy); a callback
times each optimizer step and the first is dropped (warm-up). The ratio is the median
on-policy step over the median off-policy step of the same code and setting. With
`--before REV` the same rows run on the library as it was at REV (a git worktree), interleaved
with the current tree's, so both are measured side by side on the same machine.
Results: bench/results/on_policy_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MODEL = "asset:smollm2-135m-instruct"
TEMPLATE = str(REPO / "recipes" / "chat_templates" / "smollm2-training.jinja")
# (name, SD2Config fields) of the settings measured; vllm*: continuations from a vLLM server
# (its start-up falls in the dropped first step), weights reloaded every step / every 4 steps.
# bf16 is always set: left unset, TRL's config turned bf16 autocast on, so the rows named fp32
# before 2026-12-06 were bf16 autocast too.
SETTINGS = {"fp32": {"bf16": False}, "bf16": {"bf16": True}}
SETTINGS["vllm"] = {"bf16": False, "on_policy_generator": "vllm"}
SETTINGS["vllm-refresh4"] = {**SETTINGS["vllm"], "on_policy_refresh_steps": 4}


def worker(spec: dict) -> dict:
    """One training run; returns the seconds of each optimizer step after the first."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from sd2_hf import SD2Config, SD2Trainer
    from sd2_hf.data.loaders import load_conversations
    from sd2_hf.utils.models import resolve_model_path

    torch.set_num_threads(spec["threads"])
    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = load_conversations("asset:sharegpt", limit=4 * spec["steps"])
    rows = [{"messages": r["messages"][:2]} for r in loaded.rows]

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.times.append(-time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.times[-1] += time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = SD2Config(
            output_dir=out,
            max_steps=spec["steps"],
            per_device_train_batch_size=4,
            max_length=256,
            learning_rate=1e-5,
            **dict(save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True),
            chat_template_path=TEMPLATE,
            distill_loss="fkl",
            on_policy_fraction=spec["on_policy_fraction"],
            on_policy_max_new_tokens=64,
            on_policy_temperature=1.0,
            **SETTINGS[spec["setting"]],
        )
        trainer = SD2Trainer(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            args=args,
            teacher_model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        trainer.add_callback(timer := StepTimer())
        trainer.train()
    return {"step_seconds": timer.times[1:]}


def run_row(code: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        env=env,
        cwd=code,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def to_markdown(report: dict) -> str:
    lines = [
        "# On-policy step cost vs an off-policy step (SD2Trainer, CPU)",
        "",
        f"{report['description']}",
        "",
        "| code | setting | off-policy step (s) | on-policy step (s) | on / off |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['code']} | {row['setting']} | {row['off_policy_s']:.2f} | "
            f"{row['on_policy_s']:.2f} | **{row['ratio']:.2f}×** |"
        )
    lines += ["", f"Command: `{report['command']}`", "", f"Machine: {report['machine']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--before", help="git revision to measure beside the current tree")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from sd2_hf.utils.io import atomic_write_json, atomic_write_text

    trees = {"current": REPO}
    scratch = tempfile.TemporaryDirectory()
    if args.before:
        trees[args.before] = Path(scratch.name) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(trees[args.before]), args.before],
            cwd=REPO,
            check=True,
        )
    rows = []
    try:
        for setting in args.settings.split(","):
            for code, tree in trees.items():
                medians = {}
                for fraction in (0.0, 1.0):
                    spec = {"setting": setting, "on_policy_fraction": fraction}
                    spec.update(steps=args.steps, threads=args.threads)
                    times = run_row(tree, spec)["step_seconds"]
                    medians[fraction] = statistics.median(times)
                    print(f"{code} {setting} fraction {fraction}: {times}", flush=True)
                rows.append(
                    {
                        "code": code,
                        "setting": setting,
                        "off_policy_s": medians[0.0],
                        "on_policy_s": medians[1.0],
                        "ratio": medians[1.0] / medians[0.0],
                    }
                )
    finally:
        if args.before:
            subprocess.run(["git", "worktree", "remove", "--force", str(trees[args.before])])
    report = {
        "description": __doc__.split("\n\n")[2].replace("\n", " "),
        "rows": rows,
        "command": "python bench/on_policy_cost.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_json(RESULTS / "on_policy_cost.json", report)
    atomic_write_text(RESULTS / "on_policy_cost.md", to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
