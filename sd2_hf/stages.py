"""One description per pipeline stage, read by the recipe, the CLI and the pipeline.

A `Stage` says everything the orchestration needs of a stage: its config (the schema its
`sd2 <stage>` command and its recipe section share), the fields the pipeline fills from earlier
stages and how (`wire`), which section keys hold paths, recipe-only launch settings, whether an
interrupted run resumes itself, how to run it (`run`, importing the stage's code only then) and
its one line in `sd2 run`'s summary (`note`). Adding a stage means writing its package and one
`Stage` here, appended to `STAGES` in pipeline order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from sd2_hf.data.config import DistillConfig
from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.export.config import ExportConfig
from sd2_hf.pruning.config import PruneConfig
from sd2_hf.training.config import TrainStageConfig

if TYPE_CHECKING:
    from sd2_hf.recipe import Recipe, StagePlan

# The pipeline owns every stage's output directory and decides when to start one afresh.
PIPELINE_OWNED = ("output", "overwrite")


class PipelineError(ValueError):
    """A stage cannot run or failed on its input; the message says what to do."""


@dataclass
class PlanContext:
    """What a stage's `wire` sees of the recipe while the pipeline plans it."""

    recipe: Recipe
    present: set[str]
    out: dict[str, str]  # stage -> its output directory

    def data_for(self, given: dict[str, Any], key: str) -> list[str]:
        """Fill `key` with the distilled data or the top-level dataset; the consumed stages."""
        if given.get(key) is not None:
            return []
        if "distill" in self.present:
            given[key] = self.out["distill"]
            return ["distill"]
        if self.recipe.dataset is not None:
            given[key] = self.recipe.dataset
        return []


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    config: type[BaseModel]
    # Config fields the pipeline fills when the section leaves them out -> what they default to.
    filled: dict[str, str]
    # Fills `given` (the section's values) from the context; returns the stages it consumes.
    # Raises ValueError (reported as a recipe error) when the recipe lacks what it needs.
    wire: Callable[[PlanContext, dict[str, Any]], list[str]]
    run: Callable[[StagePlan], dict[str, Any]]
    note: Callable[[dict[str, Any]], str]
    # Section keys holding paths (relative to the recipe's directory): "path", "paths" (a list)
    # or "drafters" (`[name=]path` entries).
    paths: dict[tuple[str, ...], str] = field(default_factory=dict)
    # Recipe-only fields: how the stage is launched, or what the pipeline adds for it.
    extra: dict[str, tuple[Any, FieldInfo]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    resumable: bool = False
    # The file (and key path in it) where the stage's output records the drafter's sparsity.
    sparsity_record: tuple[str, tuple[str, ...]] | None = None

    @property
    def section(self) -> type[BaseModel]:
        return _SECTIONS[self.name]

    @property
    def launch_fields(self) -> tuple[str, ...]:
        return tuple(self.extra)


def _section(stage: Stage) -> type[BaseModel]:
    """The recipe section of a stage: the stage config's own fields (same types, bounds and
    descriptions), minus those the pipeline owns, with the `filled` ones made optional.

    The stage config's validators run when the pipeline builds the config (`Recipe.plan`), so
    a bad combination is reported with the values the stage will really get.
    """
    fields: dict[str, Any] = {}
    for name, info in stage.config.model_fields.items():
        if name in PIPELINE_OWNED:
            continue
        if name in stage.filled:
            fields[name] = (
                info.annotation | None,
                Field(None, description=f"{info.description} (default: {stage.filled[name]})"),
            )
        elif name in stage.descriptions:
            copied = FieldInfo.merge_field_infos(info, description=stage.descriptions[name])
            fields[name] = (info.annotation, copied)
        else:
            fields[name] = (info.annotation, info)
    fields.update(stage.extra)
    return create_model(
        stage.config.__name__.replace("Config", "") + "Section",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"Recipe section for {stage.config.__name__}: {stage.config.__doc__}",
        **fields,
    )


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


# --- distill ---------------------------------------------------------------------------------


def _wire_distill(ctx: PlanContext, given: dict[str, Any]) -> list[str]:
    if given.get("target") is None:
        given["target"] = ctx.recipe.target.model
    if given.get("source") is None:
        if ctx.recipe.dataset is None:
            raise ValueError(
                "distill: no seed conversations: set the top-level `dataset` "
                "(e.g. asset:sharegpt) or `distill.source`"
            )
        given["source"] = ctx.recipe.dataset
    return []


def _run_distill(plan: StagePlan) -> dict[str, Any]:
    import logging
    from dataclasses import asdict

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


DISTILL = Stage(
    name="distill",
    help="self-data distillation",
    config=DistillConfig,
    filled={"target": "the recipe's target model", "source": "the recipe's top-level `dataset`"},
    wire=_wire_distill,
    run=_run_distill,
    note=lambda r: f"{r['input']} rows: {r['written']} written, {r['filtered']} filtered",
    paths={("target",): "path", ("source",): "path"},
    resumable=True,
)


# --- prune -----------------------------------------------------------------------------------


def _wire_prune(ctx: PlanContext, given: dict[str, Any]) -> list[str]:
    if given.get("model") is None:
        given["model"] = ctx.recipe.drafter_model
    consumes = ctx.data_for(given, "dataset")
    if given.get("dataset") is None:
        given.pop("dataset", None)
    return consumes


def _run_prune(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.pruning.runner import run_prune

    result = run_prune(plan.config)
    print(result.summary())
    return result.to_dict()


def _note_prune(result: dict[str, Any]) -> str:
    if result.get("method") == "width":
        before, after = result["intermediate_size"]
        return f"MLP channels {after} of {before}, MACs kept {_pct(result['macs_fraction'])}"
    if result.get("method") == "layers":
        return (
            f"dropped blocks {result['dropped_layers']}, MACs kept {_pct(result['macs_fraction'])}"
        )
    return f"{_pct(result['global_sparsity'])} {result['structure']}"


PRUNE = Stage(
    name="prune",
    help="one-shot pruning of the drafter",
    config=PruneConfig,
    filled={
        "model": "the recipe's drafter model",
        "dataset": "the distilled dataset, else the recipe's top-level `dataset`",
    },
    wire=_wire_prune,
    run=_run_prune,
    note=_note_prune,
    paths={("model",): "path", ("dataset",): "path", ("recipe",): "path"},
    sparsity_record=("sparsity_report.json", ("global_sparsity",)),
)


# --- train -----------------------------------------------------------------------------------


def _wire_train(ctx: PlanContext, given: dict[str, Any]) -> list[str]:
    consumes = []
    if given.get("model") is None:
        if "prune" in ctx.present:
            given["model"], consumes = ctx.out["prune"], ["prune"]
        else:
            given["model"] = ctx.recipe.drafter_model
    consumes += ctx.data_for(given, "dataset")
    if given.get("dataset") is None:
        raise ValueError(
            "train: no conversations to train on: add a `distill` section, set the "
            "top-level `dataset`, or set `train.dataset`"
        )
    if given.get("teacher") is None:
        given.pop("teacher", None)
        if given.get("distill_loss", "none") != "none":
            given["teacher"] = ctx.recipe.target.model
    return consumes


def _run_train(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.training.launch import error_message, launch_train
    from sd2_hf.training.stage import REPORT_FILE, run_train
    from sd2_hf.utils.io import read_json

    if plan.launch.get("in_process") and not plan.launch.get("accelerate_config"):
        report = run_train(plan.config)
    else:
        status = launch_train(
            plan.config, plan.launch.get("accelerate_config"), plan.launch.get("accelerate_args")
        )
        if status != 0:
            refused = error_message(plan.config)
            if refused:  # run_stage prefixes the stage's name, as for a refusal in-process
                raise PipelineError(refused)
            how = (
                f"was killed by signal {-status} (SIGKILL: out of memory?)"
                if status < 0
                else f"exited with status {status}"
            )
            raise PipelineError(
                f"the training process {how}; its output is above. Fix the cause and "
                f"rerun: training resumes from {plan.output / 'checkpoints'}"
            )
        report = read_json(plan.output / REPORT_FILE)
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


TRAIN = Stage(
    name="train",
    help="sparse fine-tuning (SD2Trainer)",
    config=TrainStageConfig,
    filled={
        "model": "the pruned checkpoint, else the recipe's drafter model",
        "dataset": "the distilled dataset, else the recipe's top-level `dataset`",
        "teacher": "the recipe's target model when distill_loss is set",
    },
    wire=_wire_train,
    run=_run_train,
    note=lambda r: (
        f"{r['global_step']} steps on {r['num_conversations']} conversations, "
        f"loss {_num(r['first_logged_loss'])} -> {_num(r['last_logged_loss'])}, "
        f"sparsity {_pct(r['sparsity_after'])}"
    ),
    paths={
        ("model",): "path",
        ("dataset",): "path",
        ("teacher",): "path",
        ("accelerate_config",): "path",
        ("trainer_args", "chat_template_path"): "path",
    },
    extra={
        "in_process": (
            bool,
            Field(
                False,
                description="run the training in the pipeline's own process; by default it runs "
                "in a child process (`python -m sd2_hf.training.launch`), whose memory goes back "
                "to the system when it ends (a finished training otherwise keeps its allocator's "
                "arenas in a pipeline or study that goes on). Not part of the stage's fingerprint",
            ),
        ),
        "accelerate_config": (
            str | None,
            Field(
                None,
                description="run the stage under `accelerate launch --config_file` this file "
                "(multi-GPU: recipes/accelerate/*.yaml); None: in the pipeline's process",
            ),
        ),
        "accelerate_args": (
            list[str],
            Field(
                default_factory=list,
                description="further `accelerate launch` arguments, e.g. ['--num_processes', '8']",
            ),
        ),
    },
    resumable=True,
    sparsity_record=("train_report.json", ("sparsity_after",)),
)


# --- export ----------------------------------------------------------------------------------


def _wire_export(ctx: PlanContext, given: dict[str, Any]) -> list[str]:
    consumes = []
    if given.get("drafter") is None:
        source = next((s for s in ("train", "prune") if s in ctx.present), None)
        given["drafter"] = ctx.out[source] if source else ctx.recipe.drafter_model
        consumes = [source] if source else []
    if given.get("target") is None:
        given["target"] = ctx.recipe.target.model
    return consumes


def _run_export(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.export.export import run_export

    return run_export(plan.config).to_dict()


EXPORT = Stage(
    name="export",
    help="drafter export with model card",
    config=ExportConfig,
    filled={
        "drafter": "the trained drafter, else the pruned one",
        "target": "the recipe's target model",
    },
    wire=_wire_export,
    run=_run_export,
    note=lambda r: (
        f"{r['format']}, sparsity {_pct(r['sparsity_after'])}, K={r['num_draft_tokens']}"
    ),
    paths={("drafter",): "path", ("target",): "path", ("eval_json",): "paths"},
    sparsity_record=("sd2_drafter.json", ("sparsity", "global_sparsity_after_roundtrip")),
)


# --- eval ------------------------------------------------------------------------------------

COMPARISONS = ("pruned", "dense")


def _wire_eval(ctx: PlanContext, given: dict[str, Any]) -> list[str]:
    if given.get("target") is None:
        given["target"] = ctx.recipe.target.model
    compare = ctx.recipe.eval.compare
    drafters, consumes = [], []
    if "train" in ctx.present:
        source = "export" if "export" in ctx.present else "train"
        drafters.append(f"sd2={ctx.out[source]}")
        consumes.append(source)
    elif "export" in ctx.present:
        drafters.append(f"exported={ctx.out['export']}")
        consumes.append("export")
    if "pruned" in compare and "prune" in ctx.present:
        drafters.append(f"pruned={ctx.out['prune']}")
        consumes.append("prune")
    if "dense" in compare:
        drafters.append(f"dense={ctx.recipe.drafter_model}")
    given["drafters"] = drafters + given.get("drafters", [])
    return consumes


def _run_eval(plan: StagePlan) -> dict[str, Any]:
    from sd2_hf.evaluation.runner import run_eval
    from sd2_hf.export.config import METADATA_FILE
    from sd2_hf.export.export import add_eval_to_export

    report = run_eval(plan.config)
    sd2 = next((row for row in report["drafters"] if row["name"] == "sd2"), None)
    if sd2 and (Path(sd2["path"]) / METADATA_FILE).is_file():
        add_eval_to_export(Path(sd2["path"]), plan.output / "eval.json")
    keep = ("name", "kind", "mal", "relative_macs", "improvement_factor", "lossless_mismatches")
    return {
        "backend": report["backend"],
        "num_draft_tokens": report["num_draft_tokens"],
        "num_prompts": report["num_prompts"],
        "drafters": [{k: row.get(k) for k in keep} for row in report["drafters"]],
    }


EVAL = Stage(
    name="eval",
    help="MAL / MACs evaluation",
    config=EvalConfig,
    filled={"target": "the recipe's target model"},
    wire=_wire_eval,
    run=_run_eval,
    note=lambda r: f"{r['num_prompts']} prompts, K={r['num_draft_tokens']}, {r['backend']} backend",
    paths={("target",): "path", ("prompts",): "path", ("drafters",): "drafters"},
    descriptions={
        "drafters": "further drafters to compare, each `path` or `name=path` (the pipeline "
        "adds its own: `sd2` and those named in `compare`)",
    },
    extra={
        "compare": (
            list[Literal["pruned", "dense"]],
            Field(
                default_factory=lambda: ["pruned"],
                description="pipeline drafters evaluated next to the SD² one (`sd2`): `pruned` "
                "(the pruned drafter before fine-tuning) and `dense` (the drafter model "
                "before pruning)",
            ),
        ),
    },
)


STAGES: tuple[Stage, ...] = (DISTILL, PRUNE, TRAIN, EXPORT, EVAL)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
_SECTIONS: dict[str, type[BaseModel]] = {s.name: _section(s) for s in STAGES}
