"""`TrainStageConfig`: the options of the training stage (`sd2 train`, recipe section `train`).

The trainer's own configuration, `SD2Config` (a TRL `SFTConfig`), is in `sd2_config.py`; the
stage passes it the fields below and `trainer_args`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2_hf.data.loaders import RowFormat
from sd2_hf.training.lora_options import SparseLoraOptions


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
    hidden_distill_weight: float = Field(
        0.0,
        ge=0,
        description="weight of layer-wise hidden-state distillation to `teacher` (SquareHead; "
        "drafters pruned from the target; needs distill_loss)",
    )
    on_policy_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="on-policy distillation: share of batches replaced by the drafter's own "
        "continuations of their prompts, scored by `teacher` (needs distill_loss)",
    )
    on_policy_max_new_tokens: int = Field(
        64, gt=0, description="tokens the drafter generates per on-policy sequence"
    )
    on_policy_temperature: float = Field(
        1.0, ge=0, description="sampling temperature of on-policy continuations (0: greedy)"
    )
    on_policy_refresh_steps: int = Field(
        1,
        ge=0,
        description="weights that generate on-policy continuations: 1 current, N a copy "
        "refreshed every N steps, 0 the weights before training",
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
        if self.hidden_distill_weight > 0 and self.distill_loss == "none":
            raise ValueError(
                "hidden_distill_weight > 0 distils against the teacher: set distill_loss and teacher"
            )
        if self.on_policy_fraction > 0 and self.distill_loss == "none":
            raise ValueError(
                "on_policy_fraction > 0 scores the drafter's continuations with the teacher: "
                "set distill_loss (fkl, rkl, jsd or tvd) and teacher"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (use epochs) or > 0, got {self.max_steps}")
        return self
