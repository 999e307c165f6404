"""Records of `sd2 run`: stage fingerprints and completion records, `provenance.json`, outcomes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd2_hf.utils.io import atomic_write_json, read_json
from sd2_hf.utils.provenance import git_revision, package_versions

if TYPE_CHECKING:
    from sd2_hf.recipe import Recipe, StagePlan

logger = logging.getLogger(__name__)


COMPLETE_FILE = ".sd2-complete.json"
RUNNING_FILE = ".sd2-running.json"
PROVENANCE_FILE = "provenance.json"
# Files up to this size are fingerprinted by content, larger ones by size and mtime.
HASHED_FILE_LIMIT = 64 * 2**20


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


# Launch fields that change where a stage runs, not what it writes: left out of the fingerprint,
# so a finished stage is not redone for them.
OUTPUT_NEUTRAL = frozenset({"in_process"})


def fingerprint(plan: StagePlan, inputs: dict[str, dict[str, str]]) -> str:
    """sha256 of everything that defines the stage's output (see the module docstring)."""
    from sd2_hf import __version__

    config = plan.config.model_dump(mode="json")
    payload = {
        "stage": plan.name,
        "config": config,
        "launch": {k: v for k, v in plan.launch.items() if k not in OUTPUT_NEUTRAL},
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
# Provenance


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
                "versions": package_versions(python=True, vllm=True),
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
