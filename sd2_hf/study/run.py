"""`sd2 compare`: build a study's drafters through the pipeline's stages, then evaluate them.

Every drafter chain is planned as an `sd2 run` recipe of its own (`<output>/drafters/<name>/`)
and its stages run through the pipeline's `run_stage`: fingerprinted, skipped when complete,
resumed when interrupted (distill, train), redone with everything downstream when a section or
an input changes. A chain that starts from another drafter consumes that drafter's last stage,
so a changed upstream drafter rebuilds it. The shared `distill` runs once (`<output>/distill/`).
Evaluations run through `run_eval` into `<output>/eval/<name>/`, whose journal reuses the rows
of drafters already measured with the same settings and checkpoint files: adding a drafter to a
study measures only it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd2_hf.pipeline.run import run_stage, stage_threads
from sd2_hf.recipe import RecipeError, StagePlan, recipe_from_dict
from sd2_hf.study.config import Study, StudyError, public
from sd2_hf.training.stage import CHECKPOINTS_DIR
from sd2_hf.utils.io import atomic_write_json

STUDY_FILE = "study-config.json"


@dataclass
class PlannedDrafter:
    """One drafter of the study: the stages that build it and the checkpoint it ends in."""

    name: str
    path: str
    plans: list[StagePlan] = field(default_factory=list)
    # The stage whose output `path` is (its own last stage, or an upstream drafter's).
    final_key: str | None = None
    chain: list[str] = field(default_factory=list)


def _plans(data: dict[str, Any], source: str) -> list[StagePlan]:
    try:
        return recipe_from_dict(data, source=source).plan()
    except RecipeError as err:
        raise StudyError(str(err).replace("invalid recipe ", "invalid ")) from None


def _order(study: Study) -> list[str]:
    """Drafter names with every drafter after the one it starts from; refuses a cycle."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name) :] + [name])
            raise StudyError(f"drafters: the chains start from each other in a cycle: {cycle}")
        visiting.append(name)
        upstream = study.drafters[name].model
        if upstream in study.drafters:
            visit(upstream)
        visiting.pop()
        order.append(name)

    for name in study.drafters:
        visit(name)
    return order


def _start(study: Study, name: str, planned: dict[str, PlannedDrafter]) -> tuple[str, str | None]:
    """The model drafter `name`'s chain starts from, and the stage key that produces it."""
    spec = study.drafters[name]
    if spec.model not in study.drafters:
        if spec.checkpoint is not None:
            raise StudyError(
                f"drafters.{name}.checkpoint: `model` must name a drafter of the study that "
                f"trains; got {spec.model!r}"
            )
        return spec.model or study.start_model, None
    upstream = planned[spec.model]
    if spec.checkpoint is None:
        return upstream.path, upstream.final_key
    train = next((p for p in upstream.plans if p.name == "train"), None)
    if train is None:
        raise StudyError(f"drafters.{name}.checkpoint: drafter {spec.model!r} has no train section")
    step = Path(train.config.output) / CHECKPOINTS_DIR / f"checkpoint-{spec.checkpoint}"
    return str(step), train.key


def _plan_drafter(
    study: Study, name: str, data: str | None, planned: dict[str, PlannedDrafter]
) -> PlannedDrafter:
    spec = study.drafters[name]
    start, upstream_key = _start(study, name, planned)
    origin = spec.model if spec.model in study.drafters else public(start)
    chain = [f"{origin}@{spec.checkpoint}" if spec.checkpoint else origin]
    if not spec.stages():
        return PlannedDrafter(name, start, [], upstream_key, chain)
    recipe = {
        "name": name,
        "output": str(study.root / "drafters" / name),
        "target": study.target.model,
        "drafter": start,
        "dataset": data,
        **spec.stages(),
    }
    plans = _plans(recipe, f"drafters.{name}")
    for plan in plans:
        plan.key = f"{name}/{plan.name}"
        plan.consumes = [f"{name}/{c}" for c in plan.consumes]
        if study.distill is not None and getattr(plan.config, "dataset", None) == data:
            plan.consumes.append("distill")
    if upstream_key:
        plans[0].consumes.append(upstream_key)
    last = plans[-1]
    return PlannedDrafter(name, str(last.output), plans, last.key, chain + [p.name for p in plans])


def plan_study(study: Study) -> tuple[list[StagePlan], dict[str, PlannedDrafter]]:
    """Every stage the study runs, in order, and each drafter's plan."""
    plans: list[StagePlan] = []
    data = study.dataset
    if study.distill is not None:
        recipe = {
            "name": study.name,
            "output": str(study.root),
            "target": study.target.model,
            "dataset": study.dataset,
            "distill": study.distill,
        }
        plans += _plans(recipe, "distill")
        data = str(study.root / "distill")
    planned: dict[str, PlannedDrafter] = {}
    for name in _order(study):
        planned[name] = _plan_drafter(study, name, data, planned)
        plans += planned[name].plans
    study.comparison_pairs()  # refuses a comparison naming an unknown drafter, before any work
    for evaluation in study.evaluations:
        study.eval_config(evaluation, {n: p.path for n, p in planned.items()}, study.root)
    return plans, {n: planned[n] for n in study.drafters}


def _needed(key: str, plans: list[StagePlan]) -> set[str]:
    by_key = {p.key: p for p in plans}
    needed, todo = set(), [key]
    while todo:
        current = todo.pop()
        if current in needed or current not in by_key:
            continue
        needed.add(current)
        todo += by_key[current].consumes
    return needed


def _check_root(root: Path) -> None:
    if root.is_dir() and any(root.iterdir()) and not (root / STUDY_FILE).is_file():
        raise StudyError(
            f"output {root} is not empty and holds no {STUDY_FILE}: it is not an `sd2 compare` "
            "directory. Choose another `output` (output=DIR on the command line)"
        )


def run_study(
    study: Study,
    *,
    only: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    carry: bool = True,
) -> dict[str, Any]:
    """Build the study's drafters (only `only` and what it starts from, when given), evaluate
    them, and write the report (`carry`: keeping the rows of the report in `results` for
    drafters this run did not measure). Returns {"outcomes": [...], "report": study report or None}."""
    from sd2_hf.study.report import write_study_report

    plans, planned = plan_study(study)
    if only is not None and only not in planned:
        raise StudyError(f"--only {only}: no such drafter; the study's: {', '.join(planned)}")
    root = study.root
    _check_root(root)
    selected = [p.key for p in plans]
    if only is not None:
        selected = [k for k in selected if k in _needed(planned[only].final_key or "", plans)]
    outcomes, records = [], {}
    if not dry_run:
        atomic_write_json(root / STUDY_FILE, study.model_dump(mode="json"))
    started = time.perf_counter()
    with stage_threads(None if dry_run else study.threads):
        for index, plan in enumerate(plans, 1):
            outcome = run_stage(plan, selected, records, plans, force, dry_run, index, len(plans))
            outcomes.append(outcome)
        if dry_run:
            return {"outcomes": outcomes, "report": None}
        evaluate(study, planned, only)
    report = write_study_report(study, planned, seconds=time.perf_counter() - started, carry=carry)
    return {"outcomes": outcomes, "report": report}


def evaluate(study: Study, planned: dict[str, PlannedDrafter], only: str | None = None) -> None:
    """Run every evaluation; with `only`, measure that drafter's rows alone (kept for the
    next full run, which writes the evaluation's report with every drafter)."""
    from sd2_hf.evaluation.runner import run_eval

    paths = {name: p.path for name, p in planned.items()}
    for name in study.evaluations:
        config = study.eval_config(name, paths, study.root / "eval" / name)
        entries = config.drafter_entries()
        if only is not None:
            if only not in [e.name for e in entries]:
                continue
            config = config.model_copy(update={"drafters": [f"{only}={paths[only]}"]})
            entries = config.drafter_entries()
        for entry in entries:
            local = entry.path.startswith(("/", "."))
            if local and not Path(entry.path).is_dir():
                raise StudyError(
                    f"evaluations.{name}: drafter {entry.name!r} has no checkpoint at "
                    f"{entry.path} (a `checkpoint` step the training did not save? set the "
                    "upstream `train.save_steps` to divide it and "
                    "`train.trainer_args.save_total_limit: null`)"
                )
        print(f"\n=== sd2 compare: evaluation {name} ===", flush=True)
        run_eval(config, report=only is None)
