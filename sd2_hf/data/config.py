"""`DistillConfig`: the options of self-data distillation (`sd2 distill`, recipe section
`distill`), and which of them define the rows (`identity`, checked on resume)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2_hf.data.backends import Sampling
from sd2_hf.data.loaders import RowFormat
from sd2_hf.utils.models import Dtype

DEFAULT_META_PHRASES = [
    "reference answer",
    "reference response",
    "the original answer",
    "the original response",
    "as an ai",
    "as a language model",
]

DEFAULT_REWRITE_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a reference answer to the request above:\n\n"
    "{reference}\n\n"
    "Write your own answer to the request. Use the reference for facts where it helps, but "
    "answer in your own words and do not mention the reference."
)

# Settings that change which rows are produced or what they contain: resuming an output
# directory with different values would mix two datasets, so it is refused.
IDENTITY_FIELDS = (
    "target",
    "source",
    "format",
    "limit",
    "max_turns",
    "mode",
    "rewrite_template",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "filter_truncated",
    "meta_phrases",
    "max_conversation_tokens",
    "max_prompt_tokens",
    "backend",
    "dtype",
)


class DistillConfig(BaseModel):
    """Self-data distillation: which target regenerates which data, how, and where it goes."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="target model: Hub id, local path, or asset:<name>")
    source: str = Field(
        description="seed conversations: asset:<name>, a JSON/JSONL file, or a datasets dir"
    )
    output: str = Field(description="output directory (shards, journal, manifest)")
    format: RowFormat = Field("auto", description="source row form (auto: detected per row)")
    limit: int | None = Field(None, gt=0, description="use only the first N conversations")
    max_turns: int | None = Field(
        None, gt=0, description="keep at most N user turns per conversation (None: all)"
    )
    mode: Literal["regenerate", "rewrite"] = Field(
        "regenerate",
        description="regenerate: the target answers each prompt; rewrite: the target sees the "
        "original answer as a reference and writes its own (the original is kept when the "
        "rewrite fails a check)",
    )
    rewrite_template: str = Field(
        DEFAULT_REWRITE_TEMPLATE,
        description="rewrite mode: user message shown to the target, with {prompt} and {reference}",
    )
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (temperature > 0)")
    max_new_tokens: int = Field(512, gt=0, description="token limit of each generated turn")
    seed: int = Field(0, ge=0, description="sampling seed (per-request seeds derive from it)")
    filter_truncated: bool = Field(
        True, description="filter rows whose reply hit max_new_tokens (else keep them)"
    )
    meta_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_META_PHRASES),
        description="filter replies containing any of these phrases (case-insensitive)",
    )
    max_conversation_tokens: int | None = Field(
        None,
        gt=0,
        description="filter rows whose prompt plus reply exceeds this many tokens "
        "(prompts that cannot fit the model's context with max_new_tokens are always filtered)",
    )
    max_prompt_tokens: int | None = Field(
        None,
        gt=0,
        description="filter (as too_long) prompts longer than this many tokens before generating "
        "(saves the generation a later length limit would throw away)",
    )
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: in-process; vllm: OpenAI-compatible server(s)"
    )
    dtype: Dtype = Field(
        "auto",
        description="model dtype (both backends); with `auto` a vLLM server we start computes "
        "a float32 target in float32 on a CPU without bf16 instructions, else in vLLM's choice",
    )
    device: str | None = Field(None, description="transformers device (default: cuda if available)")
    batch_size: int = Field(8, gt=0, description="transformers: conversations per generate() call")
    concurrency: int = Field(32, gt=0, description="vllm: requests in flight at once (all servers)")
    server_urls: list[str] = Field(
        default_factory=list,
        description="vllm: existing server URLs (data-parallel fan-out); empty: start one server",
    )
    vllm_max_model_len: int | None = Field(
        None, gt=0, description="vllm: --max-model-len of the started server"
    )
    vllm_extra_args: list[str] = Field(
        default_factory=list, description="vllm: extra arguments of the started server"
    )
    vllm_startup_timeout: float = Field(600.0, gt=0, description="vllm: seconds to wait for start")
    request_timeout: float = Field(600.0, gt=0, description="vllm: seconds per request")
    max_retries: int = Field(3, ge=0, description="vllm: retries per request (with backoff)")
    backoff: float = Field(1.0, ge=0, description="vllm: first retry delay in seconds (doubles)")
    shard_size: int = Field(
        256, gt=0, description="rows per committed shard (the unit of work lost on a kill)"
    )
    overwrite: bool = Field(
        False, description="delete a previous distillation in `output` instead of resuming it"
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> DistillConfig:
        if self.backend == "transformers":
            vllm_only = {
                "server_urls": self.server_urls,
                "vllm_max_model_len": self.vllm_max_model_len,
                "vllm_extra_args": self.vllm_extra_args,
            }
            given = [k for k, v in vllm_only.items() if v]
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to backend='vllm' (backend is 'transformers')"
                )
        if self.server_urls and (self.vllm_max_model_len or self.vllm_extra_args):
            raise ValueError(
                "vllm_max_model_len/vllm_extra_args configure a server that sd2 starts; "
                "with server_urls the servers already run: configure them where they are started"
            )
        for url in self.server_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server URL {url!r} must start with http:// or https://")
        if self.mode == "rewrite":
            missing = [p for p in ("{prompt}", "{reference}") if p not in self.rewrite_template]
            if missing:
                raise ValueError(f"rewrite_template must contain {' and '.join(missing)}")
        if any(not p.strip() for p in self.meta_phrases):
            raise ValueError("meta_phrases must not contain empty phrases")
        return self

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_new_tokens, self.seed)

    def identity(self) -> dict[str, Any]:
        return self.model_dump(include=set(IDENTITY_FIELDS))
