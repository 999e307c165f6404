"""bench/gpu_check.py on CPU: its training and timing code on tiny shapes (the CUDA-only 2:4
kernels are reported as not measured, with the reason)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_its_cpu_safe_parts(gpu_check, tmp_path, single_torch_thread):
    report = gpu_check.main(
        ["--tiny", "--device", "cpu", "--train-steps", "3", "--repeats", "2", "--context", "16",
         "--output", str(tmp_path)]
    )  # fmt: skip
    assert report["train"]["steps"] == 3
    assert report["train"]["zeros_exact"] is True and report["train"]["still_2of4"] is True
    assert report["train"]["first_loss"] is not None
    assert "CUDA" in report["semi_structured"]["unsupported"]
    for batch in (1, 8):
        row = report["step_timings"][batch]
        assert row["drafter_dense_ms"] > 0 and row["target_dense_ms"] > 0
        assert "drafter_2of4_ms" not in row
    assert (
        json.loads((tmp_path / "gpu_check.json").read_text())["shapes"]["drafter"] == "tiny-drafter"
    )
    assert "not measured: needs a CUDA GPU" in (tmp_path / "gpu_check.md").read_text()


def test_the_sparse_swap_keeps_the_function(gpu_check, single_torch_thread):
    """Where the kernels exist, swapping weights must not change the drafter's outputs."""
    if gpu_check.semi_structured_supported("cuda") is not None:
        pytest.skip(f"semi-structured 2:4 kernels: {gpu_check.semi_structured_supported('cuda')}")
    import tiny
    import torch

    drafter = gpu_check.build("tiny-drafter", 384, torch.bfloat16, "cuda")
    tiny.magnitude_sparsify(drafter, structure="2:4")
    ids = torch.randint(0, 384, (8, 16), device="cuda")
    with torch.no_grad():
        dense = drafter(input_ids=ids).logits
        assert gpu_check.to_semi_structured(drafter) == 14
        sparse = drafter(input_ids=ids).logits
    torch.testing.assert_close(sparse, dense, atol=5e-2, rtol=5e-2)
