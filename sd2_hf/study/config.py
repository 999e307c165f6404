"""The study file of `sd2 compare`: one target, shared data, named drafters, evaluations.

A study names the `target`, the seed `dataset`, an optional shared `distill` section (the
target's own replies, made once for every drafter), the `drafters` to build, each a chain of
the pipeline's stage sections (`prune`, `train`, `export`: the same keys as in an `sd2 run`
recipe) starting from a `model` (a checkpoint, a Hub id, `asset:<name>`, or the name of another
drafter of the study, whose result it continues from), the `evaluations` (each an `eval`
section: prompts, K, temperatures, backend) and the `comparisons` to report (`A vs B`).

Relative paths are resolved against the study file's directory; `key=value` overrides
(`drafters.sd2.train.max_steps=3`, `evaluations.mtbench.limit=4`) against the current one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sd2_hf.evaluation.config import BASELINES, EvalConfig
from sd2_hf.recipe import (
    ModelSection,
    RecipeError,
    format_validation_error,
    parse_override,
    resolve_path,
    resolve_paths,
)
from sd2_hf.utils.yamlfile import read_yaml_file

BUILD_STAGES = ("prune", "train", "export")
# Keys of an evaluation section the study fills itself (its `drafters` picks a subset).
EVAL_FILLED = ("target", "output")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_COMPARISON = re.compile(r"^\s*(?P<a>\S+)\s+vs\s+(?P<b>\S+)\s*$")
# Override keys (their last part) whose values are paths, resolved against the current dir.
_PATH_NAMES = {
    "model",
    "dataset",
    "source",
    "target",
    "drafter",
    "teacher",
    "recipe",
    "prompts",
    "output",
    "results",
    "chat_template_path",
    "accelerate_config",
}


def public(value: str | None) -> str | None:
    """A model or data reference without the local directories it lives in (the report is
    meant to be committed): Hub ids and `asset:` names as given, local paths by their name."""
    if isinstance(value, str) and value.startswith("/"):
        return Path(value).name
    return value


class StudyError(ValueError):
    """A study file that cannot run: the message names the key and what is allowed."""


class DrafterSpec(BaseModel):
    """One drafter of a study: where it starts and the stages that build it."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field("", description="what this drafter is for (shown in the report)")
    model: str | None = Field(
        None,
        description="what the chain starts from: a checkpoint, Hub id, asset:<name>, or the "
        "name of another drafter of the study (its result) (default: the study's `drafter`)",
    )
    checkpoint: int | None = Field(
        None,
        gt=0,
        description="with `model` naming a study drafter that trains: its training checkpoint "
        "at this optimizer step instead of its final result (learning curves)",
    )
    prune: dict[str, Any] | None = Field(None, description="a recipe's `prune` section")
    train: dict[str, Any] | None = Field(None, description="a recipe's `train` section")
    export: dict[str, Any] | None = Field(None, description="a recipe's `export` section")

    def stages(self) -> dict[str, dict[str, Any]]:
        return {s: getattr(self, s) for s in BUILD_STAGES if getattr(self, s) is not None}


class Curve(BaseModel):
    """MAL gain over one drafter against a quantity that varies over others (data size, steps)."""

    model_config = ConfigDict(extra="forbid")

    baseline: str = Field(
        description="the drafter each point's MAL ratio is taken over (paired-bootstrap "
        "intervals), e.g. the pruned drafter before fine-tuning"
    )
    points: dict[str, float] = Field(
        description="drafter -> its x, e.g. the unique conversations it was fine-tuned on"
    )
    x_label: str = Field("x", description="what x is, for the table and the plot")
    log_x: bool = Field(True, description="x on a log scale; the fit is the ratio against log10 x")
    goal: float | None = Field(
        None,
        gt=0,
        description="a MAL ratio to reach (e.g. 1.25 for +25%): the report extrapolates the x at "
        "which the least-squares line of ratio against (log) x reaches it",
    )


class Study(BaseModel):
    """A comparison of drafters for one target, built and evaluated by `sd2 compare`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("study", description="study name (default: the study file's name)")
    description: str = Field("", description="what the study asks")
    output: str | None = Field(
        None, description="study directory (default: outputs/<name> in the current directory)"
    )
    results: str | None = Field(
        None,
        description="a directory that also gets study.json, study.md and the plots, without "
        "local paths (e.g. bench/results/studies/<name>, to commit)",
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads while stages run")
    target: ModelSection = Field(description="the target model every drafter serves")
    drafter: ModelSection | None = Field(
        None, description="the default start of a drafter's chain (default: the target)"
    )
    dataset: str | None = Field(
        None, description="seed conversations: distill.source, else the drafters' training data"
    )
    distill: dict[str, Any] | None = Field(
        None, description="a recipe's `distill` section, run once for every drafter"
    )
    drafters: dict[str, DrafterSpec] = Field(
        default_factory=dict, description="named drafters, each a chain of stage sections"
    )
    evaluations: dict[str, dict[str, Any]] = Field(
        description="named evaluations, each a recipe's `eval` section (its `drafters`: a "
        "subset of the study's drafters to evaluate, default all)"
    )
    choose_k_on: str | None = Field(
        None,
        description="an evaluation (e.g. held-out ShareGPT prompts, `assisted: false`) on which "
        "each drafter's K is chosen: the other evaluations report the improvement factor at "
        "that K beside their own best K, so the K a user would deploy is not picked on the "
        "prompts it is reported on",
    )
    comparisons: list[str] = Field(
        default_factory=list,
        description="`A vs B`: the MAL ratio of drafter A over drafter B with its paired-"
        "bootstrap interval, overall and per category, in every evaluation holding both",
    )
    curves: dict[str, Curve] = Field(
        default_factory=dict,
        description="named curves: the MAL ratio of each point's drafter over the baseline "
        "against x, in every evaluation and decoding holding them (a table, a plot, a fit)",
    )
    left_out_evaluations: list[str] = Field(
        default_factory=list,
        description="evaluations left out of this run (`evaluations.NAME=null` fills it): not "
        "run, but carried whole from the earlier report, so a partial run keeps their tables",
    )
    left_out: list[str] = Field(
        default_factory=list,
        description="drafters left out of this run (`drafters.NAME=null` on the command line "
        "fills it): not built nor measured, but their rows carried from the earlier report keep "
        "their comparisons and curve points",
    )

    @field_validator("drafters", "evaluations")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [n for n in value if not _NAME.match(n) or n in BASELINES]
        if bad:
            raise ValueError(
                f"names must be plain words (letters, digits, _.+-) other than "
                f"{', '.join(BASELINES)}; got {bad}"
            )
        return value

    @model_validator(mode="after")
    def _choose_k_on(self) -> Study:
        known = {*self.evaluations, *self.left_out_evaluations}
        if self.choose_k_on is not None and self.choose_k_on not in known:
            raise ValueError(
                f"choose_k_on: {self.choose_k_on!r} is not an evaluation of the study "
                f"({', '.join(self.evaluations)})"
            )
        return self

    @model_validator(mode="after")
    def _left_out(self) -> Study:
        both = [d for d in self.left_out if d in self.drafters]
        if both:
            raise ValueError(
                f"left_out: {both} are also drafters of this run; leave a drafter out with "
                "drafters.NAME=null"
            )
        both = [e for e in self.left_out_evaluations if e in self.evaluations]
        if both:
            raise ValueError(
                f"left_out_evaluations: {both} are also evaluations of this run; leave an "
                "evaluation out with evaluations.NAME=null"
            )
        return self

    @model_validator(mode="after")
    def _curves(self) -> Study:
        for name, curve in self.curves.items():
            known = {*self.drafters, *self.left_out}
            unknown = [d for d in (curve.baseline, *curve.points) if d not in known]
            if unknown:
                raise ValueError(
                    f"curves.{name} names {', '.join(map(repr, unknown))}, not drafters of the "
                    f"study ({', '.join(self.drafters) or 'none'})"
                )
            if curve.log_x and any(x <= 0 for x in curve.points.values()):
                raise ValueError(f"curves.{name}: log_x needs every point's x > 0")
        return self

    @property
    def root(self) -> Path:
        return Path(self.output or Path("outputs") / self.name).expanduser().resolve()

    @property
    def start_model(self) -> str:
        return (self.drafter or self.target).model

    def comparison_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for text in self.comparisons:
            match = _COMPARISON.match(text)
            if not match:
                raise StudyError(f"comparisons: {text!r} must look like 'A vs B'")
            for side in (match["a"], match["b"]):
                if side not in self.drafters and side not in self.left_out and side != "ngram":
                    raise StudyError(
                        f"comparisons: {text!r} names {side!r}, which is not a drafter of the "
                        f"study ({', '.join(self.drafters) or 'none'}) nor 'ngram'"
                    )
            pairs.append((match["a"], match["b"]))
        return pairs

    def eval_config(self, name: str, drafters: dict[str, str], output: Path) -> EvalConfig:
        """The `EvalConfig` of evaluation `name` over `drafters` (name -> final path)."""
        section = dict(self.evaluations[name])
        for key in EVAL_FILLED:
            if key in section:
                raise StudyError(f"evaluations.{name}.{key}: set by the study; remove it")
        chosen = section.pop("drafters", None) or list(drafters)
        unknown = [d for d in chosen if d not in drafters]
        if unknown:
            raise StudyError(
                f"evaluations.{name}.drafters: {unknown} are not drafters of the study "
                f"({', '.join(drafters)})"
            )
        try:
            return EvalConfig.model_validate(
                {
                    **section,
                    "target": self.target.model,
                    "drafters": [f"{d}={drafters[d]}" for d in chosen],
                    "output": str(output),
                }
            )
        except ValidationError as err:
            raise StudyError(
                format_validation_error(err, EvalConfig, prefix=f"evaluations.{name}")
            ) from None


# --------------------------------------------------------------------------------------------
# Loading


def _resolve_study_paths(data: dict[str, Any], base: Path) -> None:
    """Make the study's local paths absolute against `base`, as a recipe's are."""
    if isinstance(data.get("results"), str):
        data["results"] = resolve_path(data["results"], base, always=True)
    top = {k: data[k] for k in ("output", "dataset", "target", "drafter") if k in data}
    if isinstance(data.get("distill"), dict):
        top["distill"] = data["distill"]
    resolve_paths(top, base)
    data.update({k: v for k, v in top.items() if k != "distill"})
    names = set(data.get("drafters") or {})
    for spec in (data.get("drafters") or {}).values():
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("model"), str) and spec["model"] not in names:
            spec["model"] = resolve_path(spec["model"], base)
        resolve_paths(spec, base)
    for section in (data.get("evaluations") or {}).values():
        if isinstance(section, dict):
            resolve_paths({"eval": section}, base)


def apply_study_overrides(data: dict[str, Any], overrides: list[str], base: Path) -> None:
    """`a.b.c=value` set in `data` (sections created as needed); path values against `base`."""
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except RecipeError as err:
            raise StudyError(str(err)) from None
        holder = data
        for depth, key in enumerate(keys[:-1]):
            current = holder.setdefault(key, {})
            if current is None:
                current = holder[key] = {}
            if not isinstance(current, dict):
                raise StudyError(
                    f"override {text!r}: {'.'.join(keys[: depth + 1])} is {current!r}, "
                    "not a section with keys"
                )
            holder = current
        if keys[-1] in _PATH_NAMES and isinstance(value, str):
            value = resolve_path(value, base)
        holder[keys[-1]] = value


def _list_left_out(data: dict[str, Any], key: str, names: list[str]) -> None:
    """Add `names` to the list `data[key]` (`left_out` or `left_out_evaluations`), once each."""
    listed = data.get(key) if isinstance(data.get(key), list) else []
    data[key] = [*listed, *(n for n in names if n not in listed)]


def _drop_null_entries(data: dict[str, Any]) -> None:
    """`drafters.NAME=null` (an override, or an empty entry) leaves that drafter out of this
    run's build and evaluations (and the evaluation subsets naming it) and lists it in
    `left_out`: a study built over several sessions runs the part that fits, and the report
    keeps the comparisons and curve points of the left-out drafters' carried rows. Refused while
    another drafter starts from it. `evaluations.NAME=null` leaves an evaluation out of this run
    and lists it in `left_out_evaluations`: the report carries it whole from the earlier one
    (and the K chosen on it, where `choose_k_on` names it)."""
    evaluations = data.get("evaluations")
    if isinstance(evaluations, dict) and None in evaluations.values():
        data["evaluations"] = {n: e for n, e in evaluations.items() if e is not None}
        _list_left_out(
            data, "left_out_evaluations", [n for n, e in evaluations.items() if e is None]
        )
    drafters = data.get("drafters")
    if not isinstance(drafters, dict):
        return
    dropped = [name for name, spec in drafters.items() if spec is None]
    if not dropped:
        return
    for name, spec in drafters.items():
        if isinstance(spec, dict) and spec.get("model") in dropped:
            raise StudyError(
                f"drafters.{spec['model']} is left out (null) but drafters.{name} starts from "
                f"it; leave {name} out too, or keep {spec['model']}"
            )
    data["drafters"] = {n: spec for n, spec in drafters.items() if n not in dropped}
    _list_left_out(data, "left_out", dropped)
    for section in (data.get("evaluations") or {}).values():
        if isinstance(section, dict) and isinstance(section.get("drafters"), list):
            section["drafters"] = [d for d in section["drafters"] if d not in dropped]


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read a study YAML, resolve its paths, apply `key=value` overrides, validate."""
    path = Path(path)
    data = read_yaml_file(path, "study", StudyError)
    if not isinstance(data, dict):
        raise StudyError(
            f"{path}: a study is a YAML mapping with keys {', '.join(Study.model_fields)}"
        )
    data.setdefault("name", path.stem)
    _resolve_study_paths(data, path.resolve().parent)
    apply_study_overrides(data, list(overrides), Path.cwd())
    _drop_null_entries(data)
    try:
        study = Study.model_validate(data)
    except ValidationError as err:
        raise StudyError(f"invalid study {path}:\n{format_validation_error(err, Study)}") from None
    return study.model_copy(update={"output": str(study.root)})
