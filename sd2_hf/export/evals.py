"""Reading `eval.json` files (from `sd2 eval`) for the export: MAL tables and the best K."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sd2_hf.export.config import ExportError
from sd2_hf.utils.io import read_json

REQUIRED_RUN_KEYS = ("target", "backend", "num_draft_tokens", "max_new_tokens", "num_prompts")
REQUIRED_DRAFTER_KEYS = ("name", "path", "kind", "uag", "mal")
# What the card shows; paths are left out (they name the machine the evaluation ran on).
KEPT_DRAFTER_KEYS = (
    "name",
    "kind",
    "uag",
    "mal",
    "mal_per_category",
    "acceptance_per_position",
    "draft_steps",
    "accepted_tokens",
    "macs",
    "relative_macs",
    "improvement_factor",
    "measured_cost",
    "measured_improvement_factor",
    "tokens_per_second",
    "speedup",
    "lossless_checked",
    "lossless_mismatches",
    "draft_length_sweep",
    "best_num_draft_tokens",
)


def load_eval_runs(
    paths: list[str], drafter_path: str, drafter_name: str | None = None
) -> list[dict[str, Any]]:
    """One summary per eval file, naming which of its drafters is the one being exported."""
    runs = []
    for path in paths:
        if not Path(path).is_file():
            raise ExportError(
                f"eval JSON {path} does not exist (expected the eval.json of `sd2 eval`)"
            )
        report = read_json(path)
        missing = [key for key in (*REQUIRED_RUN_KEYS, "drafters") if key not in report]
        if missing:
            raise ExportError(
                f"{path} is not an eval.json from `sd2 eval`: missing {', '.join(missing)} "
                f"(expected keys: {', '.join((*REQUIRED_RUN_KEYS, 'drafters'))})"
            )
        for i, row in enumerate(report["drafters"]):
            absent = [key for key in REQUIRED_DRAFTER_KEYS if key not in row]
            if absent:
                raise ExportError(f"{path}: drafters[{i}] lacks {', '.join(absent)}")
        entry = _select_entry(report["drafters"], drafter_path, drafter_name, path)
        runs.append(
            {
                "file": Path(path).name,
                "target": report["target"],
                "backend": report["backend"],
                "num_draft_tokens": report["num_draft_tokens"],
                "max_new_tokens": report["max_new_tokens"],
                "num_prompts": report["num_prompts"],
                "temperature": report.get("temperature"),
                "drafter": entry["name"],
                "drafters": [
                    {key: row.get(key) for key in KEPT_DRAFTER_KEYS} for row in report["drafters"]
                ],
            }
        )
    targets = {run["target"] for run in runs}
    if len(targets) > 1:
        raise ExportError(
            f"the eval files measure different targets ({', '.join(sorted(targets))}); "
            "pass the evaluations of one target"
        )
    return runs


def _select_entry(
    rows: list[dict[str, Any]], drafter_path: str, name: str | None, source: str
) -> dict[str, Any]:
    models = [row for row in rows if row["kind"] == "model"]
    names = ", ".join(row["name"] for row in models) or "none"
    if name is not None:
        found = [row for row in rows if row["name"] == name]
        if not found:
            raise ExportError(f"{source} has no drafter named {name!r} (model drafters: {names})")
        return found[0]
    own = os.path.realpath(drafter_path)
    found = [row for row in models if row["path"] and os.path.realpath(row["path"]) == own]
    if len(found) == 1:
        return found[0]
    if len(models) == 1:
        return models[0]
    raise ExportError(
        f"cannot tell which drafter of {source} is the exported one: pass --eval-drafter NAME "
        f"(model drafters: {names})"
    )


def selected_row(run: dict[str, Any]) -> dict[str, Any]:
    return next(row for row in run["drafters"] if row["name"] == run["drafter"])


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose K suits this drafter best.

    MAL grows with K whatever the cost, so K is chosen by the theoretical improvement factor
    MAL / (K·c + 1) (SPEC §2) when every run has it, else by measured tokens per second.
    """
    rows = [selected_row(run) for run in runs]
    key = (
        "improvement_factor"
        if all(row["improvement_factor"] is not None for row in rows)
        else "tokens_per_second"
    )
    return max(runs, key=lambda run: selected_row(run)[key] or 0.0)


def best_draft_length(runs: list[dict[str, Any]]) -> tuple[int, str]:
    """The draft length K to write for this drafter, and where it comes from.

    With improvement factors everywhere: the best of every run's measured K (`"eval"`) and,
    where an eval reports one, of its greedy draft-length sweep (`"eval sweep"`, SPEC §2's cost
    model at each K); a measured K wins a tie. Otherwise `best_run`'s choice."""
    rows = [selected_row(run) for run in runs]
    if not all(row["improvement_factor"] is not None for row in rows):
        return best_run(runs)["num_draft_tokens"], "eval"
    candidates = [
        (row["improvement_factor"], run["num_draft_tokens"], "eval")
        for run, row in zip(runs, rows, strict=True)
    ]
    for row in rows:
        candidates += [
            (s["improvement_factor"], s["num_draft_tokens"], "eval sweep")
            for s in row.get("draft_length_sweep") or []
            if s.get("improvement_factor") is not None
        ]
    _, k, source = max(candidates, key=lambda c: c[0])
    return k, source
