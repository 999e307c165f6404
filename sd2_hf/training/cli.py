"""`sd2 train`: fine-tune a pruned drafter with SD2Trainer (masks held exactly)."""

from __future__ import annotations

import argparse

from sd2_hf.training.config import TrainStageConfig
from sd2_hf.utils.schema_cli import add_command, model_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    skip = ("trainer_args", "peft.lora_args")
    add_command(subparsers, "train", _train, TrainStageConfig, positional=("model",), skip=skip)


def _train(args: argparse.Namespace) -> int:
    """fine-tune a pruned drafter on (self-distilled) conversations, masks held fixed

    Sparse fine-tuning with SD2Trainer (TRL SFTTrainer + SparsityMaskCallback). Resumes from the
    newest checkpoint in OUTPUT/checkpoints. For several processes or GPUs run it under
    `accelerate launch -m sd2_hf.cli train ...`.
    """
    from sd2_hf.training.stage import run_train

    report = run_train(model_from_args(TrainStageConfig, args))
    if not report:  # a non-main process of `accelerate launch`: rank 0 reports
        return 0
    print(
        f"\ntrained {report['global_step']} steps in {report['wall_time_s']:.0f}s: "
        f"loss {report['first_logged_loss']} -> {report['last_logged_loss']}, "
        f"sparsity {report['sparsity_before']:.4f} -> {report['sparsity_after']:.4f} "
        f"({report['structure']}); drafter written to the output dir"
        + ("\n(sparse LoRA: merged; the adapter is in OUTPUT/adapter)" if report["peft"] else "")
    )
    return 0
