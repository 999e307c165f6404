"""`sd2 export` (drafter checkpoint + metadata + model card) and `sd2 push` (Hub upload)."""

from __future__ import annotations

import argparse

from sd2_hf.export.export import ExportConfig
from sd2_hf.export.push import PushConfig
from sd2_hf.utils.schema_cli import add_model_arguments, model_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a sparse drafter (dense, w8a8, w4a16, fp8) with metadata and a model card",
        description="Write a drafter checkpoint that loads with AutoModelForCausalLM and in vLLM: "
        "`dense` keeps the sparse weights as exact zeros in safetensors; `w8a8`, `w4a16` and "
        "`fp8` quantize them with llm-compressor into compressed-tensors. Adds sd2_drafter.json "
        "(sparsity before and after a round-trip, MACs, target, UAG, recipe, evaluation), a "
        "README.md model card and the generate(assistant_model=...) settings.",
    )
    add_model_arguments(export, ExportConfig, positional=("drafter",))
    export.set_defaults(func=_export)

    push = subparsers.add_parser(
        "push",
        help="upload an export directory to the Hugging Face Hub",
        description="Create the Hub repo if needed and upload the directory in one commit. The "
        "token comes from HF_TOKEN or `hf auth login` and is never printed.",
    )
    add_model_arguments(push, PushConfig, positional=("path",))
    push.set_defaults(func=_push)


def _export(args: argparse.Namespace) -> int:
    from sd2_hf.export.export import run_export

    run_export(model_from_args(ExportConfig, args))
    return 0


def _push(args: argparse.Namespace) -> int:
    from sd2_hf.export.push import run_push

    run_push(model_from_args(PushConfig, args))
    return 0
