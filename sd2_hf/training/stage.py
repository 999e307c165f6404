"""The training stage (`sd2 train`, recipe section `train`): fine-tune a pruned drafter with
`SD2Trainer` on (self-distilled) conversations, resumably."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2_hf.data.loaders import RowFormat
from sd2_hf.training.lora_options import SparseLoraOptions
from sd2_hf.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
REPORT_FILE = "train_report.json"
ADAPTER_DIR = "adapter"


class TrainStageConfig(BaseModel):
    """Options of the training stage; SD2Config fields not listed here go in `trainer_args`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="drafter to fine-tune: checkpoint dir (e.g. `sd2 prune` output), Hub id or `asset:<name>`"
    )
    dataset: str = Field(
        description="training conversations: a `sd2 distill` output dir, JSON/JSONL file, `datasets` dir or `asset:<name>`"
    )
    output: str = Field(
        description="output directory (final drafter, checkpoints, train_report.json)"
    )
    # The loaders' own Literal, so the CLI offers exactly the values they accept.
    dataset_format: RowFormat = Field("auto", description="row format of `dataset`")
    limit: int | None = Field(None, gt=0, description="use at most this many conversations")
    teacher: str | None = Field(
        None, description="target model for token-level distillation (needs distill_loss != none)"
    )
    distill_loss: Literal["none", "fkl", "rkl", "jsd", "tvd"] = Field(
        "none", description="token-level distillation loss against `teacher`"
    )
    distill_alpha: float = Field(1.0, ge=0, description="loss = CE + alpha * divergence")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="beta of the generalized JSD")
    distill_temperature: float = Field(
        1.0, gt=0, description="softmax temperature of the divergence"
    )
    num_train_epochs: float = Field(
        1.0, gt=0, description="epochs over the dataset (ignored when max_steps > 0)"
    )
    max_steps: int = Field(-1, description="optimizer steps; -1: use num_train_epochs")
    learning_rate: float = Field(2e-5, gt=0, description="peak learning rate")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name")
    warmup_steps: float = Field(
        0.05, ge=0, description="warm-up steps; a value below 1 is a fraction of all steps"
    )
    per_device_train_batch_size: int = Field(4, gt=0, description="micro-batch size per device")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="micro-batches per optimizer step"
    )
    max_length: int = Field(1024, gt=0, description="tokens per conversation (truncated)")
    bf16: bool = Field(False, description="bf16 mixed precision")
    seed: int = Field(0, description="random seed")
    save_steps: int = Field(200, gt=0, description="checkpoint every N steps (resume point)")
    logging_steps: int = Field(10, gt=0, description="log every N steps")
    mask_targets: list[str] = Field(["Linear"], description="modules whose masks are held fixed")
    mask_ignore: list[str] = Field(["re:.*lm_head"], description="modules never masked")
    peft: SparseLoraOptions | None = Field(
        None,
        description="train a sparse LoRA adapter instead of all weights; the output is still "
        "the merged drafter (zeros exact), the adapter goes to OUTPUT/adapter",
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict, description="further SD2Config/SFTConfig arguments, passed as given"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainStageConfig:
        if self.distill_loss != "none" and not self.teacher:
            raise ValueError(
                f"distill_loss={self.distill_loss!r} needs `teacher` (the target model)"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (use epochs) or > 0, got {self.max_steps}")
        return self


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

    from sd2_hf.data.loaders import load_conversations
    from sd2_hf.pruning.masks import sparsity_report
    from sd2_hf.training.config import SD2Config
    from sd2_hf.training.trainer import SD2Trainer
    from sd2_hf.utils.models import resolve_model_path

    out = Path(config.output)
    ckpt_dir = out / CHECKPOINTS_DIR
    start = time.time()

    # Both models are checked before the dataset is read and before anything is written.
    model_path = resolve_model_path(config.model)
    teacher_path = None
    if config.teacher and config.distill_loss != "none":
        teacher_path = resolve_model_path(config.teacher)
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
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    sparsity_before = sparsity_report(model, config.mask_targets, config.mask_ignore)
    teacher = None
    if teacher_path:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)

    # Under `accelerate launch` on a machine without GPUs, TrainingArguments set up no process
    # group of their own unless told to use the CPU with gloo: each process then trains alone,
    # believing it is rank 0, and all of them write the same output.
    cpu_processes = {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        cpu_processes = {"use_cpu": True, "ddp_backend": "gloo"}
    args = SD2Config(
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
        save_total_limit=2,
        logging_steps=config.logging_steps,
        report_to="none",
        distill_loss=config.distill_loss,
        distill_alpha=config.distill_alpha,
        jsd_beta=config.jsd_beta,
        distill_temperature=config.distill_temperature,
        mask_targets=config.mask_targets,
        mask_ignore=config.mask_ignore,
        **{**cpu_processes, **config.trainer_args},
    )
    trainer = SD2Trainer(
        model,
        args=args,
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
    if config.peft:
        # The adapter for reuse, then the merged drafter as the stage's output, so export, eval
        # and vLLM load it like any other drafter.
        trainer.save_model(str(out / ADAPTER_DIR))
        trainer.model = trainer.model.merge_and_unload()
    # Collective under FSDP (gathers the full state dict); transformers writes on rank 0 only.
    trainer.save_model(str(out))
    state = trainer.accelerator.state
    # Every rank's recorded zeros (its local shard under FSDP2), before rank 0 writes anything.
    masked_per_rank = trainer.accelerator.gather(
        torch.tensor([trainer.mask_callback.num_masked])
    ).tolist()
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return {}
    tokenizer.save_pretrained(str(out))
    # Measured on the checkpoint as written: the in-memory weights may be shards (FSDP2).
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    sparsity_after = sparsity_report(saved, config.mask_targets, config.mask_ignore)
    del saved
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    report = {
        "model": config.model,
        "dataset": config.dataset,
        "num_conversations": len(rows),
        "loader_skipped": dict(loaded.skipped),
        "resumed_from": resume,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "distill_loss": config.distill_loss,
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
