"""Build argparse options from a pydantic model, so each stage's CLI and its recipe section
share one schema (the single source of truth for every option, as in speculators).

Values are passed to pydantic as given on the command line; pydantic does the typing and the
range checks, so a bad value gets the same message from the CLI as from a recipe.
"""

from __future__ import annotations

import argparse
import types
import typing
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


def _choices(annotation: Any) -> list | None:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return None


def add_model_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    positional: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
) -> None:
    """Add one option per field of `model` (`--field-name`), positional for names in `positional`."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        help_text = field.description or ""
        if not field.is_required():
            help_text += f" (default: {field.get_default(call_default_factory=True)!r})"
        kwargs: dict[str, Any] = {"help": help_text, "dest": name}
        ann = field.annotation
        if _is_bool(ann):
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
            parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def model_from_args(model: type[BaseModel], args: argparse.Namespace, **extra: Any) -> BaseModel:
    """Validate the parsed options into `model`; unset options keep the schema's defaults."""
    values = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    values.update(extra)
    try:
        return model.model_validate(values)
    except ValidationError as err:
        # A ValueError: `sd2` prints it as one message and exits with status 2.
        raise ValueError(f"invalid options for {model.__name__}:\n{err}") from None
