"""Recipe schema: every shipped recipe validates; overrides, paths and errors behave."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sd2_hf.cli import main as sd2_main
from sd2_hf.recipe import (
    STAGES,
    RecipeError,
    load_recipe,
    parse_override,
    recipe_from_dict,
    resolve_path,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SD2_RECIPES = sorted((RECIPES / "sd2").glob("*.yaml"))
PRUNING_RECIPES = sorted((RECIPES / "pruning").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def test_the_recipe_library_is_there():
    names = {p.name for p in SD2_RECIPES}
    assert {
        "smollm2-demo.yaml",
        "uag-gemma3-smollm2.yaml",
        "llama3.1-70b-llama3.2-1b.yaml",
        "llama3.1-70b-qwen2.5-0.5b-uag.yaml",
    } <= names
    assert {p.name for p in ACCELERATE_CONFIGS} == {
        "ddp.yaml",
        "fsdp2.yaml",
    }


@pytest.mark.parametrize("path", SD2_RECIPES, ids=lambda p: p.stem)
def test_sd2_recipe_validates_and_chains_its_stages(path, tmp_path):
    recipe = load_recipe(path, [f"output={tmp_path}"])
    assert recipe.name == path.stem and recipe.description
    plans = {p.name: p for p in recipe.plan()}
    assert list(plans) == list(STAGES)
    assert all(Path(p.config.output) == tmp_path / name for name, p in plans.items())
    # Each stage reads what the one before it wrote.
    assert plans["prune"].config.dataset == str(tmp_path / "distill")
    assert plans["train"].config.model == str(tmp_path / "prune")
    assert plans["export"].config.drafter == str(tmp_path / "train")
    drafters = dict(d.split("=", 1) for d in plans["eval"].config.drafters)
    assert drafters["sd2"] == str(tmp_path / "export")
    assert drafters["pruned"] == str(tmp_path / "prune")
    # The pruning recipe a recipe names exists and parses with llm-compressor.
    from sd2_hf.pruning.recipes import load_recipe as load_pruning_recipe

    assert load_pruning_recipe(plans["prune"].config.recipe).modifiers
    template = plans["train"].config.trainer_args.get("chat_template_path")
    if template:
        assert Path(template).is_file() and template.endswith("-training.jinja")
    accelerate_config = plans["train"].launch.get("accelerate_config")
    if accelerate_config:
        assert Path(accelerate_config).resolve() in ACCELERATE_CONFIGS


def test_demo_recipe_is_the_offline_default():
    recipe = load_recipe(RECIPES / "sd2" / "smollm2-demo.yaml")
    plans = {p.name: p.config for p in recipe.plan()}
    assert recipe.target.model == "asset:smollm2-135m-instruct"
    assert recipe.drafter_model == recipe.target.model
    assert plans["distill"].source == "asset:sharegpt" and plans["distill"].max_turns == 1
    assert Path(plans["prune"].recipe) == RECIPES / "pruning" / "sparsegpt-2of4.yaml"
    assert plans["eval"].prompts == "asset:mtbench"
    assert plans["eval"].backend == "transformers" and plans["eval"].baselines == ["none"]


def test_paper_scale_recipes_use_tensor_parallel_vllm_and_fsdp():
    for name, drafter in (
        ("llama3.1-70b-llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct"),
        ("llama3.1-70b-qwen2.5-0.5b-uag", "Qwen/Qwen2.5-0.5B-Instruct"),
    ):
        recipe = load_recipe(RECIPES / "sd2" / f"{name}.yaml")
        plans = {p.name: p for p in recipe.plan()}
        # Hub ids stay Hub ids (they are not paths next to the recipe).
        assert recipe.target.model == "meta-llama/Llama-3.1-70B-Instruct"
        assert plans["prune"].config.model == drafter
        for stage in ("distill", "eval"):
            config = plans[stage].config
            assert config.backend == "vllm"
            assert config.vllm_extra_args == ["--tensor-parallel-size", "8"]
        assert Path(plans["train"].launch["accelerate_config"]).name == "fsdp2.yaml"
        assert f"dense={drafter}" in plans["eval"].config.drafters


@pytest.mark.parametrize("path", PRUNING_RECIPES, ids=lambda p: p.stem)
def test_pruning_recipe_parses_with_llmcompressor(path):
    from sd2_hf.pruning.recipes import load_recipe as load_pruning_recipe

    loaded = load_pruning_recipe(str(path))
    assert loaded.modifiers and loaded.targets


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_is_valid(path):
    """Loads with accelerate's own config class (it rejects unknown top-level keys), and every
    nested key is an option `accelerate launch` knows (it copies them onto its arguments)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.constants import FSDP2_STATE_DICT_TYPE, FSDP_AUTO_WRAP_POLICY

    config = ClusterConfig.from_yaml_file(str(path))
    known = {a.dest for a in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section):
            assert key in known, f"{path.name}: {section}.{key} is not an accelerate option"
    assert config.num_processes > 1 and config.mixed_precision == "bf16"
    if path.stem == "fsdp2":
        assert config.distributed_type == DistributedType.FSDP
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_auto_wrap_policy"] in FSDP_AUTO_WRAP_POLICY
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert fsdp["fsdp_state_dict_type"] in FSDP2_STATE_DICT_TYPE
    else:
        assert config.distributed_type == DistributedType.MULTI_GPU


def minimal(**changes) -> dict:
    data = {"name": "t", "target": "asset:smollm2-135m-instruct", "dataset": "asset:sharegpt"}
    data.update({"train": {"max_steps": 2}, **changes})
    return data


def refusal(**changes) -> str:
    """The message of the `RecipeError` that `minimal(**changes)` is refused with."""
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(minimal(**changes))
    return str(err.value)


def test_misspelled_key_names_key_section_and_allowed_keys():
    message = refusal(prune={"sparsty": 0.5})
    assert "unknown key 'sparsty' in section 'prune'" in message
    assert "Did you mean 'sparsity'?" in message
    assert "Allowed keys: model, method, recipe, sparsity" in message
    # The pipeline owns output directories: not a section key.
    assert "output" not in message.split("Allowed keys:")[1].split(",")[0]


def test_misspelled_section_and_top_level_key():
    message = refusal(evaluation={"limit": 2})
    assert "unknown key 'evaluation' in the top level of the recipe" in message
    assert "distill, prune, train, export, eval" in message


def test_wrong_type_says_what_was_expected():
    message = refusal(train={"max_steps": "many"})
    assert "train.max_steps" in message and "'many'" in message and "expected int" in message
    with pytest.raises(RecipeError, match=r"eval.num_draft_tokens: .*greater than 0.*> 0"):
        recipe_from_dict(minimal(eval={"num_draft_tokens": 0}))
    with pytest.raises(RecipeError, match=r"distill.backend: Input should be 'transformers' or"):
        recipe_from_dict(minimal(distill={"backend": "tgi"}))


def test_stage_validators_run_with_the_filled_values():
    # PruneConfig's own check, reported under the section it came from.
    with pytest.raises(RecipeError, match=r"prune: method 'layers' needs exactly one of `drop`"):
        recipe_from_dict(minimal(prune={"method": "layers"}))
    with pytest.raises(RecipeError, match="train: no conversations to train on"):
        recipe_from_dict({"target": "m", "train": {}})
    with pytest.raises(RecipeError, match="distill: no seed conversations"):
        recipe_from_dict({"target": "m", "distill": {}})
    with pytest.raises(RecipeError, match="the recipe has no stage"):
        recipe_from_dict({"target": "m"})
    with pytest.raises(RecipeError, match="target: required key missing"):
        recipe_from_dict({"train": {"dataset": "d"}})


def test_fallbacks_without_distill_and_prune():
    recipe = recipe_from_dict(
        minimal(drafter="org/small", train={"distill_loss": "fkl"}, eval={"compare": ["dense"]})
    )
    plans = {p.name: p for p in recipe.plan()}
    train = plans["train"]
    assert train.config.model == "org/small" and train.config.dataset == "asset:sharegpt"
    assert train.config.teacher == "asset:smollm2-135m-instruct"  # DistillSpec loss: the target
    assert train.consumes == []
    assert plans["eval"].config.drafters == [f"sd2={recipe.root / 'train'}", "dense=org/small"]
    assert plans["eval"].consumes == ["train"]


def test_overrides_are_yaml_scalars():
    assert parse_override("train.max_steps=3") == (("train", "max_steps"), 3)
    assert parse_override("train.bf16=true") == (("train", "bf16"), True)
    assert parse_override("train.learning_rate=1e-4") == (("train", "learning_rate"), 1e-4)
    assert parse_override("eval.baselines=[none, ngram]") == (
        ("eval", "baselines"),
        ["none", "ngram"],
    )
    assert parse_override("target.model=asset:gemma-3-270m") == (
        ("target", "model"),
        "asset:gemma-3-270m",
    )
    assert parse_override("distill=null") == (("distill",), None)
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        parse_override("train.max_steps")


def test_overrides_and_relative_paths(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    (recipe_dir / "seed.jsonl").write_text("")
    (recipe_dir / "local-model").mkdir()
    path = recipe_dir / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "target": "local-model",
                "drafter": "org/hub-model",
                "dataset": "seed.jsonl",
                "output": "../runs/r",
                "distill": {},
                "prune": {"recipe": "sparsegpt-50"},
                "train": {},
            }
        )
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "other.jsonl").write_text("")
    monkeypatch.chdir(cwd)
    recipe = load_recipe(
        path, ["train.max_steps=3", "train.dataset=other.jsonl", "distill=null", "eval.limit=2"]
    )
    # In the file: relative to the recipe's directory; Hub ids and shipped names unchanged.
    assert recipe.target.model == str(recipe_dir / "local-model")
    assert recipe.drafter_model == "org/hub-model"
    assert recipe.dataset == str(recipe_dir / "seed.jsonl")
    assert recipe.root == tmp_path / "runs" / "r"
    assert recipe.prune.recipe == "sparsegpt-50"
    # On the command line: relative to the current directory.
    assert recipe.train.dataset == str(cwd / "other.jsonl")
    assert recipe.train.max_steps == 3
    # `distill=null` dropped the stage; `eval.limit=2` added one.
    assert recipe.stages() == ["prune", "train", "eval"]
    assert recipe.plan()[0].config.dataset == str(recipe_dir / "seed.jsonl")
    with pytest.raises(RecipeError, match="unknown key 'max_step' in section 'train'"):
        load_recipe(path, ["train.max_step=3"])
    with pytest.raises(RecipeError, match="prune.recipe is 'sparsegpt-50', not a section"):
        load_recipe(path, ["prune.recipe.x=1"])


def test_path_resolution_rules(tmp_path):
    (tmp_path / "dir").mkdir()
    assert resolve_path("dir", tmp_path) == str(tmp_path / "dir")
    assert resolve_path("./missing", tmp_path) == str(tmp_path / "missing")
    assert resolve_path("data/new.jsonl", tmp_path) == str(tmp_path / "data" / "new.jsonl")
    assert resolve_path("meta-llama/Llama-3.2-1B", tmp_path) == "meta-llama/Llama-3.2-1B"
    assert resolve_path("asset:sharegpt", tmp_path) == "asset:sharegpt"
    assert resolve_path("/abs/x", tmp_path) == "/abs/x"


def test_cli_dry_run_and_clear_errors(tmp_path, capsys, sd2_fails):
    demo = RECIPES / "sd2" / "smollm2-demo.yaml"
    assert sd2_main(["run", str(demo), f"output={tmp_path / 'demo'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"{stage:<9}would run" in out for stage in STAGES)
    assert not (tmp_path / "demo").exists()  # a dry run writes nothing
    assert "unknown key 'limt' in section 'eval'" in sd2_fails(
        ["run", demo, "eval.limt=3", "--dry-run"]
    )
    assert re.search("recipe file .* does not exist", sd2_fails(["run", tmp_path / "nope.yaml"]))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "a recipe is a YAML mapping" in sd2_fails(["run", tmp_path / "list.yaml"])


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _original_template(name: str) -> str:
    if name == "smollm2":
        from sd2_hf.assets import asset_dir, is_cached

        if is_cached("smollm2-135m-instruct"):  # the asset's own copy, when fetched
            shipped = asset_dir("smollm2-135m-instruct") / "chat_template.jinja"
            assert shipped.read_text() == SMOLLM2_TEMPLATE
        return SMOLLM2_TEMPLATE
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "llama3_2.jinja").read_text()


@pytest.mark.parametrize("name", ["smollm2", "llama3.2"])
def test_training_chat_templates_render_like_the_originals(name, tiny_tokenizer):
    """The training templates only add `{% generation %}` markers: same text, and TRL's
    assistant-only loss accepts them (no patching needed)."""
    import copy

    from trl.chat_template_utils import get_training_chat_template

    training = (RECIPES / "chat_templates" / f"{name}-training.jinja").read_text()
    original, patched = copy.deepcopy(tiny_tokenizer), copy.deepcopy(tiny_tokenizer)
    original.chat_template, patched.chat_template = _original_template(name), training
    conversations = [
        [{"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello!"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "Two."},
            {"role": "user", "content": "Three?"},
            {"role": "assistant", "content": " Four. "},
        ],
    ]
    for messages in conversations:
        for prompt in (messages[:-1], messages):
            for add in (False, True):
                kwargs = {"tokenize": False, "add_generation_prompt": add}
                assert patched.apply_chat_template(
                    prompt, **kwargs
                ) == original.apply_chat_template(prompt, **kwargs)
        masked = patched.apply_chat_template(
            messages, return_dict=True, return_assistant_tokens_mask=True
        )
        assert 0 < sum(masked["assistant_masks"]) < len(masked["input_ids"])
    assert get_training_chat_template(patched) is None


BROKEN_YAML = "name: x\ntarget:\n  model: foo\n bad: [1, 2\n"  # line 4 dedented by one


def _one_located_message(message: str, path: Path, line: int, column: int) -> None:
    assert f"{path}, line {line}, column {column}: YAML syntax error" in message, message
    assert "<unicode string>" not in message  # PyYAML's own location names no file
    assert message.count("error: sd2") == 1 and "fix the file there and rerun" in message


def test_a_yaml_syntax_error_names_the_recipe_line_and_column(tmp_path, sd2_fails):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN_YAML)
    message = sd2_fails(["run", path])
    _one_located_message(message, path, 4, 2)
    assert "\n     bad: [1, 2\n     ^" in message  # the line, a caret under the column


def test_yaml_files_the_recipe_names_are_checked_when_it_loads(tmp_path, sd2_fails):
    """`train.accelerate_config` is read by `accelerate launch` (a traceback), after the stages
    before it; a syntax error there is reported before anything runs, with the recipe key."""
    bad = tmp_path / "ddp.yaml"
    bad.write_text("compute_environment: LOCAL_MACHINE\nnum_processes: [2\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(minimal(train={"max_steps": 2, "accelerate_config": "ddp.yaml"}))
    )
    message = sd2_fails(["run", recipe, "--dry-run"])
    assert f"recipe {recipe}: train.accelerate_config" in message
    _one_located_message(message, bad, 3, 1)


def test_a_pruning_recipe_yaml_syntax_error_names_the_file(tmp_path, tiny_model_dir, sd2_fails):
    bad = tmp_path / "my-pruning.yaml"
    bad.write_text(
        "default_stage:\n  default_modifiers:\n    SparseGPTModifier:\n     sparsity: 0.5\n"
        "      targets: [Linear]\n"
    )
    message = sd2_fails(["prune", tiny_model_dir, "--recipe", bad, "--output", tmp_path / "out"])
    _one_located_message(message, bad, 5, 14)


@pytest.mark.parametrize("path", sorted((RECIPES / "distill").glob("*.yaml")), ids=lambda p: p.stem)
def test_distill_only_recipes_validate(path, tmp_path):
    recipe = load_recipe(path, [f"output={tmp_path}"])
    assert recipe.description and recipe.stages() == ["distill"]
    assert [p.name for p in recipe.plan()] == ["distill"]
