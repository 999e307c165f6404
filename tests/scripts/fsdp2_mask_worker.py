"""Worker for the FSDP2 test: the mask callback on sharded (DTensor) parameters, 2 CPU ranks.

Trainer + accelerate fall back to plain multi-CPU DDP on a machine without accelerators, so this
drives the callback's hooks around a hand-written loop on a `fully_shard`-ed tiny Llama.

The work runs in `train()`, so that the sharded model (whose FSDP state holds the process
group) is garbage once it returns; `destroy_process_groups` then drops the group's last
reference and its gloo worker threads are joined before the interpreter finalizes (see
sd2_hf/utils/distributed.py: a worker still finishing the last all-gather at exit aborted the
process with "terminate called without an active exception").
"""

import json
import sys
from pathlib import Path

import tiny
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sd2_hf.pruning.masks import find_target_linears
from sd2_hf.training.callbacks import SparsityMaskCallback
from sd2_hf.utils.distributed import destroy_process_groups, gloo_worker_threads


def train(rank: int) -> dict:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tok = tiny.build_tokenizer()
    model = tiny.magnitude_sparsify(tiny.build_model(tok, seed=0), 0.5).train()
    before = {n: (m.weight == 0).clone() for n, m in find_target_linears(model).items()}
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    cb = SparsityMaskCallback(check_interval=1)
    cb.record(model)
    weight_type = type(model.model.layers[0].mlp.up_proj.weight).__name__
    local_numel = model.model.layers[0].mlp.up_proj.weight.to_local().numel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = tok(
        [r["messages"][1]["content"] for r in tiny.conversations(8, seed=rank)],
        return_tensors="pt",
        padding=True,
    )
    for step in range(10):
        for _ in range(2):  # gradient accumulation
            loss = model(**ids, labels=ids["input_ids"]).loss
            loss.backward()
        cb.mask_gradients()
        opt.step()
        cb.apply_masks()
        opt.zero_grad()
        cb.verify(f"step {step}")

    full = {n: m.weight.full_tensor() for n, m in find_target_linears(model).items()}
    return {
        "weight_type": weight_type,
        "local_numel": local_numel,
        "full_numel": full["model.layers.0.mlp.up_proj"].numel(),
        "zeros_equal_initial": all(torch.equal(before[n], full[n] == 0) for n in before),
        "weights_changed": not torch.equal(w0, full["model.layers.0.mlp.up_proj"]),
        "loss": loss.item(),
    }


out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
report = train(rank)
report["gloo_threads_before_teardown"] = gloo_worker_threads()
report["gloo_threads_after_teardown"] = destroy_process_groups()
(out / f"rank{rank}.json").write_text(json.dumps(report))
