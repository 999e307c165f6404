"""`SparsityMaskCallback`: holds the zeros of a pruned drafter exactly fixed during training."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from sd2_hf.pruning.masks import DEFAULT_IGNORE, DEFAULT_TARGETS, find_target_linears
from sd2_hf.utils.distributed import destroy_process_groups_at_exit

logger = logging.getLogger(__name__)


class MaskDriftError(RuntimeError):
    """Raised when a pruned weight is no longer exactly zero."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter or gradient (FSDP2 DTensor), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


ZERO3_MESSAGE = (
    "DeepSpeed ZeRO-3 is not supported for sparse fine-tuning: it partitions every parameter "
    "outside `param.data` (empty between gathers), so the sparsity masks could not be recorded "
    "nor held, and the zeros would be lost without an error. Use FSDP2 "
    "(`--config_file recipes/accelerate/fsdp2.yaml`), which shards parameters as DTensors whose "
    "local shards the masks are held on, or DDP (`recipes/accelerate/ddp.yaml`)."
)


def _check_not_partitioned(model: nn.Module) -> None:
    """Refuse parameters whose values are not in `.data`: a mask recorded there is empty."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        # DeepSpeed ZeRO-3 marks its partitioned parameters with `ds_*` attributes and leaves
        # `.data` an empty 1-D tensor between gathers.
        if hasattr(weight, "ds_tensor") or hasattr(weight, "ds_id"):
            raise ValueError(f"{name}.weight is a ZeRO-3 partitioned parameter. {ZERO3_MESSAGE}")
        # (A DTensor's local shard may rightly be empty: fewer rows than ranks.)
        if isinstance(module, nn.Linear) and module.in_features * module.out_features:
            if not hasattr(weight, "to_local") and weight.data.numel() == 0:
                raise ValueError(
                    f"{name}.weight has no local data to record a mask on (partitioned by a "
                    f"wrapper this callback does not know). {ZERO3_MESSAGE}"
                )


class SparsityMaskCallback(TrainerCallback):
    """Records the sparsity masks at train begin and keeps pruned weights exactly zero.

    When it acts:
    - `on_train_begin`: records `weight != 0` of every targeted layer, on each rank's local
      parameter data (so it also holds when FSDP2 shards parameters). Layers without zeros are
      not stored; masks are `torch.bool` (1 byte per weight), on the weight's device.
    - `on_pre_optimizer_step`: zeroes the gradients of pruned weights, so optimizer state
      (Adam moments) never accumulates at pruned positions and their update is exactly zero.
    - `on_optimizer_step`: re-applies the masks to the weights (guards against weight decay,
      optimizers or state loaded from elsewhere that would move a zero).
    - `on_step_end`: every `check_interval` steps and before every save, verifies that no pruned
      weight drifted; `on_save` and `on_train_end` verify too. Drift raises `MaskDriftError`.

    With PEFT adapters (`SD2Trainer(..., peft_config=...)`) the base weights are frozen and what
    must hold is the adapter's delta: verification also checks that every adapter's delta weight
    (PEFT's `get_delta_weight`, what `merge_and_unload` adds) is exactly zero at the pruned
    positions, so the merged drafter keeps its zeros.

    Under gradient accumulation the masks act once per optimizer step, after all micro-batches.
    Note: gradient clipping runs before `on_pre_optimizer_step`, so its norm still includes the
    (discarded) gradients of pruned weights.
    """

    def __init__(
        self,
        targets: Sequence[str] = DEFAULT_TARGETS,
        ignore: Sequence[str] = DEFAULT_IGNORE,
        check_interval: int = 50,
    ):
        self.targets = tuple(targets)
        self.ignore = tuple(ignore)
        self.check_interval = check_interval
        self.masks: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        # PEFT LoRA layers on sparse weights: their deltas must stay zero where the mask is.
        self.adapted: dict[str, tuple[nn.Module, torch.Tensor]] = {}
        self.num_masked = 0
        self.num_targeted = 0

    # -- recording -------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, model: nn.Module) -> None:
        """Record the current zero pattern of the targeted layers as the masks to hold."""
        _check_not_partitioned(model)
        if hasattr(model, "get_base_model"):  # a PeftModel: names as in the plain model
            model = model.get_base_model()
        modules = find_target_linears(model, self.targets, self.ignore)
        if not modules:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
            raise ValueError(
                f"no module matches mask targets {list(self.targets)} (ignore {list(self.ignore)}); "
                f"linear modules of this model include {names}"
            )
        self.masks, self.adapted = {}, {}
        self.num_masked = self.num_targeted = 0
        for name, module in modules.items():
            local = _local(module.weight.data)
            self.num_targeted += local.numel()
            # A sparse LoRA layer already holds the mask of its frozen base weight: share it.
            mask = getattr(module, "sparsity_mask", None)
            if mask is None or mask.shape != local.shape:
                mask = local != 0
            zeros = int(local.numel() - mask.sum().item())
            if zeros:
                self.masks[name] = (module.weight, mask)
                self.num_masked += zeros
                # (the full delta is compared with the mask, so not on sharded weights)
                if hasattr(module, "get_delta_weight") and not hasattr(module.weight, "to_local"):
                    self.adapted[name] = (module, mask)
        logger.info(
            "SparsityMaskCallback: holding %d zeros in %d of %d targeted layers (local sparsity %.4f)",
            self.num_masked,
            len(self.masks),
            len(modules),
            self.sparsity,
        )

    @property
    def sparsity(self) -> float:
        """Recorded sparsity of the targeted layers on this rank."""
        return self.num_masked / self.num_targeted if self.num_targeted else 0.0

    # -- enforcing -------------------------------------------------------------------------
    @torch.no_grad()
    def mask_gradients(self) -> None:
        for param, mask in self.masks.values():
            if param.grad is not None:
                _local(param.grad).mul_(mask)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for param, mask in self.masks.values():
            if param.requires_grad:  # frozen weights (PEFT base layers) cannot move
                _local(param.data).mul_(mask)

    @torch.no_grad()
    def verify(self, where: str) -> None:
        """Raise `MaskDriftError` if any recorded zero is no longer exactly zero."""
        drifted = {}
        for name, (param, mask) in self.masks.items():
            n = int(_local(param.data).masked_select(~mask).count_nonzero().item())
            if n:
                drifted[name] = n
        for name, (module, mask) in self.adapted.items():
            for adapter in module.lora_A:
                delta = module.get_delta_weight(adapter)
                n = int(delta.masked_select(~mask).count_nonzero().item())
                if n:
                    drifted[f"{name} (adapter {adapter!r} delta)"] = n
        if drifted:
            raise MaskDriftError(
                f"{sum(drifted.values())} pruned weights are no longer zero ({where}): {drifted}"
            )

    # -- TrainerCallback hooks -------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SparsityMaskCallback needs the model (Trainer passes it)")
        self.record(model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mask_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply_masks()

    def on_step_end(self, args, state, control, **kwargs):
        periodic = self.check_interval and state.global_step % self.check_interval == 0
        if periodic or control.should_save:
            self.verify(f"step {state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        self.verify(f"checkpoint at step {state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.verify("end of training")
        # Several processes (accelerate launch, torchrun): join the gloo worker threads at exit,
        # before the interpreter finalizes; a worker still releasing its last collective then
        # aborted the process (see sd2_hf/utils/distributed.py). Registered here, once training
        # succeeded: the callback is the part of SD2Trainer that every run has.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy_process_groups_at_exit()
