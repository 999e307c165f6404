"""`sd2_hf.evaluation.step_timing`: the step it times is the model's real step (its logits are
those of a full forward over the same ids), at widths 1 and K + 1 and batches 1 and 3; a CUDA
graph replays the same step (on a CUDA machine)."""

from __future__ import annotations

import pytest
import tiny
import torch

from sd2_hf.evaluation.step_timing import prepare_step, step_seconds

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _model(device: str = "cpu"):
    return tiny.build_model(tiny.build_tokenizer()).to(device)


@pytest.mark.parametrize(("batch", "width"), [(1, 1), (1, 5), (3, 1), (3, 5)])
def test_the_timed_step_is_the_models_step_over_its_cache(batch, width):
    model = _model()
    torch.manual_seed(0)
    forward, ids = prepare_step(model, batch, 12, width)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, 12:]
        torch.testing.assert_close(forward(), expected, rtol=1e-4, atol=1e-4)
        # Called again (as every timed step is), it writes the same cache slots: same logits.
        torch.testing.assert_close(forward(), expected, rtol=1e-4, atol=1e-4)


def test_step_seconds_times_eager_steps_and_refuses_a_graph_off_cuda():
    model = _model()
    assert step_seconds(model, batch=2, context=8, width=3, repeats=2, warmup=1) > 0
    with pytest.raises(ValueError, match="graph=True needs a model on CUDA"):
        step_seconds(model, context=8, graph=True)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: CUDA-graph capture and replay of the step; a CUDA machine runs it",
)
def test_a_cuda_graph_replays_the_same_step():
    model = _model("cuda")
    torch.manual_seed(0)
    forward, ids = prepare_step(model, 2, 16, 5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, 16:]
        graph = torch.cuda.CUDAGraph()
        eager = forward()  # warm-up outside the capture, as step_seconds does
        with torch.cuda.graph(graph):
            captured = forward()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(eager, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(captured, expected, rtol=1e-3, atol=1e-3)
    assert step_seconds(model, context=16, width=5, repeats=3, graph=True) > 0
