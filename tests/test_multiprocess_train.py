"""The train stage as users run it at scale: `accelerate launch` with the shipped configs, two
CPU processes (gloo), through `sd2 train` and through a recipe's `train.accelerate_config`.

accelerate enables FSDP only on accelerators; `tests/scripts/cpu_fsdp/sitecustomize.py` (put on
the processes' PYTHONPATH) lets the same launch shard with FSDP2 on CPU processes, so the real
SD2Trainer path runs on DTensor parameters: sharded masks, full-state-dict saves, resume.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from sd2_hf.cli import main as sd2_main
from sd2_hf.pruning.masks import find_target_linears
from sd2_hf.training.stage import REPORT_FILE

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "recipes" / "accelerate"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def cpu_fsdp_env(monkeypatch):
    path = os.pathsep.join(
        [str(REPO / "tests" / "scripts" / "cpu_fsdp"), str(REPO), os.environ.get("PYTHONPATH", "")]
    )
    monkeypatch.setenv("PYTHONPATH", path)
    return {**os.environ, "PYTHONPATH": path}


def _zeros(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: m.weight == 0 for n, m in find_target_linears(model).items()}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: m.weight.detach().clone() for n, m in find_target_linears(model).items()}


def _assert_trained_sparse(pruned: Path, out: Path, report: dict) -> None:
    """Same zeros as the pruned checkpoint, other weights moved, every rank held a mask."""
    before, after = _zeros(pruned), _zeros(out)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"zero pattern changed in {name}"
    moved = _weights(out)
    assert any(not torch.equal(w, moved[n]) for n, w in _weights(pruned).items())
    assert report["num_processes"] == 2
    assert report["sparsity_after"] == report["sparsity_before"]
    assert len(report["masked_zeros_per_rank"]) == 2


def test_sd2_train_under_accelerate_fsdp2_shards_masks_and_resumes(
    tmp_path, sparse_dir, conversations_file, cpu_fsdp_env
):
    out = tmp_path / "trained"

    def launch(max_steps: int) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ACCELERATE / "fsdp2.yaml"),
            "--num_processes", "2", "--main_process_port", str(_free_port()),
            "-m", "sd2_hf.cli", "train", str(sparse_dir), "--dataset", str(conversations_file),
            "--output", str(out), "--max-steps", str(max_steps), "--save-steps", "2",
            "--max-length", "64", "--logging-steps", "1",
        ]  # fmt: skip
        proc = subprocess.run(
            command, env=cpu_fsdp_env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    first = launch(2)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["distributed_type"] == "FSDP" and report["global_step"] == 2
    # Sharded: each rank held the zeros of its own half, together all of them.
    total_zeros = sum(int(z.sum()) for z in _zeros(sparse_dir).values())
    assert sum(report["masked_zeros_per_rank"]) == total_zeros
    assert all(0 < z < total_zeros for z in report["masked_zeros_per_rank"])
    assert first.stdout.count("trained 2 steps") == 1  # rank 0 reports, alone
    _assert_trained_sparse(sparse_dir, out, report)

    launch(4)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["resumed_from"].endswith("checkpoint-2")
    assert report["global_step"] == 4
    assert report["distributed_type"] == "FSDP"
    _assert_trained_sparse(sparse_dir, out, report)


def test_recipe_train_stage_launches_processes_with_the_ddp_config(
    tmp_path, sparse_dir, conversations_file, cpu_fsdp_env, capsys
):
    """`train.accelerate_config` runs the stage in `accelerate launch` processes, here with the
    distillation loss against the target (a second model prepared by accelerate)."""
    recipe = {
        "name": "multiprocess",
        "output": str(tmp_path / "run"),
        "target": str(sparse_dir),
        "dataset": str(conversations_file),
        "train": {
            "max_steps": 3,
            "max_length": 64,
            "learning_rate": 1e-2,
            "distill_loss": "fkl",
            "distill_alpha": 0.5,
            "accelerate_config": str(ACCELERATE / "ddp.yaml"),
            "accelerate_args": ["--num_processes", "2", "--main_process_port", str(_free_port())],
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert sd2_main(["run", str(path)]) == 0
    out = tmp_path / "run" / "train"
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["distributed_type"] == "MULTI_CPU"  # DDP on CPU processes
    assert report["global_step"] == 3 and report["distill_loss"] == "fkl"
    # DDP: every rank holds the whole drafter and all of its zeros.
    assert report["masked_zeros_per_rank"][0] == report["masked_zeros_per_rank"][1]
    _assert_trained_sparse(sparse_dir, out, report)
    summary = capsys.readouterr().out
    assert "train    ran" in summary and "3 steps on 12 conversations" in summary
