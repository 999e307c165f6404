"""`sd2 export` (drafter checkpoint + metadata + model card) and `sd2 push` (Hub upload)."""

from __future__ import annotations

import argparse

from sd2_hf.export.config import ExportConfig
from sd2_hf.export.push import PushConfig
from sd2_hf.utils.schema_cli import add_command, model_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "export", _export, ExportConfig, positional=("drafter",))
    add_command(subparsers, "push", _push, PushConfig, positional=("path",))


def _export(args: argparse.Namespace) -> int:
    """export a sparse drafter (dense, w8a8, w4a16, fp8) with metadata and a model card

    Write a drafter checkpoint that loads with AutoModelForCausalLM and in vLLM: `dense` keeps
    the sparse weights as exact zeros in safetensors; `w8a8`, `w4a16` and `fp8` quantize them
    with llm-compressor into compressed-tensors. Adds sd2_drafter.json (sparsity before and
    after a round-trip, MACs, target, UAG, recipe, evaluation), a README.md model card and the
    generate(assistant_model=...) settings.
    """
    from sd2_hf.export.export import run_export

    run_export(model_from_args(ExportConfig, args))
    return 0


def _push(args: argparse.Namespace) -> int:
    """upload an export directory to the Hugging Face Hub

    Create the Hub repo if needed and upload the directory in one commit. The token comes from
    HF_TOKEN or `hf auth login` and is never printed.
    """
    from sd2_hf.export.push import run_push

    run_push(model_from_args(PushConfig, args))
    return 0
