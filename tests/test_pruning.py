"""One-shot pruning: shipped recipes, user recipes, saved checkpoints and bad input."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from sd2_hf.cli import main as sd2_main
from sd2_hf.pruning import masks
from sd2_hf.pruning.config import PruneConfig, PruneInputError
from sd2_hf.pruning.recipes import load_recipe, shipped_recipes
from sd2_hf.pruning.runner import run_prune
from tests.tiny import prune

# What each shipped recipe promises (sparsity of every targeted layer, structure).
EXPECTED = {
    "sparsegpt-50": (0.5, "unstructured"),
    "sparsegpt-60": (0.6, "unstructured"),
    "sparsegpt-70": (0.7, "unstructured"),
    "sparsegpt-2of4": (0.5, "2:4"),
    "wanda-50": (0.5, "unstructured"),
    "magnitude-50": (0.5, "unstructured"),
}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def original(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _decoder_linears(model) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(DECODER_LINEARS)
    }


def test_shipped_recipes_are_the_tested_ones():
    assert set(shipped_recipes()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_recipe(name, tiny_model_dir, chat_rows_file, original, tmp_path):
    sparsity, structure = EXPECTED[name]
    result = prune(tiny_model_dir, tmp_path / "out", chat_rows_file, recipe=name)

    # Reloaded with plain transformers: the zeros are in the saved weights.
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    layers = _decoder_linears(pruned)
    assert len(layers) == 7 * pruned.config.num_hidden_layers
    for layer_name, module in layers.items():
        got = masks.weight_sparsity(module.weight)
        assert abs(got - sparsity) <= 0.005, (layer_name, got)
        if structure == "2:4":
            assert masks.is_n_m_sparse(module.weight, 2, 4), layer_name
    # Embeddings and lm_head are untouched, bit for bit.
    assert torch.equal(pruned.lm_head.weight, original.lm_head.weight)
    assert torch.equal(pruned.model.embed_tokens.weight, original.model.embed_tokens.weight)

    report = json.loads((tmp_path / "out" / "sparsity_report.json").read_text())
    assert report["structure"] == structure
    assert set(report["layers"]) == set(layers)
    for layer_name, info in report["layers"].items():
        assert info["sparsity"] == masks.weight_sparsity(layers[layer_name].weight)
    assert report["recipe_source"].endswith(f"{name}.yaml")
    assert report["calibration"]["num_samples"] == (0 if name.startswith("magnitude") else 16)
    assert abs(result.global_sparsity - sparsity) <= 0.005
    assert (tmp_path / "out" / "recipe.yaml").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_user_recipe_file_and_targets(tiny_model_dir, chat_rows_file, original, tmp_path):
    recipe = tmp_path / "mlp-wanda.yaml"
    recipe.write_text(
        "my_stage:\n"
        "  pruning_modifiers:\n"
        "    WandaPruningModifier:\n"
        "      sparsity: 0.3\n"
        "      targets: ['re:.*mlp\\.(gate|up|down)_proj$']\n"
        "      ignore: ['re:.*lm_head']\n"
    )
    prune(tiny_model_dir, tmp_path / "out", chat_rows_file, recipe=str(recipe))
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, module in _decoder_linears(pruned).items():
        got = masks.weight_sparsity(module.weight)
        if ".mlp." in name:
            assert abs(got - 0.3) <= 0.005, name
        else:  # attention was not targeted: unchanged
            before = original.get_submodule(name).weight
            assert torch.equal(module.weight, before), name
    report = json.loads((tmp_path / "out" / "sparsity_report.json").read_text())
    assert all(".mlp." in name for name in report["layers"])


def test_sparsity_override(tiny_model_dir, tmp_path):
    # Magnitude needs no calibration data.
    config = PruneConfig(
        model=str(tiny_model_dir), output=str(tmp_path / "out"), recipe="magnitude-50", sparsity=0.6
    )
    run_prune(config)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for module in _decoder_linears(pruned).values():
        assert abs(masks.weight_sparsity(module.weight) - 0.6) <= 0.005


def test_cli_prune(tiny_model_dir, tmp_path, capsys, sd2_fails):
    out = tmp_path / "cli-out"
    assert (
        sd2_main(["prune", str(tiny_model_dir), "--recipe", "magnitude-50", "--output", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "global sparsity   50.00%" in printed
    assert (out / "sparsity_report.json").exists()
    message = sd2_fails(["prune", tiny_model_dir, "--recipe", "magnitude-50", "--output", out])
    assert re.search("output directory .* exists", message)
    message = sd2_fails(["prune", tiny_model_dir, "--recipe", "nope", "--output", tmp_path / "x"])
    assert "unknown recipe 'nope'" in message
    assert not (tmp_path / "x").exists()


PER_LAYER_LINE = "Sparsifying model.layers.0.self_attn.q_proj"


def test_llmcompressor_per_layer_lines_only_when_verbose(
    tiny_model_dir, chat_rows_file, tmp_path, capfd
):
    llmcompressor_logger = importlib.import_module("llmcompressor.logger")
    before = llmcompressor_logger.LOGGER_CONFIG
    prune(tiny_model_dir, tmp_path / "quiet", chat_rows_file)
    quiet = capfd.readouterr().out
    assert PER_LAYER_LINE not in quiet and "METRIC" not in quiet
    # llm-compressor's configuration is restored after the stage.
    assert llmcompressor_logger.LOGGER_CONFIG == before

    sd2_logger = logging.getLogger("sd2_hf")
    level = sd2_logger.level
    sd2_logger.setLevel(logging.DEBUG)  # what `sd2 -v` does, through the root logger
    try:
        prune(tiny_model_dir, tmp_path / "verbose", chat_rows_file)
    finally:
        sd2_logger.setLevel(level)
    verbose = capfd.readouterr().out
    assert PER_LAYER_LINE in verbose and "METRIC - error" in verbose


def test_cli_verbose_flag_after_the_command_shows_llmcompressor_lines(
    tiny_model_dir, chat_rows_file, tmp_path
):
    # A subprocess: in-process, pytest's log handlers make the CLI's logging set-up a no-op.
    command = [sys.executable, "-m", "sd2_hf.cli", "prune", str(tiny_model_dir)]
    command += ["--dataset", chat_rows_file, "--num-samples", "8", "--max-seq-length", "32"]
    result = subprocess.run(
        [*command, "--output", str(tmp_path / "out"), "-v"],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert PER_LAYER_LINE in result.stdout
    assert "global sparsity" in result.stdout  # the summary still ends the output


def test_verbose_flag_before_or_after_the_command():
    from sd2_hf.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "run", "r.yaml"]).verbose
    assert parser.parse_args(["run", "r.yaml", "-v"]).verbose
    assert parser.parse_args(["prune", "m", "--verbose"]).verbose
    assert not parser.parse_args(["run", "r.yaml"]).verbose


# ---- bad input -------------------------------------------------------------------------


def _write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_recipe_lists_shipped():
    with pytest.raises(PruneInputError, match="unknown recipe 'sparsegpt-55'.*sparsegpt-50"):
        load_recipe("sparsegpt-55")
    with pytest.raises(PruneInputError, match="does not exist.*sparsegpt-2of4"):
        load_recipe("missing/recipe.yaml")


def test_recipe_rejected_by_llmcompressor(tmp_path):
    path = _write(tmp_path, "s_stage:\n  m_modifiers:\n    NoSuchModifier:\n      sparsity: 0.5\n")
    with pytest.raises(
        PruneInputError, match=f"llm-compressor rejected recipe {path}.*NoSuchModifier"
    ):
        load_recipe(path)
    path = _write(tmp_path, "just: a mapping\n")
    with pytest.raises(PruneInputError, match="defines no modifiers"):
        load_recipe(path)


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.2])
def test_sparsity_outside_unit_interval(tmp_path, value):
    path = _write(
        tmp_path,
        f"s_stage:\n  m_modifiers:\n    SparseGPTModifier:\n      sparsity: {value}\n",
    )
    with pytest.raises(PruneInputError, match=r"SparseGPTModifier.sparsity = .* outside \(0, 1\)"):
        load_recipe(path)
    with pytest.raises(ValidationError, match="sparsity"):
        PruneConfig(model="m", output="o", sparsity=value)


def test_gradual_magnitude_schedule_rejected(tmp_path):
    path = _write(
        tmp_path,
        "s_stage:\n  m_modifiers:\n    MagnitudePruningModifier:\n"
        "      init_sparsity: 0.1\n      final_sparsity: 0.5\n      start: 0\n      end: 10\n"
        "      targets: ['re:.*proj$']\n",
    )
    with pytest.raises(PruneInputError, match="init_sparsity 0.1 != final_sparsity 0.5"):
        load_recipe(path)


def test_targets_that_match_nothing(tiny_model, tmp_path):
    from sd2_hf.pruning.recipes import targeted_linears

    path = _write(
        tmp_path,
        "s_stage:\n  m_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n"
        "      targets: ['re:.*c_attn$', 'Linear']\n      ignore: ['re:.*lm_head']\n",
    )
    with pytest.raises(PruneInputError, match=r"\['re:\.\*c_attn\$'\] match no module") as err:
        targeted_linears(tiny_model, load_recipe(path))
    assert "model.layers.N.self_attn.q_proj" in str(err.value)


def test_recipe_needing_data_without_dataset(tiny_model_dir, tmp_path):
    config = PruneConfig(
        model=str(tiny_model_dir), output=str(tmp_path / "o"), recipe="sparsegpt-50"
    )
    with pytest.raises(PruneInputError, match="needs calibration data"):
        run_prune(config)
    assert not (tmp_path / "o").exists()


def test_config_combinations():
    with pytest.raises(ValidationError, match="exactly one of `drop`"):
        PruneConfig(model="m", output="o", method="layers", dataset="d")
    with pytest.raises(ValidationError, match="method 'layers' only"):
        PruneConfig(model="m", output="o", drop=2)
    with pytest.raises(ValidationError, match="apply to method 'oneshot' only"):
        PruneConfig(model="m", output="o", method="layers", drop=1, dataset="d", recipe="wanda-50")
    with pytest.raises(ValidationError, match="extra"):
        PruneConfig(model="m", output="o", sparsty=0.5)
