"""The training stage (`sd2 train`, recipe section `train`): fine-tune a pruned drafter with
`SD2Trainer` on (self-distilled) conversations, resumably."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd2_hf.training.config import TrainStageConfig
from sd2_hf.utils.io import atomic_write_json

if TYPE_CHECKING:
    from sd2_hf.data.loaders import LoadResult
    from sd2_hf.training.sd2_config import SD2Config
    from sd2_hf.training.trainer import SD2Trainer

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
REPORT_FILE = "train_report.json"
ADAPTER_DIR = "adapter"


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def run_train(config: TrainStageConfig) -> dict[str, Any]:
    """Fine-tune the drafter; resumes from the newest checkpoint in `<output>/checkpoints`.

    Writes the final drafter (safetensors + tokenizer) to `output` and `train_report.json`;
    under `accelerate launch` every process trains and rank 0 writes (other ranks return `{}`).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd2_hf.pruning.masks import sparsity_report
    from sd2_hf.training.trainer import SD2Trainer, ignore_for_masks
    from sd2_hf.utils.models import resolve_model_path

    out = Path(config.output)
    ckpt_dir = out / CHECKPOINTS_DIR
    start = time.time()

    # Both models are checked before the dataset is read and before anything is written.
    model_path = resolve_model_path(config.model)
    teacher_path = None
    if config.teacher and config.distill_loss != "none":
        teacher_path = resolve_model_path(config.teacher)
    rows, loaded = _conversations_with_replies(config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # What the trainer holds: a sparse output head is counted too (`ignore_for_masks`).
    mask_ignore = ignore_for_masks(model, config.mask_ignore)
    sparsity_before = sparsity_report(model, config.mask_targets, mask_ignore)
    teacher = None
    if teacher_path:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)

    trainer = SD2Trainer(
        model,
        args=_trainer_args(config, ckpt_dir),
        teacher_model=teacher,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=config.peft.to_lora_config() if config.peft else None,
    )
    resume = _last_checkpoint(ckpt_dir)
    if resume:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    masked_per_rank = _save_drafter(trainer, config, out)
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return {}
    tokenizer.save_pretrained(str(out))
    # Measured on the checkpoint as written: the in-memory weights may be shards (FSDP2).
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    sparsity_after = sparsity_report(saved, config.mask_targets, mask_ignore)
    del saved
    report = _train_report(
        config,
        trainer,
        num_conversations=len(rows),
        loader_skipped=dict(loaded.skipped),
        resumed_from=resume,
        training_loss=result.training_loss,
        trainable=trainable,
        sparsity_before=sparsity_before,
        sparsity_after=sparsity_after,
        masked_per_rank=masked_per_rank,
        start=start,
    )
    atomic_write_json(out / REPORT_FILE, report)
    trainer.accelerator.wait_for_everyone()
    summary = {
        k: report[k]
        for k in (
            "global_step",
            "train_loss",
            "sparsity_before",
            "sparsity_after",
            "structure",
            "wall_time_s",
        )
    }
    logger.info("training done: %s", json.dumps(summary))
    return report


def _conversations_with_replies(
    config: TrainStageConfig,
) -> tuple[list[dict[str, Any]], LoadResult]:
    """The training rows (`{"messages": ...}`, only conversations with an assistant turn) and
    the loader's result; a dataset with none raises `ValueError` naming what was read."""
    from sd2_hf.data.loaders import load_conversations

    loaded = load_conversations(config.dataset, format=config.dataset_format, limit=config.limit)
    rows = [
        {"messages": r["messages"]}
        for r in loaded.rows
        if any(m["role"] == "assistant" for m in r["messages"])
    ]
    if not rows:
        raise ValueError(
            f"{config.dataset} has no conversation with an assistant turn to train on "
            f"({loaded.total} rows read, skipped: {dict(loaded.skipped)})"
        )
    return rows, loaded


def _trainer_args(config: TrainStageConfig, ckpt_dir: Path) -> SD2Config:
    """The `SD2Config` (TrainingArguments plus the SD² losses) of the stage's settings, with
    checkpoints under `ckpt_dir`; `trainer_args` override any of them."""
    import torch

    from sd2_hf.training.sd2_config import SD2Config

    # Under `accelerate launch` on a machine without GPUs, TrainingArguments set up no process
    # group of their own unless told to use the CPU with gloo: each process then trains alone,
    # believing it is rank 0, and all of them write the same output.
    cpu_settings = {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        cpu_settings = {"use_cpu": True, "ddp_backend": "gloo"}
    # bf16 (autocast) on a machine without an accelerator: TrainingArguments refuse it ("Your
    # setup doesn't support bf16/gpu") unless told to use the CPU, which is what is meant.
    if config.bf16 and not torch.cuda.is_available():
        cpu_settings["use_cpu"] = True
    return SD2Config(
        output_dir=str(ckpt_dir),
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        bf16=config.bf16,
        seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        logging_steps=config.logging_steps,
        report_to="none",
        distill_loss=config.distill_loss,
        distill_alpha=config.distill_alpha,
        jsd_beta=config.jsd_beta,
        distill_temperature=config.distill_temperature,
        hidden_distill_weight=config.hidden_distill_weight,
        on_policy_fraction=config.on_policy_fraction,
        on_policy_max_new_tokens=config.on_policy_max_new_tokens,
        on_policy_temperature=config.on_policy_temperature,
        on_policy_refresh_steps=config.on_policy_refresh_steps,
        mask_targets=config.mask_targets,
        mask_ignore=config.mask_ignore,
        # The newest two checkpoints unless trainer_args keep more (None: every one, for a
        # study's learning-curve drafters that evaluate them).
        **{"save_total_limit": 2, **cpu_settings, **config.trainer_args},
    )


def _save_drafter(trainer: SD2Trainer, config: TrainStageConfig, out: Path) -> list[int]:
    """Write the trained drafter to `out` (with `--peft`, the adapter to `out/adapter` and the
    merged drafter to `out`) on every rank; returns each rank's count of masked zeros."""
    import torch

    if config.peft:
        # The adapter for reuse, then the merged drafter as the stage's output, so export, eval
        # and vLLM load it like any other drafter.
        trainer.save_model(str(out / ADAPTER_DIR))
        trainer.model = trainer.model.merge_and_unload()
    # Collective under FSDP (gathers the full state dict); transformers writes on rank 0 only.
    trainer.save_model(str(out))
    # Every rank's recorded zeros (its local shard under FSDP2), before rank 0 writes anything.
    return trainer.accelerator.gather(torch.tensor([trainer.mask_callback.num_masked])).tolist()


def _train_report(
    config: TrainStageConfig,
    trainer: SD2Trainer,
    *,
    num_conversations: int,
    loader_skipped: dict[str, int],
    resumed_from: str | None,
    training_loss: float,
    trainable: int,
    sparsity_before: dict[str, Any],
    sparsity_after: dict[str, Any],
    masked_per_rank: list[int],
    start: float,
) -> dict[str, Any]:
    """The content of train_report.json: settings, losses, sparsity and the processes."""
    state = trainer.accelerator.state
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "model": config.model,
        "dataset": config.dataset,
        "num_conversations": num_conversations,
        "loader_skipped": loader_skipped,
        "resumed_from": resumed_from,
        "global_step": trainer.state.global_step,
        "train_loss": training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "distill_loss": config.distill_loss,
        "on_policy_fraction": config.on_policy_fraction,
        "hidden_distill_weight": config.hidden_distill_weight,
        "peft": config.peft.model_dump() if config.peft else None,
        "trainable_parameters": trainable,
        "sparsity_before": sparsity_before["global_sparsity"],
        "sparsity_after": sparsity_after["global_sparsity"],
        "structure": sparsity_after["structure"],
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type).removeprefix("DistributedType."),
        "masked_zeros_per_rank": masked_per_rank,
        "wall_time_s": round(time.time() - start, 2),
        "log_history": trainer.state.log_history,
    }
