"""`ExportConfig` (`sd2 export`, recipe section `export`) and the export stage's constants."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2_hf.utils.models import Dtype

METADATA_FILE = "sd2_drafter.json"
DEFAULT_NUM_DRAFT_TOKENS = 4
ExportFormat = Literal["dense", "w8a8", "w4a16", "fp8"]

# W4A16 quantizes groups of input columns; the preset's 128 does not divide every model's widths
# (SmolLM2's hidden size is 576), and llm-compressor refuses such layers.
W4A16_GROUP_SIZES = (128, 64, 32)


class ExportError(ValueError):
    """Bad export input or an impossible format: the message says what is wrong and what works."""


class ExportConfig(BaseModel):
    """Export a (sparse) drafter checkpoint with its metadata and model card."""

    model_config = ConfigDict(extra="forbid")

    drafter: str = Field(description="drafter checkpoint: local dir, Hub id or `asset:<name>`")
    output: str = Field(description="export directory (created; must not exist unless --overwrite)")
    format: ExportFormat = Field(
        "dense",
        description="`dense`: the sparse weights as plain safetensors (exact zeros); `w8a8` "
        "(int8 weights and activations), `w4a16` (int4 weights) and `fp8` (FP8 weights and "
        "dynamic activations): compressed-tensors checkpoints made with llm-compressor",
    )
    target: str | None = Field(
        None,
        description="target model the drafter was made for (Hub id, dir or `asset:<name>`); "
        "decides whether UAG is needed; default: the target of --eval-json",
    )
    eval_json: list[str] = Field(
        default_factory=list,
        description="`eval.json` files from `sd2 eval` (e.g. one per draft length K): their MAL "
        "tables go into the model card and the best K into generation_config.json",
    )
    eval_drafter: str | None = Field(
        None,
        description="name of this drafter in the eval files (default: the entry whose path is "
        "the drafter, else the only model drafter)",
    )
    num_draft_tokens: int | None = Field(
        None,
        gt=0,
        le=64,
        description="draft length K written to generation_config.json (`num_assistant_tokens`); "
        f"default: the K of the best run in --eval-json, else {DEFAULT_NUM_DRAFT_TOKENS}",
    )
    assistant_confidence_threshold: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="`assistant_confidence_threshold` for transformers assisted generation; 0 "
        "drafts all K tokens every step (as vLLM does and as MAL is measured)",
    )
    dtype: Dtype = Field(
        "auto", description="dtype of the written (non-quantized) weights; `auto`: as stored"
    )
    targets: list[str] = Field(
        default_factory=lambda: ["Linear"],
        description="layers to quantize and to report sparsity for (llm-compressor syntax: "
        "class name, module name or `re:<regex>`)",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["re:.*lm_head"],
        description="layers left alone (`re:.*lm_head` keeps the head dense; plain `lm_head` "
        "does not match in llm-compressor 0.14)",
    )
    group_size: int | None = Field(
        None,
        gt=0,
        description="w4a16 only: input columns per quantization group; default: the first of "
        f"{', '.join(map(str, W4A16_GROUP_SIZES))} that divides every quantized layer's input width",
    )
    context_length: int = Field(512, gt=0, description="context length for the MAC counts")
    base_model: str | None = Field(
        None,
        description="Hub id of the model the drafter was made from (model card `base_model`); "
        "default: the drafter when it is a Hub id",
    )
    license: str = Field("apache-2.0", description="license id for the model card")
    datasets: list[str] = Field(
        default_factory=list, description="Hub ids of the seed datasets (model card `datasets`)"
    )
    model_name: str | None = Field(
        None, description="title of the model card (default: the output directory name)"
    )
    repo_id: str | None = Field(
        None,
        description="Hub repo the card's usage snippets name (`sd2 push` re-renders the card "
        "with the repo it pushes to)",
    )
    overwrite: bool = Field(False, description="replace an existing export in --output")

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if self.eval_drafter is not None and not self.eval_json:
            raise ValueError("eval_drafter names an entry of --eval-json files: pass --eval-json")
        if self.group_size is not None and self.format != "w4a16":
            raise ValueError("group_size applies to format 'w4a16' only")
        if not self.targets:
            raise ValueError("targets must name at least one layer pattern, e.g. ['Linear']")
        if Path(self.output).expanduser().resolve() == Path(self.drafter).expanduser().resolve():
            raise ValueError("output must be a new directory, not the drafter checkpoint itself")
        return self
