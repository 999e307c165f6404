"""Options and result of the pruning stage (`sd2 prune`, recipe section `prune`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2_hf.utils.models import Dtype

DEFAULT_RECIPE = "sparsegpt-50"


class PruneInputError(ValueError):
    """Bad input to the pruning stage: the message says what was wrong and what is allowed."""


class PruneConfig(BaseModel):
    """One-shot pruning with an llm-compressor recipe, or the layer-dropping baseline."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="model to prune: Hub id, local checkpoint dir or `asset:<name>`",
    )
    output: str = Field(description="output directory (checkpoint + reports)")
    method: Literal["oneshot", "layers", "width"] = Field(
        "oneshot",
        description="`oneshot`: llm-compressor recipe (SparseGPT, Wanda, magnitude, ...); "
        "`layers`: drop consecutive decoder blocks chosen by angular distance; `width`: keep "
        "the MLP channels with the largest activations (Minitron-style), a smaller dense config",
    )
    recipe: str = Field(
        DEFAULT_RECIPE,
        description="llm-compressor recipe: a YAML file or the name of a shipped recipe "
        "(see `recipes/pruning/`); method `oneshot` only",
    )
    sparsity: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="override the sparsity of every pruning modifier in the recipe",
    )
    dataset: str | None = Field(
        None,
        description="calibration conversations: a distilled dataset dir, JSON/JSONL file or "
        "`asset:<name>` (any source `sd2_hf.data.loaders` reads); chat template applied",
    )
    num_samples: int = Field(64, gt=0, description="number of calibration conversations")
    max_seq_length: int = Field(512, gt=0, description="calibration tokens per sample (truncated)")
    drop: int | None = Field(
        None, gt=0, description="method `layers`: number of consecutive blocks to drop"
    )
    target_macs_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="method `layers`: drop the fewest blocks that bring MACs (one decoding "
        "step at context 512) down to at most this fraction of the original",
    )
    mlp_keep: float | None = Field(
        None,
        gt=0,
        le=1,
        description="method `width`: fraction of every MLP's intermediate channels to keep "
        "(rounded to a multiple of 32)",
    )
    draft_vocab_size: int | None = Field(
        None,
        gt=0,
        description="cheaper head: keep the head rows of the N tokens most frequent in the "
        "assistant turns of `dataset` (special tokens always kept) and make the rest impossible "
        "(logit below -1e4 at every position, through one hidden channel cut from the layers; "
        "head untied; same tokenizer, vocabulary size and architecture, so it deploys wherever "
        "the drafter does)",
    )
    head_sparsity: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="cheaper head: prune the (untied) head to this unstructured sparsity with "
        "SparseGPT, calibrated on `dataset` like the other layers",
    )
    dtype: Dtype = Field("auto", description="dtype to load the model in (`auto`: as stored)")
    overwrite: bool = Field(False, description="replace an existing output directory")

    @model_validator(mode="after")
    def _check_method_options(self) -> PruneConfig:
        head = [k for k in ("draft_vocab_size", "head_sparsity") if getattr(self, k) is not None]
        if head and self.dataset is None:
            raise ValueError(
                f"{head} need `dataset`: the distilled conversations that choose the draft "
                "vocabulary / calibrate the head"
            )
        if self.method == "layers":
            if (self.drop is None) == (self.target_macs_fraction is None):
                raise ValueError(
                    "method 'layers' needs exactly one of `drop` (number of blocks) or "
                    "`target_macs_fraction` (0 < F < 1)"
                )
            if self.dataset is None:
                raise ValueError(
                    "method 'layers' needs `dataset`: calibration conversations to measure "
                    "angular distances on"
                )
            set_for_oneshot = {"recipe", "sparsity"} & self.model_fields_set
            if set_for_oneshot:
                raise ValueError(
                    f"{sorted(set_for_oneshot)} apply to method 'oneshot' only; "
                    "method 'layers' takes `drop` or `target_macs_fraction`"
                )
        elif self.drop is not None or self.target_macs_fraction is not None:
            raise ValueError(
                "`drop` and `target_macs_fraction` apply to method 'layers' only "
                "(use `method: layers`)"
            )
        if self.method == "width":
            if self.mlp_keep is None or self.dataset is None:
                raise ValueError(
                    "method 'width' needs `mlp_keep` (fraction of MLP channels kept, 0 < F <= 1) "
                    "and `dataset` (calibration conversations to rank the channels on)"
                )
            set_for_oneshot = {"recipe", "sparsity"} & self.model_fields_set
            if set_for_oneshot:
                raise ValueError(
                    f"{sorted(set_for_oneshot)} apply to method 'oneshot' only; "
                    "method 'width' takes `mlp_keep`"
                )
        elif self.mlp_keep is not None:
            raise ValueError("`mlp_keep` applies to method 'width' only (use `method: width`)")
        return self


@dataclass
class PruneResult:
    """What `run_prune` produced; `summary()` is the one-screen report the CLI prints."""

    output: str
    method: str
    prune_seconds: float
    num_layers: int
    seconds: float = 0.0  # whole run: loading, calibration, pruning, saving
    global_sparsity: float = 0.0
    structure: str = "dense"
    recipe: str | None = None
    calibration_samples: int = 0
    dropped_layers: list[int] = field(default_factory=list)
    macs_fraction: float | None = None
    intermediate_size: list[int] = field(default_factory=list)  # width: [before, after]
    head: dict = field(default_factory=dict)  # what draft_vocab_size / head_sparsity did

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"pruned model written to {self.output}", f"  method            {self.method}"]
        if self.method == "oneshot":
            lines += [
                f"  recipe            {self.recipe}",
                f"  global sparsity   {self.global_sparsity:.2%} ({self.structure})",
            ]
        elif self.method == "width":
            before, after = self.intermediate_size
            lines += [
                f"  MLP channels      {after} of {before} kept per block",
                f"  MACs kept         {self.macs_fraction:.2%}",
            ]
        else:
            lines += [
                f"  dropped blocks    {self.dropped_layers}",
                f"  MACs kept         {self.macs_fraction:.2%}",
            ]
        if self.head:
            lines.append(f"  head              {_head_line(self.head)}")
        lines += [
            f"  decoder layers    {self.num_layers}",
            f"  calibration rows  {self.calibration_samples}",
            f"  time              {self.prune_seconds:.1f} s pruning, {self.seconds:.1f} s total",
        ]
        return "\n".join(lines)


def _head_line(head: dict) -> str:
    parts = []
    if "draft_vocab_size" in head:
        parts.append(
            f"draft vocabulary {head['draft_vocab_size']} of {head['vocab_size']} tokens "
            f"({head['coverage']:.2%} of the data's assistant tokens)"
        )
    if "head_sparsity" in head:
        parts.append(f"SparseGPT {head['head_sparsity']:.0%}")
    return ", ".join(parts) + f"; head sparsity {head['zero_fraction']:.2%}"
