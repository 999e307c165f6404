"""`sd2 distill`: self-data distillation from the command line (options = `DistillConfig`)."""

from __future__ import annotations

import argparse
import logging

from sd2_hf.utils.schema_cli import add_command, model_from_args


def _run(args: argparse.Namespace) -> int:
    """regenerate a seed dataset with the target model (self-data distillation)

    The target model regenerates the assistant turns of a seed dataset (multi-turn on-policy),
    on the transformers or the vLLM backend. Rerunning the same command resumes an interrupted
    run.
    """
    from sd2_hf.data.config import DistillConfig
    from sd2_hf.data.distill import run_distill

    config = model_from_args(DistillConfig, args)
    # One INFO line per HTTP request would bury the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = run_distill(config)
    print(result.summary())
    # Non-zero so scripts notice rows still to be retried by rerunning the same command.
    return 0 if result.complete else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    from sd2_hf.data.config import DistillConfig

    add_command(subparsers, "distill", _run, DistillConfig)
