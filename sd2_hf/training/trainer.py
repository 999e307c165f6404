"""`SD2Trainer`: TRL's `SFTTrainer` for sparse drafters, with optional token-level distillation."""

from __future__ import annotations

import copy
import logging
import random
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from peft import LoraConfig
from transformers import PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from sd2_hf.training.callbacks import ZERO3_MESSAGE, SparsityMaskCallback
from sd2_hf.training.floor import (
    FloorChannelCallback,
    dropped_token_ids,
    floor_channel_of,
    ignore_dropped_labels,
    renormalize_teacher,
)
from sd2_hf.training.losses import token_divergence
from sd2_hf.training.sd2_config import SD2Config
from sd2_hf.training.sparse_lora import check_sparse_adapters, sparse_lora_config

logger = logging.getLogger(__name__)


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
            ignore=ignore_for_masks(self.model, args.mask_ignore),
            check_interval=args.mask_check_interval,
        )
        self.add_callback(self.mask_callback)
        # A draft-vocabulary drafter trains on its own vocabulary (`sd2_hf.training.floor`).
        self._dropped_ids = None
        if (channel := floor_channel_of(self.model)) is not None:
            self.add_callback(FloorChannelCallback(channel))
            self._dropped_ids = dropped_token_ids(self.model, channel)

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
            if args.hidden_distill_weight > 0:
                shapes = [
                    (
                        m.config.get_text_config().num_hidden_layers,
                        m.config.get_text_config().hidden_size,
                    )
                    for m in (self.accelerator.unwrap_model(self.model), teacher_model)
                ]
                if shapes[0] != shapes[1]:
                    raise ValueError(
                        "hidden_distill_weight > 0 matches the drafter's hidden states layer by "
                        f"layer with the teacher's, but the drafter has (layers, width) "
                        f"{shapes[0]} and the teacher {shapes[1]}; use it for drafters pruned "
                        "from the target, or set hidden_distill_weight=0"
                    )
            teacher_model.eval().requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            # Under mixed precision `prepare_model` wraps the given object's `forward` in autocast
            # in place. The teacher is the caller's target, often evaluated after training: left
            # wrapped, its greedy output changed (bf16 logits on CPU). accelerate's own unwrap
            # takes the wrapper off again; `compute_loss` runs the teacher under
            # `accelerator.autocast()` instead, the same precision as the drafter.
            extract_model_from_parallel(teacher_model, keep_fp32_wrapper=False)
        elif args.distill_loss != "none":
            raise ValueError(
                f"distill_loss={args.distill_loss!r} needs a teacher_model (the target); "
                "pass teacher_model=... or set distill_loss='none'"
            )
        if args.on_policy_fraction > 0 and args.on_policy_refresh_steps != 1:
            if self.accelerator.num_processes > 1:
                raise ValueError(
                    "on_policy_refresh_steps != 1 keeps a copy of the drafter for generation, "
                    "which is not supported across processes: use on_policy_refresh_steps=1"
                )
        # The generating copy for on_policy_refresh_steps != 1, and the step it was taken at;
        # with 0 it is taken here, from the weights given (also when a run resumes later).
        self._generator: PreTrainedModel | None = None
        self._generator_step = -1
        # The vLLM server that generates instead (on_policy_generator="vllm"), started at the
        # first on-policy batch and stopped when training ends.
        self._vllm = None
        if args.on_policy_fraction > 0 and args.on_policy_generator == "vllm":
            self._check_vllm_generator()
            if args.on_policy_refresh_steps == 0:
                # The weights given, written now; the server starts at the first on-policy batch.
                self._vllm_generator().write(
                    self.accelerator.unwrap_model(self.model), self.processing_class
                )
                self._generator_step = 0
        elif args.on_policy_fraction > 0 and args.on_policy_refresh_steps == 0:
            self._generator = self._copy_for_generation(self.model)
            self._generator_step = 0
        self._on_policy_batch = False
        self._micro_batch = 0
        self._micro_step = -1

    # ----- on-policy distillation -------------------------------------------------------------
    # TRL's GKD trainer (trl.experimental.gkd) is the reference design: the same per-batch draw
    # (`lmbda` there), the same generation under `unwrap_model_for_generation` and the same
    # label layout (-100 on the prompt and after the first EOS). It is not subclassed: it is
    # experimental, needs its own ChatML collator with separate prompt tensors, and has no
    # sparsity masks or stale-generator option; here prompts are read from the SFT batch itself.

    def _draw_on_policy(self) -> bool:
        """Seeded by (seed, step, micro-batch): a resumed run draws the same batches."""
        step = self.state.global_step
        # The micro-batch's index within its optimizer step (not a run-long counter, which a
        # resumed run would restart from 0).
        self._micro_batch = self._micro_batch + 1 if self._micro_step == step else 0
        self._micro_step = step
        draw = random.Random(f"{self.args.seed}:{step}:{self._micro_batch}")
        return draw.random() < self.args.on_policy_fraction

    def _generating_model(self, model):
        """The model whose weights generate: the training model itself (refresh 1) or a copy
        taken before training (refresh 0) / every `on_policy_refresh_steps` steps."""
        refresh = self.args.on_policy_refresh_steps
        if refresh == 1:
            return None
        step = self.state.global_step
        if refresh > 1 and (self._generator is None or step - self._generator_step >= refresh):
            self._generator = self._copy_for_generation(self.accelerator.unwrap_model(model))
            self._generator_step = step
        return self._generator

    def _check_vllm_generator(self) -> None:
        from peft import PeftModel

        from sd2_hf.utils.environment import vllm_python

        if self.accelerator.num_processes > 1:
            raise ValueError(
                "on_policy_generator='vllm' serves one process's drafter; under several "
                "processes use on_policy_generator='transformers'"
            )
        if isinstance(self.accelerator.unwrap_model(self.model), PeftModel):
            raise ValueError(
                "on_policy_generator='vllm' reloads the drafter's full weights into the server, "
                "and a PEFT adapter is not merged into them: train without peft_config, or use "
                "on_policy_generator='transformers'"
            )
        vllm_python()  # refuses now, with how to make the environment, not at the first batch

    def _vllm_generator(self):
        from sd2_hf.training.vllm_generator import VLLMGenerator

        if self._vllm is None:
            self._vllm = VLLMGenerator(
                f"{self.args.output_dir}/on_policy_generator",
                dtype="bfloat16" if self.args.bf16 else "float32",
                max_model_len=self.args.max_length or 2048,
            )
        return self._vllm

    def _vllm_generate(
        self, model, prompts: list[torch.Tensor], new_tokens: int, eos: list[int]
    ) -> list:
        """The prompts' continuations from the vLLM server, its weights synced first when
        they are older than `on_policy_refresh_steps` steps (0: synced once)."""
        step, refresh = self.state.global_step, self.args.on_policy_refresh_steps
        generator = self._vllm_generator()
        stale = self._generator_step < 0 or (refresh > 0 and step - self._generator_step >= refresh)
        if stale or generator.server is None:
            began = time.perf_counter()
            if stale:
                generator.write(self.accelerator.unwrap_model(model), self.processing_class)
                self._generator_step = step
            generator.load()
            self._metrics["train"]["on_policy_sync_seconds"].append(time.perf_counter() - began)
        seeds = [
            random.Random(f"{self.args.seed}:{step}:{self._micro_batch}:{i}").randrange(2**31)
            for i in range(len(prompts))
        ]
        out = generator.generate(
            [p.tolist() for p in prompts],
            max_new_tokens=new_tokens,
            temperature=self.args.on_policy_temperature,
            eos_token_ids=eos,
            seeds=seeds,
        )
        device = prompts[0].device
        return [torch.tensor(c, dtype=prompts[0].dtype, device=device) for c in out]

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._vllm is not None:
                self._vllm.close(remove=True)
                self._vllm = None

    @staticmethod
    def _copy_for_generation(model):
        return copy.deepcopy(model).eval().requires_grad_(False)

    @staticmethod
    def _prompts(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each row's tokens before its first label (the first assistant token)."""
        labels, ids = inputs["labels"], inputs["input_ids"]
        prompts = []
        for row_ids, row_labels, row_mask in zip(
            ids, labels, inputs["attention_mask"], strict=True
        ):
            labelled = (row_labels != -100).nonzero()
            start = int(labelled[0]) if len(labelled) else int(row_mask.sum())
            if start == 0:
                raise ValueError(
                    "on-policy distillation continues each row's prompt (its tokens before the "
                    "first label), but a row is labelled from its first token, so its prompt is "
                    "empty: train with assistant_only_loss=True on conversations, or on "
                    "prompt-completion data with completion_only_loss left on"
                )
            prompts.append(row_ids[:start])
        return prompts

    def _eos_ids(self, model) -> list[int]:
        """Every token that ends a continuation: the generation config's list (Llama-3 and
        Qwen name several) and the tokenizer's EOS."""
        ids = getattr(model.generation_config, "eos_token_id", None)
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        eos = getattr(self.processing_class, "eos_token_id", None)
        return ids + [eos] if eos is not None and eos not in ids else ids

    def _hf_generate(
        self, model, prompts: list[torch.Tensor], pad_id: int, new_tokens: int, eos: list[int]
    ):
        """The prompts' continuations from the drafter's own `generate` (padding after EOS)."""
        # Left-padded for generation (TRL's own `pad`, as its collators use).
        prompt_ids = pad(prompts, padding_value=pad_id, padding_side="left")
        prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_side="left")
        temperature = self.args.on_policy_temperature
        generator = self._generating_model(model)
        unwrapped = (
            unwrap_model_for_generation(
                model,
                self.accelerator,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            )
            if generator is None
            else nullcontext(generator)
        )
        with unwrapped as generating, self.accelerator.autocast(), torch.no_grad():
            generation = {
                "max_new_tokens": new_tokens,
                "do_sample": temperature > 0,
                "pad_token_id": pad_id,
                "eos_token_id": eos or None,
                "use_cache": True,
            }
            if temperature > 0:
                generation.update(temperature=temperature, top_k=0, top_p=1.0)
            was_training = generating.training
            generating.eval()
            try:
                out = generating.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    # Every rank runs forwards until all ranks are done: under FSDP2 through
                    # accelerate (which transformers does not detect, unlike ZeRO-3 / FSDP1) a
                    # rank that stopped early would leave the others waiting in a sharded forward.
                    synced_gpus=self.accelerator.num_processes > 1,
                    **generation,
                )
            finally:
                generating.train(was_training)
        return list(out[:, prompt_ids.shape[1] :])

    def _generate_on_policy(self, model, inputs: dict[str, torch.Tensor]) -> dict:
        """The batch's prompts continued by the drafter; labels on the generated tokens only.

        Generation runs as inference: eval mode (no dropout), under the training's autocast
        (the dtype the drafter trains in), with a KV cache, and every rank in step under
        several processes."""
        tokenizer = self.processing_class
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        prompts = self._prompts(inputs)
        max_length = self.args.max_length
        new_tokens = self.args.on_policy_max_new_tokens
        if max_length is not None:
            # No row is cut below: none can keep more than max_length - its prompt.
            new_tokens = max(1, min(new_tokens, max_length - min(len(p) for p in prompts)))
        # The generating copy (on_policy_refresh_steps != 1) shares the drafter's config.
        eos = self._eos_ids(self.accelerator.unwrap_model(model))
        if self.args.on_policy_generator == "vllm":
            completions = self._vllm_generate(model, prompts, new_tokens, eos)
        else:
            completions = self._hf_generate(model, prompts, pad_id, new_tokens, eos)
        stops = torch.tensor(eos)
        # Right-padded for training, like the SFT collator: prompt, completion up to and
        # including its first EOS, padding; labels on the completion only; at most max_length.
        rows, labels = [], []
        for p, c in zip(prompts, completions, strict=True):
            at = torch.isin(c, stops.to(c.device)).nonzero()
            c = c[: int(at[0]) + 1] if len(at) else c
            rows.append(torch.cat([p, c])[:max_length])
            labels.append(torch.cat([torch.full_like(p, -100), c])[:max_length])
        return {
            "input_ids": pad(rows, padding_value=pad_id),
            "attention_mask": pad([torch.ones_like(r) for r in rows]),
            "labels": pad(labels, padding_value=-100),
        }

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._on_policy_batch = False
        if self.args.on_policy_fraction > 0 and self.teacher_model is not None:
            self._on_policy_batch = self._draw_on_policy()
            if self._on_policy_batch:
                inputs = self._generate_on_policy(model, self._prepare_inputs(inputs))
            self._metrics["train"]["on_policy"].append(float(self._on_policy_batch))
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._on_policy_batch = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._dropped_ids is not None:
            labels = ignore_dropped_labels(inputs["labels"], self._dropped_ids)
            inputs = {**inputs, "labels": labels}
        if self.teacher_model is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        # The fused LM head of SFTTrainer never builds logits, and the divergence needs them, so
        # this path runs a plain forward and computes the cross-entropy itself.
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        hidden = self.args.hidden_distill_weight > 0
        if hidden:
            model_inputs["output_hidden_states"] = True
        # Logits only from the position before the batch's first label on (`logits_to_keep`):
        # the LM head and the 49k-way divergence over prompt tokens cost about a quarter of a
        # step on SmolLM2 and never enter the loss.
        labelled = (labels != -100).any(0).nonzero()
        first = max(int(labelled[0]) if len(labelled) else 1, 1)
        model_inputs["logits_to_keep"] = labels.shape[1] - first + 1
        outputs = model(**model_inputs)
        logits = outputs.logits[:, :-1]
        with torch.no_grad(), self.accelerator.autocast():
            teacher_outputs = self.teacher_model(**model_inputs)
            teacher_logits = teacher_outputs.logits[:, :-1]
            if self._dropped_ids is not None:
                teacher_logits = renormalize_teacher(teacher_logits, self._dropped_ids)
        shift_labels = labels[:, first:]
        mask = shift_labels != -100
        on_policy = self._on_policy_batch and self.model.training
        if on_policy:
            # Tokens the drafter sampled itself: their count is not the one the Trainer summed
            # over the accumulation window from the dataset batches, so this batch's loss is its
            # own per-token mean, weighted like one micro-batch of the window.
            num_tokens = mask.sum()
        else:
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
        # A per-batch mean is weighted like one micro-batch of the accumulation window (the
        # Trainer divides by the window's length itself only when it gave no token count).
        micro_batch_weight = (
            1 / self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        )
        if on_policy:
            # No cross-entropy on the drafter's own samples: the teacher's distribution is the
            # only target there (GKD).
            loss = div / num_tokens * micro_batch_weight
        else:
            loss = (ce + self.args.distill_alpha * div) / num_tokens
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
        if hidden:
            square_head = self._square_head(
                outputs.hidden_states, teacher_outputs.hidden_states, model_inputs
            )
            loss = loss + self.args.hidden_distill_weight * square_head * micro_batch_weight
            self._metrics[mode]["hidden_distill_loss"].append(
                self.accelerator.gather_for_metrics(square_head.detach()).mean().item()
            )

        # Sums over processes, then divided by all processes' tokens (as SFTTrainer does for its
        # metrics): every rank logs the same token-weighted values, not its own batch's.
        def total(value: torch.Tensor) -> torch.Tensor:
            return self.accelerator.gather_for_metrics(value.detach()).sum()

        valid = total(mask.sum()).clamp(min=1)
        correct = ((logits.argmax(-1) == shift_labels) & mask).sum()
        prefix = "on_policy_" if on_policy else ""
        self._metrics[mode][f"{prefix}ce_loss"].append((total(ce) / valid).item())
        self._metrics[mode][f"{prefix}{self.args.distill_loss}_divergence"].append(
            (total(div) / valid).item()
        )
        self._metrics[mode][f"{prefix}mean_token_accuracy"].append((total(correct) / valid).item())
        if return_outputs:
            return loss, {"logits": logits}
        return loss

    @staticmethod
    def _square_head(student_states, teacher_states, inputs) -> torch.Tensor:
        """SquareHead: mean over decoder layers of ‖h_s − h_t‖² / ‖h_t‖², on real tokens.
        Written here: TRL and transformers have no hidden-state distillation loss."""
        mask = inputs.get("attention_mask")
        terms = []
        for h_s, h_t in zip(student_states[1:], teacher_states[1:], strict=True):
            err = (h_s.float() - h_t.float()).pow(2).sum(-1)
            ref = h_t.float().pow(2).sum(-1)
            if mask is not None:
                err, ref = err * mask, ref * mask
            terms.append(err.sum() / ref.sum().clamp(min=1e-6))
        return torch.stack(terms).mean()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.mask_callback.num_targeted:
            logs["sparsity"] = round(self.mask_callback.sparsity, 6)
        super().log(logs, start_time)


def ignore_for_masks(model, ignore: list[str]) -> list[str]:
    """`ignore` without the patterns that match a sparse output head (`sd2 prune` with
    `draft_vocab_size` or `head_sparsity`): the default ignores `lm_head` because a tied head is
    the dense embedding table, but an untied sparse head's zeros are part of the drafter."""
    from sd2_hf.pruning.head import sparse_head_name
    from sd2_hf.pruning.masks import find_target_linears

    model = extract_model_from_parallel(model)
    name = sparse_head_name(model)
    if name is None:
        return list(ignore)
    # A pattern "ignores the head" when the head is not found with it as the only ignore.
    kept = [p for p in ignore if name in find_target_linears(model, ["Linear"], [p])]
    if len(kept) != len(ignore):
        logger.info("the output head %s is sparse: its mask is held as well", name)
    return kept
