"""`ServeConfig`: the options of `sd2 serve`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2_hf.utils.models import Dtype


class ServeConfig(BaseModel):
    """Options of `sd2 serve` (target, drafter, speculative length, server settings)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="target model: checkpoint dir, Hub id or asset:<name>")
    drafter: str | None = Field(
        None,
        description="draft model: checkpoint dir, Hub id or asset:<name>; none = plain decoding",
    )
    num_draft_tokens: int | None = Field(
        None,
        gt=0,
        le=64,
        description="draft tokens per step (K); default: the drafter's num_assistant_tokens",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int | None = Field(None, gt=0, lt=65536, description="port; default: a free one")
    dtype: Dtype = Field(
        "auto",
        description="weight and activation dtype; `auto`: vLLM's choice, but a float32 "
        "checkpoint stays float32 on a CPU without bf16 instructions (vLLM would emulate bf16)",
    )
    max_model_len: int | None = Field(
        None, gt=0, description="context length; default: the model's"
    )
    startup_timeout: float = Field(600, gt=0, description="seconds to wait for the server")
    log_path: str | None = Field(None, description="server log file; default: a temporary file")
    vllm_args: str = Field(
        "", description="more vLLM server options as one string, e.g. --vllm-args='--seed 1'"
    )

    @model_validator(mode="after")
    def _draft_length_needs_drafter(self) -> ServeConfig:
        if self.num_draft_tokens is not None and self.drafter is None:
            raise ValueError("num_draft_tokens is only allowed with a drafter: add --drafter")
        return self
