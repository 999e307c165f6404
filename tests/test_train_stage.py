"""`sd2 train` / run_train: a pruned checkpoint + conversations file -> fine-tuned drafter, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sd2_hf.cli import main as sd2_main
from sd2_hf.pruning.masks import find_target_linears
from sd2_hf.training.config import TrainStageConfig
from sd2_hf.training.stage import run_train


def zeros(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: m.weight == 0 for n, m in find_target_linears(model).items()}


def test_run_train_then_resume(tmp_path, sparse_dir, conversations_file):
    out = tmp_path / "trained"
    config = TrainStageConfig(
        model=str(sparse_dir),
        dataset=str(conversations_file),
        output=str(out),
        max_steps=6,
        save_steps=3,
        learning_rate=1e-2,
        max_length=64,
        logging_steps=2,
    )
    report = run_train(config)
    assert report["global_step"] == 6 and report["resumed_from"] is None
    assert report["sparsity_before"] == pytest.approx(0.5, abs=1e-3) == report["sparsity_after"]
    before, after = zeros(sparse_dir), zeros(out)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert json.loads((out / "train_report.json").read_text())["global_step"] == 6

    # a longer run in the same output dir continues from the last checkpoint
    report2 = run_train(config.model_copy(update={"max_steps": 8}))
    assert report2["resumed_from"].endswith("checkpoint-6")
    assert report2["global_step"] == 8


def test_cli_train_and_bad_values(tmp_path, sparse_dir, conversations_file, capsys, sd2_fails):
    out = tmp_path / "cli"
    rc = sd2_main(
        ["train", str(sparse_dir), "--dataset", str(conversations_file), "--output", str(out),
         "--max-steps", "2", "--max-length", "64"]
    )  # fmt: skip
    assert rc == 0 and (out / "model.safetensors").exists()
    assert "trained 2 steps" in capsys.readouterr().out
    assert "needs `teacher`" in sd2_fails(
        ["train", sparse_dir, "--dataset", "x", "--output", "y", "--distill-loss", "fkl"]
    )
    assert "less than 1" in sd2_fails(
        ["train", sparse_dir, "--dataset", "x", "--output", "y", "--jsd-beta", "1.5"]
    )


def test_every_dataset_format_the_cli_offers_is_one_the_loaders_read(conversations_file):
    """`sd2 train --dataset-format` offers exactly the row forms `load_conversations` takes."""
    from sd2_hf.cli import build_parser
    from sd2_hf.data.loaders import ROW_FORMATS, load_conversations

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    offered = next(a.choices for a in train._actions if a.dest == "dataset_format")
    assert sorted(offered) == sorted(ROW_FORMATS)
    for form in offered:  # raises "unknown format" for a value the loaders do not know
        load_conversations(str(conversations_file), format=form)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case: this machine has CUDA")
def test_bf16_on_a_machine_without_an_accelerator_trains_on_the_cpu(tmp_path):
    from sd2_hf.training.stage import _trainer_args

    # TrainingArguments alone refuse bf16 here ("Your setup doesn't support bf16/gpu").
    config = TrainStageConfig(model="m", dataset="d", output=str(tmp_path), bf16=True)
    args = _trainer_args(config, tmp_path / "checkpoints")
    assert args.bf16 and args.use_cpu
