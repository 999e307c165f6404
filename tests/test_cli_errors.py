"""Bad input to every `sd2` command: one message saying what is wrong, exit status 2, no
traceback, and nothing written."""

from __future__ import annotations

import json

import pytest
import tiny

from sd2_hf.utils.models import resolve_model_path


@pytest.fixture()
def inputs(tmp_path, tiny_tokenizer, monkeypatch):
    """A real checkpoint and conversations file; the commands run from `tmp_path`, so the
    relative names below are relative paths."""
    monkeypatch.chdir(tmp_path)
    tiny.save_model(tiny.build_model(tiny_tokenizer), tiny_tokenizer, tmp_path / "model")
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in tiny.conversations(4))
    )
    (tmp_path / "questions.jsonl").write_text(
        json.dumps({"question_id": 1, "category": "writing", "turns": ["Hi?"]}) + "\n"
    )
    return tmp_path


# (command line, what the message must say); `runs/missing` is a relative path with one slash, which
# looks like a Hub id (org/name) and used to skip the fail-fast check.
MISSING_MODEL = "runs/missing is not a local directory"
NO_DATASET = "dataset source 'nope.jsonl' not found"
EVAL = "eval --prompts questions.jsonl --output out"
CASES = {
    "train-model": ("train runs/missing --dataset data.jsonl --output out", MISSING_MODEL),
    "train-teacher": (
        "train model --dataset data.jsonl --output out --teacher runs/missing --distill-loss fkl",
        MISSING_MODEL,
    ),
    "train-dataset": ("train model --dataset nope.jsonl --output out", NO_DATASET),
    "train-bad-value": (
        "train model --dataset data.jsonl --output out --learning-rate -1",
        "learning_rate",
    ),
    "prune-model": ("prune runs/missing --recipe sparsegpt-50 --output out", MISSING_MODEL),
    "prune-dataset": (
        "prune model --recipe sparsegpt-50 --dataset nope.jsonl --output out",
        NO_DATASET,
    ),
    "eval-target": (f"{EVAL} --target runs/missing --drafter d=model", MISSING_MODEL),
    "eval-drafter": (f"{EVAL} --target model --drafter d=runs/missing", MISSING_MODEL),
    "eval-prompts": (
        "eval --target model --drafter d=model --prompts nope.jsonl --output out",
        "nope.jsonl",
    ),
    "export-model": ("export runs/missing --output out", MISSING_MODEL),
    "distill-target": (
        "distill --target runs/missing --source data.jsonl --output out",
        MISSING_MODEL,
    ),
    "distill-source": ("distill --target model --source nope.jsonl --output out", NO_DATASET),
    "macs-model": ("macs runs/missing", "cannot count MACs of 'runs/missing'"),
    "serve-target": ("serve --target runs/missing --drafter model", MISSING_MODEL),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_message_and_exit_2(inputs, sd2_fails, case):
    argv, expected = CASES[case]
    message = sd2_fails(argv.split())
    assert expected in message
    assert not (inputs / "out").exists(), "a failed command left its output directory"


def test_a_missing_relative_path_with_a_slash_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runs/x is not a local directory.*Hub"):
        resolve_model_path("runs/x")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_path("runs/x")
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a valid Hub"):
        resolve_model_path("not a/valid id")


def test_verbose_adds_the_traceback(inputs, capsys):
    from sd2_hf.cli import main

    assert main(["-v", "macs", "runs/missing"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: sd2 macs: cannot count MACs" in err
