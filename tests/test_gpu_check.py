"""bench/gpu_check.py: its training and timing code on tiny shapes on CPU (the CUDA-only 2:4
kernels are reported as not measured, with the reason); results written part by part; the library
code it runs the 2:4 kernels with (`sd2_hf.pruning.semi_structured`): the `FlatLinear` 2-D reshape
and the swap with a dense stand-in, the backend choice; and, on a CUDA machine, the
semi-structured path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sd2_hf.pruning import semi_structured
from sd2_hf.pruning.semi_structured import (
    FlatLinear,
    choose_backend,
    semi_structured_backend,
    semi_structured_converter,
    to_semi_structured,
)

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
TINY = ["--tiny", "--train-steps", "3", "--repeats", "2", "--context", "16"]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: the semi-structured 2:4 path; a CUDA machine runs it (tests/test_gpu_check.py)",
)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_its_cpu_safe_parts(gpu_check, tmp_path, single_torch_thread, capsys):
    report = gpu_check.main([*TINY, "--device", "cpu", "--output", str(tmp_path)])
    assert report["errors"] == {}
    assert report["train"]["steps"] == 3
    assert report["train"]["zeros_exact"] is True and report["train"]["still_2of4"] is True
    assert report["train"]["first_loss"] is not None
    assert report["semi_structured"]["unsupported"].startswith("needs CUDA")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    for batch in (1, 8):
        row = report["step_timings"][batch]
        assert row["drafter_dense_ms"] > 0 and row["target_dense_ms"] > 0
        assert row["drafter_vs_target_cost"] == row["drafter_dense_ms"] / row["target_dense_ms"]
        assert "drafter_2of4_ms" not in row
        # The file holds every result, the last ratio included (not only the returned report).
        assert saved["step_timings"][str(batch)] == row
    assert saved["shapes"]["drafter"] == "tiny-drafter"
    # The target's verify step over K + 1 tokens (batch 1, eager on CPU; graph keys on CUDA).
    row = report["step_timings"][1]
    assert all(row[f"target_verify_k{k}_ms"] > 0 for k in gpu_check.VERIFY_K)
    assert not any("graph" in key for key in row)
    # The cost model on these times for each committed study row with a draft-length sweep.
    from sd2_hf.evaluation.cost_model import projected_speedup

    dense = report["projection"]["mtbench/dense"]
    study = json.loads(gpu_check.MAL_FROM.read_text())["evaluations"]["mtbench"]
    sweep = next(r for r in study["drafters"] if r["name"] == "dense")["draft_length_sweep"]
    mal = {s["num_draft_tokens"]: s["mal"] for s in sweep}
    expected = projected_speedup(
        mal[4], 4, row["drafter_dense_ms"], row["target_dense_ms"], row["target_verify_k4_ms"]
    )
    assert dense["steps"] == "eager" and dense["by_k"][4] == pytest.approx(expected)
    assert dense["best"] == max(dense["by_k"].values()) and dense["own_run_k"] == 4
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "Target verify step (eager)" in markdown and "| mtbench/dense | eager |" in markdown
    assert "not measured: needs CUDA" in (tmp_path / "gpu_check.md").read_text()
    assert "not measured: needs CUDA" in capsys.readouterr().out


def test_flat_linear_gives_its_weight_2d_input_only(monkeypatch):
    """What semi-structured weights need: F.linear sees (tokens, features), never 3-D input; the
    result is nn.Linear's, in the input's leading shape."""
    dense = torch.nn.Linear(16, 8)
    flat = FlatLinear(dense.weight.detach().clone(), dense.bias.detach().clone())
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append(x.dim())
        return linear(x, weight, bias)

    x = torch.randn(8, 3, 16)
    with torch.no_grad():
        expected = dense(x)
        monkeypatch.setattr(semi_structured.F, "linear", spy)
        got = flat(x)
    assert seen == [2]
    assert got.shape == (8, 3, 8)
    torch.testing.assert_close(got, expected)


def test_the_swap_keeps_the_function_with_a_dense_stand_in(gpu_check, single_torch_thread):
    """to_semi_structured with an identity conversion: every 2:4 linear becomes a FlatLinear and
    the drafter's outputs on 3-D input at batch 8 are unchanged."""
    import tiny

    drafter = gpu_check.build("tiny-drafter", 384, torch.float32, "cpu")
    tiny.magnitude_sparsify(drafter, structure="2:4")
    ids = torch.randint(0, 384, (8, 16))
    with torch.no_grad():
        dense = drafter(input_ids=ids).logits
        assert to_semi_structured(drafter, convert=lambda w: w.clone()) == 14
        flat = drafter(input_ids=ids).logits
    assert sum(isinstance(m, FlatLinear) for m in drafter.modules()) == 14
    torch.testing.assert_close(flat, dense)


@pytest.mark.parametrize(
    ("capability", "cusparselt", "requested", "backend"),
    [
        ((8, 0), True, "auto", "cusparselt"),
        ((8, 0), False, "auto", "cutlass"),
        ((8, 6), True, "cutlass", "cutlass"),
        ((9, 0), True, "auto", "cusparselt"),
        ((9, 0), True, "cutlass", None),  # CUTLASS: "Supported only on ... capability 8.x"
        ((9, 0), False, "auto", None),
        ((7, 5), True, "auto", None),
    ],
)
def test_backend_choice_keeps_cutlass_off_sm90(capability, cusparselt, requested, backend):
    chosen, reason = choose_backend(capability, cusparselt, requested)
    assert chosen == backend
    assert (reason is None) == (backend is not None)
    if capability == (9, 0) and backend is None:
        assert "8.x" in reason


def test_the_converter_is_the_backends_own():
    """Each backend converts with its own tensor class (no global `_FORCE_CUTLASS` switch)."""
    for backend, cls in (
        ("cusparselt", torch.sparse.SparseSemiStructuredTensorCUSPARSELT),
        ("cutlass", torch.sparse.SparseSemiStructuredTensorCUTLASS),
    ):
        assert semi_structured_converter(backend) == cls.from_dense


def test_the_kernels_need_cuda_and_a_known_backend():
    """Off CUDA the library says why (the reason gpu_check reports); a backend name it does not
    know is an error, not a silent fallback."""
    for device in ("cpu", torch.device("cpu")):
        backend, reason = semi_structured_backend(device)
        assert backend is None and reason.startswith("needs CUDA")
    with pytest.raises(ValueError, match="unknown semi-structured backend"):
        choose_backend((8, 0), True, "cusparse")


def test_a_failing_part_keeps_the_results_before_it(
    gpu_check, tmp_path, monkeypatch, single_torch_thread
):
    """The GPU failure of the 2:4 step at batch 8, simulated on CPU (dense stand-in for the
    conversion): the train and dense results and the 2:4 batch-1 time stay in the JSON, the
    failure is recorded, and the run goes on to the end."""
    kernels = gpu_check.semi_kernels
    monkeypatch.setattr(kernels, "semi_structured_backend", lambda *a: ("cusparselt", None))
    monkeypatch.setattr(kernels, "semi_structured_converter", lambda b: lambda w: w.clone())
    step_seconds = gpu_check.step_seconds
    message = "SparseSemiStructuredTensorCUSPARSELT only supports ... (expand.default)"

    def failing_step(model, batch, **options):
        swapped = any(isinstance(m, FlatLinear) for m in model.modules())
        if swapped and batch == 8:
            raise NotImplementedError(message)
        return step_seconds(model, batch=batch, **options)

    monkeypatch.setattr(gpu_check, "step_seconds", failing_step)
    report = gpu_check.main([*TINY, "--device", "cpu", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["train"]["steps"] == 3
    assert saved["semi_structured"]["layers_swapped"] == 14
    assert saved["step_timings"]["1"]["drafter_2of4_ms"] > 0
    assert saved["step_timings"]["1"]["speedup_2of4_vs_dense"] > 0
    assert saved["step_timings"]["8"]["drafter_dense_ms"] > 0
    assert "drafter_2of4_ms" not in saved["step_timings"]["8"]
    assert saved["errors"] == {"drafter 2:4, batch 8": f"NotImplementedError: {message}"}
    assert report["errors"] == saved["errors"]
    assert "FAILED: drafter 2:4, batch 8" in (tmp_path / "gpu_check.md").read_text()


def test_results_are_on_disk_as_soon_as_measured(
    gpu_check, tmp_path, monkeypatch, single_torch_thread
):
    """A run killed during the timings (here: an interrupt) has the training result on disk."""

    def interrupted(*args, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "step_seconds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main([*TINY, "--device", "cpu", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["train"]["zeros_exact"] is True


@needs_cuda
def test_the_sparse_swap_keeps_the_function(gpu_check, single_torch_thread):
    """Where the kernels exist, swapping weights must not change the drafter's outputs, on the
    3-D input of a batch of 8 (the shape that failed inside nn.Linear)."""
    backend, unsupported = semi_structured_backend("cuda")
    if backend is None:
        pytest.skip(f"semi-structured 2:4 kernels: {unsupported}")
    import tiny

    drafter = gpu_check.build("tiny-drafter", 384, torch.bfloat16, "cuda")
    tiny.magnitude_sparsify(drafter, structure="2:4")
    ids = torch.randint(0, 384, (8, 16), device="cuda")
    with torch.no_grad():
        dense = drafter(input_ids=ids).logits
        convert = semi_structured_converter(backend)
        assert to_semi_structured(drafter, convert) == 14
        sparse = drafter(input_ids=ids).logits
    torch.testing.assert_close(sparse, dense, atol=5e-2, rtol=5e-2)


@needs_cuda
def test_gpu_check_end_to_end_on_cuda(gpu_check, tmp_path):
    """The whole script on CUDA at tiny shapes: bf16 training, dense and 2:4 step times, eager
    and from CUDA graphs, the verify steps, and the projection on the graph times."""
    report = gpu_check.main([*TINY, "--device", "cuda", "--output", str(tmp_path)])
    assert report["train"]["bf16"] is True and report["train"]["zeros_exact"] is True
    dense = {k: v for k, v in report["errors"].items() if "2:4" not in k}
    assert dense == {}
    row = report["step_timings"][1]
    for k in gpu_check.VERIFY_K:
        assert row[f"target_verify_k{k}_ms"] > 0 and row[f"target_verify_k{k}_graph_ms"] > 0
    assert row["drafter_vs_target_cost_graph"] > 0
    assert report["projection"]["mtbench/dense"]["steps"] == "graph"
    assert report["errors"] == {}
    semi = report["semi_structured"]
    if semi["backend"] is None:
        pytest.skip(f"semi-structured 2:4 kernels: {semi['unsupported']}")
    if torch.cuda.get_device_capability()[0] >= 9:  # CUTLASS's 2:4 kernels are 8.x only
        assert semi["backend"] == "cusparselt"
    assert semi["layers_swapped"] == 14
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    for batch in (1, 8):
        assert report["step_timings"][batch]["drafter_2of4_ms"] > 0
        assert report["step_timings"][batch]["speedup_2of4_vs_dense"] > 0
        assert saved["step_timings"][str(batch)] == report["step_timings"][batch]
