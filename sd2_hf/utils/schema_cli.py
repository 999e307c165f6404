"""Build argparse options from a pydantic model, so each stage's CLI and its recipe section
share one schema (the single source of truth for every option, as in speculators).

Values are passed to pydantic as given on the command line; pydantic does the typing and the
range checks, so a bad value gets the same message from the CLI as from a recipe.

A field that is itself a pydantic model (e.g. `train.peft`) becomes a flag, `--peft`, that
turns the section on with its defaults, plus one option per sub-field, `--peft-r`; giving a
sub-field turns the section on too (recipe overrides spell the same `train.peft.r=8`).
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))
    return origin in (list, tuple)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(a is bool for a in typing.get_args(annotation))
    return False


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `annotation` (`Model`, `Model | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := submodel(arg)) is not None:
                return found
    return None


def _choices(annotation: Any) -> list | None:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return None


def add_model_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    positional: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    prefix: str = "",
) -> None:
    """Add one option per field of `model` (`--field-name`), positional for names in `positional`.

    Names in `skip` may be dotted (`peft.lora_args`) to skip a sub-field; the options of a
    sub-model's fields get the dotted name as `dest`.
    """
    for field_name, field in model.model_fields.items():
        name = prefix + field_name
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-").replace(".", "-")
        if (section := submodel(field.annotation)) is not None:
            parser.add_argument(
                flag,
                action="store_true",
                default=None,
                dest=name,
                help=f"{field.description or ''} (with the defaults of its {flag}-* options)",
            )
            add_model_arguments(parser, section, skip=skip, prefix=name + ".")
            continue
        help_text = field.description or ""
        if not field.is_required():
            help_text += f" (default: {field.get_default(call_default_factory=True)!r})"
        kwargs: dict[str, Any] = {"help": help_text, "dest": name}
        if prefix:
            kwargs["metavar"] = field_name.upper()
        ann = field.annotation
        if _is_bool(ann):
            kwargs.pop("metavar", None)
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(ann):
            kwargs["nargs"] = "+"
        elif choices := _choices(ann):
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        if name in positional:
            kwargs.pop("dest")
            parser.add_argument(name, **kwargs)
        else:
            kwargs["default"] = None
            parser.add_argument(flag, **kwargs)


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    model: type[BaseModel] | None = None,
    *,
    description: str | None = None,
    **options: Any,
) -> argparse.ArgumentParser:
    """Add the subcommand `name` that runs `func(args)`, with one option per field of `model`
    (`options`: `positional`, `skip`, as in `add_model_arguments`); returns its parser.

    As in click, `func`'s docstring documents the command: its first paragraph is the help
    line of `sd2 --help`, the rest the description of `sd2 NAME --help` (unless `description`).
    """
    summary, _, body = inspect.getdoc(func).partition("\n\n")
    parser = subparsers.add_parser(
        name, help=" ".join(summary.split()), description=description or body or None
    )
    if model is not None:
        add_model_arguments(parser, model, **options)
    parser.set_defaults(func=func)
    return parser


def add_file_arguments(parser: argparse.ArgumentParser, name: str, help: str, overrides: str):
    """The positionals of a command on a YAML file, `NAME [KEY=VALUE ...]`: the file, then
    `overrides` of its keys (`sd2 run`, `sd2 compare`); `help` and `overrides` are their help."""
    parser.add_argument(name, help=help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides)


def model_from_args(model: type[BaseModel], args: argparse.Namespace, **extra: Any) -> BaseModel:
    """Validate the parsed options into `model`; unset options keep the schema's defaults."""
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        *sections, name = key.split(".")
        if value is None or (sections or [name])[0] not in model.model_fields:
            continue
        holder = values
        for section in sections:
            holder = holder.setdefault(section, {})
        if value is True and submodel(_field_annotation(model, key)) is not None:
            holder.setdefault(name, {})  # the section's flag: on, with its defaults
        else:
            holder[name] = value
    values.update(extra)
    try:
        return model.model_validate(values)
    except ValidationError as err:
        # A ValueError: `sd2` prints it as one message and exits with status 2.
        raise ValueError(f"invalid options for {model.__name__}:\n{err}") from None


def _field_annotation(model: type[BaseModel], dotted: str) -> Any:
    annotation: Any = model
    for part in dotted.split("."):
        annotation = submodel(annotation).model_fields[part].annotation
    return annotation
