"""`train.peft` / `sd2 train --peft`: the sparse LoRA options of the training stage.

Kept apart from `sparse_lora` (which imports torch and PEFT) so the recipe schema and the CLI
stay light; `to_lora_config()` builds the `peft.LoraConfig` when training starts.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from peft import LoraConfig

# LoraConfig fields this schema sets itself, or that sparse LoRA cannot honour (refused with the
# reason when given in `lora_args`).
_OWN = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "task_type")
_UNSUPPORTED = {
    "use_dora": "DoRA rescales the merged weight per column, which is not a masked delta",
    "lora_bias": "a bias adapter is not part of the masked weight delta",
    "target_parameters": "sparse LoRA adapts whole nn.Linear layers",
}


class SparseLoraOptions(BaseModel):
    """Train a sparsity-preserving LoRA adapter (delta masked with the base weights' zeros)
    instead of all weights; the merged drafter keeps every pruned zero."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: scale = alpha / r")
    lora_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on the adapter input; 0 lets each layer run one matmul with "
        "W + M*(BA), > 0 needs a second one",
    )
    target_modules: list[str] = Field(
        ["all-linear"],
        description="layers that get an adapter: `all-linear` (every linear layer but the output "
        "head), module-name suffixes (q_proj v_proj ...) or one `re:<regex>` on module names",
    )
    use_rslora: bool = Field(False, description="rank-stabilized scale alpha / sqrt(r)")
    lora_args: dict[str, Any] = Field(
        default_factory=dict, description="further peft.LoraConfig arguments, passed as given"
    )

    @model_validator(mode="after")
    def _check(self) -> SparseLoraOptions:
        regexes = [t for t in self.target_modules if t.startswith("re:")]
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ValueError("target_modules: `all-linear` stands alone; drop the other names")
        if regexes and len(self.target_modules) > 1:
            raise ValueError(
                "target_modules: give one `re:<regex>` or a list of module-name suffixes, not both"
            )
        for key in self.lora_args:
            if key in _OWN:
                raise ValueError(f"lora_args.{key}: set it as `peft.{key}` instead")
            if key in _UNSUPPORTED:
                raise ValueError(f"lora_args.{key} is not supported: {_UNSUPPORTED[key]}")
        if self.lora_args:
            from peft import LoraConfig

            known = {f.name for f in dataclasses.fields(LoraConfig)}
            if unknown := sorted(set(self.lora_args) - known):
                raise ValueError(
                    f"lora_args: {unknown} are not peft.LoraConfig fields; see "
                    "https://huggingface.co/docs/peft/package_reference/lora"
                )
        return self

    def to_lora_config(self) -> LoraConfig:
        from peft import LoraConfig

        targets: str | list[str] = self.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        elif targets[0].startswith("re:"):
            targets = targets[0][3:]  # PEFT reads a string as a regex on module names
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            use_rslora=self.use_rslora,
            task_type="CAUSAL_LM",
            **self.lora_args,
        )
