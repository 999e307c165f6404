"""`sd2 export` on the tiny fixtures: every format loads with plain `from_pretrained`, keeps its
zeros, runs in assisted generation with a MAL well above a random drafter's, and drafts K tokens
per step with no settings."""

from __future__ import annotations

import json
import math

import pytest
import tiny
import torch
import yaml
from huggingface_hub import ModelCard
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from sd2_hf.export.card import render_model_card
from sd2_hf.export.export import ExportConfig, ExportError, checkpoint_bytes, run_export
from sd2_hf.utils.io import atomic_write_json, read_json

FORMATS = ("dense", "w8a8", "w4a16", "fp8")
CT_FORMATS = {"w8a8": "int-quantized", "w4a16": "pack-quantized", "fp8": "float-quantized"}
PROMPTS = ["Why does the draft model", "Python code data set one two"]
K = 3


@pytest.fixture(scope="module")
def trained_target_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny target trained on the word cycle (`tiny.trained_model`): what a drafter derived
    from it accepts is measurable, unlike with a random-init target's near-tied logits."""
    path = tmp_path_factory.mktemp("trained-target")
    return tiny.save_model(tiny.trained_model(tiny_tokenizer), tiny_tokenizer, path)


@pytest.fixture(scope="module")
def sparse_drafter_dir(tmp_path_factory, tiny_tokenizer):
    """A 50%-sparse tiny drafter: the trained target pruned by magnitude (same tokenizer), with
    the files the pruning stage leaves next to it (recipe.yaml, sparsity_report.json)."""
    path = tmp_path_factory.mktemp("sparse-drafter")
    model = tiny.magnitude_sparsify(tiny.trained_model(tiny_tokenizer), 0.5)
    tiny.save_model(model, tiny_tokenizer, path)
    (path / "recipe.yaml").write_text(
        "default_stage:\n  default_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n"
    )
    atomic_write_json(
        path / "sparsity_report.json",
        {"global_sparsity": 0.5, "structure": "unstructured", "layers": {}},
    )
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory, sparse_drafter_dir, trained_target_dir):
    """One export per format (K=3), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("exports")
    options = {"target": str(trained_target_dir), "num_draft_tokens": K}
    return {
        fmt: tiny.export(sparse_drafter_dir, root / fmt, format=fmt, **options) for fmt in FORMATS
    }


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _greedy(model, tok, prompt, max_new_tokens=12, **kwargs):
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0, **kwargs
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_loads_with_plain_from_pretrained_and_keeps_the_zeros(
    fmt, exports, sparse_drafter_dir, tiny_tokenizer
):
    result = exports[fmt]
    out = result.output
    metadata = read_json(f"{out}/sd2_drafter.json")
    config = read_json(f"{out}/config.json")
    if fmt == "dense":
        assert "quantization_config" not in config
    else:
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert config["quantization_config"]["format"] == CT_FORMATS[fmt]
        assert metadata["quantization"]["compressed_tensors_format"] == CT_FORMATS[fmt]
        assert "lm_head" in config["quantization_config"]["ignore"]
    # The sparsity recorded before export is the drafter's, measured independently here.
    source = AutoModelForCausalLM.from_pretrained(sparse_drafter_dir)
    layers = tiny.decoder_linear_layers(source)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    expected = zeros / sum(m.weight.numel() for m in layers.values())
    sparsity = metadata["sparsity"]
    assert sparsity["global_sparsity"] == pytest.approx(expected)
    assert set(sparsity["before_export"]["layers"]) == set(layers)
    # Symmetric schemes map 0 to 0: every pruned weight is still exactly zero.
    assert sparsity["zeros_kept"] == 1.0 == result.zeros_kept
    assert sparsity["global_sparsity_after_roundtrip"] >= sparsity["global_sparsity"]
    assert metadata["uag"] is False and metadata["target_model"]
    assert metadata["recipe"]["recipe.yaml"].startswith("default_stage")
    assert metadata["macs"]["drafter"] < metadata["macs"]["drafter_dense"]
    assert metadata["checkpoint_bytes"] == checkpoint_bytes(out)
    if fmt != "dense":
        assert result.checkpoint_bytes < exports["dense"].checkpoint_bytes

    model = AutoModelForCausalLM.from_pretrained(out)  # plain: no quantization arguments
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    generated = _greedy(model, tokenizer, PROMPTS[0], max_new_tokens=5)
    assert len(generated) == 5
    if fmt == "dense":
        for name, module in tiny.decoder_linear_layers(model).items():
            assert torch.equal(module.weight, layers[name].weight)


@pytest.fixture(scope="module")
def trained_target(trained_target_dir):
    return AutoModelForCausalLM.from_pretrained(trained_target_dir).eval()


@pytest.fixture(scope="module")
def reference(trained_target, tiny_tokenizer):
    """The trained target's own greedy continuations (24 tokens)."""
    return [_greedy(trained_target, tiny_tokenizer, p, max_new_tokens=24) for p in PROMPTS]


@pytest.fixture(scope="module")
def random_drafter_mal(trained_target, tiny_tokenizer, reference):
    """The MAL (K = 3) of a random drafter: the floor an export must clear."""
    random_drafter = tiny.build_model(tiny_tokenizer, seed=1)
    outputs, mal = tiny.assisted_greedy(trained_target, random_drafter, tiny_tokenizer, PROMPTS)
    assert outputs == reference
    return mal


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_export_loads_in_assisted_generation_and_is_accepted(
    fmt, exports, trained_target, tiny_tokenizer, reference, random_drafter_mal
):
    """Load test: greedy assisted generation with the export runs and keeps the target's own
    output (verification guarantees that for any drafter that loads). What can fail: the
    export's MAL must stay well above a random drafter's, e.g. a quantization that scrambles the
    weights or a conversion that loses the zeros' neighbours fails."""
    drafter = AutoModelForCausalLM.from_pretrained(exports[fmt].output)
    assisted, mal = tiny.assisted_greedy(trained_target, drafter, tiny_tokenizer, PROMPTS)
    assert assisted == reference
    assert mal > random_drafter_mal + 0.5, (mal, random_drafter_mal)


def _count_forwards(model, events, label):
    return model.register_forward_hook(lambda *_: events.append(label))


def test_generate_drafts_k_tokens_per_step_same_family(tmp_path, tiny_model_dir, target):
    """The target drafting for itself: every draft is accepted, so each target forward pass
    commits K drafts + 1 bonus token, and `new / (K+1)` passes produce `new` tokens; the
    drafter runs K forward passes (one per drafted token) before each verification."""
    result = tiny.export(
        tiny_model_dir, tmp_path / "self", target=str(tiny_model_dir), num_draft_tokens=K
    )
    generation = read_json(tmp_path / "self" / "generation_config.json")
    assert generation["num_assistant_tokens"] == K
    assert generation["num_assistant_tokens_schedule"] == "constant"
    assert generation["assistant_confidence_threshold"] == 0.0
    assert result.uag is False

    drafter = AutoModelForCausalLM.from_pretrained(result.output)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    new_tokens = 6 * (K + 1)
    events: list[str] = []
    hooks = [_count_forwards(target, events, "T"), _count_forwards(drafter, events, "D")]
    try:
        ids = _greedy(target, tokenizer, PROMPTS[1], new_tokens, assistant_model=drafter)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(ids) == new_tokens
    assert ids == _greedy(target, tokenizer, PROMPTS[1], new_tokens)
    assert events.count("T") == math.ceil(new_tokens / (K + 1))
    assert "".join(events) == ("D" * K + "T") * (new_tokens // (K + 1))


def test_generate_uses_the_export_settings_cross_family(
    tmp_path, tiny_model_dir, other_family_dir, target, tiny_tokenizer, other_tokenizer
):
    """UAG: a drafter with another tokenizer. Output equals the target's greedy output and the
    drafter runs exactly K forward passes (K drafted tokens) before every verification."""
    result = tiny.export(
        other_family_dir, tmp_path / "uag", target=str(tiny_model_dir), num_draft_tokens=K
    )
    assert result.uag is True
    assert read_json(tmp_path / "uag" / "sd2_drafter.json")["uag"] is True
    card = (tmp_path / "uag" / "README.md").read_text()
    assert "assistant_tokenizer=assistant_tokenizer" in card
    assert '"use_heterogeneous_vocab": true' in card

    drafter = AutoModelForCausalLM.from_pretrained(result.output)
    assistant_tokenizer = AutoTokenizer.from_pretrained(result.output)
    events: list[str] = []
    hooks = [_count_forwards(target, events, "T"), _count_forwards(drafter, events, "D")]
    try:
        ids = _greedy(
            target,
            tiny_tokenizer,
            PROMPTS[0],
            24,
            assistant_model=drafter,
            tokenizer=tiny_tokenizer,
            assistant_tokenizer=assistant_tokenizer,
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert ids == _greedy(target, tiny_tokenizer, PROMPTS[0], 24)
    steps = "".join(events).split("T")[:-1]
    assert len(steps) >= 2
    # Every verification but the last (cut short by max_new_tokens) follows K drafts.
    assert all(step == "D" * K for step in steps[:-1]), steps
    assert 0 < len(steps[-1]) <= K


def _eval_json(path, target_path, drafter_path, k, mal, improvement):
    row = {
        "path": str(drafter_path),
        "kind": "model",
        "uag": False,
        "mal_per_category": {"coding": mal + 0.1, "writing": mal - 0.1},
        "acceptance_per_position": [0.9, 0.7, 0.5][:k],
        "draft_steps": 100,
        "accepted_tokens": int((mal - 1) * 100),
        "macs": 1000,
        "relative_macs": 0.25,
        "tokens_per_second": 10.0,
        "speedup": 1.25,
        "measured_cost": 0.4,
        "measured_improvement_factor": 1.1,
        "lossless_checked": True,
        "lossless_mismatches": 0,
    }
    report = {
        "target": str(target_path),
        "backend": "transformers",
        "num_draft_tokens": k,
        "max_new_tokens": 64,
        "num_prompts": 16,
        "drafters": [
            {**row, "name": "sd2-sparse", "mal": mal, "improvement_factor": improvement},
            {**row, "name": "layer-pruned", "path": "elsewhere", "mal": 1.5},
        ],
        "versions": {"transformers": "5.17.0"},
    }
    report["drafters"][1]["improvement_factor"] = 0.9
    atomic_write_json(path, report)
    return path


def test_eval_json_sets_k_and_the_card_shows_the_measured_mal(
    tmp_path, sparse_drafter_dir, tiny_model_dir
):
    runs = [
        _eval_json(tmp_path / "k2.json", tiny_model_dir, sparse_drafter_dir, 2, 2.31, 1.54),
        _eval_json(tmp_path / "k3.json", tiny_model_dir, sparse_drafter_dir, 3, 2.47, 1.41),
    ]
    result = tiny.export(
        sparse_drafter_dir,
        tmp_path / "card",
        eval_json=[str(p) for p in runs],
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        datasets=["anon8231489123/ShareGPT_Vicuna_unfiltered"],
        model_name="SmolLM2-135M-SD2-drafter",
    )
    # Best K by improvement factor (K=2: 1.54 > 1.41), not by raw MAL (K=3).
    assert result.num_draft_tokens == 2
    assert read_json(tmp_path / "card" / "generation_config.json")["num_assistant_tokens"] == 2
    metadata = read_json(tmp_path / "card" / "sd2_drafter.json")
    assert metadata["target_model"] == str(tiny_model_dir)  # from the eval files
    assert metadata["uag"] is False
    assert metadata["assisted_generation"]["source"] == "eval"
    assert metadata["eval"]["best_num_draft_tokens"] == 2

    card = ModelCard.load(tmp_path / "card" / "README.md")
    data = card.data.to_dict()
    assert {"sd2", "speculative-decoding", "sparse"} <= set(data["tags"])
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["base_model_relation"] == "finetune"
    assert "target_model" not in data  # a local path is not a Hub id
    assert data["library_name"] == "transformers"
    assert data["datasets"] == ["anon8231489123/ShareGPT_Vicuna_unfiltered"]
    text = card.text
    assert "arxiv.org/abs/2504.08838" in text
    assert "### K = 2" in text and "### K = 3" in text
    assert "| **sd2-sparse** (this model) | model | no | 2.31 |" in text
    assert "| **sd2-sparse** (this model) | model | no | 2.47 |" in text
    assert "| layer-pruned | model | no | 1.50 |" in text
    # The measured step-time ratio and speed-up beside the MACs ratio.
    assert "| 0.250 | 1.54 | 0.400 | 1.10 | 10.0 | 1.25 | 0 |" in text
    assert "coding 2.41" in text and "1: 0.90" in text
    assert "| global sparsity of the targeted linear layers (before export) | 50.00% |" in text
    assert "SparseGPTModifier" in text
    assert "assistant_model=drafter" in text
    assert '"num_speculative_tokens": 2' in text
    assert "use_heterogeneous_vocab" not in text
    # No machine paths leak into the card or the metadata's eval summary.
    assert str(tmp_path) not in text and str(tiny_model_dir) not in text
    assert str(tmp_path) not in json.dumps(metadata["eval"])

    # Rendered for a Hub target and repo (as `sd2 push` does), the front matter names the target.
    metadata["target_model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = render_model_card(metadata, repo_id="org/smollm2-sd2-drafter")
    assert card.data.to_dict()["target_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct" in card.text
    assert 'from_pretrained("org/smollm2-sd2-drafter")' in card.text


def test_w4a16_picks_a_group_size_that_divides_every_layer(tmp_path, tiny_tokenizer, exports):
    """Widths 192 and 384 (like SmolLM2's 576) are not multiples of the preset's 128."""
    assert (
        read_json(f"{exports['w4a16'].output}/sd2_drafter.json")["quantization"]["group_size"]
        == 128
    )
    model = tiny.build_model(tiny_tokenizer, hidden_size=192, intermediate_size=384, num_heads=3)
    source = tiny.save_model(tiny.magnitude_sparsify(model, 0.5), tiny_tokenizer, tmp_path / "odd")
    with pytest.raises(ExportError, match="192, 384.*--group-size"):
        run_export(
            ExportConfig(
                drafter=str(source), output=str(tmp_path / "g"), format="w4a16", group_size=128
            )
        )
    result = run_export(
        ExportConfig(drafter=str(source), output=str(tmp_path / "w4"), format="w4a16")
    )
    config = read_json(tmp_path / "w4" / "config.json")["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert result.zeros_kept == 1.0
    assert "one scale per 64 input columns" in (tmp_path / "w4" / "README.md").read_text()
    assert (
        len(_greedy(AutoModelForCausalLM.from_pretrained(result.output), tiny_tokenizer, "Hi")) > 0
    )


def test_card_without_evaluation_claims_no_mal(exports):
    card = ModelCard.load(f"{exports['w8a8'].output}/README.md")
    assert "makes no claim" in card.text
    assert "### K =" not in card.text
    assert "| MACs relative to the target (c) |" in card.text
    front = yaml.safe_load(open(f"{exports['w8a8'].output}/README.md").read().split("---")[1])
    assert "compressed-tensors" in front["tags"] and "w8a8" in front["tags"]


def test_sd2_export_cli(tmp_path, sparse_drafter_dir, capsys, sd2_fails):
    from sd2_hf.cli import main

    out = tmp_path / "cli"
    args = ["export", str(sparse_drafter_dir), "--output", str(out), "--num-draft-tokens", "5"]
    assert main(args) == 0
    assert read_json(out / "generation_config.json")["num_assistant_tokens"] == 5
    assert "exported drafter" in capsys.readouterr().out
    # A second export into the same directory needs --overwrite.
    assert "--overwrite" in sd2_fails(args)
    assert main([*args, "--overwrite", "--format", "w8a8"]) == 0
    assert read_json(out / "sd2_drafter.json")["format"] == "w8a8"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_what_cannot_be_done(tmp_path, sparse_drafter_dir, exports, monkeypatch):
    with pytest.raises(ValidationError, match="format"):
        ExportConfig(drafter="d", output="o", format="int3")
    with pytest.raises(ValidationError, match="eval-json"):
        ExportConfig(drafter="d", output="o", eval_drafter="x")
    with pytest.raises(ExportError, match="not an sd2 export"):
        other = tmp_path / "other"
        other.mkdir()
        (other / "notes.txt").write_text("mine")
        run_export(ExportConfig(drafter=str(sparse_drafter_dir), output=str(other), overwrite=True))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="drafter: model directory .* does not exist"):
        run_export(ExportConfig(drafter=str(tmp_path / "missing"), output=str(tmp_path / "m")))
    with pytest.raises(ExportError, match="already a compressed-tensors"):
        run_export(ExportConfig(drafter=exports["w8a8"].output, output=str(tmp_path / "again")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"target": "t", "drafters": []}))
    with pytest.raises(ExportError, match="missing backend"):
        run_export(
            ExportConfig(
                drafter=str(sparse_drafter_dir), output=str(tmp_path / "x"), eval_json=[str(bad)]
            )
        )

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llmcompressor" else find_spec(name, *a),
    )
    with pytest.raises(ExportError, match="llmcompressor not installed.*can produce: dense"):
        run_export(
            ExportConfig(drafter=str(sparse_drafter_dir), output=str(tmp_path / "q"), format="fp8")
        )
    assert not (tmp_path / "q").exists() and not (tmp_path / "x").exists()
