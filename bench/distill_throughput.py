"""Self-data distillation throughput: the transformers backend vs the vLLM backend, one run.

SmolLM2-135M-Instruct regenerates the first assistant turn of the first N ShareGPT
conversations (greedy, `--max-new-tokens` each) with `run_distill` on each backend. Each
backend is tried at several batch sizes / concurrencies (honest tuning for both), and the
best of each gives the ratio. Wall-clock tokens/s on a shared machine moves with the other
jobs' load, so each run also reports tokens per CPU-second (CPU time of this process, plus the
vLLM server's process tree for vLLM runs; the transformers figure includes loading the model). On a shared CPU, torch's OpenMP threads spin-wait for each other
and collapse when cores are oversubscribed, so the transformers runs also vary the number of
torch threads. The vLLM server is started once, before its runs; its start-up
time is reported separately and not counted in tokens/s (it is paid once per job, not per row).

    .venv/bin/python bench/distill_throughput.py [--num-prompts 64 --max-new-tokens 128]
        [--note "what else ran on the machine"]

Writes bench/results/distill_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil
import torch

from sd2_hf.assets import resolve_model
from sd2_hf.data.distill import DistillConfig, run_distill
from sd2_hf.serving import VLLMServer
from sd2_hf.utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TARGET = "asset:smollm2-135m-instruct"
SOURCE = "asset:sharegpt"


def rows_of(output: Path) -> dict[str, list[dict]]:
    return {
        row["id"]: row["messages"]
        for shard in sorted((output / "data").glob("*.jsonl"))
        for row in map(json.loads, shard.read_text().splitlines())
    }


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU time of the processes and all their descendants."""
    tree = {p.pid: p for root in processes for p in [root, *root.children(recursive=True)]}
    total = 0.0
    for p in tree.values():
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def distill(
    work: Path, name: str, args: argparse.Namespace, processes: list[psutil.Process], **options
) -> dict:
    output = work / name
    config = DistillConfig(
        target=TARGET,
        source=SOURCE,
        output=str(output),
        limit=args.num_prompts,
        max_turns=1,
        max_new_tokens=args.max_new_tokens,
        temperature=0.0,
        filter_truncated=False,
        meta_phrases=[],
        dtype=args.dtype,
        overwrite=True,
        **options,
    )
    load_before = os.getloadavg()[0]
    cpu_before = cpu_seconds(processes)
    result = run_distill(config)
    cpu = cpu_seconds(processes) - cpu_before
    manifest = json.loads((output / "manifest.json").read_text())
    run = manifest["this_run"]
    record = {
        "name": name,
        "backend": config.backend,
        "batch_size": config.batch_size if config.backend == "transformers" else None,
        "concurrency": config.concurrency if config.backend == "vllm" else None,
        "rows": result.input,
        "written": result.written,
        "generated_tokens": run["generated_tokens"],
        "generation_time_s": run["generation_time_s"],
        "wall_time_s": run["wall_time_s"],
        "tokens_per_second": run["tokens_per_second"],
        "cpu_seconds": round(cpu, 1),
        "tokens_per_cpu_second": round(run["generated_tokens"] / cpu, 2),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": manifest["versions"],
        "output": str(output),
    }
    print(
        f"{name:>24}: {record['generated_tokens']} tokens in {record['generation_time_s']:.1f} s "
        f"= {record['tokens_per_second']:.1f} tok/s, {record['tokens_per_cpu_second']:.1f} "
        f"tok/CPU-s (load {record['load_avg_1min']})",
        flush=True,
    )
    return record


def machine(note: str | None) -> dict:
    """The machine's description in the report: what the script can see, and `--note` as given
    (the script cannot tell whether other jobs ran; the load averages of each run say how busy
    the machine was)."""
    info = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if note:
        info["note"] = note
    return info


def machine_line(info: dict) -> str:
    line = f"Machine: {info['cpus']} CPUs; 1-min load averages before and after each run above."
    return f"{line} Note: {info['note']}" if info.get("note") else line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--hf-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vllm-concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument(
        "--note",
        default=None,
        help="recorded as given under machine.note (e.g. whether other jobs shared the machine)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    runs = []
    with tempfile.TemporaryDirectory(prefix="sd2-distill-bench-") as tmp:
        work = Path(tmp)
        me = psutil.Process()
        default_threads = torch.get_num_threads()
        for threads in args.hf_threads:
            torch.set_num_threads(threads)
            for batch_size in args.hf_batch_sizes:
                name = f"transformers-bs{batch_size}-t{threads}"
                runs.append(distill(work, name, args, [me], batch_size=batch_size))
                runs[-1]["torch_threads"] = threads
        torch.set_num_threads(default_threads)
        started = time.perf_counter()
        with VLLMServer(
            resolve_model(TARGET), dtype=args.dtype, log_path=str(work / "vllm-server.log")
        ) as server:
            startup_s = time.perf_counter() - started
            server_tree = [me, psutil.Process(server.process.pid)]
            for concurrency in args.vllm_concurrency:
                runs.append(
                    distill(
                        work,
                        f"vllm-c{concurrency}",
                        args,
                        server_tree,
                        backend="vllm",
                        server_urls=[server.url],
                        concurrency=concurrency,
                    )
                )

        def best(backend: str) -> dict:
            return max(
                (r for r in runs if r["backend"] == backend), key=lambda r: r["tokens_per_second"]
            )

        hf, vllm = best("transformers"), best("vllm")
        hf_rows, vllm_rows = rows_of(Path(hf["output"])), rows_of(Path(vllm["output"]))
        agree = sum(hf_rows[i] == vllm_rows.get(i) for i in hf_rows)

    ratio = vllm["tokens_per_second"] / hf["tokens_per_second"]
    cpu_ratio = vllm["tokens_per_cpu_second"] / hf["tokens_per_cpu_second"]
    report = {
        "target": TARGET,
        "source": SOURCE,
        "num_prompts": args.num_prompts,
        "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype,
        "greedy": True,
        "runs": [{k: v for k, v in r.items() if k != "output"} for r in runs],
        "best_transformers": hf["name"],
        "best_vllm": vllm["name"],
        "transformers_tokens_per_second": hf["tokens_per_second"],
        "vllm_tokens_per_second": vllm["tokens_per_second"],
        "vllm_over_transformers": round(ratio, 2),
        "vllm_over_transformers_per_cpu_second": round(cpu_ratio, 2),
        "goal": ">= 3x",
        "goal_met": ratio >= 3,
        "vllm_server_startup_s": round(startup_s, 1),
        "greedy_rows_identical_between_best_runs": f"{agree}/{len(hf_rows)}",
        "machine": machine(args.note),
    }
    results = Path(args.results)
    atomic_write_json(results / "distill_throughput.json", report)
    lines = [
        "# Distillation throughput: transformers vs vLLM backend",
        "",
        f"SmolLM2-135M-Instruct ({args.dtype}) regenerates the first turn of {args.num_prompts} "
        f"ShareGPT conversations, greedy, up to {args.max_new_tokens} new tokens, with "
        "`run_distill` on each backend (one run of `bench/distill_throughput.py`). tokens/s = "
        "generated tokens / generation time (model load and server start excluded).",
        "",
        "| run | backend | setting | tokens | generation s | tokens/s | CPU s | tokens/CPU-s | load avg (before, after) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        knob = (
            f"batch {r['batch_size']}, {r['torch_threads']} threads"
            if r["backend"] == "transformers"
            else f"concurrency {r['concurrency']}"
        )
        lines.append(
            f"| {r['name']} | {r['backend']} | {knob} | {r['generated_tokens']} | "
            f"{r['generation_time_s']:.1f} | {r['tokens_per_second']:.1f} | {r['cpu_seconds']} | "
            f"{r['tokens_per_cpu_second']:.1f} | {r['load_avg_1min']} |"
        )
    lines += [
        "",
        f"**vLLM / transformers = {ratio:.2f}x** (best {vllm['name']} vs best {hf['name']}; "
        f"goal >= 3x: {'met' if ratio >= 3 else 'not met'}); per CPU-second: {cpu_ratio:.2f}x.",
        f"vLLM server start-up: {startup_s:.1f} s (paid once per job).",
        f"Greedy rows identical between the two best runs: {agree}/{len(hf_rows)}.",
        machine_line(report["machine"]),
        "Transformers runs with one torch thread use one core while vLLM uses all; the "
        "tokens/CPU-s ratio compares work per core and is the load-independent figure.",
    ]
    atomic_write_text(results / "distill_throughput.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
