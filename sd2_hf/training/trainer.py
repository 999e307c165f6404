"""`SD2Trainer`: TRL's `SFTTrainer` for sparse drafters, with optional token-level distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig
from transformers import PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTTrainer

from sd2_hf.training.callbacks import ZERO3_MESSAGE, SparsityMaskCallback
from sd2_hf.training.losses import token_divergence
from sd2_hf.training.sd2_config import SD2Config
from sd2_hf.training.sparse_lora import check_sparse_adapters, sparse_lora_config


def _vocab_size(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


class SD2Trainer(SFTTrainer):
    """Fine-tunes a pruned drafter while its sparsity masks stay exactly fixed.

    Loss: cross-entropy on the assistant tokens of the (self-distilled) conversations, plus, when a
    `teacher_model` (the target) is given and `args.distill_loss != "none"`,
    `distill_alpha` × divergence between drafter and teacher token distributions at the same
    positions (DistillSpec). Drafter and teacher must share a vocabulary; for cross-family
    drafters, distil at the sequence level instead (train on the target-regenerated dataset).

    The `SparsityMaskCallback` is installed automatically (configured from `args.mask_*`) and is
    available as `trainer.mask_callback`; global sparsity is added to the logs.

    Args:
        model: the drafter (a model or a path/Hub id), usually already pruned.
        args: an `SD2Config`.
        teacher_model: optional target model (or path) for token-level distillation.
        peft_config: optional `peft.LoraConfig`: train a sparsity-preserving LoRA adapter instead
            of the full weights (SparsePEFT: the delta is masked with the base weight's zero
            pattern in training and in `merge_and_unload`, so the merged drafter keeps its zeros).
        **kwargs: everything `SFTTrainer` accepts (train_dataset, processing_class, ...).
    """

    _tag_names = ["trl", "sft", "sd2", "speculative-decoding", "sparse"]
    _name = "SD2"
    _paper = {
        "title": "SD²: Self-Distilled Sparse Drafters",
        "id": "2504.08838",
        "citation": (
            "@article{lasby2025sd2,\n"
            "  title={{SD}$^2$: Self-Distilled Sparse Drafters},\n"
            "  author={Lasby, Mike and Lazarevich, Ivan and Sinnadurai, Nish and Lie, Sean and "
            "Ioannou, Yani and Thangarasa, Vithursan},\n"
            "  journal={arXiv preprint arXiv:2504.08838},\n"
            "  year={2025}\n}"
        ),
    }

    def __init__(
        self,
        model,
        args: SD2Config | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        peft_config: LoraConfig | None = None,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SD2Config(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-SD2")
        elif not isinstance(args, SD2Config):
            raise TypeError(f"SD2Trainer needs an SD2Config, got {type(args).__name__}")
        # Before the model is wrapped: fail at construction, not after the first steps.
        if is_deepspeed_zero3_enabled():
            raise ValueError(ZERO3_MESSAGE)
        if peft_config is not None:
            peft_config = sparse_lora_config(peft_config)
        super().__init__(model, args=args, peft_config=peft_config, **kwargs)
        check_sparse_adapters(self.model)

        self.mask_callback = SparsityMaskCallback(
            targets=args.mask_targets,
            ignore=args.mask_ignore,
            check_interval=args.mask_check_interval,
        )
        self.add_callback(self.mask_callback)

        self.teacher_model = None
        if teacher_model is not None and args.distill_loss != "none":
            if isinstance(teacher_model, str):
                from transformers import AutoModelForCausalLM

                teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype="auto")
            student_vocab, teacher_vocab = _vocab_size(self.model), _vocab_size(teacher_model)
            if student_vocab != teacher_vocab:
                raise ValueError(
                    f"token-level distillation needs drafter and teacher to share a vocabulary, but the "
                    f"drafter has {student_vocab} tokens and the teacher {teacher_vocab}. For a "
                    "cross-family drafter use sequence-level distillation: train on the dataset the target "
                    "regenerated (`sd2 distill`) with distill_loss='none'."
                )
            teacher_model.eval().requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        elif args.distill_loss != "none":
            raise ValueError(
                f"distill_loss={args.distill_loss!r} needs a teacher_model (the target); "
                "pass teacher_model=... or set distill_loss='none'"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        # The fused LM head of SFTTrainer never builds logits, and the divergence needs them, so
        # this path runs a plain forward and computes the cross-entropy itself.
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        logits = model(**model_inputs).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = self.teacher_model(**model_inputs).logits[:, :-1]
        shift_labels = labels[:, 1:]
        mask = shift_labels != -100
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        num_tokens = torch.as_tensor(num_tokens, device=logits.device).clamp(min=1)

        ce = F.cross_entropy(
            logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="sum"
        )
        div = token_divergence(
            logits,
            teacher_logits,
            self.args.distill_loss,
            mask=mask,
            beta=self.args.jsd_beta,
            temperature=self.args.distill_temperature,
            reduction="sum",
        )
        loss = (ce + self.args.distill_alpha * div) / num_tokens
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        # Sums over processes, then divided by all processes' tokens (as SFTTrainer does for its
        # metrics): every rank logs the same token-weighted values, not its own batch's.
        def total(value: torch.Tensor) -> torch.Tensor:
            return self.accelerator.gather_for_metrics(value.detach()).sum()

        valid = total(mask.sum()).clamp(min=1)
        correct = ((logits.argmax(-1) == shift_labels) & mask).sum()
        self._metrics[mode]["ce_loss"].append((total(ce) / valid).item())
        self._metrics[mode][f"{self.args.distill_loss}_divergence"].append(
            (total(div) / valid).item()
        )
        self._metrics[mode]["mean_token_accuracy"].append((total(correct) / valid).item())
        if return_outputs:
            return loss, {"logits": logits}
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.mask_callback.num_targeted:
            logs["sparsity"] = round(self.mask_callback.sparsity, 6)
        super().log(logs, start_time)
