"""The pipeline recipe: one YAML file with a section per stage, validated by one schema.

A recipe names the `target` model, the `drafter` model to prune (default: the target itself) and
the stages to run: `distill`, `prune`, `train`, `export`, `eval`. Each stage section takes the
options of that stage's own config (`DistillConfig`, `PruneConfig`, `TrainStageConfig`,
`ExportConfig`, `EvalConfig`: the same schema as its `sd2 <stage>` command), except the fields
the pipeline fills from earlier stages: each stage writes to `<output>/<stage>/`, prune
calibrates on the distilled data, train fine-tunes the pruned checkpoint on it, export writes the
trained drafter and eval compares it with the pruned one. A field set in the section wins over
the filled value. A stage that is absent is skipped, and its consumers fall back (no `distill`:
prune and train use the top-level `dataset`; no `prune`: train fine-tunes `drafter.model`).

Relative paths in the file are resolved against the recipe's directory; `section.key=value`
overrides (values parsed as YAML scalars) against the current directory. Hub ids and
`asset:<name>` names are kept as given.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from sd2_hf.data.distill import DistillConfig
from sd2_hf.evaluation.config import EvalConfig, parse_drafter
from sd2_hf.export.export import ExportConfig
from sd2_hf.pruning.config import PruneConfig
from sd2_hf.training.stage import TrainStageConfig
from sd2_hf.utils.schema_cli import submodel

STAGES = ("distill", "prune", "train", "export", "eval")
# The pipeline owns every stage's output directory and decides when to start one afresh.
PIPELINE_OWNED = ("output", "overwrite")
# File suffixes that mark a value as a path even before the file exists.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_PATH_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".parquet", ".arrow", ".gguf")


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key, its section and what is allowed."""


def _optional(annotation: Any) -> Any:
    return annotation | None


def _section(
    config: type[BaseModel],
    filled: dict[str, str],
    *,
    descriptions: dict[str, str] | None = None,
    extra: dict[str, tuple[Any, FieldInfo]] | None = None,
) -> type[BaseModel]:
    """The recipe section of a stage: the stage config's own fields (same types, bounds and
    descriptions), minus those the pipeline owns, with the `filled` ones made optional.

    The stage config's validators run when the pipeline builds the config (`Recipe.plan`), so
    a bad combination is reported with the values the stage will really get.
    """
    fields: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        if name in PIPELINE_OWNED:
            continue
        if name in filled:
            fields[name] = (
                _optional(info.annotation),
                Field(None, description=f"{info.description} (default: {filled[name]})"),
            )
        elif descriptions and name in descriptions:
            copied = FieldInfo.merge_field_infos(info, description=descriptions[name])
            fields[name] = (info.annotation, copied)
        else:
            fields[name] = (info.annotation, info)
    fields.update(extra or {})
    return create_model(
        config.__name__.replace("Config", "") + "Section",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"Recipe section for {config.__name__}: {config.__doc__}",
        **fields,
    )


DistillSection = _section(
    DistillConfig,
    {"target": "the recipe's target model", "source": "the recipe's top-level `dataset`"},
)
PruneSection = _section(
    PruneConfig,
    {
        "model": "the recipe's drafter model",
        "dataset": "the distilled dataset, else the recipe's top-level `dataset`",
    },
)
TrainSection = _section(
    TrainStageConfig,
    {
        "model": "the pruned checkpoint, else the recipe's drafter model",
        "dataset": "the distilled dataset, else the recipe's top-level `dataset`",
        "teacher": "the recipe's target model when distill_loss is set",
    },
    extra={
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
)
ExportSection = _section(
    ExportConfig,
    {
        "drafter": "the trained drafter, else the pruned one",
        "target": "the recipe's target model",
    },
)
COMPARISONS = ("pruned", "dense")
EvalSection = _section(
    EvalConfig,
    {"target": "the recipe's target model"},
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
SECTIONS: dict[str, type[BaseModel]] = {
    "distill": DistillSection,
    "prune": PruneSection,
    "train": TrainSection,
    "export": ExportSection,
    "eval": EvalSection,
}
# Recipe-section fields that are not options of the stage config itself.
LAUNCH_FIELDS = {"train": ("accelerate_config", "accelerate_args"), "eval": ("compare",)}


class ModelSection(BaseModel):
    """A model: Hub id, local checkpoint directory or `asset:<name>`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hub id, local checkpoint directory or asset:<name>")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `target: asset:smollm2-135m-instruct` is the same as `target: {model: ...}`.
        return {"model": value} if isinstance(value, str) else value


class Recipe(BaseModel):
    """An SD² pipeline: models, seed data, and one section per stage to run."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("sd2", description="recipe name (default: the recipe file's name)")
    description: str = Field("", description="what the recipe is for")
    output: str | None = Field(
        None,
        description="run directory: each stage writes to <output>/<stage>/ "
        "(default: outputs/<name> in the current directory)",
    )
    threads: int | None = Field(
        None,
        gt=0,
        description="torch CPU threads of the stages run in the pipeline's process (None: "
        "torch's default, one per core). On a shared CPU machine 1 avoids OpenMP "
        "oversubscription, which can slow generation and training many times over. Not part "
        "of any stage's fingerprint",
    )
    target: ModelSection = Field(description="the target model the drafter serves")
    drafter: ModelSection | None = Field(
        None, description="the model pruned into the drafter (default: the target itself)"
    )
    dataset: str | None = Field(
        None,
        description="seed conversations (asset:<name>, JSON/JSONL file or datasets dir): "
        "distill.source, and prune/train data when there is no distill section",
    )
    distill: DistillSection | None = Field(None, description="self-data distillation")
    prune: PruneSection | None = Field(None, description="one-shot pruning of the drafter")
    train: TrainSection | None = Field(None, description="sparse fine-tuning (SD2Trainer)")
    export: ExportSection | None = Field(None, description="drafter export with model card")
    eval: EvalSection | None = Field(None, description="MAL / MACs evaluation")

    @model_validator(mode="after")
    def _some_stage(self) -> Recipe:
        if not any(getattr(self, s) is not None for s in STAGES):
            raise ValueError(f"the recipe has no stage: add at least one of {', '.join(STAGES)}")
        return self

    @property
    def root(self) -> Path:
        return Path(self.output or Path("outputs") / self.name).expanduser().resolve()

    @property
    def drafter_model(self) -> str:
        return self.drafter.model if self.drafter else self.target.model

    def stages(self) -> list[str]:
        """The stages present in the recipe, in pipeline order."""
        return [s for s in STAGES if getattr(self, s) is not None]

    def plan(self) -> list[StagePlan]:
        """The stage configs the pipeline runs, with the fields filled from earlier stages.

        Raises `RecipeError` when a stage config rejects the values (its own validators).
        """
        present = set(self.stages())
        out = {s: str(self.root / s) for s in STAGES}
        plans: list[StagePlan] = []

        def user(stage: str) -> dict[str, Any]:
            section = getattr(self, stage)
            given = section.model_dump(exclude_unset=True)
            return {k: v for k, v in given.items() if k not in LAUNCH_FIELDS.get(stage, ())}

        def launch(stage: str) -> dict[str, Any]:
            section = getattr(self, stage)
            return {k: getattr(section, k) for k in LAUNCH_FIELDS.get(stage, ())}

        def data_for(stage: str, given: dict[str, Any], key: str) -> list[str]:
            """Fill `key` with the distilled data or the top-level dataset; the consumed stages."""
            if given.get(key) is not None:
                return []
            if "distill" in present:
                given[key] = out["distill"]
                return ["distill"]
            if self.dataset is not None:
                given[key] = self.dataset
            return []

        if "distill" in present:
            given = user("distill")
            if given.get("target") is None:
                given["target"] = self.target.model
            if given.get("source") is None:
                if self.dataset is None:
                    raise RecipeError(
                        "distill: no seed conversations: set the top-level `dataset` "
                        "(e.g. asset:sharegpt) or `distill.source`"
                    )
                given["source"] = self.dataset
            plans.append(_build("distill", DistillConfig, given, out, [], {}))

        if "prune" in present:
            given = user("prune")
            if given.get("model") is None:
                given["model"] = self.drafter_model
            consumes = data_for("prune", given, "dataset")
            if given.get("dataset") is None:
                given.pop("dataset", None)
            plans.append(_build("prune", PruneConfig, given, out, consumes, {}))

        if "train" in present:
            given = user("train")
            consumes = []
            if given.get("model") is None:
                if "prune" in present:
                    given["model"], consumes = out["prune"], ["prune"]
                else:
                    given["model"] = self.drafter_model
            consumes += data_for("train", given, "dataset")
            if given.get("dataset") is None:
                raise RecipeError(
                    "train: no conversations to train on: add a `distill` section, set the "
                    "top-level `dataset`, or set `train.dataset`"
                )
            if given.get("teacher") is None:
                given.pop("teacher", None)
                if given.get("distill_loss", "none") != "none":
                    given["teacher"] = self.target.model
            plans.append(_build("train", TrainStageConfig, given, out, consumes, launch("train")))

        if "export" in present:
            given = user("export")
            consumes = []
            if given.get("drafter") is None:
                source = next((s for s in ("train", "prune") if s in present), None)
                given["drafter"] = out[source] if source else self.drafter_model
                consumes = [source] if source else []
            if given.get("target") is None:
                given["target"] = self.target.model
            plans.append(_build("export", ExportConfig, given, out, consumes, {}))

        if "eval" in present:
            given = user("eval")
            if given.get("target") is None:
                given["target"] = self.target.model
            compare = self.eval.compare
            drafters, consumes = [], []
            if "train" in present:
                source = "export" if "export" in present else "train"
                drafters.append(f"sd2={out[source]}")
                consumes.append(source)
            elif "export" in present:
                drafters.append(f"exported={out['export']}")
                consumes.append("export")
            if "pruned" in compare and "prune" in present:
                drafters.append(f"pruned={out['prune']}")
                consumes.append("prune")
            if "dense" in compare:
                drafters.append(f"dense={self.drafter_model}")
            given["drafters"] = drafters + given.get("drafters", [])
            plans.append(_build("eval", EvalConfig, given, out, consumes, launch("eval")))
        return plans


@dataclass
class StagePlan:
    """One stage as the pipeline runs it: its config and the stages whose outputs it reads."""

    name: str
    config: BaseModel
    consumes: list[str] = field(default_factory=list)
    # Recipe-only settings of the stage (how it is launched) that also define its result.
    launch: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return Path(self.config.output)


def _build(
    stage: str,
    config: type[BaseModel],
    given: dict[str, Any],
    out: dict[str, str],
    consumes: list[str],
    launch: dict[str, Any],
) -> StagePlan:
    try:
        built = config.model_validate({**given, "output": out[stage]})
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, config, prefix=stage)) from None
    return StagePlan(stage, built, consumes, launch)


# --------------------------------------------------------------------------------------------
# Error messages


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None or (model := submodel(info.annotation)) is None:
            return None
    return model


def _describe_type(info: FieldInfo) -> str:
    annotation = info.annotation
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "")
    bounds = [
        f"{sym} {getattr(m, attr)}"
        for m in info.metadata
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(m, attr, None) is not None
    ]
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def format_validation_error(
    err: ValidationError, model: type[BaseModel], prefix: str | None = None
) -> str:
    """One line per problem, naming the key, its section and what is allowed."""
    lines = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
        parent = _model_at(model, loc[:-1]) if loc else None
        section = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc[:-1])
        where = f"section {section!r}" if section else "the top level of the recipe"
        if problem["type"] == "extra_forbidden" and parent is not None:
            key = str(loc[-1])
            allowed = list(parent.model_fields)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(
                f"unknown key {key!r} in {where}.{hint} Allowed keys: {', '.join(allowed)}"
            )
        elif problem["type"] == "missing" and parent is not None:
            info = parent.model_fields[str(loc[-1])]
            lines.append(f"{path}: required key missing in {where} ({info.description})")
        elif loc and parent is not None and str(loc[-1]) in parent.model_fields:
            info = parent.model_fields[str(loc[-1])]
            lines.append(
                f"{path}: {problem['msg']}; got {problem['input']!r}, "
                f"expected {_describe_type(info)}: {info.description}"
            )
        else:
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"{path or 'recipe'}: {message}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Loading


# Keys holding paths, resolved against the recipe's directory: `dir` always (a directory to
# create), `path` when it names a local path, `paths` a list of them, `drafters` `[name=]path`s.
_PATH_KEYS: dict[tuple[str, ...], str] = {
    ("output",): "dir",
    ("dataset",): "path",
    ("target",): "path",
    ("drafter",): "path",
    ("target", "model"): "path",
    ("drafter", "model"): "path",
    ("distill", "target"): "path",
    ("distill", "source"): "path",
    ("prune", "model"): "path",
    ("prune", "dataset"): "path",
    ("prune", "recipe"): "path",
    ("train", "model"): "path",
    ("train", "dataset"): "path",
    ("train", "teacher"): "path",
    ("train", "accelerate_config"): "path",
    ("train", "trainer_args", "chat_template_path"): "path",
    ("export", "drafter"): "path",
    ("export", "target"): "path",
    ("export", "eval_json"): "paths",
    ("eval", "target"): "path",
    ("eval", "prompts"): "path",
    ("eval", "drafters"): "drafters",
}


def resolve_path(value: Any, base: Path, always: bool = False) -> Any:
    """`value` made absolute against `base` when it is a local path; Hub ids, `asset:` names
    and names of shipped pruning recipes are returned unchanged."""
    if not isinstance(value, str) or value.startswith(("asset:", "http://", "https://")):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = (base / path).resolve()
    if (
        always
        or value.startswith(("./", "../"))
        or value.endswith(_PATH_SUFFIXES)
        or candidate.exists()
    ):
        return str(candidate)
    return value


def _resolve_value(kind: str, value: Any, base: Path) -> Any:
    if kind == "dir":
        return resolve_path(value, base, always=True)
    if kind == "paths" and isinstance(value, list):
        return [resolve_path(v, base) for v in value]
    if kind == "drafters" and isinstance(value, list):
        resolved = []
        for entry in value:
            if not isinstance(entry, str):
                resolved.append(entry)
                continue
            parsed = parse_drafter(entry)
            path = resolve_path(parsed.path, base)
            resolved.append(f"{parsed.name}={path}" if entry != parsed.path else path)
        return resolved
    return resolve_path(value, base)


def resolve_paths(data: dict[str, Any], base: Path, only: set[tuple[str, ...]] | None = None):
    """Resolve the path-valued keys of a raw recipe dict in place (those in `only`, if given)."""
    for keys, kind in _PATH_KEYS.items():
        if only is not None and keys not in only:
            continue
        holder: Any = data
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and holder.get(keys[-1]) is not None:
            holder[keys[-1]] = _resolve_value(kind, holder[keys[-1]], base)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`section.key=value` -> ((section, key), value), the value parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    keys = tuple(k.strip() for k in key.split("."))
    if not sep or not all(keys):
        raise RecipeError(
            f"override {text!r} must look like section.key=value (e.g. train.max_steps=3) "
            "or key=value for a top-level key"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 (PyYAML) reads `1e-4` as a string; a command line means the number.
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str], base: Path) -> dict[str, Any]:
    """Set each `section.key=value` in `data`; path values are resolved against `base`.

    `section=null` removes a stage; a section not in the file is created.
    """
    for text in overrides:
        keys, value = parse_override(text)
        holder = data
        for depth, key in enumerate(keys[:-1]):
            current = holder.get(key)
            if current is None:
                current = holder[key] = {}
            elif isinstance(current, str) and depth == 0 and key in ("target", "drafter"):
                current = holder[key] = {"model": current}
            elif not isinstance(current, dict):
                raise RecipeError(
                    f"override {text!r}: {'.'.join(keys[: depth + 1])} is {current!r}, "
                    "not a section with keys"
                )
            holder = current
        if value is None and len(keys) == 1 and keys[0] in STAGES:
            holder.pop(keys[0], None)
            continue
        holder[keys[-1]] = value
        resolve_paths(data, base, only={keys})
    return data


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw recipe dict (paths already resolved) and check its stage configs."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe is a YAML mapping with keys {', '.join(Recipe.model_fields)}; "
            f"got {type(data).__name__}"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(
            f"invalid recipe {source}:\n{format_validation_error(err, Recipe)}"
        ) from None
    try:
        recipe.plan()
    except RecipeError as err:
        raise RecipeError(f"invalid recipe {source}:\n{err}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply `section.key=value` overrides, resolve paths, validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
        resolve_paths(data, path.resolve().parent)
        apply_overrides(data, list(overrides), Path.cwd())
    recipe = recipe_from_dict(data, source=str(path))
    # Fix the run directory now, so a later change of directory cannot move it.
    return recipe.model_copy(update={"output": str(recipe.root)})
