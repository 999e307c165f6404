"""SD2Trainer + SparsityMaskCallback on tiny sparse Llamas: zeros stay exactly zero."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from sd2_hf import SD2Config, SD2Trainer, SparsityMaskCallback
from sd2_hf.pruning.masks import find_target_linears, is_n_m_sparse, sparsity_report
from sd2_hf.training.callbacks import MaskDriftError

REPO = Path(__file__).resolve().parents[1]
# tiny models: one thread is as fast and immune to CPU oversubscription (see conftest)
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def zero_pattern(model) -> dict[str, torch.Tensor]:
    return {n: (m.weight == 0).clone() for n, m in find_target_linears(model).items()}


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def base_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        max_steps=20,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        logging_steps=5,
        dataloader_num_workers=0,
        mask_check_interval=5,
    )
    return tiny.trainer_kwargs(tmp_path / "out", **{**kwargs, **overrides})


def make_args(tmp_path, **overrides) -> SD2Config:
    return SD2Config(**base_kwargs(tmp_path, **overrides))


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(tiny.conversations(24))


def assert_same_zeros(before, model):
    after = zero_pattern(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"zero pattern changed in {name}"


def test_zeros_exact_with_grad_accumulation(tmp_path, sparse_model, tiny_tokenizer, dataset):
    before_zeros, before_w = zero_pattern(sparse_model), weights(sparse_model)
    trainer = SD2Trainer(
        sparse_model,
        args=make_args(tmp_path, gradient_accumulation_steps=2, max_steps=20),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    result = trainer.train()
    assert trainer.state.global_step == 20
    assert_same_zeros(before_zeros, sparse_model)
    # training really moved the surviving weights
    changed = [n for n, p in sparse_model.named_parameters() if not torch.equal(p, before_w[n])]
    assert any("layers.0.mlp" in n for n in changed)
    assert result.training_loss > 0
    # sparsity reported in the logs
    logged = [h["sparsity"] for h in trainer.state.log_history if "sparsity" in h]
    assert logged and all(s == pytest.approx(0.5, abs=1e-3) for s in logged)
    # masks are compact (bool) and only stored for layers with zeros
    assert all(m.dtype == torch.bool for _, m in trainer.mask_callback.masks.values())


def test_zeros_exact_with_bf16_autocast(tmp_path, sparse_model, tiny_tokenizer, dataset):
    before = zero_pattern(sparse_model)
    trainer = SD2Trainer(
        sparse_model,
        args=make_args(tmp_path, bf16=True, max_steps=20),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    assert trainer.args.bf16
    assert_same_zeros(before, sparse_model)


def test_zeros_exact_through_checkpoint_and_resume(tmp_path, sparse_model, tiny_tokenizer, dataset):
    before = zero_pattern(sparse_model)
    args = make_args(tmp_path, max_steps=20, save_strategy="steps", save_steps=10)
    SD2Trainer(
        sparse_model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer
    ).train()
    ckpt = tmp_path / "out" / "checkpoint-10"
    assert ckpt.is_dir()

    # A fresh process would start from the pruned model again and resume from the checkpoint.
    resumed_model = tiny.build_model(tiny_tokenizer)
    tiny.magnitude_sparsify(resumed_model, 0.5)
    args2 = make_args(tmp_path, max_steps=30, save_strategy="steps", save_steps=10)
    trainer = SD2Trainer(
        resumed_model, args=args2, train_dataset=dataset, processing_class=tiny_tokenizer
    )
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 30
    assert_same_zeros(before, resumed_model)
    # the saved checkpoints themselves hold the exact zeros
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint-30")
    assert_same_zeros(before, reloaded)


def test_2_4_structure_survives_training(tmp_path, sparse_24_model, tiny_tokenizer, dataset):
    assert sparsity_report(sparse_24_model)["structure"] == "2:4"
    SD2Trainer(
        sparse_24_model,
        args=make_args(tmp_path, max_steps=20),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    ).train()
    for name, module in find_target_linears(sparse_24_model).items():
        assert is_n_m_sparse(module.weight, 2, 4), name


def test_without_callback_sparsity_drifts(tmp_path, sparse_model, tiny_tokenizer, dataset):
    """The control: plain SFT on the same sparse model loses its zeros (so the tests above can fail)."""
    before = zero_pattern(sparse_model)
    kwargs = base_kwargs(tmp_path)
    kwargs.pop("mask_check_interval")
    args = SFTConfig(**kwargs, assistant_only_loss=True)
    SFTTrainer(
        sparse_model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer
    ).train()
    after = zero_pattern(sparse_model)
    lost = sum(int((before[n] & ~after[n]).sum()) for n in before)
    assert lost > 0.9 * sum(int(b.sum()) for b in before.values())
    # and the callback's verifier detects such drift
    cb = SparsityMaskCallback()
    model = tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer), 0.5)
    cb.record(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    with pytest.raises(MaskDriftError, match="no longer zero"):
        cb.verify("test")


def test_teacher_distillation_overfits(tmp_path, tiny_tokenizer):
    rows = tiny.conversations(4, seed=3)
    ds = Dataset.from_list(rows)
    drafter = tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer, seed=5), 0.5)
    teacher = tiny.build_model(tiny_tokenizer, seed=6)
    before = zero_pattern(drafter)
    args = make_args(
        tmp_path,
        max_steps=40,
        distill_loss="fkl",
        distill_alpha=0.5,
        logging_steps=1,
        learning_rate=5e-3,
    )
    trainer = SD2Trainer(
        drafter, args=args, teacher_model=teacher, train_dataset=ds, processing_class=tiny_tokenizer
    )
    teacher_before = weights(teacher)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    assert any("fkl_divergence" in h for h in trainer.state.log_history)
    assert_same_zeros(before, drafter)
    # the teacher is frozen
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())


@pytest.mark.parametrize("bf16", [True, False])
def test_teacher_object_is_left_as_given(tmp_path, tiny_tokenizer, dataset, bf16):
    """The teacher is the caller's target, often evaluated after training: the trainer must not
    leave accelerate's mixed-precision forward wrapper on it (it changed its greedy output), but
    still runs it in the drafter's precision during training."""
    teacher = tiny.build_model(tiny_tokenizer, seed=6)
    ids = torch.randint(
        3, tiny_tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        reference = teacher(ids).logits
    head_dtypes = []
    teacher.lm_head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    drafter = tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer, seed=5), 0.5)
    trainer = SD2Trainer(
        drafter,
        args=make_args(tmp_path, max_steps=2, distill_loss="fkl", bf16=bf16),
        teacher_model=teacher,
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    assert head_dtypes and set(head_dtypes) == {torch.bfloat16 if bf16 else torch.float32}
    head_dtypes.clear()
    with torch.no_grad():
        after = teacher(ids).logits
    assert after.dtype == torch.float32 and head_dtypes == [torch.float32]
    assert torch.equal(after, reference)


def test_vocab_mismatch_is_refused(tmp_path, tiny_tokenizer, other_tokenizer, dataset):
    drafter = tiny.build_model(tiny_tokenizer)
    teacher = tiny.build_model(other_tokenizer)
    with pytest.raises(
        ValueError, match=r"drafter has 384 tokens and the teacher 320.*sequence-level"
    ):
        SD2Trainer(
            drafter,
            args=make_args(tmp_path, distill_loss="tvd"),
            teacher_model=teacher,
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )


def test_distill_loss_needs_teacher(tmp_path, tiny_model, tiny_tokenizer, dataset):
    with pytest.raises(ValueError, match="needs a teacher_model"):
        SD2Trainer(
            tiny_model,
            args=make_args(tmp_path, distill_loss="jsd"),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distill_loss": "kl"}, "allowed: none, fkl, rkl, jsd, tvd"),
        ({"distill_alpha": -1.0}, "distill_alpha must be >= 0"),
        ({"jsd_beta": 1.0}, "open interval"),
        ({"distill_temperature": 0.0}, "distill_temperature must be > 0"),
        ({"mask_check_interval": -1}, "mask_check_interval must be >= 0"),
        ({"mask_targets": []}, "at least one module pattern"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_mask_targets_that_match_nothing(tmp_path, tiny_model, tiny_tokenizer, dataset):
    trainer = SD2Trainer(
        tiny_model,
        args=make_args(tmp_path, mask_targets=["re:.*no_such_proj$"], max_steps=1),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    with pytest.raises(ValueError, match="no module matches mask targets"):
        trainer.train()


def _partition_like_zero3(model) -> None:
    """What DeepSpeed ZeRO-3 does to a parameter outside a gather: its data is an empty
    tensor and the partition lives in `ds_tensor` (DeepSpeed is not installed here)."""
    for module in find_target_linears(model).values():
        weight = module.weight
        weight.ds_id, weight.ds_tensor = 0, weight.data.flatten().clone()
        weight.data = torch.empty(0)


def test_masks_are_not_recorded_on_zero3_partitions(sparse_model):
    """Without the check the callback would record no mask and hold nothing, silently."""
    _partition_like_zero3(sparse_model)
    with pytest.raises(ValueError, match=r"ZeRO-3 partitioned parameter.*fsdp2\.yaml"):
        SparsityMaskCallback().record(sparse_model)


def test_parameters_without_local_data_are_refused(sparse_model):
    module = next(iter(find_target_linears(sparse_model).values()))
    module.weight.data = torch.empty(0)  # stands in for any wrapper that empties `.data`
    with pytest.raises(ValueError, match="no local data to record a mask on"):
        SparsityMaskCallback().record(sparse_model)


def test_sd2_trainer_refuses_zero3_before_training(
    tmp_path, sparse_model, tiny_tokenizer, dataset, monkeypatch
):
    # transformers' own switch, set when TrainingArguments carry a ZeRO-3 DeepSpeed config.
    monkeypatch.setattr("sd2_hf.training.trainer.is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 is not supported"):
        SD2Trainer(
            sparse_model,
            args=make_args(tmp_path),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )


def test_model_card_tags(tmp_path, sparse_model, tiny_tokenizer, dataset):
    trainer = SD2Trainer(
        sparse_model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    trainer.create_model_card(model_name="tiny-sd2")
    card = (tmp_path / "out" / "README.md").read_text()
    for tag in ("sd2", "speculative-decoding", "sparse"):
        assert f"- {tag}" in card


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_gloo_threads_joined(report: dict) -> None:
    """The worker tore torch.distributed down before exit: its gloo threads were joined.

    A rank whose gloo worker was still releasing its last collective when Python finalized
    aborted ("terminate called without an active exception") after all of its work was done;
    see sd2_hf/utils/distributed.py.
    """
    assert report["gloo_threads_before_teardown"] >= 1  # the group's workers were running
    assert report["gloo_threads_after_teardown"] == 0


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): the launcher starts its ranks in sessions of
    their own, so killing its process group would leave hung ranks behind."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _run_two_ranks(
    launcher: list[str], script: str, tmp_path, pythonpath=(), timeout: float = 600
) -> list[dict]:
    """Runs `script` under `launcher` (2 ranks); a run past `timeout` (a hang) fails the test,
    its ranks killed."""
    path = [*map(str, pythonpath), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    cmd = [sys.executable, "-m", *launcher, str(REPO / "tests" / "scripts" / script), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script} did not finish in {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_processes_keep_masks(tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo): both ranks keep the zeros.

    accelerate's `--cpu --num_processes 2` only multiplies processes through mpirun; on a machine
    without accelerators `--multi_gpu` starts torch's elastic launcher and Trainer runs MULTI_CPU.
    """
    launcher = [
        "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    reports = _run_two_ranks(launcher, "ddp_mask_worker.py", tmp_path)
    for rep in reports:
        assert rep["world_size"] == 2
        assert rep["distributed_type"] == "DistributedType.MULTI_CPU"
        assert rep["global_step"] == 12
        assert rep["zeros_equal_initial"] is True
        assert rep["weights_changed"] is True
        assert_gloo_threads_joined(rep)
    # both ranks hold identical weights (DDP)
    assert reports[0]["weights_digest"] == reports[1]["weights_digest"]
    # The distillation path's metrics are gathered: each rank trains on other conversations,
    # yet both log the same accuracy, CE and divergence (those of all tokens of the step).
    assert len(reports[0]["logged"]) == 3
    assert reports[0]["logged"] == reports[1]["logged"]


@pytest.mark.slow
def test_fsdp2_sharded_masks_hold(tmp_path):
    """Masks recorded on each rank's local shard of FSDP2 DTensor parameters hold exactly."""
    launcher = [
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    reports = _run_two_ranks(launcher, "fsdp2_mask_worker.py", tmp_path)
    for rep in reports:
        assert rep["weight_type"] == "DTensor"
        assert rep["local_numel"] * 2 == rep["full_numel"]  # really sharded
        assert rep["zeros_equal_initial"] is True
        assert rep["weights_changed"] is True
        assert_gloo_threads_joined(rep)


# --- on-policy distillation under several processes ----------------------------------------
# Ranks whose generations end at different lengths run different numbers of forwards unless
# `generate` runs with `synced_gpus`; under FSDP2 every forward all-gathers the sharded
# parameters, so a rank done early leaves the other waiting in a collective (or pairs its next
# collectives with the wrong ones). A hang fails the test after ON_POLICY_TIMEOUT_S.
ON_POLICY_TIMEOUT_S = 240
ON_POLICY_STEPS = 6  # tests/scripts/on_policy_worker.py: max_steps, every batch on-policy


def _assert_on_policy_run(reports: list[dict], distributed_type: str) -> None:
    for rep in reports:
        assert rep["world_size"] == 2
        assert rep["distributed_type"] == f"DistributedType.{distributed_type}"
        assert rep["global_step"] == ON_POLICY_STEPS
        # Every step trained on the drafter's own continuations, one generation per step.
        assert rep["on_policy_logged"] == [1.0] * ON_POLICY_STEPS
        assert len(rep["generated"]) == ON_POLICY_STEPS
        assert rep["zeros_equal_initial"] is True
        assert rep["gloo_threads_after_teardown"] == 0
    # Not vacuous: the ranks' own continuations ended at different lengths at least once.
    lengths = [rep["generated"] for rep in reports]
    assert any(a != b for a, b in zip(*lengths, strict=True)), lengths
    # Both ranks end with the same whole weights (DDP replicas; FSDP2 shards gathered).
    assert reports[0]["weights_digest"] == reports[1]["weights_digest"]


@pytest.mark.slow
def test_on_policy_under_fsdp2_with_ranks_generating_different_lengths(tmp_path):
    """On-policy TVD training, 2 CPU ranks sharded with FSDP2 (`accelerate launch` with the
    shipped FSDP2 config, tests/scripts/cpu_fsdp): generation on DTensor parameters runs in
    lockstep (`synced_gpus`), finishes, and the masks hold on every rank's shard."""
    launcher = [
        "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/fsdp2.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    reports = _run_two_ranks(
        launcher,
        "on_policy_worker.py",
        tmp_path,
        pythonpath=[REPO / "tests" / "scripts" / "cpu_fsdp", REPO],
        timeout=ON_POLICY_TIMEOUT_S,
    )
    _assert_on_policy_run(reports, "FSDP")
    for rep in reports:
        assert rep["weight_type"] == "DTensor"
    # Sharded: each rank's mask held the zeros of its own shard, together all of them.
    assert sum(rep["masked_zeros"] for rep in reports) == reports[0]["initial_zeros"]
    assert all(0 < rep["masked_zeros"] < rep["initial_zeros"] for rep in reports)
    # Lockstep: in every generation both ranks ran as many forwards as the longer one needed.
    lengths = [rep["generated"] for rep in reports]
    longest = [max(a, b) for a, b in zip(*lengths, strict=True)]
    assert reports[0]["forwards"] == reports[1]["forwards"] == longest


@pytest.mark.slow
def test_on_policy_under_ddp_with_ranks_generating_different_lengths(tmp_path):
    """The same on-policy run with DDP over gloo (`accelerate launch --multi_gpu` on CPU
    processes): every rank holds the whole drafter, its zeros stay the initial ones and the
    replicas stay identical though the ranks generated different lengths."""
    launcher = [
        "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    reports = _run_two_ranks(
        launcher, "on_policy_worker.py", tmp_path, pythonpath=[REPO], timeout=ON_POLICY_TIMEOUT_S
    )
    _assert_on_policy_run(reports, "MULTI_CPU")
    for rep in reports:
        assert rep["weight_type"] == "Parameter"
        assert rep["masked_zeros"] == rep["initial_zeros"]


@pytest.mark.parametrize(
    ("native", "asked", "expected"),
    [(False, None, False), (True, None, True), (None, None, True), (False, True, True)],
)
def test_bf16_default_follows_the_cpu(tmp_path, monkeypatch, native, asked, expected):
    """TRL turns bf16 autocast on when unset; on a CPU that only emulates bf16 it stays off."""
    from sd2_hf.utils import environment

    monkeypatch.setattr(environment, "cpu_has_native_bf16", lambda *a, **k: native)
    kwargs = {} if asked is None else {"bf16": asked}
    args = SD2Config(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    assert args.bf16 is expected
