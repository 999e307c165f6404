"""Sparse LoRA (SparsePEFT): the adapter's delta is masked with the base weights' zeros, so the
merged drafter keeps every pruned zero; plain LoRA is the control that loses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sd2_hf import SD2Config, SD2Trainer, SparsityMaskCallback, load_sparse_adapter
from sd2_hf.cli import build_parser
from sd2_hf.cli import main as sd2_main
from sd2_hf.pruning.masks import find_target_linears, is_n_m_sparse, sparsity_report
from sd2_hf.recipe import RecipeError, apply_overrides, recipe_from_dict
from sd2_hf.training.callbacks import MaskDriftError
from sd2_hf.training.config import TrainStageConfig
from sd2_hf.training.lora_options import SparseLoraOptions
from sd2_hf.training.sparse_lora import SparseLoraLinear, get_sparse_peft_model
from sd2_hf.training.stage import run_train
from sd2_hf.utils.schema_cli import model_from_args

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def zero_pattern(model) -> dict[str, torch.Tensor]:
    return {n: (m.weight == 0).clone() for n, m in find_target_linears(model).items()}


def lost_zeros(before: dict[str, torch.Tensor], model) -> int:
    after = zero_pattern(model)
    return sum(int((before[n] & ~after[n]).sum()) for n in before)


def lora(**changes) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **changes})


def trainer_args(tmp_path, **changes) -> SD2Config:
    kwargs = dict(
        max_steps=12, learning_rate=2e-2, lr_scheduler_type="constant", mask_check_interval=3
    )
    return SD2Config(**tiny.trainer_kwargs(tmp_path / "out", **{**kwargs, **changes}))


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(tiny.conversations(24))


@pytest.mark.parametrize("fixture", ["sparse_model", "sparse_24_model"])
def test_trained_adapter_merges_with_every_zero_exact(
    request, fixture, tmp_path, tiny_tokenizer, dataset
):
    model = request.getfixturevalue(fixture)
    before, structure = zero_pattern(model), sparsity_report(model)["structure"]
    base = {n: m.weight.detach().clone() for n, m in find_target_linears(model).items()}
    trainer = SD2Trainer(
        model,
        args=trainer_args(tmp_path),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
        peft_config=lora(),
    )
    adapted = [m for m in trainer.model.modules() if isinstance(m, SparseLoraLinear)]
    assert len(adapted) == 2 * 7  # every linear of both blocks, not lm_head
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert trainable < 0.1 * sum(p.numel() for p in trainer.model.parameters())
    trainer.train()  # the mask callback verified the adapter deltas every 3 steps

    merged = trainer.model.merge_and_unload()
    assert lost_zeros(before, merged) == 0
    assert sparsity_report(merged)["structure"] == structure
    if structure == "2:4":
        assert all(is_n_m_sparse(m.weight) for m in find_target_linears(merged).values())
    # the adapter learned something: the surviving weights moved
    moved = [
        n for n, m in find_target_linears(merged).items() if not torch.equal(m.weight, base[n])
    ]
    assert len(moved) == len(base)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["one-matmul", "two-matmuls"])
def test_adapter_logits_equal_merged_logits(sparse_model, dropout):
    inputs = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = sparse_model(inputs).logits
    # random B (not PEFT's zero init), so the delta is not zero
    peft_model = get_sparse_peft_model(
        sparse_model, lora(init_lora_weights=False, lora_dropout=dropout)
    ).eval()
    with torch.no_grad():
        adapter_logits = peft_model(inputs).logits
        merged = peft_model.merge_and_unload()
        merged_logits = merged(inputs).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(adapter_logits, merged_logits, rtol=1e-5, atol=1e-5)


def test_plain_lora_merge_loses_the_zeros_and_is_caught(
    sparse_model, tmp_path, tiny_tokenizer, dataset
):
    """The control: PEFT's unmasked merge W + BA fills the pruned zeros."""
    before = zero_pattern(sparse_model)
    plain = get_peft_model(sparse_model, lora(init_lora_weights=False))
    # what SD2Trainer's mask callback checks: the deltas at pruned positions
    callback = SparsityMaskCallback()
    callback.record(plain)
    assert len(callback.adapted) == 14
    with pytest.raises(MaskDriftError, match="adapter 'default' delta"):
        callback.verify("test")
    # and SD2Trainer refuses such a model before training
    with pytest.raises(ValueError, match="without masking the delta"):
        SD2Trainer(
            plain,
            args=trainer_args(tmp_path),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
    merged = plain.merge_and_unload()
    assert lost_zeros(before, merged) > 0.99 * sum(int(b.sum()) for b in before.values())


def test_sparse_layers_refuse_what_they_cannot_mask(sparse_model):
    with pytest.raises(ValueError, match="DoraLinearVariant"):
        get_sparse_peft_model(sparse_model, lora(use_dora=True))
    with pytest.raises(ValueError, match="target_parameters"):
        get_sparse_peft_model(sparse_model, lora(target_modules=None, target_parameters=["x"]))


def test_adapter_run_resumes_like_an_uninterrupted_one(tmp_path, sparse_dir, conversations_file):
    def config(name: str, steps: int) -> TrainStageConfig:
        return TrainStageConfig(
            model=str(sparse_dir),
            dataset=str(conversations_file),
            output=str(tmp_path / name),
            max_steps=steps,
            save_steps=3,
            learning_rate=2e-2,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_length=64,
            logging_steps=1,
            peft={"r": 4, "lora_alpha": 8},
        )

    first = run_train(config("resumed", 3))
    pruned = AutoModelForCausalLM.from_pretrained(sparse_dir)
    linears = find_target_linears(pruned).values()
    assert first["trainable_parameters"] == sum(
        4 * (m.in_features + m.out_features) for m in linears
    )
    resumed = run_train(config("resumed", 6))
    run_train(config("straight", 6))
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["global_step"] == 6
    assert resumed["sparsity_after"] == pytest.approx(0.5, abs=1e-3)
    # the resumed run continued from the checkpoint's adapter and optimizer state: it ends
    # where the uninterrupted run ends (a fresh adapter would not)
    a = load_file(tmp_path / "resumed" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    base = load_file(sparse_dir / "model.safetensors")
    assert any(not torch.equal(a[n], base[n]) for n in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed")
    assert lost_zeros(zero_pattern(pruned), merged) == 0

    # the saved adapter reloads onto the pruned model as masking layers, merging to the output
    reloaded = load_sparse_adapter(pruned, tmp_path / "resumed" / "adapter")
    assert any(isinstance(m, SparseLoraLinear) for m in reloaded.modules())
    for name, tensor in reloaded.merge_and_unload().state_dict().items():
        torch.testing.assert_close(tensor, a[name], rtol=0, atol=1e-7)


def test_recipe_section_and_overrides():
    data = {"name": "t", "target": "m", "dataset": "d", "train": {"peft": {"r": 8}}}
    train = next(p for p in recipe_from_dict(data).plan() if p.name == "train")
    assert train.config.peft.r == 8 and train.config.peft.lora_alpha == 32
    lora_config = train.config.peft.to_lora_config()
    assert lora_config.r == 8 and lora_config.target_modules == "all-linear"
    data = apply_overrides(data, ["train.peft.target_modules=[q_proj, v_proj]"], base=Path.cwd())
    train = next(p for p in recipe_from_dict(data).plan() if p.name == "train")
    assert train.config.peft.to_lora_config().target_modules == {"q_proj", "v_proj"}

    with pytest.raises(RecipeError) as err:
        recipe_from_dict({**data, "train": {"peft": {"rank": 8}}})
    assert "unknown key 'rank' in section 'train.peft'" in str(err.value)
    assert "Allowed keys: r, lora_alpha" in str(err.value)
    with pytest.raises(RecipeError, match=r"lora_args.use_dora is not supported: DoRA"):
        recipe_from_dict({**data, "train": {"peft": {"lora_args": {"use_dora": True}}}})
    with pytest.raises(RecipeError, match=r"\['lora_rank'\] are not peft.LoraConfig fields"):
        recipe_from_dict({**data, "train": {"peft": {"lora_args": {"lora_rank": 2}}}})


def test_cli_trains_a_merged_sparse_drafter(tmp_path, sparse_dir, conversations_file, capsys):
    out = tmp_path / "cli"
    rc = sd2_main(
        ["train", str(sparse_dir), "--dataset", str(conversations_file), "--output", str(out),
         "--max-steps", "2", "--max-length", "64", "--learning-rate", "1e-2", "--peft-r", "2"]
    )  # fmt: skip
    assert rc == 0 and "sparse LoRA: merged" in capsys.readouterr().out
    report = json.loads((out / "train_report.json").read_text())
    assert report["peft"]["r"] == 2 and report["sparsity_after"] == pytest.approx(0.5, abs=1e-3)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain checkpoint, no PEFT needed
    pruned = AutoModelForCausalLM.from_pretrained(sparse_dir)
    assert lost_zeros(zero_pattern(pruned), merged) == 0

    # `--peft` alone: the defaults
    def parsed(*options: str) -> TrainStageConfig:
        args = build_parser().parse_args(
            ["train", "m", "--dataset", "d", "--output", "o", *options]
        )
        return model_from_args(TrainStageConfig, args)

    assert parsed("--peft").peft == SparseLoraOptions()
    assert parsed().peft is None
    assert parsed("--peft-target-modules", "q_proj", "o_proj").peft.target_modules == [
        "q_proj",
        "o_proj",
    ]

    # an adapter dir is not a drafter: export says what to export instead
    from sd2_hf.export.export import ExportConfig, ExportError, run_export

    with pytest.raises(ExportError, match="is a PEFT adapter.*merged drafter"):
        run_export(ExportConfig(drafter=str(out / "adapter"), output=str(tmp_path / "export")))
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_lora_on_a_bf16_base(tiny_tokenizer, dropout, bias):
    """PEFT keeps adapters in fp32 on a bf16 base: the layer computes the adapter in fp32 and
    returns bf16, with or without dropout and bias (on-policy generation reaches it outside
    the trainer's autocast)."""
    model = tiny.build_model(tiny_tokenizer)
    if bias:
        for module in tiny.decoder_linear_layers(model).values():
            module.bias = torch.nn.Parameter(torch.randn(module.out_features) * 0.01)
    model = tiny.magnitude_sparsify(model, 0.5).to(torch.bfloat16)
    before = zero_pattern(model)
    peft_model = get_sparse_peft_model(model, lora(lora_dropout=dropout))
    layer = next(m for m in peft_model.modules() if isinstance(m, SparseLoraLinear))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        peft_model.train()  # dropout on: the two-matmul path
        assert peft_model(input_ids=ids).logits.dtype == torch.bfloat16
        peft_model.eval()
        out = peft_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)
    merged = peft_model.merge_and_unload()
    assert lost_zeros(before, merged) == 0
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    # bf16 rounding of the merged weights only.
    assert (merged_logits.float() - logits.float()).abs().max() < 0.1 * logits.float().abs().max()
