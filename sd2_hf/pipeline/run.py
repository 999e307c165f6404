"""The run loop of `sd2 run`: each selected stage skipped, resumed or run, in order."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd2_hf.pipeline.records import (
    COMPLETE_FILE,
    PROVENANCE_FILE,
    RUNNING_FILE,
    PipelineResult,
    StageOutcome,
    _now,
    _Provenance,
    fingerprint,
    read_record,
)
from sd2_hf.stages import BY_NAME, PipelineError
from sd2_hf.utils.io import atomic_write_json

if TYPE_CHECKING:
    from sd2_hf.recipe import Recipe, StagePlan

logger = logging.getLogger(__name__)


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
        with stage_threads(None if dry_run else recipe.threads):
            for index, plan in enumerate(plans, 1):
                outcome = run_stage(
                    plan, selected, records, plans, force, dry_run, index, len(plans)
                )
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
def stage_threads(count: int | None) -> Iterator[None]:
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


def run_stage(
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
    if plan.key not in selected:
        consumers = [p.key for p in plans if p.key in selected and plan.key in p.consumes]
        if record is None:
            if consumers:
                raise PipelineError(
                    f"{', '.join(consumers)} needs the output of the {plan.name} stage, which is "
                    f"not complete ({directory}); run it first (`--only {plan.name}`) or run "
                    "without --from/--only"
                )
            return StageOutcome(plan.key, "not selected")
        records[plan.key] = record
        reason = "complete, not selected"
        if record["fingerprint"] != current:
            reason = "complete but its section or inputs changed since; not selected, kept"
            logger.warning("%s: %s", plan.key, reason)
        return StageOutcome(plan.key, "kept", reason, record=record)

    if record is not None and record["fingerprint"] == current and not force:
        records[plan.key] = record
        return StageOutcome(plan.key, "skipped", "complete, fingerprint matches", record=record)

    running = read_record(directory, RUNNING_FILE)
    resume = (
        BY_NAME[plan.name].resumable
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
        records[plan.key] = {"fingerprint": "pending", "run_id": "pending"}
        return StageOutcome(plan.key, "would run", reason)

    print(f"\n=== sd2 [{index}/{total}] {plan.key}: {reason} ===", flush=True)
    if not resume and directory.exists():
        shutil.rmtree(directory)
    (directory / COMPLETE_FILE).unlink(missing_ok=True)
    start_time, began = _now(), time.perf_counter()
    earlier_seconds = _interrupted_seconds(directory, running) if resume else 0.0
    if BY_NAME[plan.name].resumable:
        atomic_write_json(
            directory / RUNNING_FILE,
            {"fingerprint": current, "since": start_time, "earlier_seconds": earlier_seconds},
        )
    try:
        summary = BY_NAME[plan.name].run(plan)
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
    records[plan.key] = record
    gc.collect()
    return StageOutcome(plan.key, "resumed" if resume else "ran", reason, seconds, record)


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
