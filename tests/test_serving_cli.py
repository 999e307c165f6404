"""`sd2 serve` input checks (the full run against vLLM is in test_serving_vllm.py)."""

from __future__ import annotations

import subprocess
import sys
import time

SERVE = [sys.executable, "-m", "sd2_hf.cli", "serve"]


def test_serve_rejects_a_missing_model_quickly(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [*SERVE, "--target", str(tmp_path / "missing-model")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "missing-model does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_serve_rejects_bad_option_combinations(tiny_model_dir):
    no_drafter = subprocess.run(
        [*SERVE, "--target", str(tiny_model_dir), "--num-draft-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_drafter.returncode != 0
    assert "num_draft_tokens is only allowed with a drafter" in no_drafter.stderr
    bad_dtype = subprocess.run(
        [*SERVE, "--target", str(tiny_model_dir), "--dtype", "int3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad_dtype.returncode == 2
    assert "invalid choice: 'int3'" in bad_dtype.stderr
