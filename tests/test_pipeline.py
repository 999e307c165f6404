"""`sd2 run`: every stage end to end on tiny models, then reruns that skip, resume or redo."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import tiny
import torch
import yaml

from sd2_hf.cli import main as sd2_main
from sd2_hf.pipeline import COMPLETE_FILE, PROVENANCE_FILE, RUNNING_FILE, PipelineError
from sd2_hf.recipe import STAGES, load_recipe

# Tiny models are dominated by thread hand-offs: one thread is faster on a busy machine.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def write_recipe(directory: Path, target: Path, **changes) -> Path:
    """A recipe on the tiny target, its data next to it and referred to by relative paths."""
    tiny.write_seed_data(directory)
    recipe = {
        "name": "tiny",
        "description": "every stage on a tiny model",
        "output": "run",
        "target": str(target),
        "dataset": "seed.jsonl",
        "distill": {"max_new_tokens": 12, "filter_truncated": False, "dtype": "float32"},
        "prune": {"recipe": "sparsegpt-50", "num_samples": 8, "max_seq_length": 64},
        "train": {"max_steps": 4, "learning_rate": 1e-2, "max_length": 64, "save_steps": 2},
        "export": {"format": "dense"},
        "eval": {
            "prompts": "question.jsonl",
            "num_draft_tokens": 3,
            "max_new_tokens": 8,
            "baselines": ["none"],
        },
    }
    for key, value in changes.items():
        recipe[key] = value
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def statuses(out: str) -> dict[str, str]:
    """Stage -> status, read from the summary table `sd2 run` prints."""
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in STAGES and parts[1] in ("ran", "resumed", "skipped"):
            found[parts[0]] = parts[1]
    return found


def records(root: Path) -> dict[str, dict]:
    return {
        s: json.loads((root / s / COMPLETE_FILE).read_text())
        for s in STAGES
        if (root / s / COMPLETE_FILE).exists()
    }


def test_run_every_stage_then_skip_then_redo_train(
    tmp_path, tiny_model_dir, tiny_tokenizer, capsys
):
    # The longest seed prompts are filtered before generation (distill.max_prompt_tokens).
    lengths = sorted(
        len(
            tiny_tokenizer.apply_chat_template(
                r["messages"][:1], add_generation_prompt=True, return_dict=False
            )
        )
        for r in tiny.conversations(8)
    )
    limit = lengths[-3]
    long_prompts = sum(n > limit for n in lengths)
    distill = {"max_new_tokens": 12, "filter_truncated": False, "dtype": "float32"}
    recipe = write_recipe(
        tmp_path / "recipe", tiny_model_dir, distill={**distill, "max_prompt_tokens": limit}
    )
    root = tmp_path / "recipe" / "run"

    # 1. First run: every stage runs, in order, into <output>/<stage>/.
    assert sd2_main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert statuses(out) == dict.fromkeys(STAGES, "ran")
    first = records(root)
    assert list(first) == list(STAGES)
    # Stages consume their predecessors' outputs, and their records say which run of them.
    assert first["prune"]["config"]["dataset"] == str(root / "distill")
    assert first["train"]["config"]["model"] == str(root / "prune")
    assert first["train"]["config"]["dataset"] == str(root / "distill")
    assert first["export"]["config"]["drafter"] == str(root / "train")
    assert first["train"]["inputs"]["prune"]["run_id"] == first["prune"]["run_id"]
    assert 1 <= long_prompts <= 2
    assert first["distill"]["result"]["written"] == 8 - long_prompts
    assert first["distill"]["result"]["filtered_by_reason"] == {"too_long": long_prompts}
    assert first["train"]["result"]["num_conversations"] == 8 - long_prompts
    assert first["prune"]["result"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert first["train"]["result"]["global_step"] == 4
    # The training ran in a child process (its memory goes back to the system when it ends).
    assert "-m sd2_hf.training.launch " in out
    assert not any((root / s / RUNNING_FILE).exists() for s in STAGES)

    report = json.loads((root / "eval" / "eval.json").read_text())
    rows = {r["name"]: r for r in report["drafters"]}
    assert set(rows) == {"none", "sd2", "pruned"}
    assert rows["sd2"]["path"] == str(root / "export")
    assert rows["pruned"]["path"] == str(root / "prune")
    assert all(r["lossless_mismatches"] == 0 for r in rows.values())
    assert (root / "eval" / "mal_per_category.png").exists()
    # The exported drafter's card states the MAL measured by the eval stage.
    metadata = json.loads((root / "export" / "sd2_drafter.json").read_text())
    assert metadata["eval"]["runs"][0]["drafter"] == "sd2"
    assert f"{rows['sd2']['mal']:.2f}" in (root / "export" / "README.md").read_text()
    # ... and the best draft length eval found is the exported drafter's K (export ran first,
    # with the default K).
    best = rows["sd2"]["best_num_draft_tokens"]
    exported = json.loads((root / "export" / "generation_config.json").read_text())
    assert exported["num_assistant_tokens"] == best
    assert metadata["assisted_generation"]["num_assistant_tokens"] == best
    assert metadata["assisted_generation"]["source"].startswith("eval")
    # The summary reports MAL per drafter and where the report is.
    assert f"{rows['sd2']['mal']:.3f}" in out and f"{rows['pruned']['mal']:.3f}" in out
    assert str(root / "eval" / "eval.md") in out
    table = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    sparsity = f"{first['prune']['result']['global_sparsity']:.1%}"
    assert sparsity in table["pruned"] and sparsity in table["sd2"]
    # ... and each drafter's measured step time against the target's, and its speed-up.
    assert f"{rows['sd2']['measured_cost']:.1%}" in table["sd2"]
    assert f"{rows['sd2']['speedup']:.2f}x" in table["sd2"]

    provenance = json.loads((root / PROVENANCE_FILE).read_text())
    run = provenance["run"]
    assert run["status"] == "complete" and run["end_time"] >= run["start_time"]
    assert run["command"][:2] == ["sd2", "run"]
    assert run["recipe"]["dataset"] == str(tmp_path / "recipe" / "seed.jsonl")
    for package in ("python", "torch", "transformers", "trl", "llmcompressor", "datasets"):
        assert run["versions"][package]
    assert set(run["stages"]) == set(STAGES)

    # 2. Rerun: everything is complete and unchanged, nothing runs.
    assert sd2_main(["run", str(recipe)]) == 0
    assert statuses(capsys.readouterr().out) == dict.fromkeys(STAGES, "skipped")
    assert {s: r["run_id"] for s, r in records(root).items()} == {
        s: r["run_id"] for s, r in first.items()
    }
    assert len(json.loads((root / PROVENANCE_FILE).read_text())["history"]) == 1

    # 3. A changed train section redoes train and the stages that consume it, only.
    assert sd2_main(["run", str(recipe), "train.max_steps=3"]) == 0
    assert statuses(capsys.readouterr().out) == {
        "distill": "skipped",
        "prune": "skipped",
        "train": "ran",
        "export": "ran",
        "eval": "ran",
    }
    third = records(root)
    assert third["distill"]["run_id"] == first["distill"]["run_id"]
    assert third["prune"]["run_id"] == first["prune"]["run_id"]
    assert third["train"]["result"]["global_step"] == 3
    # Started afresh, not resumed from the 4-step run's checkpoints.
    assert third["train"]["resumed"] is False
    assert third["export"]["inputs"]["train"]["run_id"] == third["train"]["run_id"]

    # 4. An interrupted training resumes from its last checkpoint, not from step 0 (here
    # killed after the step-2 checkpoint: the step-3 one and the completion record are gone).
    (root / "train" / COMPLETE_FILE).unlink()
    shutil.rmtree(root / "train" / "checkpoints" / "checkpoint-3")
    # The killed attempt started an hour before its last file and resumed one of 50 s.
    newest = max(f.stat().st_mtime for f in (root / "train").rglob("*") if f.is_file())
    since = datetime.fromtimestamp(newest - 3600, timezone.utc).isoformat()
    running = {"fingerprint": third["train"]["fingerprint"], "since": since, "earlier_seconds": 50}
    (root / "train" / RUNNING_FILE).write_text(json.dumps(running))
    assert sd2_main(["run", str(recipe), "train.max_steps=3", "--only", "train"]) == 0
    assert statuses(capsys.readouterr().out) == {"train": "resumed"}
    report = json.loads((root / "train" / "train_report.json").read_text())
    assert report["resumed_from"].endswith("checkpoint-2") and report["global_step"] == 3
    fourth = records(root)["train"]
    assert 3650 - 1 <= fourth["earlier_attempts_seconds"] <= 3650 + 1
    assert fourth["total_seconds"] == pytest.approx(fourth["seconds"] + 3650, abs=1.1)

    # 5. An interrupted distillation (no completion record) resumes from its journal.
    (root / "distill" / COMPLETE_FILE).unlink()
    running = {"fingerprint": third["distill"]["fingerprint"], "since": "earlier"}
    (root / "distill" / RUNNING_FILE).write_text(json.dumps(running))
    assert sd2_main(["run", str(recipe), "train.max_steps=3", "--only", "distill"]) == 0
    assert statuses(capsys.readouterr().out) == {"distill": "resumed"}
    manifest = json.loads((root / "distill" / "manifest.json").read_text())
    assert manifest["this_run"]["rows_resumed"] == 8  # written and filtered rows alike
    # An unreadable start of the killed attempt counts nothing.
    assert records(root)["distill"]["earlier_attempts_seconds"] == 0
    assert manifest["this_run"]["rows_processed"] == 0

    # 6. The resumed distill is a new output: a dry run shows every consumer would be redone.
    assert sd2_main(["run", str(recipe), "train.max_steps=3", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    for stage in ("prune", "train", "export", "eval"):
        assert f"{stage:<9}would run" in dry
    assert "distill  skipped" in dry


def test_only_needs_complete_inputs(tmp_path, tiny_model_dir):
    recipe = load_recipe(write_recipe(tmp_path / "r", tiny_model_dir))
    from sd2_hf.pipeline import run_pipeline

    with pytest.raises(PipelineError, match="needs the output of the train stage"):
        run_pipeline(recipe, only="export")
    with pytest.raises(PipelineError, match="the recipe has no 'train' section"):
        run_pipeline(recipe.model_copy(update={"train": None}), from_stage="train")


def test_refuses_a_foreign_output_directory(tmp_path, tiny_model_dir, sd2_fails):
    recipe = write_recipe(tmp_path / "r", tiny_model_dir)
    (tmp_path / "r" / "run").mkdir()
    (tmp_path / "r" / "run" / "precious.txt").write_text("keep me")
    assert "not an `sd2 run` directory" in sd2_fails(["run", recipe, "--only", "distill"])
    assert (tmp_path / "r" / "run" / "precious.txt").read_text() == "keep me"


def test_bad_stage_input_is_a_message_not_a_traceback(tmp_path, tiny_model_dir, sd2_fails):
    recipe = write_recipe(tmp_path / "r", tiny_model_dir)
    message = sd2_fails(
        ["run", recipe, "prune.recipe=sparsegpt-55", "distill=null", "--only", "prune"]
    )
    assert "error: sd2 run: prune: unknown recipe 'sparsegpt-55'" in message
    provenance = json.loads((tmp_path / "r" / "run" / PROVENANCE_FILE).read_text())
    assert provenance["run"]["status"] == "failed"


def test_a_refused_training_input_is_a_message_from_the_child_process(
    tmp_path, tiny_model_dir, sd2_fails
):
    recipe = write_recipe(tmp_path / "r", tiny_model_dir)
    (tmp_path / "r" / "bad.jsonl").write_text('{"text": "no messages here"}\n')
    message = sd2_fails(
        ["run", recipe, "distill=null", "prune=null", "export=null", "eval=null",
         f"dataset={tmp_path / 'r' / 'bad.jsonl'}", f"train.model={tiny_model_dir}"]
    )  # fmt: skip
    assert "error: sd2 run: train: " in message and "Traceback" not in message
    assert "has no conversation with an assistant turn" in message
    assert message.count("has no conversation") == 1


def test_threads_are_set_for_the_stages_and_restored(monkeypatch):
    from sd2_hf.pipeline.run import stage_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with stage_threads(before + 1):
        assert torch.get_num_threads() == before + 1
        assert os.environ["OMP_NUM_THREADS"] == str(before + 1)
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ


@pytest.mark.vllm
def test_distill_with_the_vllm_backend(tmp_path, tiny_model_dir, vllm_python, monkeypatch, capsys):
    """The distill stage on a vLLM server (started and stopped by the stage), then prune and
    train consume its output as with the transformers backend."""
    monkeypatch.setenv("SD2_VLLM_PYTHON", str(vllm_python))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    recipe = write_recipe(tmp_path / "r", tiny_model_dir)
    overrides = ["distill.backend=vllm", "export=null", "eval=null"]
    assert sd2_main(["run", str(recipe), *overrides]) == 0
    assert statuses(capsys.readouterr().out) == {"distill": "ran", "prune": "ran", "train": "ran"}
    root = tmp_path / "r" / "run"
    done = records(root)
    assert done["distill"]["config"]["backend"] == "vllm"
    assert done["distill"]["result"]["written"] == 8
    manifest = json.loads((root / "distill" / "manifest.json").read_text())
    assert manifest["versions"]["vllm"]
    assert done["train"]["result"]["num_conversations"] == 8
