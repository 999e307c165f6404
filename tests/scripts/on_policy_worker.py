"""Worker for the multi-process on-policy tests: SD2Trainer with on_policy_fraction 1.0 (every
batch is the drafter's own continuations, scored by a teacher with TVD) on 2 CPU processes,
under the `accelerate launch` the test picks (FSDP2 through tests/scripts/cpu_fsdp, or DDP).

The ranks must generate continuations of different lengths, or the test proves nothing: each
rank trains on other prompts and samples with a seed of its own, and the drafter's EOS logit is
scaled up so that it often ends a continuation early (not always). Per on-policy batch the report records how many tokens the
rank generated (the longest continuation, EOS included) and how many forwards its generating
model ran: under `synced_gpus` a rank that is done keeps running forwards until every rank is.
"""

import hashlib
import json
import sys
from pathlib import Path

import tiny
import torch

from sd2_hf import SD2Trainer
from sd2_hf.pruning.masks import find_target_linears
from sd2_hf.utils.distributed import destroy_process_groups

MAX_NEW_TOKENS = 12
EOS_LOGIT_SCALE = 100.0  # the EOS row of lm_head, so that sampling at T = 1 often stops early


class RecordingTrainer(SD2Trainer):
    """SD2Trainer that records, per on-policy batch, the generated length and the forwards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated: list[int] = []
        self.forwards: list[int] = []

    def _generate_on_policy(self, model, inputs):
        count = [0]

        def hook(module, args, kwargs):
            count[0] += 1

        # Every rank starts from the same seed, and the tiny drafter's distribution is almost
        # flat: the same uniform draws would sample the same tokens from other prompts. A seed
        # per rank (and batch) lets the ranks' continuations, and their lengths, differ.
        torch.manual_seed(1000 * (self.args.process_index + 1) + len(self.generated))
        generating = self.accelerator.unwrap_model(model)
        handle = generating.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            batch = super()._generate_on_policy(model, inputs)
        finally:
            handle.remove()
        # Completions are cut after their first EOS: the longest one is how many steps this
        # rank's own sequences needed.
        self.generated.append(int((batch["labels"] != -100).sum(1).max()))
        self.forwards.append(count[0])
        return batch


def train(out: Path) -> tuple[int, dict]:
    tok = tiny.build_tokenizer()
    model = tiny.magnitude_sparsify(tiny.build_model(tok, seed=0), 0.5)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= EOS_LOGIT_SCALE
    before = {n: (m.weight == 0).clone() for n, m in find_target_linears(model).items()}
    trainer = tiny.distilling_trainer(
        model,
        tok,
        out / "run",
        RecordingTrainer,
        max_steps=6,
        per_device_train_batch_size=1,
        learning_rate=1e-4,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        mask_check_interval=1,
        ddp_backend="gloo",
        distill_loss="tvd",
        on_policy_fraction=1.0,
        on_policy_max_new_tokens=MAX_NEW_TOKENS,
        on_policy_temperature=1.0,
        logging_steps=1,
    )
    trainer.train()
    # Each rank's (local shard of the) weights against the masks it recorded, then the whole
    # weights' zeros against the initial ones (gathered from the shards under FSDP2: every rank
    # runs the same collectives in the same order).
    trainer.mask_callback.verify("worker end")
    zeros_equal_initial = True
    digest = hashlib.sha256()
    for name, module in find_target_linears(trainer.model).items():
        weight = module.weight.detach()
        full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        zeros_equal_initial &= torch.equal(before[name], full == 0)
        digest.update(full.float().numpy().tobytes())
    rank = trainer.args.process_index
    return rank, {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "weight_type": type(trainer.model.model.layers[0].mlp.up_proj.weight).__name__,
        "global_step": trainer.state.global_step,
        "zeros_equal_initial": zeros_equal_initial,
        "weights_digest": digest.hexdigest(),
        "initial_zeros": sum(int(z.sum()) for z in before.values()),
        "masked_zeros": trainer.mask_callback.num_masked,  # of its shard under FSDP2
        "generated": trainer.generated,
        "forwards": trainer.forwards,
        "on_policy_logged": [h["on_policy"] for h in trainer.state.log_history if "on_policy" in h],
    }


out = Path(sys.argv[1])
rank, report = train(out)
report["gloo_threads_after_teardown"] = destroy_process_groups()
(out / f"rank{rank}.json").write_text(json.dumps(report))
