"""Test-only: let `accelerate launch` with an FSDP config really shard on CPU processes.

accelerate 1.15 turns FSDP on only for accelerator types (MULTI_GPU, MULTI_XPU, ...); on a
machine without GPUs the same launch silently trains with plain multi-CPU DDP. The tests put
this directory on PYTHONPATH so that every process of the launch takes the FSDP branch
accelerate takes on GPUs (FullyShardedDataParallelPlugin from the launch's environment, FSDP2
`fully_shard` over gloo), and the real SD2Trainer path runs on sharded DTensor parameters.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    from accelerate import state as _state
    from accelerate.utils import DistributedType

    _original_init = _state.AcceleratorState.__init__

    def _init(self, *args, fsdp_plugin=None, **kwargs):
        _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does for its own choice: later states copy PartialState's type.
            _state.PartialState._shared_state["distributed_type"] = self.distributed_type

    _state.AcceleratorState.__init__ = _init
