"""`sd2 distill`: self-data distillation from the command line (options = `DistillConfig`)."""

from __future__ import annotations

import argparse
import logging

from sd2_hf.utils.schema_cli import add_model_arguments, model_from_args


def _run(args: argparse.Namespace) -> int:
    from sd2_hf.data.distill import DistillConfig, run_distill

    config = model_from_args(DistillConfig, args)
    # One INFO line per HTTP request would bury the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = run_distill(config)
    print(result.summary())
    # Non-zero so scripts notice rows still to be retried by rerunning the same command.
    return 0 if result.complete else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    from sd2_hf.data.distill import DistillConfig

    parser = subparsers.add_parser(
        "distill",
        help="regenerate a seed dataset with the target model (self-data distillation)",
        description="The target model regenerates the assistant turns of a seed dataset "
        "(multi-turn on-policy), on the transformers or the vLLM backend. Rerunning the same "
        "command resumes an interrupted run.",
    )
    add_model_arguments(parser, DistillConfig)
    parser.set_defaults(func=_run)
