"""MAC counting: hand-computed counts, sparsity, checkpoints without running them, the CLI."""

from __future__ import annotations

import json

import pytest
import tiny

from sd2_hf.cli import main as sd2_main
from sd2_hf.evaluation.macs import count_macs


def _hand_count(config, context: int) -> int:
    """One decoding step of a Llama, written out from the config."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = h // heads
    attention_proj = h * heads * d + 2 * h * kv * d + heads * d * h  # q, k, v, o
    mlp = 3 * h * i  # gate, up, down
    scores = 2 * heads * d * context  # QK^T and AV over the context
    return config.num_hidden_layers * (attention_proj + mlp + scores) + h * v  # + lm_head


@pytest.mark.parametrize("context", [1, 512])
def test_dense_count_matches_hand_count(tiny_model, tiny_model_dir, context):
    expected = _hand_count(tiny_model.config, context)
    in_memory = count_macs(tiny_model, context)
    from_disk = count_macs(tiny_model_dir, context)
    assert in_memory.total == in_memory.dense_total == expected
    assert from_disk.total == expected
    assert in_memory.attention == 2 * 2 * 2 * 64 * context  # layers x (QK, AV) x heads x head_dim
    assert in_memory.sparsity == 0.0
    assert from_disk.per_module == in_memory.per_module
    assert sum(from_disk.per_module.values()) == expected


def test_half_sparse_model_halves_decoder_linear_macs(
    sparse_model, tiny_model, tmp_path, tiny_tokenizer
):
    dense, sparse = count_macs(tiny_model), count_macs(sparse_model)
    lm_head = dense.per_module["lm_head"]
    assert sparse.per_module["lm_head"] == lm_head  # lm_head stays dense
    assert sparse.linear - lm_head == (dense.linear - lm_head) // 2
    assert sparse.dense_total == dense.total
    assert sparse.attention == dense.attention
    assert sparse.sparsity == pytest.approx(0.5 * (dense.linear - lm_head) / dense.linear)
    # Same count from the saved checkpoint (zeros read from safetensors).
    tiny.save_model(sparse_model, tiny_tokenizer, tmp_path)
    assert count_macs(tmp_path).to_dict() == sparse.to_dict()


def test_sliding_window_layers_see_their_window(tmp_path):
    types = ["sliding_attention", "full_attention"]
    model = tiny.gemma3_model(types, sliding_window=8, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    report = count_macs(tmp_path, context_length=100)
    attention = {k: v for k, v in report.per_module.items() if k.endswith(":attention")}
    assert attention == {
        "model.layers.0.self_attn:attention": 2 * 2 * 16 * 8,
        "model.layers.1.self_attn:attention": 2 * 2 * 16 * 100,
    }
    # Tied lm_head: read from the embedding table, counted dense, not flagged as assumed.
    assert report.per_module["lm_head"] == 32 * 64
    assert report.assumed_dense == []


def test_cli_macs(tiny_model_dir, capsys):
    assert sd2_main(["macs", str(tiny_model_dir), "--context-length", "128", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == count_macs(tiny_model_dir, 128).to_dict()
    assert sd2_main(["macs", str(tiny_model_dir)]) == 0
    table = capsys.readouterr().out
    assert "block 1" in table and "lm_head" in table
    assert f"{count_macs(tiny_model_dir).total:,}" in table


def test_bad_input(tiny_model, tmp_path, sd2_fails):
    with pytest.raises(ValueError, match="context_length must be a positive"):
        count_macs(tiny_model, 0)
    (tmp_path / "config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        count_macs(tmp_path)
    assert "cannot count MACs" in sd2_fails(["macs", tmp_path])
    assert "context_length" in sd2_fails(["macs", tmp_path, "--context-length", "0"])


def test_unknown_weights_are_counted_dense_and_listed(tiny_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v for k, v in tiny_model.state_dict().items() if "layers.0.mlp.up_proj" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    tiny_model.config.save_pretrained(tmp_path)
    report = count_macs(tmp_path)
    assert report.assumed_dense == ["model.layers.0.mlp.up_proj"]
    assert report.total == count_macs(tiny_model).total
