"""`SD2Config`: TRL's `SFTConfig` plus the options of sparse, self-distilled drafter training."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from sd2_hf.pruning.masks import DEFAULT_IGNORE, DEFAULT_TARGETS
from sd2_hf.training.losses import DIVERGENCES

DISTILL_LOSSES = ("none", *DIVERGENCES)
ON_POLICY_GENERATORS = ("transformers", "vllm")


def _trains_on_cpu(use_cpu: bool) -> bool:
    """Whether training will run on the CPU (told so, or no CUDA, XPU or MPS device)."""
    import torch

    if use_cpu:
        return True
    accelerators = (torch.cuda, getattr(torch, "xpu", None), torch.backends.mps)
    return not any(a is not None and a.is_available() for a in accelerators)


@dataclass
class SD2Config(SFTConfig):
    r"""
    Configuration for [`SD2Trainer`]: everything of [`~trl.SFTConfig`], plus

    Parameters:
        mask_targets (`list[str]`, defaults to `["Linear"]`):
            Modules whose sparsity masks are held fixed, in llm-compressor target syntax: a class
            name, an exact module name, or `re:<regex>` on module names.
        mask_ignore (`list[str]`, defaults to `["re:.*lm_head"]`):
            Modules never masked. Embeddings are never masked.
        mask_check_interval (`int`, defaults to `50`):
            Verify every this many optimizer steps that pruned weights are still exactly zero
            (always verified at each save and at the end of training). `0` checks only then.
        distill_loss (`str`, defaults to `"none"`):
            Token-level distillation against `teacher_model`: `"none"`, `"fkl"` (forward KL),
            `"rkl"` (reverse KL), `"jsd"` (generalized JSD with `jsd_beta`) or `"tvd"`.
        distill_alpha (`float`, defaults to `1.0`):
            Weight of the distillation term: loss = CE + `distill_alpha` × divergence.
        jsd_beta (`float`, defaults to `0.5`):
            β of the generalized JSD, in the open interval (0, 1).
        distill_temperature (`float`, defaults to `1.0`):
            Softmax temperature applied to both distributions before the divergence.
        hidden_distill_weight (`float`, defaults to `0.0`):
            Weight of a layer-wise distillation term (SquareHead, Kurtic et al. 2023, arXiv
            2310.06927, made for fine-tuning sparse LLMs with fixed masks): the mean over decoder
            layers of ‖h_drafter − h_teacher‖² / ‖h_teacher‖² on the batch's real tokens. Needs a
            teacher with the drafter's depth and width (a drafter pruned from the target).
        on_policy_fraction (`float`, defaults to `0.0`):
            On-policy distillation (DistillSpec; TRL GKD's `lmbda`): the probability that a
            training batch is replaced by the drafter's own continuations of its prompts (the
            tokens before the first assistant token), scored by the teacher; the loss on such a
            batch is the `distill_loss` divergence alone, on the generated tokens only. The rest
            of the batches train on the dataset as without it. Needs a teacher and a
            `distill_loss`. The draw is seeded by (`seed`, step, micro-batch), so a resumed run
            makes the same choices.
        on_policy_max_new_tokens (`int`, defaults to `64`):
            Tokens the drafter generates per on-policy sequence (it stops earlier at EOS).
        on_policy_temperature (`float`, defaults to `1.0`):
            Sampling temperature of the drafter's continuations; `0` generates greedily.
        on_policy_refresh_steps (`int`, defaults to `1`):
            Which weights generate: `1`, the drafter's current weights at every on-policy batch
            (GKD); `N > 1`, a copy of the drafter refreshed every N optimizer steps; `0`, a
            copy of the drafter's weights before training, never refreshed (stale on purpose:
            the cheap variant whose continuations could be made once before training).

            On-policy generation runs in eval mode, under the training's autocast, with
            transformers' dynamic KV cache, stops at any EOS of the drafter's generation config,
            and keeps every row within `max_length`. (A static cache is not offered: it is
            allocated in the weights' dtype and fails under bf16 autocast of fp32 weights.)
        on_policy_generator (`str`, defaults to `"transformers"`):
            What generates the on-policy continuations: `"transformers"` (the drafter's own
            `generate`, in this process) or `"vllm"` (a vLLM server in the project's vLLM
            environment holding the drafter's weights, as TRL's `use_vllm`; the weights are
            written to `<output_dir>/on_policy_generator/` and reloaded in place by the server
            every `on_policy_refresh_steps` steps, `0`: once, before training). Requests are
            sent concurrently, so vLLM batches the rows; each row's sampling is seeded by
            (`seed`, step, micro-batch, row). One process, full fine-tuning (no PEFT adapter).

    Changed defaults: `assistant_only_loss=True` (cross-entropy on the assistant tokens of the
    distilled conversations, the SD² method); `bf16` left unset is off when training on a CPU
    without bfloat16 instructions (TRL turns it on, and such a CPU emulates bf16 autocast at a
    fraction of float32's speed); explicitly set, it is kept.
    """

    mask_targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={
            "help": "Modules whose sparsity masks are held fixed (llm-compressor target syntax)."
        },
    )
    mask_ignore: list[str] = field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        metadata={"help": "Modules never masked (embeddings are never masked)."},
    )
    mask_check_interval: int = field(
        default=50,
        metadata={
            "help": "Verify exact zeros every N optimizer steps (and at every save and at the end); 0: only then."
        },
    )
    distill_loss: str = field(
        default="none",
        metadata={"help": "Token-level distillation loss.", "choices": list(DISTILL_LOSSES)},
    )
    distill_alpha: float = field(
        default=1.0,
        metadata={"help": "Weight of the distillation term (loss = CE + alpha * divergence)."},
    )
    jsd_beta: float = field(
        default=0.5, metadata={"help": "Beta of the generalized JSD, in the open interval (0, 1)."}
    )
    distill_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature for the distillation divergence (> 0)."}
    )
    hidden_distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of layer-wise hidden-state distillation (SquareHead); needs a teacher "
            "of the drafter's shape."
        },
    )
    on_policy_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Probability that a batch is replaced by the drafter's own continuations, "
            "scored by the teacher (on-policy distillation; GKD's lmbda)."
        },
    )
    on_policy_max_new_tokens: int = field(
        default=64, metadata={"help": "Tokens the drafter generates per on-policy sequence."}
    )
    on_policy_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of on-policy continuations (0: greedy)."},
    )
    on_policy_refresh_steps: int = field(
        default=1,
        metadata={
            "help": "Weights that generate on-policy continuations: 1 = current weights, N = a "
            "copy refreshed every N steps, 0 = the weights before training."
        },
    )
    on_policy_generator: str = field(
        default="transformers",
        metadata={
            "help": "What generates on-policy continuations: 'transformers' (in process) or "
            "'vllm' (a server on the drafter's weights, reloaded every on_policy_refresh_steps)."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Unset: on, as in TRL, except for training on a CPU "
            "without bfloat16 instructions (no avx512_bf16/amx_bf16/bf16 flag), where it is off."
        },
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Compute the cross-entropy only on assistant tokens (the SD² method)."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and _trains_on_cpu(self.use_cpu):
            # TRL turns bf16 autocast on when it is left unset. A CPU without bfloat16
            # instructions emulates it: an SD2Trainer step of SmolLM2-135M took about 4 min
            # against 15 s in float32 (~15x) on an AVX2-only CPU here.
            from sd2_hf.utils.environment import cpu_has_native_bf16

            if cpu_has_native_bf16() is False:
                self.bf16 = False
        super().__post_init__()
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(
                f"distill_loss={self.distill_loss!r} is not supported; allowed: {', '.join(DISTILL_LOSSES)}"
            )
        if self.distill_alpha < 0:
            raise ValueError(f"distill_alpha must be >= 0, got {self.distill_alpha}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(
                f"jsd_beta must be in the open interval (0, 1), got {self.jsd_beta}; "
                "for the limits use distill_loss='fkl' (beta -> 0) or 'rkl' (beta -> 1)"
            )
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.mask_check_interval < 0:
            raise ValueError(f"mask_check_interval must be >= 0, got {self.mask_check_interval}")
        if self.hidden_distill_weight < 0:
            raise ValueError(
                f"hidden_distill_weight must be >= 0, got {self.hidden_distill_weight}"
            )
        if self.hidden_distill_weight > 0 and self.distill_loss == "none":
            raise ValueError(
                "hidden_distill_weight > 0 distils against the teacher: set distill_loss "
                "(fkl, rkl, jsd or tvd) and pass teacher_model"
            )
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.on_policy_fraction > 0 and self.distill_loss == "none":
            raise ValueError(
                "on-policy distillation (on_policy_fraction > 0) scores the drafter's own "
                "continuations with the teacher's logits: set distill_loss (fkl, rkl, jsd or tvd)"
            )
        if self.on_policy_max_new_tokens < 1:
            raise ValueError(
                f"on_policy_max_new_tokens must be >= 1, got {self.on_policy_max_new_tokens}"
            )
        if self.on_policy_temperature < 0:
            raise ValueError(
                f"on_policy_temperature must be >= 0, got {self.on_policy_temperature}"
            )
        if self.on_policy_refresh_steps < 0:
            raise ValueError(
                f"on_policy_refresh_steps must be >= 0, got {self.on_policy_refresh_steps}"
            )
        if self.on_policy_generator not in ON_POLICY_GENERATORS:
            raise ValueError(
                f"on_policy_generator={self.on_policy_generator!r} is not supported; allowed: "
                f"{', '.join(ON_POLICY_GENERATORS)}"
            )
        if self.on_policy_fraction > 0 and self.padding_free:
            raise ValueError(
                "on-policy distillation needs padded batches with an attention mask: "
                "set padding_free=False"
            )
        if (
            self.on_policy_fraction > 0
            and not self.assistant_only_loss
            and self.completion_only_loss is False
        ):
            raise ValueError(
                "on-policy distillation continues each row's prompt, read as the tokens before "
                "its first label; with assistant_only_loss=False and completion_only_loss=False "
                "every token is labelled and the prompt is empty: set assistant_only_loss=True "
                "(conversations) or leave completion_only_loss on (prompt-completion data)"
            )
        if not self.mask_targets:
            raise ValueError("mask_targets must name at least one module pattern, e.g. ['Linear']")
