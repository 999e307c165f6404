"""On-policy continuations from a vLLM server (`on_policy_generator="vllm"`): the server's
greedy continuations are the drafter's own (equal to `generate` on the same weights), its weights
follow training through in-place reloads, the masks stay exact, and what cannot run is refused."""

from __future__ import annotations

import pytest
import tiny
import torch
from datasets import Dataset
from test_on_policy import make_trainer, zero_pattern

from sd2_hf import SD2Config, SD2Trainer

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def vllm_env(vllm_python, monkeypatch):
    monkeypatch.setenv("SD2_VLLM_PYTHON", str(vllm_python))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


def hf_greedy(model, prompt: torch.Tensor, new_tokens: int, eos: list[int]) -> list[int]:
    """`generate`'s greedy continuation, cut after its first stop token."""
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt[None], max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos
        )[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), None)
    return out if cut is None else out[: cut + 1]


@pytest.mark.vllm
def test_vllm_continuations_follow_the_trained_weights(tmp_path, tiny_tokenizer, vllm_env):
    """Every on-policy batch: the server's greedy continuation of each prompt equals the
    drafter's `generate` on its weights at that step (so each step's reload took effect), and
    the masks are exact after training; the server is gone afterwards."""
    trainer = make_trainer(
        tmp_path,
        tiny_tokenizer,
        max_steps=3,
        on_policy_generator="vllm",
        on_policy_temperature=0.0,
    )
    before = zero_pattern(trainer.model)
    original = trainer._generate_on_policy
    checked = []

    def wrapped(model, inputs):
        batch = original(model, inputs)
        drafter = trainer.accelerator.unwrap_model(model)
        eos = trainer._eos_ids(drafter)
        was_training = drafter.training
        drafter.eval()
        for prompt, labels in zip(trainer._prompts(inputs), batch["labels"], strict=True):
            served = labels[labels != -100].tolist()
            assert served == hf_greedy(drafter, prompt, 6, eos)[: len(served)]
            checked.append(len(served))
        drafter.train(was_training)
        return batch

    trainer._generate_on_policy = wrapped
    trainer.train()
    assert len(checked) == 3 * 4 and all(checked)  # 3 steps of 4 rows (tiny.trainer_kwargs)
    syncs = [h for h in trainer.state.log_history if "on_policy_sync_seconds" in h]
    assert syncs, "weight syncs are logged"
    after = zero_pattern(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert trainer._vllm is None
    assert not (tmp_path / "out" / "on_policy_generator").exists()


@pytest.mark.vllm
def test_the_server_reloads_weights_in_place(tmp_path, tiny_tokenizer, vllm_env):
    from sd2_hf.training.vllm_generator import VLLMGenerator

    prompts = [tiny_tokenizer("the cat sat on")["input_ids"], tiny_tokenizer("a b c")["input_ids"]]
    eos = [tiny_tokenizer.eos_token_id]
    generator = VLLMGenerator(tmp_path / "gen", max_model_len=64)
    try:
        for seed in (5, 6):
            model = tiny.build_model(tiny_tokenizer, seed=seed).eval()
            generator.write(model, tiny_tokenizer)
            generator.load()
            served = generator.generate(
                prompts, max_new_tokens=8, temperature=0.0, eos_token_ids=eos, seeds=[0, 1]
            )
            expected = [hf_greedy(model, torch.tensor(p), 8, eos) for p in prompts]
            assert served == expected
        assert generator.server is not None and generator.server.is_running()
    finally:
        generator.close()


def test_a_peft_drafter_and_an_unknown_generator_are_refused(tmp_path, tiny_tokenizer):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="on_policy_generator='hf' is not supported"):
        SD2Config(**tiny.trainer_kwargs(tmp_path, on_policy_generator="hf"))
    args = SD2Config(
        **tiny.trainer_kwargs(
            tmp_path, distill_loss="fkl", on_policy_fraction=0.5, on_policy_generator="vllm"
        )
    )
    with pytest.raises(ValueError, match="a PEFT adapter is not merged"):
        SD2Trainer(
            tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer, seed=5), 0.5),
            args=args,
            teacher_model=tiny.build_model(tiny_tokenizer, seed=6),
            train_dataset=Dataset.from_list(tiny.conversations(4, seed=1)),
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
        )
