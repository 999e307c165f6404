"""MLP width pruning (Minitron-style): activation-ranked channels, a smaller standard config."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from sd2_hf.evaluation.macs import count_macs
from sd2_hf.pruning.config import PruneConfig
from sd2_hf.pruning.runner import run_prune
from sd2_hf.pruning.width import kept_channels

WIDTH = 256
DEAD = 128  # channels per block whose gate and up rows are zero: activation exactly 0


@pytest.fixture(scope="module")
def half_dead_dir(tmp_path_factory, tiny_tokenizer):
    """Every MLP has DEAD channels that never activate, at scattered positions per block."""
    model = tiny.build_model(tiny_tokenizer, num_layers=2, intermediate_size=WIDTH, seed=5)
    dead = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            index = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(i))[:DEAD]
            layer.mlp.gate_proj.weight[index] = 0
            layer.mlp.up_proj.weight[index] = 0
            dead[i] = sorted(index.tolist())
    return tiny.save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("dead")), dead


@pytest.fixture(scope="module")
def width_pruned(half_dead_dir, chat_rows_file, tmp_path_factory):
    model_dir, _ = half_dead_dir
    out = tmp_path_factory.mktemp("width") / "out"
    config = PruneConfig(
        model=str(model_dir),
        output=str(out),
        method="width",
        mlp_keep=(WIDTH - DEAD) / WIDTH,
        dataset=chat_rows_file,
        num_samples=8,
    )
    return run_prune(config), out


def test_dead_channels_are_the_ones_removed_and_nothing_changes(
    half_dead_dir, width_pruned, tiny_tokenizer
):
    model_dir, dead = half_dead_dir
    result, out = width_pruned
    assert result.intermediate_size == [WIDTH, WIDTH - DEAD]
    report = json.loads((out / "width_report.json").read_text())
    for i, kept in enumerate(report["kept_channels"]):
        assert sorted(set(range(WIDTH)) - set(kept)) == dead[i]
    # A standard, smaller config: transformers loads it as it is, and the outputs are those of
    # the original (the removed channels contributed exactly zero).
    pruned = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    assert pruned.config.intermediate_size == WIDTH - DEAD
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (128, WIDTH - DEAD)
    ids = tiny_tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


def test_macs_shrink_by_the_mlp_share(half_dead_dir, width_pruned):
    model_dir, _ = half_dead_dir
    result, out = width_pruned
    before, after = count_macs(str(model_dir), 512), count_macs(str(out), 512)
    # Counted dense (the dead rows were zeros, which the sparse-aware count already skipped):
    # 2 blocks x 3 projections x hidden 128 x DEAD channels fewer.
    assert after.dense_total == before.dense_total - 2 * 3 * 128 * DEAD
    assert after.total == after.dense_total  # nothing left that is zero
    assert result.macs_fraction == pytest.approx(after.total / before.total)


def test_kept_channels_round_to_a_multiple_of_32():
    assert kept_channels(4864, 0.5) == 2432
    assert kept_channels(4864, 0.4) == 1952
    assert kept_channels(100, 0.01) == 32 and kept_channels(100, 1.0) == 100


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "width"}, "needs `mlp_keep`"),
        ({"method": "width", "mlp_keep": 0.5, "sparsity": 0.5}, "apply to method 'oneshot'"),
        ({"method": "oneshot", "mlp_keep": 0.5}, "applies to method 'width' only"),
    ],
)
def test_width_options_are_checked(options, message, chat_rows_file):
    with pytest.raises(ValueError, match=message):
        PruneConfig(model="m", output="o", dataset=chat_rows_file, **options)
