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
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from sd2_hf.evaluation.config import parse_drafter
from sd2_hf.stages import STAGE_NAMES, PlanContext
from sd2_hf.stages import STAGES as STAGE_DESCRIPTIONS
from sd2_hf.utils.schema_cli import submodel
from sd2_hf.utils.yamlfile import YAMLFileError, load_yaml_file, read_yaml_file

STAGES = STAGE_NAMES
# File suffixes that mark a value as a path even before the file exists.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_PATH_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".parquet", ".arrow", ".gguf")


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key, its section and what is allowed."""


class ModelSection(BaseModel):
    """A model: Hub id, local checkpoint directory or `asset:<name>`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hub id, local checkpoint directory or asset:<name>")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `target: asset:smollm2-135m-instruct` is the same as `target: {model: ...}`.
        return {"model": value} if isinstance(value, str) else value


class _RecipeBase(BaseModel):
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

    @model_validator(mode="after")
    def _some_stage(self) -> _RecipeBase:
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
        ctx = PlanContext(self, set(self.stages()), {s: str(self.root / s) for s in STAGES})
        plans: list[StagePlan] = []
        for stage in STAGE_DESCRIPTIONS:
            section = getattr(self, stage.name)
            if section is None:
                continue
            given = section.model_dump(exclude_unset=True)
            given = {k: v for k, v in given.items() if k not in stage.launch_fields}
            launch = {k: getattr(section, k) for k in stage.launch_fields}
            try:
                consumes = stage.wire(ctx, given)
            except ValueError as err:
                raise RecipeError(str(err)) from None
            plans.append(_build(stage.name, stage.config, given, ctx.out, consumes, launch))
        return plans


# Every stage's section is a field of the recipe, in pipeline order.
Recipe = create_model(
    "Recipe",
    __base__=_RecipeBase,
    **{
        stage.name: (stage.section | None, Field(None, description=stage.help))
        for stage in STAGE_DESCRIPTIONS
    },
)


@dataclass
class StagePlan:
    """One stage as the pipeline runs it: its config and the stages whose outputs it reads."""

    name: str
    config: BaseModel
    consumes: list[str] = field(default_factory=list)
    # Recipe-only settings of the stage (how it is launched) that also define its result.
    launch: dict[str, Any] = field(default_factory=dict)
    # The stage's name among several pipelines run together (`sd2 compare`: `<drafter>/train`);
    # `consumes` names these keys. Default: the stage name.
    key: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.name

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
    **{
        (stage.name, *keys): kind
        for stage in STAGE_DESCRIPTIONS
        for keys, kind in stage.paths.items()
    },
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


def check_named_yaml_files(data: dict[str, Any], source: str = "recipe") -> None:
    """Parse every existing .yaml/.yml file a stage section names (`prune.recipe`,
    `train.accelerate_config`, ...): the stages read them only when they start, after the stages
    before them ran (and `accelerate launch` reports a syntax error as a traceback). A syntax
    error is a `RecipeError` naming the recipe key, the file, the line and column, at load."""
    for stage in STAGES:
        section = data.get(stage)
        if not isinstance(section, dict):
            continue
        for key, value in section.items():
            if not isinstance(value, str) or not value.endswith((".yaml", ".yml")):
                continue
            if not Path(value).is_file():
                continue
            try:
                load_yaml_file(value, f"{stage}.{key}")
            except YAMLFileError as err:
                raise RecipeError(f"recipe {source}: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply `section.key=value` overrides, resolve paths, validate."""
    path = Path(path)
    data = read_yaml_file(path, "recipe", RecipeError)
    if data is None:
        data = {}
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
        resolve_paths(data, path.resolve().parent)
        apply_overrides(data, list(overrides), Path.cwd())
        check_named_yaml_files(data, source=str(path))
    recipe = recipe_from_dict(data, source=str(path))
    # Fix the run directory now, so a later change of directory cannot move it.
    return recipe.model_copy(update={"output": str(recipe.root)})
