"""Worker for the DDP test: trains a tiny sparse model with SD2Trainer on 2 CPU processes, with
the token-level distillation loss (its own metrics path) against a tiny teacher.

The run happens in `train()`, so that the trainer and its DDP model (which hold the process group)
are garbage once it returns, and `destroy_process_groups` joins the gloo worker threads before
the interpreter finalizes (see sd2_hf/utils/distributed.py).
"""

import hashlib
import json
import sys
from pathlib import Path

import tiny
import torch

from sd2_hf.pruning.masks import find_target_linears
from sd2_hf.utils.distributed import destroy_process_groups, gloo_worker_threads


def train(out: Path) -> tuple[int, dict]:
    tok = tiny.build_tokenizer()
    model = tiny.magnitude_sparsify(tiny.build_model(tok, seed=0), 0.5)
    before = {n: (m.weight == 0).clone() for n, m in find_target_linears(model).items()}
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = tiny.distilling_trainer(
        model,
        tok,
        out / "run",
        max_steps=12,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        mask_check_interval=3,
        ddp_backend="gloo",
        distill_loss="fkl",
        distill_alpha=0.5,
        logging_steps=4,
    )
    trainer.train()
    after = {n: (m.weight == 0) for n, m in find_target_linears(model).items()}
    digest = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        digest.update(p.detach().numpy().tobytes())
    rank = trainer.args.process_index
    return rank, {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "zeros_equal_initial": all(torch.equal(before[n], after[n]) for n in before),
        "weights_changed": not torch.equal(w0, model.model.layers[0].mlp.up_proj.weight),
        "weights_digest": digest.hexdigest(),
        "weight_type": type(model.model.layers[0].mlp.up_proj.weight).__name__,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "logged": [
            {k: h[k] for k in ("mean_token_accuracy", "ce_loss", "fkl_divergence")}
            for h in trainer.state.log_history
            if "mean_token_accuracy" in h
        ],
    }


out = Path(sys.argv[1])
rank, report = train(out)
report["gloo_threads_before_teardown"] = gloo_worker_threads()
report["gloo_threads_after_teardown"] = destroy_process_groups()
(out / f"rank{rank}.json").write_text(json.dumps(report))
