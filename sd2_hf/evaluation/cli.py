"""`sd2 eval`: MAL, MACs and speed of drafters for a target (options from `EvalConfig`)."""

from __future__ import annotations

import argparse

from sd2_hf.evaluation.config import BASELINES, EvalConfig
from sd2_hf.utils.schema_cli import add_command, model_from_args


def _baselines(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown baseline(s) {unknown}: use a comma-separated subset of {list(BASELINES)} "
            "or '' for none"
        )
    return names


def _run(args: argparse.Namespace) -> int:
    """mean accepted length, MACs and speed of drafters (transformers or vLLM)"""
    from sd2_hf.evaluation.runner import run_eval

    run_eval(model_from_args(EvalConfig, args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    skip = ("drafters", "baselines")
    parser = add_command(
        subparsers, "eval", _run, EvalConfig, description=EvalConfig.__doc__, skip=skip
    )
    parser.add_argument(
        "--drafter",
        dest="drafters",
        action="append",
        default=None,
        metavar="[NAME=]MODEL",
        help=EvalConfig.model_fields["drafters"].description + " Repeat for several drafters.",
    )
    parser.add_argument(
        "--baselines",
        type=_baselines,
        default=None,
        metavar="LIST",
        help="comma-separated baselines from none (target alone) and ngram (prompt lookup); "
        "'' for no baseline (default: none,ngram)",
    )
