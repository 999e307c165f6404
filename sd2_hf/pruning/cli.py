"""`sd2 prune` (one-shot pruning / layer-dropping baseline) and `sd2 macs` (MAC counter)."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import BaseModel, ConfigDict, Field

from sd2_hf.pruning.config import PruneConfig
from sd2_hf.utils.schema_cli import add_command, model_from_args


class MacsOptions(BaseModel):
    """Options of `sd2 macs`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint dir, Hub id or `asset:<name>`")
    context_length: int = Field(512, gt=0, description="context length of the decoding step")


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "prune", _prune, PruneConfig, positional=("model",))
    macs = add_command(subparsers, "macs", _macs, MacsOptions, positional=("model",))
    # Output format only, not an option of the count: kept out of the schema.
    macs.add_argument("--json", action="store_true", help="print the full report as JSON")


def _prune(args: argparse.Namespace) -> int:
    """one-shot pruning with an llm-compressor recipe, layer dropping, or MLP width pruning

    Prune a model with an llm-compressor recipe (SparseGPT, Wanda, magnitude; shipped:
    recipes/pruning/), drop consecutive decoder blocks by angular distance (--method layers
    --drop N | --target-macs-fraction F), or keep the MLP channels with the largest
    activations, a smaller dense config (--method width --mlp-keep F).
    """
    from sd2_hf.pruning.runner import run_prune

    config = model_from_args(PruneConfig, args)
    result = run_prune(config)
    print(result.summary())
    return 0


def _macs(args: argparse.Namespace) -> int:
    """MACs of one decoding step (sparse-aware), from a checkpoint

    Count multiply-accumulates of one decoding step at a context length: linear layers as in x
    out x (1 - sparsity), plus attention; per decoder block.
    """
    from sd2_hf.evaluation.macs import count_macs

    options = model_from_args(MacsOptions, args)
    try:
        report = count_macs(options.model, options.context_length)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot count MACs of {options.model!r}: {err}") from None
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(f"{options.model}: one decoding step at context length {options.context_length}")
        print(report.table())
    return 0
