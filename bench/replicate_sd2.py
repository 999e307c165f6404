"""Reproduce the SD² paper's comparisons at small scale on real models (issue 8).

Same family, target SmolLM2-135M-Instruct, drafters at about half its MACs:
  (a) layers     half the decoder blocks dropped by angular distance, fine-tuned
  (b) sd2        SparseGPT 50% unstructured, fine-tuned (SD²)
  (c) 2of4       SparseGPT 2:4, fine-tuned
  (d) *-noft     (a), (b), (c) without fine-tuning
  (e) sd2-orig   (b) fine-tuned on the original ShareGPT replies of the same prompts (plain SFT)
  (f) sd2-fkl, sd2-tvd   (b) with the token-level distillation loss added (DistillSpec style)
  (g) sd2-onpolicy   (b) with on-policy distillation (DistillSpec): half the batches are the
                 drafter's own sampled continuations, scored by the target with TVD, the
                 divergence whose minimum is the acceptance rate of speculative sampling
  (h) sd2-long   (b) with `--long-factor` times the fine-tuning budget
Cross family (UAG), target Gemma-3-270M: SmolLM2 dense off the shelf, SmolLM2 dense fine-tuned
on Gemma-distilled data (the dense reference for the sparse-vs-dense comparison) and SmolLM2
SD² (SparseGPT 50% fine-tuned on Gemma-distilled data).

Every fine-tuned drafter of a family sees the same distilled prompts and the same training
budget (epochs, batch, learning rate, max length). Evaluation on MT-Bench first turns, greedy,
K = 4 and 8: the transformers backend for all, vLLM for the same-family drafters; with
`--temperatures`, speculative sampling at those temperatures too (transformers backend).
`--drafters` restricts the same-family drafters built and evaluated (a report of its own with
`--report-name`: CPU goes where it answers a question).

    .venv/bin/python bench/replicate_sd2.py [--root outputs/replication] [--threads 2] ...

Every step is a `sd2 run` pipeline (or `run_eval`) with its own output directory: rerunning the
same command skips finished steps and resumes an interrupted one (distillation and training
from their journals and checkpoints, evaluation per drafter), so the bench can be stopped and
continued across sessions. `--steps` picks what to run; the report is written from whatever
evaluations are complete. Results: bench/results/replication.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SMOLLM2 = "asset:smollm2-135m-instruct"
GEMMA = "asset:gemma-3-270m"
TEMPLATE = str(REPO / "recipes" / "chat_templates" / "smollm2-training.jinja")
PRUNING = REPO / "recipes" / "pruning"

# name -> (family, description); the order of the table.
DRAFTERS = {
    "layers": ("smol", "(a) half the blocks dropped (angular distance) + self-distilled FT"),
    "sd2": ("smol", "(b) SD²: SparseGPT 50% + self-distilled FT"),
    "2of4": ("smol", "(c) SparseGPT 2:4 + self-distilled FT"),
    "layers-noft": ("smol", "(d) (a) without fine-tuning"),
    "sd2-noft": ("smol", "(d) (b) without fine-tuning"),
    "2of4-noft": ("smol", "(d) (c) without fine-tuning"),
    "sd2-orig": ("smol", "(e) (b) fine-tuned on the original ShareGPT replies (plain SFT)"),
    "sd2-fkl": ("smol", "(f) (b) + token-level forward KL to the target"),
    "sd2-tvd": ("smol", "(f) (b) + token-level TVD to the target"),
    "sd2-onpolicy": ("smol", "(g) (b) + on-policy distillation (λ 0.5, T 1), TVD to the target"),
    "sd2-long": ("smol", "(h) (b) with a longer fine-tuning budget"),
    "dense": ("gemma", "SmolLM2-135M-Instruct dense, off the shelf (UAG)"),
    "dense-ft": ("gemma", "SmolLM2 dense + FT on Gemma-distilled data (UAG)"),
    "sd2-gemma": ("gemma", "SmolLM2 SparseGPT 50% + FT on Gemma-distilled data (UAG)"),
}
BASELINES = {
    "none": "the target alone (no drafting)",
    "ngram": "prompt lookup (n-gram), no draft model",
}
STEPS = ("data", "prune", "train", "eval", "report")


def family_drafters(family: str) -> list[str]:
    """The drafters of one family (smol: same family, gemma: UAG), in table order."""
    return [n for n, (f, _) in DRAFTERS.items() if f == family]


def _log(message: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(args.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------------
    # Steps as pipeline recipes

    def pipeline(self, name: str, data: dict[str, Any]) -> Path:
        """Run one recipe (complete stages are skipped, partial ones resume); its run dir."""
        from sd2_hf.pipeline import run_pipeline
        from sd2_hf.recipe import recipe_from_dict

        recipe = recipe_from_dict(
            {"name": name, "output": str(self.root / name), "threads": self.args.threads, **data},
            source=f"replication step {name}",
        )
        started = time.perf_counter()
        result = run_pipeline(recipe, command=sys.argv)
        ran = result.ran
        _log(
            f"{name}: {'ran ' + ', '.join(ran) if ran else 'complete'} ({time.perf_counter() - started:.0f} s)"
        )
        return self.root / name

    def distill_section(self) -> dict[str, Any]:
        a = self.args
        return {
            "limit": a.distill_limit,
            "max_turns": 1,
            "max_prompt_tokens": a.max_prompt_tokens,
            "max_new_tokens": a.distill_new_tokens,
            "filter_truncated": False,
            "backend": a.distill_backend,
            "concurrency": a.concurrency,
            "batch_size": 16,
        }

    def train_section(self, **extra: Any) -> dict[str, Any]:
        a = self.args
        section = {
            "num_train_epochs": a.epochs,
            "learning_rate": a.learning_rate,
            "warmup_steps": 0.1,
            "per_device_train_batch_size": a.batch_size,
            "max_length": a.max_length,
            "logging_steps": 5,
            "save_steps": 25,
            "trainer_args": {"chat_template_path": TEMPLATE},
        }
        if a.max_steps:
            section["max_steps"] = a.max_steps
        section.update(extra)
        return section

    def prune_section(self, **method: Any) -> dict[str, Any]:
        return {"num_samples": self.args.calibration_samples, "max_seq_length": 256, **method}

    def data(self) -> None:
        common = {"dataset": "asset:sharegpt", "distill": self.distill_section()}
        if "smol" in self.args.families:
            self.pipeline("data-smol", {"target": SMOLLM2, **common})
            self.original_replies()
        if "gemma" in self.args.families:
            # Commits every 64 rows: Gemma generates slowly on a CPU, and an interrupted window
            # is redone on resume. (data-smol ran with the default window; changing it there
            # would change its fingerprint and redo it.)
            distill = {
                **common["distill"],
                "shard_size": 64,
                "backend": self.args.gemma_distill_backend,
            }
            gemma = {**common, "distill": distill}
            self.pipeline("data-gemma", {"target": GEMMA, **gemma})

    def original_replies(self) -> Path:
        """(e)'s data: the original ShareGPT first turns of exactly the distilled prompts."""
        from sd2_hf.data.loaders import load_conversations
        from sd2_hf.pipeline import read_record

        out = self.root / "data-orig" / "train.jsonl"
        distilled = self.root / "data-smol" / "distill"
        stamp = (read_record(distilled) or {}).get("run_id")
        marker = out.with_suffix(".source.json")
        if out.is_file() and marker.is_file() and read_json(marker) == {"distilled": stamp}:
            return out
        from datasets import load_dataset

        ids = {row["id"] for row in load_dataset(str(distilled), split="train")}
        original = load_conversations("asset:sharegpt", limit=self.args.distill_limit)
        rows = []
        for row in original.rows:
            if row["id"] not in ids:
                continue
            messages = [m for m in row["messages"] if m["role"] == "system"]
            turns = [m for m in row["messages"] if m["role"] != "system"][:2]
            if [m["role"] for m in turns] == ["user", "assistant"] and turns[1]["content"].strip():
                rows.append({"id": row["id"], "messages": messages + turns})
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(marker, {"distilled": stamp})
        _log(f"data-orig: {len(rows)} original replies for {len(ids)} distilled prompts")
        return out

    def drafters(self, train: bool) -> None:
        """Prune (and with `train`, fine-tune) every drafter of the chosen families."""
        if "smol" in self.args.families:
            self.smol_drafters(train)
        if train and "gemma" in self.args.families:
            gemma_data = str(self.root / "data-gemma" / "distill")
            self.pipeline(
                "dense-ft",
                {
                    "target": GEMMA,
                    "drafter": SMOLLM2,
                    "dataset": gemma_data,
                    "train": self.train_section(),
                },
            )
            self.pipeline(
                "sd2-gemma",
                {
                    "target": GEMMA,
                    "drafter": SMOLLM2,
                    "dataset": gemma_data,
                    "prune": self.prune_section(recipe=str(PRUNING / "sparsegpt-50.yaml")),
                    "train": self.train_section(),
                },
            )

    def smol_names(self) -> list[str]:
        """The same-family drafters (and baselines' family) this run builds and evaluates."""
        return [
            n for n in family_drafters("smol") if not self.args.drafters or n in self.args.drafters
        ]

    def smol_drafters(self, train: bool) -> None:
        smol_data = str(self.root / "data-smol" / "distill")
        wanted = set(self.smol_names())
        one_shot = {
            "layers": {"method": "layers", "drop": 15},  # half of the 30 blocks
            "sd2": {"recipe": str(PRUNING / "sparsegpt-50.yaml")},
            "2of4": {"recipe": str(PRUNING / "sparsegpt-2of4.yaml")},
        }
        for name, method in one_shot.items():
            # The sd2-* variants fine-tune sd2's pruned drafter.
            needs_prune = {name, f"{name}-noft"} | (
                {n for n in wanted if n.startswith("sd2-")} if name == "sd2" else set()
            )
            if not wanted & needs_prune:
                continue
            finetune = train and name in wanted
            self.pipeline(
                name,
                {
                    "target": SMOLLM2,
                    "dataset": smol_data,
                    "prune": self.prune_section(**method),
                    **({"train": self.train_section()} if finetune else {}),
                },
            )
        if not train:
            return
        sd2_pruned = str(self.root / "sd2" / "prune")
        a = self.args
        variants = {
            "sd2-orig": {
                "dataset": str(self.root / "data-orig" / "train.jsonl"),
                "train": self.train_section(),
            },
            "sd2-fkl": {"dataset": smol_data, "train": self.train_section(distill_loss="fkl")},
            "sd2-tvd": {"dataset": smol_data, "train": self.train_section(distill_loss="tvd")},
            # DistillSpec's two levers: on-policy data, and the divergence matched to
            # speculative sampling (acceptance = 1 - TVD(target, drafter)).
            "sd2-onpolicy": {
                "dataset": smol_data,
                "train": self.train_section(
                    distill_loss="tvd",
                    on_policy_fraction=0.5,
                    on_policy_temperature=1.0,
                    on_policy_max_new_tokens=64,
                ),
            },
            "sd2-long": {
                "dataset": smol_data,
                "train": self.train_section(
                    num_train_epochs=a.epochs * a.long_factor,
                    **({"max_steps": a.max_steps * a.long_factor} if a.max_steps else {}),
                ),
            },
        }
        for name, data in variants.items():
            if name in wanted:
                self.pipeline(name, {"target": SMOLLM2, "drafter": sd2_pruned, **data})

    def drafter_path(self, name: str) -> str:
        paths = {
            "layers": "layers/train",
            "sd2": "sd2/train",
            "2of4": "2of4/train",
            "layers-noft": "layers/prune",
            "sd2-noft": "sd2/prune",
            "2of4-noft": "2of4/prune",
            "sd2-orig": "sd2-orig/train",
            "sd2-fkl": "sd2-fkl/train",
            "sd2-tvd": "sd2-tvd/train",
            "sd2-onpolicy": "sd2-onpolicy/train",
            "sd2-long": "sd2-long/train",
            "dense-ft": "dense-ft/train",
            "sd2-gemma": "sd2-gemma/train",
        }
        return SMOLLM2 if name == "dense" else str(self.root / paths[name])

    # ---------------------------------------------------------------------------------------
    # Evaluation

    def eval_runs(self) -> list[tuple[str, str, str, int]]:
        """(run name, family, backend, K) of every evaluation."""
        runs = []
        for k in self.args.ks:
            for backend in self.args.backends if "smol" in self.args.families else ():
                runs.append((f"eval-smol-{backend}-k{k}", "smol", backend, k))
            if "gemma" in self.args.families:
                runs.append((f"eval-gemma-transformers-k{k}", "gemma", "transformers", k))
        return runs

    def evaluate(self) -> None:
        for run, family, backend, k in self.eval_runs():
            out = self.root / run
            names = self.smol_names() if family == "smol" else family_drafters(family)
            if (out / "eval.json").is_file():
                # A finished evaluation keeps its drafters: a `--drafters` run adds rows to it
                # (run_eval measures only the new ones), never drops any.
                have = {d["name"] for d in read_json(out / "eval.json")["drafters"]}
                if have.issuperset(names):
                    _log(f"{run}: complete")
                    continue
                names = [n for n in family_drafters(family) if n in have or n in names]
            missing = [
                n
                for n in names
                if n != "dense" and not (Path(self.drafter_path(n)) / "config.json").is_file()
            ]
            if missing:
                _log(f"{run}: skipped, drafters not built yet: {', '.join(missing)}")
                continue
            started = time.perf_counter()
            try:
                workers = self.args.eval_workers
                if workers > 1:
                    self._parallel_eval(run, family, backend, k, names, out, workers)
                # Reuses every row measured before (by workers, an interrupted attempt or a
                # finished evaluation with fewer drafters): only the drafters new to it are
                # measured, against the same target reference run.
                self._run_eval(run, family, backend, k, names, out)
            finally:
                # Accumulated over attempts: an interrupted evaluation resumes per drafter.
                self.add_eval_seconds(run, time.perf_counter() - started)
            _log(f"{run}: done in {time.perf_counter() - started:.0f} s")

    def eval_workers(self) -> dict[str, int]:
        """The evaluations measured by parallel workers, and how many ran at once."""
        return self._eval_record("eval-workers.json")

    def _eval_record(self, name: str) -> dict[str, Any]:
        path = self.root / name
        return read_json(path) if path.is_file() else {}

    def add_eval_seconds(self, run: str, seconds: float) -> None:
        spent = self.eval_seconds()
        spent[run] = round(spent.get(run, 0.0) + seconds, 1)
        atomic_write_json(self.root / "eval-seconds.json", spent)

    def _parallel_eval(
        self, run: str, family: str, backend: str, k: int, names: list[str], out: Path, workers: int
    ) -> None:
        """Measure the rows of one evaluation in up to `workers` processes at once. vLLM: each
        with its vLLM server bound to its own CPU core: vLLM's CPU backend computes on one core
        and keeps the other for its front end, so on a 2-core machine one evaluation leaves a
        core idle. transformers: each with its share of the cores as torch threads (assisted
        generation at batch 1 is latency-bound and gains little from a second thread). The
        target's reference run comes first, alone; then one process per drafter
        (the next one starts on the core the last one freed), each writing its row to the
        evaluation's journal (`run_eval(report=False)`; a row already there is reused at once),
        and the caller's last `run_eval` reuses them all. The rows' tokens/s are then measured
        beside another worker."""
        atomic_write_json(self.root / "eval-workers.json", {**self.eval_workers(), run: workers})
        self._run_eval(run, family, backend, k, [], out, baselines=["none"], report=False)
        pending = ["ngram", *names]
        _log(f"{run}: {len(pending)} rows on up to {workers} cores at once")
        cpus = os.cpu_count() or 1
        running: dict[int, subprocess.Popen] = {}
        failed = []
        try:
            while pending or running:
                for core in range(workers):
                    if core not in running and pending:
                        item = pending.pop(0)
                        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core % cpus)}
                        if backend == "transformers":
                            env["OMP_NUM_THREADS"] = str(max(1, cpus // workers))
                        worker = f"{run}:{item}"
                        cmd = [sys.executable, __file__, *sys.argv[1:], "--eval-worker", worker]
                        running[core] = subprocess.Popen(cmd, env=env)
                time.sleep(2)
                for core, proc in list(running.items()):
                    if proc.poll() is not None:
                        del running[core]
                        if proc.returncode != 0:
                            failed.append(proc.args[-1])
        finally:
            for proc in running.values():  # interrupted: stop the workers (and their servers)
                proc.terminate()
                proc.wait()
        if failed:
            raise RuntimeError(f"{run}: evaluation workers failed: {failed}")

    def eval_worker(self, spec: str) -> None:
        """One worker of `_parallel_eval`: `<run>:<drafter>` (or `ngram`, the baseline)."""
        run, item = spec.split(":", 1)
        family, backend, k = next((f, b, k) for r, f, b, k in self.eval_runs() if r == run)
        names, baselines = ([], ["ngram"]) if item == "ngram" else ([item], [])
        self._run_eval(run, family, backend, k, names, self.root / run, baselines, report=False)

    def _run_eval(
        self,
        run: str,
        family: str,
        backend: str,
        k: int,
        names: list[str],
        out: Path,
        baselines: list[str] | None = None,
        report: bool = True,
    ) -> dict[str, Any]:
        from sd2_hf.evaluation.config import EvalConfig
        from sd2_hf.evaluation.runner import run_eval

        return run_eval(
            EvalConfig(
                target=SMOLLM2 if family == "smol" else GEMMA,
                prompts="asset:mtbench",
                turns="first",
                limit=self.args.prompts,
                backend=backend,
                num_draft_tokens=k,
                max_new_tokens=self.args.max_new_tokens,
                uag="off" if family == "smol" else "on",
                drafters=[f"{n}={self.drafter_path(n)}" for n in names],
                # n-gram prompt lookup needs no draft model, so it runs for the Gemma target
                # too: a reference for how much of a target's output is copied text.
                baselines=["none", "ngram"] if baselines is None else baselines,
                sampled_temperatures=self.args.temperatures if backend == "transformers" else [],
                # vLLM: the prompts of a category in flight together (MAL stays exact).
                concurrency=8 if backend == "vllm" else 1,
                output=str(out),
            ),
            report=report,
        )

    # ---------------------------------------------------------------------------------------
    # Report

    def report(self) -> None:
        from sd2_hf.utils.provenance import package_versions

        evals = {}
        for run, family, backend, k in self.eval_runs():
            path = self.root / run / "eval.json"
            if path.is_file():
                evals[run] = (family, backend, k, read_json(path))
        earlier = self.earlier_results(evals)
        if not evals and not earlier["evaluations"]:
            _log("report: no evaluation is complete yet")
            return
        rows: dict[str, dict[str, Any]] = dict(earlier["drafters"])
        for family, backend, k, report in evals.values():
            for d in report["drafters"]:
                row = rows.setdefault(
                    f"{family}:{d['name']}",
                    {
                        "family": family,
                        "drafter": d["name"],
                        "description": BASELINES.get(d["name"])
                        or DRAFTERS.get(d["name"], (family, d["name"]))[1],
                        "relative_macs": d["relative_macs"],
                        "results": {},
                    },
                )
                row["results"][f"{backend}-k{k}"] = {
                    key: d[key]
                    for key in (
                        "mal",
                        "mal_per_category",
                        "acceptance_per_position",
                        "improvement_factor",
                        "tokens_per_second",
                        "speedup",
                        "lossless_checked",
                        "lossless_mismatches",
                        "draft_steps",
                        "new_tokens",
                        "per_prompt",
                    )
                    if key in d
                }
                # Speculative sampling at each `--temperatures` (no lossless check: the
                # distribution is the target's, tests/test_sampled_eval.py; no speed-up: the
                # target's own sampled speed is not measured).
                macs = d["relative_macs"]
                for t, run_t in d.get("sampled", {}).items():
                    row["results"][f"{backend}-k{k}-t{t}"] = {
                        **{
                            key: run_t.get(key)
                            for key in (
                                "mal",
                                "mal_per_category",
                                "acceptance_per_position",
                                "tokens_per_second",
                                "draft_steps",
                                "new_tokens",
                                "per_prompt",
                            )
                        },
                        "improvement_factor": run_t["mal"] / (k * macs + 1)
                        if macs is not None
                        else None,
                        "speedup": None,
                        "lossless_checked": False,
                        "lossless_mismatches": 0,
                    }
        workers = self.eval_workers()
        result = {
            # The command that builds and evaluates (rerunning it resumes); `--steps report`
            # only rewrites these files from the evaluations on disk.
            "command": self.command(),
            "settings": self.settings(),
            "evaluations": {
                **earlier["evaluations"],
                **{
                    run: {
                        "family": f,
                        "backend": b,
                        "num_draft_tokens": k,
                        "num_prompts": r["num_prompts"],
                        "prompts": r["prompts"],
                        "target_macs": r["target_macs"],
                        "workers": workers.get(run, 1),
                    }
                    for run, (f, b, k, r) in evals.items()
                },
            },
            **self.stage_seconds(earlier),
            "eval_seconds": {
                **earlier["eval_seconds"],
                **{run: seconds for run, seconds in self.eval_seconds().items() if run in evals},
            },
            "carried_over": sorted(earlier["evaluations"]),
            "drafters": rows,
            "versions": package_versions(python=True, vllm=True),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        }
        results = Path(self.args.results)
        name = self.args.report_name
        atomic_write_json(results / f"{name}.json", result)
        atomic_write_text(results / f"{name}.md", self.markdown(result))
        self.plot(result, results / f"{name}.png")
        _log(f"report: {results / (name + '.md')}")

    # Settings that must match for an earlier report's evaluations to share a table with
    # this run's (what is evaluated where, and the threads, do not change a result).
    _NOT_COMPARED = (
        "families",
        "ks",
        "backends",
        "threads",
        "concurrency",
        "eval_workers",
        "gemma_distill_backend",  # the Gemma data only: not a same-family setting
        "drafters",
        "temperatures",
        "report_name",
        "long_factor",  # sd2-long only, a row of its own
    )

    def settings(self) -> dict[str, Any]:
        """The bench's options that shape a result (not where its files go)."""
        skip = ("root", "steps", "results", "eval_worker")
        return {k: v for k, v in vars(self.args).items() if k not in skip}

    def earlier_results(self, evals: dict[str, Any]) -> dict[str, Any]:
        """The evaluations of the published report whose run directories are not on this
        machine, to keep in the table beside this run's.

        A session's machine can lose `--root` (a fresh checkout), and rebuilding every drafter
        to re-evaluate what is already measured would cost hours on a CPU: the earlier numbers
        are carried, with their wall times, and listed as such in the report. Only when the
        data, training and evaluation settings are the same as this run's (else, or with
        nothing to carry, every part is empty)."""
        none: dict[str, Any] = {
            "evaluations": {},
            "drafters": {},
            "eval_seconds": {},
            "stage_seconds": {},
            "rebuilt_stage_seconds": {},
        }
        path = Path(self.args.results) / f"{self.args.report_name}.json"
        if not path.is_file():
            return none
        old = read_json(path)
        ours = self.settings()
        differ = sorted(
            k
            for k in set(ours) | set(old.get("settings", {}))
            if k not in self._NOT_COMPARED and ours.get(k) != old.get("settings", {}).get(k)
        )
        if differ:
            _log(
                f"report: {path.name} was made with other settings ({', '.join(differ)}); not kept"
            )
            return none
        carried = {run: e for run, e in old["evaluations"].items() if run not in evals}
        if not carried:
            return none
        columns = {
            (e["family"], f"{e['backend']}-k{e['num_draft_tokens']}") for e in carried.values()
        }
        drafters = {}
        for key, row in old["drafters"].items():
            kept = {c: r for c, r in row["results"].items() if (row["family"], c) in columns}
            if kept:
                drafters[key] = {**row, "results": kept}
        return {
            "evaluations": carried,
            "drafters": drafters,
            "eval_seconds": {r: t for r, t in old.get("eval_seconds", {}).items() if r in carried},
            "stage_seconds": old.get("stage_seconds", {}),
            "rebuilt_stage_seconds": old.get("rebuilt_stage_seconds", {}),
        }

    def command(self) -> str:
        argv, skip = [], False
        for arg in sys.argv[1:]:
            if skip:
                skip = False
                continue
            name = arg.split("=")[0]
            if name in ("--steps", "--root", "--results"):
                skip = "=" not in arg
                continue
            argv.append(arg)
        return " ".join(["python", "bench/replicate_sd2.py", *argv])

    def comparisons(self, result: dict[str, Any]) -> list[str]:
        """The paper's comparisons as ratios of MAL, per backend and K, with how many of the
        8 MT-Bench categories agree (24 prompts: a ratio near 1 is within noise) and, where the
        rows keep their per-prompt counts, the 95% paired-bootstrap interval over prompts."""
        from sd2_hf.evaluation.report import mal_ratio_interval

        rows = {f"{r['family']}:{r['drafter']}": r for r in result["drafters"].values()}
        pairs = [
            ("SD² vs layer-pruned, both fine-tuned (paper: 1.59×)", "smol:sd2", "smol:layers"),
            ("SD² vs its pruned drafter before fine-tuning", "smol:sd2", "smol:sd2-noft"),
            ("layer-pruned: fine-tuned vs not", "smol:layers", "smol:layers-noft"),
            ("2:4: fine-tuned vs not", "smol:2of4", "smol:2of4-noft"),
            ("unstructured 50% vs 2:4 (both fine-tuned)", "smol:sd2", "smol:2of4"),
            ("self-distilled vs original ShareGPT replies", "smol:sd2", "smol:sd2-orig"),
            ("+ forward KL vs SFT only (same data)", "smol:sd2-fkl", "smol:sd2"),
            ("+ TVD vs SFT only (same data)", "smol:sd2-tvd", "smol:sd2"),
            ("on-policy + TVD vs SFT only (same data)", "smol:sd2-onpolicy", "smol:sd2"),
            ("on-policy + TVD vs its pruned drafter", "smol:sd2-onpolicy", "smol:sd2-noft"),
            (
                "on-policy + TVD vs SFT + TVD (the on-policy batches alone)",
                "smol:sd2-onpolicy",
                "smol:sd2-tvd",
            ),
            ("SD², longer budget vs its pruned drafter", "smol:sd2-long", "smol:sd2-noft"),
            ("SD², longer budget vs SD²", "smol:sd2-long", "smol:sd2"),
            (
                "sparse vs dense, both fine-tuned on Gemma data (paper: −8.36% MAL, −43.87% MACs)",
                "gemma:sd2-gemma",
                "gemma:dense-ft",
            ),
            ("dense: fine-tuned on Gemma data vs off the shelf", "gemma:dense-ft", "gemma:dense"),
        ]
        columns = sorted(
            {c for r in rows.values() for c in r["results"]},
            key=column_order,
        )
        lines = [
            "| comparison | A | B | MACs A/B | "
            + " | ".join(f"MAL A/B {c} [95% CI] (categories A > B)" for c in columns)
            + " |",
            "|" + "---|" * (4 + len(columns)),
        ]
        for label, a, b in pairs:
            if a not in rows or b not in rows:
                continue
            ma, mb = rows[a]["relative_macs"], rows[b]["relative_macs"]
            cells = []
            for c in columns:
                ra, rb = rows[a]["results"].get(c), rows[b]["results"].get(c)
                if not ra or not rb:
                    cells.append("-")
                    continue
                pa, pb = ra["mal_per_category"], rb["mal_per_category"]
                wins = sum(pa[k] > pb[k] for k in pa if k in pb)
                interval = mal_ratio_interval(ra.get("per_prompt"), rb.get("per_prompt"))
                ci = f" [{interval[1]:.3f}–{interval[2]:.3f}]" if interval else ""
                cells.append(f"{ra['mal'] / rb['mal']:.3f}{ci} ({wins}/{len(pa)})")
            macs = f"{ma / mb:.3f}" if ma and mb else "-"
            lines.append(f"| {label} | {a} | {b} | {macs} | " + " | ".join(cells) + " |")
        return lines

    def eval_seconds(self) -> dict[str, float]:
        return self._eval_record("eval-seconds.json")

    def stage_seconds(self, earlier: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
        """Wall time of every pipeline stage, from the completion records (with the interrupted
        attempts they resumed). A stage with no record here keeps its `earlier` (published)
        time. A stage of a family whose earlier evaluations the report carries was rebuilt: its
        time goes to `rebuilt_stage_seconds`, and the first build's stays, since both were spent
        on the published numbers."""
        from sd2_hf.pipeline import read_record

        first = {run: dict(times) for run, times in earlier["stage_seconds"].items()}
        rebuilt = {run: dict(times) for run, times in earlier["rebuilt_stage_seconds"].items()}
        carried = {e["family"] for e in earlier["evaluations"].values()}
        for run_dir in sorted(self.root.iterdir()):
            for stage in ("distill", "prune", "train"):
                record = read_record(run_dir / stage) if (run_dir / stage).is_dir() else None
                if not record or "seconds" not in record:
                    continue
                seconds = round(record.get("total_seconds", record["seconds"]), 1)
                run = run_dir.name
                family = (
                    run.split("-", 1)[1] if run.startswith("data-") else DRAFTERS.get(run, ("",))[0]
                )
                is_rebuild = family in carried and stage in first.get(run, {})
                (rebuilt if is_rebuild else first).setdefault(run, {})[stage] = seconds
        return {"stage_seconds": first, "rebuilt_stage_seconds": rebuilt}

    def markdown(self, result: dict[str, Any]) -> str:
        from sd2_hf.evaluation.report import fmt

        columns = sorted(
            {c for r in result["drafters"].values() for c in r["results"]},
            key=column_order,
        )
        a = self.args
        lines = [
            "# SD² replication at small scale",
            "",
            f"MT-Bench first turns ({a.prompts} questions, spread over the 8 categories), greedy"
            + (
                f" and speculative sampling at T = {', '.join(f'{t:g}' for t in a.temperatures)} "
                "(columns `-t<T>`, transformers backend)"
                if a.temperatures
                else ""
            )
            + f", max {a.max_new_tokens} new tokens. MAL per backend and K; relative MACs = drafter / "
            "target MACs of one decoding step at context 512 (zeros of sparse weights not counted); "
            "improvement factor = MAL / (K·c + 1) at K = 4 (transformers).",
            "",
            f"Fine-tuning (every fine-tuned drafter): {a.epochs} epoch(s), batch {a.batch_size}, "
            f"lr {a.learning_rate}, max length {a.max_length}, loss on assistant tokens; data: the "
            f"target's greedy replies (≤ {a.distill_new_tokens} tokens) to the first turns of the "
            f"first {a.distill_limit} ShareGPT conversations (prompts over {a.max_prompt_tokens} "
            "tokens skipped).",
            "",
            "| family | drafter | what | relative MACs | "
            + " | ".join(f"MAL {c}" for c in columns)
            + " | improvement factor (tf, K=4) | lossless mismatches |",
            "|" + "---|" * (5 + len(columns) + (1 if columns else 0)),
        ]
        for row in result["drafters"].values():
            res = row["results"]
            mismatches = sum(
                r["lossless_mismatches"] for r in res.values() if r["lossless_checked"]
            )
            lines.append(
                f"| {row['family']} | {row['drafter']} | {row['description']} | {fmt(row['relative_macs'], 3)} | "
                + " | ".join(fmt(res.get(c, {}).get("mal")) for c in columns)
                + f" | {fmt(res.get('transformers-k4', {}).get('improvement_factor'))} | {mismatches} |"
            )
        lines += ["", "## The paper's comparisons (MAL ratios)", ""]
        lines += self.comparisons(result)
        lines += ["", "## MAL per category (transformers, K = 4)", ""]
        cats = sorted(
            {
                c
                for r in result["drafters"].values()
                for c in r["results"].get("transformers-k4", {}).get("mal_per_category", {})
            }
        )
        lines += ["| drafter | " + " | ".join(cats) + " |", "|" + "---|" * (len(cats) + 1)]
        for row in result["drafters"].values():
            per = row["results"].get("transformers-k4", {}).get("mal_per_category")
            if per:
                lines.append(
                    f"| {row['family']}:{row['drafter']} | "
                    + " | ".join(fmt(per.get(c)) for c in cats)
                    + " |"
                )
        lines += [
            "",
            "## Acceptance per draft position (K = 8)",
            "",
            "Fraction of verification steps whose draft token at position i was accepted. "
            "With UAG (the Gemma target) a draft is re-tokenized into the target's tokens, so "
            "K drafter tokens can make more than K target tokens: those lists are longer than K.",
        ]
        k8_columns = [c for c in columns if c.endswith("-k8")]
        if not k8_columns:
            lines += ["", "Not measured yet."]
        for column in k8_columns:
            lines += ["", f"{column.split('-k')[0]}:", ""]
            for row in result["drafters"].values():
                acc = row["results"].get(column, {}).get("acceptance_per_position")
                if acc:
                    lines.append(
                        f"- {row['family']}:{row['drafter']}: "
                        + " / ".join(f"{x:.2f}" for x in acc)
                    )
        lines += ["", "## Wall time per stage (s)", ""]
        rebuilt = result.get("rebuilt_stage_seconds", {})
        for run, stages in result["stage_seconds"].items():
            line = f"- {run}: " + ", ".join(f"{s} {t:.0f}" for s, t in stages.items())
            if rebuilt.get(run):
                line += "; rebuild: " + ", ".join(f"{s} {t:.0f}" for s, t in rebuilt[run].items())
            lines.append(line)
        for run, seconds in result["eval_seconds"].items():
            lines.append(f"- {run}: {seconds:.0f}")
        total = sum(t for st in result["stage_seconds"].values() for t in st.values())
        total += sum(t for st in rebuilt.values() for t in st.values())
        total += sum(result["eval_seconds"].values())
        lines.append(f"- total: {total / 3600:.1f} h")
        carried = result.get("carried_over") or []
        if carried:
            lines += [
                "",
                "Measured in an earlier session with the same command and settings (its run "
                "directory was not kept; the numbers and wall times are that run's): "
                + ", ".join(carried)
                + ".",
            ]
            rebuilt = {r.split("-")[1] for r in carried}
            here = [
                r for r in result["eval_seconds"] if r not in carried and r.split("-")[1] in rebuilt
            ]
            families = sorted({r.split("-")[1] for r in here})
            if families:
                lines.append(
                    f"The {', '.join(families)} data and drafters behind {', '.join(here)} were "
                    "rebuilt from the same recipes and settings after the first build's files "
                    "were lost, so those columns measure other builds of the same drafters "
                    '(their stage times are the ones marked "rebuild" above).'
                )
        parallel = {
            r: e["workers"] for r, e in result["evaluations"].items() if e.get("workers", 1) > 1
        }
        if parallel:
            lines += [
                "",
                ", ".join(f"{r} ran up to {n} drafters at once" for r, n in parallel.items())
                + ", one vLLM server per CPU core: their tokens/s and speed-ups were measured "
                "beside another job (MAL is unaffected).",
            ]
        lines += ["", f"Command: `{result['command']}`", "", f"Machine: {result['machine']}.", ""]
        lines.append(
            "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + "."
        )
        lines.append("")
        return "\n".join(lines)

    def plot(self, result: dict[str, Any], path: Path) -> None:
        from matplotlib.figure import Figure

        from sd2_hf.evaluation.report import _save_png

        # One panel per (family, backend/K): the two families have different targets, so
        # their relative MACs and MALs are not on the same scale.
        panels = [
            (family, column)
            for family in ("smol", "gemma")
            for column in sorted(
                {c for r in result["drafters"].values() for c in r["results"]}, key=column_order
            )
            if any(
                r["family"] == family and column in r["results"]
                for r in result["drafters"].values()
            )
        ]
        if not panels:
            return
        ncols = min(len(panels), 3)
        nrows = -(-len(panels) // ncols)
        fig = Figure(figsize=(4.5 * ncols, 4 * nrows))
        target = {"smol": "SmolLM2-135M", "gemma": "Gemma-3-270M (UAG)"}
        for i, (family, column) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            points = []
            for row in result["drafters"].values():
                res = row["results"].get(column)
                if row["family"] != family or not res or row["relative_macs"] is None:
                    continue
                if row["drafter"] in BASELINES:
                    continue
                finetuned = not row["drafter"].endswith("-noft") and row["drafter"] != "dense"
                ax.scatter(
                    row["relative_macs"],
                    res["mal"],
                    marker="o" if finetuned else "x",
                    color="tab:blue" if finetuned else "tab:gray",
                )
                points.append((row["relative_macs"], res["mal"], row["drafter"]))
            # Drafters at the same MACs share an x: spread their labels vertically so that
            # near-equal MALs stay readable.
            mals = [m for _, m, _ in points] or [0.0]
            gap = max(max(mals) - min(mals), 0.1) * 0.06
            xs = [x for x, _, _ in points] or [0.0]
            span = max(max(xs) - min(xs), 0.05)
            top = max(mals)
            columns_x: dict[float, list[tuple[float, str]]] = {}
            for x, mal, name in points:
                columns_x.setdefault(round(x, 3), []).append((mal, name))
            for x, labelled in columns_x.items():
                last = None
                for mal, name in sorted(labelled):
                    y = mal if last is None else max(mal, last + gap)
                    ax.annotate(
                        name,
                        (x, mal),
                        xytext=(x + 0.04 * span, y),
                        textcoords="data",
                        fontsize=7,
                        ha="left",
                        va="center",
                    )
                    last = y
                    top = max(top, y)
            ax.set_xlim(min(xs) - 0.1 * span, max(xs) + 0.45 * span)
            ax.set_ylim(top=top + gap)
            ax.set_xlabel("relative MACs (drafter / target)")
            ax.set_ylabel("MAL")
            backend, k = column.split("-k")
            k, _, t = k.partition("-t")
            decoding = f"T = {t}" if t else "greedy"
            ax.set_title(f"{target[family]}, {backend}, K = {k}, {decoding}", fontsize=9)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        _save_png(fig, path)


def column_order(column: str) -> tuple[bool, int, float]:
    """`<backend>-k<K>[-t<T>]`: transformers first, then by K, greedy before sampled."""
    backend, rest = column.split("-k")
    k, _, t = rest.partition("-t")
    return backend != "transformers", int(k), float(t) if t else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", default=str(REPO / "outputs" / "replication"), help="run directory"
    )
    parser.add_argument(
        "--results", default=str(RESULTS), help="where replication.{md,json,png} are written"
    )
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    parser.add_argument(
        "--families", default="smol,gemma", help="smol (same family) and/or gemma (UAG)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the pipeline stages"
    )
    # Data
    parser.add_argument("--distill-limit", type=int, default=320, help="ShareGPT conversations")
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--distill-new-tokens", type=int, default=192)
    parser.add_argument("--distill-backend", default="vllm", choices=("vllm", "transformers"))
    parser.add_argument(
        "--gemma-distill-backend",
        default="transformers",
        choices=("vllm", "transformers"),
        help="backend of the Gemma distillation: vLLM's CPU path ran Gemma-3-270M at ≈10 "
        "tokens/s (32 in flight), transformers' batched generate() at ≈44 (batch 16, 1 thread)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="vLLM distillation requests in flight. vLLM's CPU backend decodes ≈25 tokens/s here "
        "whether 32 or 128 are in flight, so at 128 a 192-token reply outlasts the 600 s request "
        "timeout",
    )
    parser.add_argument("--calibration-samples", type=int, default=64)
    # Training budget, the same for every fine-tuned drafter
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=None, help="overrides --epochs when set")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=448)
    # Evaluation
    parser.add_argument(
        "--prompts", type=int, default=24, help="MT-Bench questions (of 80; 3 per category)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument(
        "--backends", nargs="+", default=["transformers", "vllm"], choices=("transformers", "vllm")
    )
    parser.add_argument(
        "--eval-workers",
        type=int,
        default=1,
        help="processes measuring drafters at once: vLLM, each with its server on its own CPU "
        "core (vLLM's CPU backend computes on one core); transformers, each with its share of "
        "the cores as threads. MAL is unaffected, the measured speeds share the machine",
    )
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="*",
        default=[],
        help="transformers evaluations: also measure speculative sampling at these temperatures "
        "(a column per temperature, e.g. transformers-k4-t1)",
    )
    parser.add_argument(
        "--drafters",
        default="",
        help="comma-separated same-family drafters to build and evaluate (default: all of "
        f"{', '.join(family_drafters('smol'))})",
    )
    parser.add_argument(
        "--long-factor",
        type=int,
        default=3,
        help="sd2-long: this many times the fine-tuning budget (--epochs or --max-steps)",
    )
    parser.add_argument(
        "--report-name",
        default="replication",
        help="file name of the report (<results>/<name>.{md,json,png}); its earlier evaluations "
        "are carried into the table when the settings match",
    )
    parser.add_argument("--eval-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.families = [f for f in args.families.split(",") if f]
    args.drafters = [d for d in args.drafters.split(",") if d]
    smol = family_drafters("smol")
    if set(args.drafters) - set(smol):
        parser.error(
            f"unknown drafters {sorted(set(args.drafters) - set(smol))}; choose from {', '.join(smol)}"
        )
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")

    from sd2_hf.utils.signals import sigterm_as_interrupt

    bench = Bench(args)
    if args.eval_worker:
        with sigterm_as_interrupt():
            bench.eval_worker(args.eval_worker)
        return
    started = time.perf_counter()
    # SIGTERM like Ctrl-C: stages unwind and stop the vLLM servers they started.
    with sigterm_as_interrupt():
        if "data" in steps:
            bench.data()
        if "prune" in steps and "train" not in steps:
            bench.drafters(train=False)
        if "train" in steps:
            bench.drafters(train=True)
        if "eval" in steps:
            bench.evaluate()
        if "report" in steps:
            bench.report()
    _log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
