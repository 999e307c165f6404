"""Layer-pruned baseline: angular-distance block selection, dropping, and the saved model."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from sd2_hf.evaluation.macs import count_macs
from sd2_hf.pruning.config import PruneConfig, PruneInputError
from sd2_hf.pruning.layers import angular_distances, drop_layers
from sd2_hf.pruning.runner import run_prune

IDENTITY_BLOCKS = (2, 3)


@pytest.fixture(scope="module")
def six_layer_dir(tmp_path_factory, tiny_tokenizer):
    """6 blocks, of which 2 and 3 are exact identities (their residual writes are zero)."""
    model = tiny.build_model(tiny_tokenizer, num_layers=6, seed=3)
    with torch.no_grad():
        for i in IDENTITY_BLOCKS:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return tiny.save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("six-layers"))


def prune_layers(model_dir, dataset, out, **options):
    """`sd2 prune --method layers` of `model_dir` into `out`, calibrated on `dataset`; `options`
    are further `PruneConfig` fields (drop or target_macs_fraction, num_samples)."""
    config = PruneConfig(
        model=str(model_dir), output=str(out), method="layers", dataset=dataset, **options
    )
    return run_prune(config)


@pytest.fixture(scope="module")
def dropped_dir(six_layer_dir, chat_rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dropped") / "out"
    result = prune_layers(six_layer_dir, chat_rows_file, out, drop=2, num_samples=8)
    assert result.dropped_layers == list(IDENTITY_BLOCKS)
    return out


def test_angular_distance_definition():
    # h0 ⟂ h1 (a quarter turn: d = 0.5), h1 = h2 (d = 0), h0 vs h2: 0.5.
    states = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]])
    assert angular_distances(states, 1) == pytest.approx([0.5, 0.0])
    assert angular_distances(states, 2) == pytest.approx([0.5])


def test_picks_the_identity_blocks(dropped_dir):
    report = json.loads((dropped_dir / "layer_distances.json").read_text())
    assert report["start"] == IDENTITY_BLOCKS[0]
    assert report["dropped_layers"] == list(IDENTITY_BLOCKS)
    distances = report["distances"]
    assert len(distances) == 6 - 2 + 1  # every start block l in 0..L-n
    assert distances[2] == pytest.approx(0.0, abs=1e-3)
    assert min(d for i, d in enumerate(distances) if i != 2) > 10 * distances[2] + 1e-3
    assert set(report["all_distances"]) == {"1", "2", "3", "4", "5"}
    assert (dropped_dir / "layer_distances.png").stat().st_size > 0
    assert report["num_layers_after"] == 4


def test_dropped_model_generates_like_the_original(dropped_dir, six_layer_dir, tiny_tokenizer):
    small = AutoModelForCausalLM.from_pretrained(dropped_dir)
    full = AutoModelForCausalLM.from_pretrained(six_layer_dir)
    assert small.config.num_hidden_layers == 4 and len(small.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2, 3]
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello sparse world"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    kwargs = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    got = small.generate(**prompt, **kwargs)
    # The dropped blocks were identities, so greedy output (with the KV cache) is unchanged.
    assert torch.equal(got, full.generate(**prompt, **kwargs))
    assert got.shape[1] == prompt["input_ids"].shape[1] + 12


def test_macs_drop_by_the_dropped_blocks_share(dropped_dir, six_layer_dir):
    before, after = count_macs(six_layer_dir), count_macs(dropped_dir)
    blocks = before.per_block()
    dropped_share = sum(blocks[f"block {i}"] for i in IDENTITY_BLOCKS)
    assert before.total - after.total == dropped_share
    # Dense: every block costs the same; lm_head (dense, kept) is the only other cost.
    dense_block = (before.dense_total - before.per_module["lm_head"]) // 6
    assert before.dense_total - after.dense_total == 2 * dense_block
    report = json.loads((dropped_dir / "layer_distances.json").read_text())
    assert report["macs_fraction"] == pytest.approx(after.total / before.total)


def test_target_macs_fraction_picks_the_fewest_blocks(six_layer_dir, chat_rows_file, tmp_path):
    macs = count_macs(six_layer_dir)
    blocks = macs.per_block()
    share = sum(blocks[f"block {i}"] for i in IDENTITY_BLOCKS)
    fraction = (macs.total - share) / macs.total + 1e-9  # dropping one block is not enough
    result = prune_layers(
        six_layer_dir,
        chat_rows_file,
        tmp_path / "out",
        target_macs_fraction=fraction,
        num_samples=4,
    )
    assert result.dropped_layers == list(IDENTITY_BLOCKS)
    assert result.macs_fraction <= fraction


def test_drop_too_many(six_layer_dir, chat_rows_file, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(PruneInputError, match=r"drop = 6 .* 6 decoder layers; allowed: 1\.\.5"):
        prune_layers(six_layer_dir, chat_rows_file, out, drop=6)
    with pytest.raises(PruneInputError, match="target_macs_fraction = 0.01 cannot be reached"):
        prune_layers(six_layer_dir, chat_rows_file, out, target_macs_fraction=0.01, num_samples=2)
    assert not (tmp_path / "o").exists()


def test_hybrid_attention_config_is_trimmed(tmp_path):
    """Gemma-3: per-layer `layer_types` follow the kept blocks; the KV cache still lines up."""
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = tiny.gemma3_model(types, sliding_window=4, max_position_embeddings=64).eval()
    assert drop_layers(model, 1, 2) == [1, 2]
    assert model.config.layer_types == [types[0], types[3]]
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cached = reloaded.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, reloaded.generate(ids, use_cache=False, **kwargs))
