"""On-policy distillation in SD2Trainer: who generates, what is labelled, what the loss is, and
that the masks stay exact."""

from __future__ import annotations

import pytest
import tiny
import torch
from datasets import Dataset

from sd2_hf import SD2Config, SD2Trainer
from sd2_hf.pruning.masks import find_target_linears
from sd2_hf.training.losses import token_divergence

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def zero_pattern(model) -> dict[str, torch.Tensor]:
    return {n: (m.weight == 0).clone() for n, m in find_target_linears(model).items()}


def make_trainer(tmp_path, tokenizer, rows=8, **overrides):
    kwargs = dict(
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        distill_loss="fkl",
        on_policy_fraction=1.0,
        on_policy_max_new_tokens=6,
        mask_check_interval=1,
    )
    kwargs.update(overrides)
    args = SD2Config(**tiny.trainer_kwargs(tmp_path / "out", **kwargs))
    drafter = tiny.magnitude_sparsify(tiny.build_model(tokenizer, seed=5), 0.5)
    teacher = tiny.build_model(tokenizer, seed=6)
    return SD2Trainer(
        drafter,
        args=args,
        teacher_model=teacher,
        train_dataset=Dataset.from_list(tiny.conversations(rows, seed=1)),
        processing_class=tokenizer,
    )


class Spy:
    """Wraps `SD2Trainer._generate_on_policy`: records the batch it returned, the weights of the
    model that generated it, and the step it was made at."""

    def __init__(self, trainer: SD2Trainer):
        self.trainer = trainer
        self.calls: list[dict] = []
        original = trainer._generate_on_policy

        def wrapped(model, inputs):
            generator = trainer._generating_model(model)
            source = generator if generator is not None else trainer.accelerator.unwrap_model(model)
            out = original(model, inputs)
            self.calls.append(
                {
                    "step": trainer.state.global_step,
                    "generator_is_model": generator is None,
                    "weights": {n: p.detach().clone() for n, p in source.named_parameters()},
                    "inputs": inputs,
                    "batch": {k: v.clone() for k, v in out.items()},
                }
            )
            return out

        trainer._generate_on_policy = wrapped


def current_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_on_policy_batches_come_from_the_current_weights(tmp_path, tiny_tokenizer):
    """Each on-policy batch is what the drafter's weights *at that step* generate: a fresh copy
    of those weights, given the same random state, generates the same tokens, and a copy of the
    weights before training generates other tokens."""
    trainer = make_trainer(tmp_path, tiny_tokenizer, learning_rate=5e-2)
    initial = current_weights(trainer.model)
    calls: list[dict] = []
    original = trainer._generate_on_policy

    def wrapped(model, inputs):
        calls.append(
            {
                "step": trainer.state.global_step,
                "weights": current_weights(trainer.accelerator.unwrap_model(model)),
                "rng": torch.get_rng_state(),
                "inputs": {k: v.clone() for k, v in inputs.items()},
            }
        )
        calls[-1]["batch"] = original(model, inputs)
        return calls[-1]["batch"]

    trainer._generate_on_policy = wrapped
    trainer.train()
    assert [c["step"] for c in calls] == [0, 1, 2, 3]

    def regenerate(weights, call):
        copy = tiny.build_model(tiny_tokenizer, seed=5)
        copy.load_state_dict(weights)
        torch.set_rng_state(call["rng"])
        return original(copy, call["inputs"])["input_ids"]

    for call in calls:
        assert torch.equal(regenerate(call["weights"], call), call["batch"]["input_ids"])
    # The weights moved, and with them what is generated (so the check above is not vacuous).
    stale = [torch.equal(regenerate(initial, c), c["batch"]["input_ids"]) for c in calls[1:]]
    assert not all(stale)


def test_generation_runs_as_inference_in_the_training_dtype(tmp_path, tiny_tokenizer):
    """Eval mode (no dropout) and the trainer's autocast while generating; training mode after."""
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=2, bf16=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    seen = []
    generate = model.generate

    def spy(*args, **kwargs):
        seen.append((model.training, torch.is_autocast_enabled("cpu"), kwargs.get("use_cache")))
        return generate(*args, **kwargs)

    model.generate = spy
    trainer.train()
    assert seen == [(False, True, True)] * 2
    assert model.training


def test_generation_stops_at_any_eos_of_the_generation_config(tmp_path, tiny_tokenizer):
    """Llama-3 and Qwen list several EOS ids in generation_config.json: each one ends a
    continuation, not only the tokenizer's."""
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=1, on_policy_temperature=0.0)
    model = trainer.accelerator.unwrap_model(trainer.model)
    inputs = next(iter(trainer.get_train_dataloader()))
    prompts = trainer._prompts(inputs)
    with torch.no_grad():
        first = model.generate(input_ids=prompts[0][None], max_new_tokens=1, do_sample=False)
    stop = int(first[0, -1])
    assert stop != tiny_tokenizer.eos_token_id
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop]
    batch = trainer._generate_on_policy(trainer.model, inputs)
    generated = batch["labels"][0][batch["labels"][0] != -100]
    assert generated.tolist() == [stop]


def test_generated_rows_are_cut_to_max_length(tmp_path, tiny_tokenizer):
    # max_length: two tokens after the longest prompt, fewer than the 6 generated.
    trainer = make_trainer(tmp_path / "probe", tiny_tokenizer)
    probe = next(iter(trainer.get_train_dataloader()))
    limit = max(len(p) for p in trainer._prompts(probe)) + 2
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=1, max_length=limit)
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = trainer._generate_on_policy(trainer.model, inputs)
    assert batch["input_ids"].shape[1] == limit
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape


def test_an_empty_prompt_is_refused(tmp_path, tiny_tokenizer):
    """With every token labelled (assistant_only_loss=False on conversations) there is no
    prompt to continue: one message saying what to set, not a run on empty prompts."""
    with pytest.raises(ValueError, match="assistant_only_loss=True"):
        SD2Config(
            **tiny.trainer_kwargs(
                tmp_path,
                distill_loss="fkl",
                on_policy_fraction=0.5,
                assistant_only_loss=False,
                completion_only_loss=False,
            )
        )
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=1, assistant_only_loss=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        trainer.train()


def test_refresh_zero_generates_with_the_weights_before_training(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, on_policy_refresh_steps=0)
    initial = current_weights(trainer.model)
    spy = Spy(trainer)
    trainer.train()
    assert len(spy.calls) == 4
    for call in spy.calls:
        assert not call["generator_is_model"]
        assert same(call["weights"], initial)
    assert not same(current_weights(trainer.model), initial)


def test_refresh_every_two_steps(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, on_policy_refresh_steps=2, max_steps=5)
    snapshots = {}
    original = trainer.training_step

    def step(model, inputs, num_items_in_batch=None):
        snapshots[trainer.state.global_step] = current_weights(trainer.model)
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = step
    spy = Spy(trainer)
    trainer.train()
    # steps 0,1 from the weights at step 0; 2,3 from step 2; 4 from step 4
    for call in spy.calls:
        taken = call["step"] - call["step"] % 2
        assert same(call["weights"], snapshots[taken]), call["step"]


def test_labels_only_on_generated_tokens(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=2)
    spy = Spy(trainer)
    trainer.train()
    eos = tiny_tokenizer.eos_token_id
    for call in spy.calls:
        inputs, batch = call["inputs"], call["batch"]
        for row in range(batch["input_ids"].shape[0]):
            start = int((inputs["labels"][row] != -100).nonzero()[0])
            ids, labels, mask = (batch[k][row] for k in ("input_ids", "labels", "attention_mask"))
            # the prompt is the dataset row's tokens before its first assistant label
            assert torch.equal(ids[:start], inputs["input_ids"][row, :start])
            assert (labels[:start] == -100).all()
            length = int(mask.sum())
            generated = ids[start:length]
            assert 1 <= len(generated) <= 6
            assert torch.equal(labels[start:length], generated)
            assert (labels[length:] == -100).all() and (mask[length:] == 0).all()
            # the completion stops at its first EOS (kept, labelled) or at the token limit
            eos_at = (generated == eos).nonzero()
            if len(eos_at):
                assert int(eos_at[0]) == len(generated) - 1


def test_on_policy_loss_is_the_divergence_on_generated_tokens(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=1)
    spy = Spy(trainer)
    losses = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(model, inputs, return_outputs, num_items_in_batch)
        losses.append((loss.detach().clone(), {k: v.clone() for k, v in inputs.items()}))
        return loss

    trainer.compute_loss = compute_loss
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    (loss, inputs), call = losses[0], spy.calls[0]
    assert torch.equal(inputs["input_ids"], call["batch"]["input_ids"])
    # Recompute with the weights before the step: divergence alone, mean over generated tokens.
    drafter = tiny.build_model(tiny_tokenizer, seed=5)
    drafter.load_state_dict(before)
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        logits = drafter(**model_inputs).logits[:, :-1]
        teacher_logits = trainer.teacher_model(**model_inputs).logits[:, :-1]
    mask = inputs["labels"][:, 1:] != -100
    expected = token_divergence(logits, teacher_logits, "fkl", mask=mask, reduction="mean")
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-6)
    logged = [h for h in trainer.state.log_history if "on_policy_fkl_divergence" in h]
    assert logged and logged[0]["on_policy"] == 1.0


def test_masks_exact_after_on_policy_steps(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=6, on_policy_fraction=0.5)
    before = zero_pattern(trainer.model)
    start = current_weights(trainer.model)
    trainer.train()
    after = zero_pattern(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not same(start, current_weights(trainer.model))
    drawn = [h["on_policy"] for h in trainer.state.log_history if "on_policy" in h]
    assert drawn and 0.0 < sum(drawn) / len(drawn) < 1.0  # both kinds of batches ran


def test_draws_are_seeded_per_step(tmp_path, tiny_tokenizer):
    """A rerun (or a resumed run) makes the same on-policy choices at the same steps."""
    draws = []
    for run in range(2):
        trainer = make_trainer(
            tmp_path / str(run), tiny_tokenizer, max_steps=8, on_policy_fraction=0.5
        )
        picks = []
        original = trainer._draw_on_policy

        def draw(original=original, picks=picks):
            picks.append(original())
            return picks[-1]

        trainer._draw_on_policy = draw
        trainer.train()
        draws.append(picks)
    assert draws[0] == draws[1] and 0 < sum(draws[0]) < 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"on_policy_fraction": 1.5}, r"on_policy_fraction must be in \[0, 1\]"),
        ({"on_policy_fraction": 0.5, "distill_loss": "none"}, "set distill_loss"),
        ({"on_policy_max_new_tokens": 0}, "on_policy_max_new_tokens must be >= 1"),
        ({"on_policy_temperature": -1.0}, "on_policy_temperature must be >= 0"),
        ({"on_policy_refresh_steps": -1}, "on_policy_refresh_steps must be >= 0"),
        ({"on_policy_fraction": 0.5, "distill_loss": "fkl", "padding_free": True}, "padding_free"),
    ],
)
def test_on_policy_config_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        SD2Config(**tiny.trainer_kwargs(tmp_path, **overrides))


def test_resumed_run_draws_the_same_batches(tmp_path, tiny_tokenizer):
    """Interrupted at a checkpoint and resumed, a run replaces the same (step, micro-batch)
    pairs as the uninterrupted run, with gradient accumulation."""

    def run(out, max_steps, resume=None):
        trainer = make_trainer(
            out,
            tiny_tokenizer,
            rows=16,
            max_steps=max_steps,
            on_policy_fraction=0.5,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=2,
        )
        picks = []
        original = trainer._draw_on_policy

        def draw():
            picked = original()
            picks.append((trainer.state.global_step, trainer._micro_batch, picked))
            return picked

        trainer._draw_on_policy = draw
        trainer.train(resume_from_checkpoint=resume)
        return picks

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 2)
    resumed = run(tmp_path / "cut", 4, resume=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    assert [p for p in whole if p[0] >= 2] == resumed
    assert {p[1] for p in whole} == {0, 1}
    assert 0 < sum(p[2] for p in whole) < len(whole)
