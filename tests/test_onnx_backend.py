"""`sd2 eval --backend onnxruntime`: tiny checkpoints written by transformers 5 exported by
optimum in the ONNX environment and run by ONNX Runtime; the counts and outputs are those of
the transformers backend on the same fp32 models (same greedy step rule, same accounting)."""

from __future__ import annotations

import json

import pytest
import tiny

from sd2_hf.evaluation.runner import run_eval
from sd2_hf.utils.environment import PROJECT_ROOT

pytestmark = [pytest.mark.onnx, pytest.mark.usefixtures("single_torch_thread")]
ONNX_PYTHON = PROJECT_ROOT / ".venv-onnx" / "bin" / "python"


@pytest.fixture(scope="module", autouse=True)
def _onnx_environment():
    if not ONNX_PYTHON.exists():
        pytest.skip("the ONNX Runtime environment (.venv-onnx) is missing: run `make setup`")


@pytest.fixture(scope="module")
def mtbench_file(tmp_path_factory):
    return tiny.write_questions(tmp_path_factory.mktemp("prompts") / "question.jsonl")


def _eval(tmp_path, target, drafters, prompts, backend, **options):
    config = tiny.eval_config(
        target,
        prompts,
        tmp_path / backend,
        backend=backend,
        drafters=drafters,
        baselines=["none"],
        num_draft_tokens=3,
        max_new_tokens=12,
        dtype="float32",
        **options,
    )
    return {r["name"]: r for r in run_eval(config)["drafters"]}


def test_onnxruntime_matches_the_transformers_backend(
    tmp_path, tiny_model_dir, noisy_drafter_dir, mtbench_file
):
    drafters = [f"noisy={noisy_drafter_dir}", f"self={tiny_model_dir}"]
    onnx = _eval(
        tmp_path, tiny_model_dir, drafters, mtbench_file, "onnxruntime", step_cost_prompts=2
    )
    hf = _eval(
        tmp_path, tiny_model_dir, drafters, mtbench_file, "transformers", step_cost_prompts=0
    )
    for name in ("noisy", "self"):
        assert onnx[name]["lossless_checked"] and onnx[name]["lossless_mismatches"] == 0
        assert onnx[name]["per_prompt"] == hf[name]["per_prompt"], name
        assert onnx[name]["mal"] == pytest.approx(hf[name]["mal"])
        assert onnx[name]["tokens_per_second"] > 0 and onnx[name]["speedup"] > 0
        assert onnx[name]["step_cost"]["ratio"] > 0  # both models timed alone in the worker
        # The target's verify step over K + 1 tokens, timed in the worker: the cost model's
        # projection beside the measured speed-up.
        assert onnx[name]["step_cost"]["verify_ratio"]["3"] > 0
        assert onnx[name]["projected_speedup"] > 0
    # The target drafting for itself accepts every draft (MAL K + 1 but at the length limit).
    assert onnx["self"]["mal"] > 3.5
    # One fp32 export per checkpoint, reused: two drafters, one of them the target itself.
    assert len(list((tmp_path / "onnxruntime" / "onnx").iterdir())) == 2
    report = json.loads((tmp_path / "onnxruntime" / "eval.json").read_text())
    assert report["served_dtype"] == "float32" and "onnxruntime" in report["versions"]
    assert report["versions"]["optimum-onnx"][0].isdigit()  # read from the wheel's metadata


def test_onnxruntime_refuses_what_it_cannot_run(tmp_path, tiny_model_dir, mtbench_file):
    with pytest.raises(ValueError, match="backend onnxruntime runs fp32 exports greedily"):
        tiny.eval_config(
            tiny_model_dir, mtbench_file, tmp_path, backend="onnxruntime", baselines=["ngram"]
        )


def test_export_staging_links_the_checkpoint_files_and_leaves_subfolders_out(tmp_path):
    """A training run's folder holds `checkpoints/` (optimizer states, several times the
    model): the export stages the top-level files as links and the config (with `rope_theta`
    from transformers 5's `rope_parameters`) as a copy, never the subfolders."""
    import subprocess

    src = tmp_path / "train"
    (src / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (src / "checkpoints" / "checkpoint-10" / "optimizer.pt").write_bytes(b"x" * 1024)
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 1e6}}))
    staging = tmp_path / "export.src"
    worker_dir = PROJECT_ROOT / "sd2_hf" / "evaluation"
    code = (
        "import sys; from pathlib import Path; "
        f"sys.path.insert(0, {str(worker_dir)!r}); from onnx_worker import stage; "
        f"stage({str(src)!r}, Path({str(staging)!r}))"
    )
    subprocess.run([str(ONNX_PYTHON), "-c", code], check=True)
    assert sorted(p.name for p in staging.iterdir()) == ["config.json", "model.safetensors"]
    assert (staging / "model.safetensors").is_symlink()
    assert (staging / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((staging / "config.json").read_text())["rope_theta"] == 1e6
    assert "rope_theta" not in json.loads((src / "config.json").read_text())
