"""Cheaper heads (`sd2 prune --draft-vocab-size / --head-sparsity`): MACs by hand, drafters that
load in greedy assisted generation and are accepted far more than a random drafter, masks held in
fine-tuning, and bad input."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from sd2_hf import SD2Config, SD2Trainer
from sd2_hf.evaluation.macs import count_macs
from sd2_hf.pruning.config import PruneConfig
from sd2_hf.pruning.head import (
    LOGIT_FLOOR,
    assistant_token_counts,
    draft_vocabulary,
    find_floor_channel,
    restrict_vocab,
    sparse_head_name,
    untie_head,
)
from tests.tiny import (
    assisted_greedy,
    build_model,
    prune,
    save_model,
    trained_model,
    trainer_kwargs,
)

CONTEXT = 512


def _head_macs(report) -> int:
    return report.per_module["lm_head"]


def kept_rows(model) -> torch.Tensor:
    """The head rows a draft vocabulary keeps: nonzero outside the floor channel."""
    head = model.lm_head.weight.detach().clone()
    head[:, find_floor_channel(model)] = 0
    return head.abs().sum(-1) != 0


def test_draft_vocabulary_keeps_special_tokens_then_most_frequent():
    counts = Counter({5: 10, 7: 10, 9: 3, 2: 1, 100: 50})
    # 100 is outside the vocabulary: never chosen; ties go to the smaller id.
    assert draft_vocabulary(counts, 3, vocab_size=20, always=[0]) == [0, 5, 7]
    assert draft_vocabulary(counts, 5, vocab_size=20, always=[0, 1]) == [0, 1, 5, 7, 9]
    with pytest.raises(ValueError, match="1..20"):
        draft_vocabulary(counts, 21, vocab_size=20)
    with pytest.raises(ValueError, match="special tokens"):
        draft_vocabulary(counts, 1, vocab_size=20, always=[0, 1])


def test_untie_copies_a_tied_head(tiny_tokenizer):
    model = build_model(tiny_tokenizer)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    assert sparse_head_name(model) is None  # tied: the dense embedding table
    before = model.model.embed_tokens.weight.detach().clone()
    restrict_vocab(model, [0, 1, 2])
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # embeddings untouched but for the floor channel
    channel = find_floor_channel(model)
    others = [c for c in range(before.shape[1]) if c != channel]
    assert torch.equal(model.model.embed_tokens.weight[:, others], before[:, others])
    assert int(kept_rows(model).sum()) == 3
    assert not model.config.tie_word_embeddings
    assert sparse_head_name(model) == "lm_head"
    untie_head(model)  # already untied: no-op
    assert int(kept_rows(model).sum()) == 3


@pytest.mark.parametrize("temperature", [1.0, 10.0])
def test_dropped_tokens_are_impossible_at_every_temperature(tiny_tokenizer, chat_rows, temperature):
    """Zeroed head rows gave the dropped tokens logit 0: a third of the rows kept, 0.67 of the
    probability mass at T = 1 went to tokens the drafter must never propose. With the floor
    channel their logits are below LOGIT_FLOOR on unseen text, at every position."""
    model = build_model(tiny_tokenizer)
    keep = list(range(0, len(tiny_tokenizer), 3))
    calibration = [
        tiny_tokenizer.apply_chat_template(r["messages"], return_dict=False) for r in chat_rows[:8]
    ]
    restrict_vocab(model, keep, calibration)
    dropped = torch.ones(len(tiny_tokenizer), dtype=torch.bool)
    dropped[keep] = False
    unseen = [
        tiny_tokenizer.apply_chat_template(r["messages"], return_dict=False) for r in chat_rows[8:]
    ]
    with torch.no_grad():
        for ids in unseen + [list(range(5, 60))]:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            assert (logits[:, dropped] < LOGIT_FLOOR / 2).all()
            probs = torch.softmax(logits / temperature, -1)
            assert probs[:, dropped].sum(-1).max() == 0
            assert not dropped[logits.argmax(-1)].any()


def test_draft_vocab_macs_by_hand_and_saved_checkpoint(
    tiny_model_dir, tiny_tokenizer, chat_rows_file, tmp_path
):
    out = tmp_path / "vocab"
    result = prune(tiny_model_dir, out, chat_rows_file, draft_vocab_size=64)
    hidden = 128
    vocab = len(tiny_tokenizer)
    report = json.loads((out / "sparsity_report.json").read_text())["head"]
    keep = report["kept_token_ids"]
    assert len(keep) == 64 == result.head["draft_vocab_size"]
    assert set(tiny_tokenizer.all_special_ids) <= set(keep)
    counts = assistant_token_counts(chat_rows_file, tiny_tokenizer)
    # Every kept non-special token is at least as frequent as every dropped one.
    kept_counts = [counts[t] for t in keep if t not in tiny_tokenizer.all_special_ids]
    dropped = [c for t, c in counts.items() if t not in keep]
    assert min(kept_counts) >= max(dropped, default=0)
    assert 0 < result.head["coverage"] <= 1

    model = AutoModelForCausalLM.from_pretrained(out)
    rows = kept_rows(model)
    assert sorted(torch.nonzero(rows).flatten().tolist()) == keep
    # Hand count: the head costs (hidden - 1) × kept rows (their floor-channel weight is zero)
    # plus one weight per dropped row (the floor); the layers lose the channel's reads/writes.
    dense = count_macs(tiny_model_dir, CONTEXT)
    pruned = count_macs(out, CONTEXT)
    assert _head_macs(dense) == hidden * vocab
    assert _head_macs(pruned) == (hidden - 1) * 64 + (vocab - 64)
    assert dense.total - pruned.total == _head_macs(dense) - _head_macs(pruned) + (
        dense.linear - _head_macs(dense) - (pruned.linear - _head_macs(pruned))
    )


def test_head_sparsity_macs_by_hand(tiny_model_dir, tiny_tokenizer, chat_rows_file, tmp_path):
    out = tmp_path / "head50"
    result = prune(tiny_model_dir, out, chat_rows_file, recipe="sparsegpt-50", head_sparsity=0.5)
    model = AutoModelForCausalLM.from_pretrained(out)
    head = model.lm_head.weight
    # SparseGPT (unstructured) prunes half of the head's weights (an update can land on 0).
    zeros = int((head == 0).sum())
    assert head.numel() // 2 <= zeros <= head.numel() // 2 + head.numel() // 1000
    assert result.head["zero_fraction"] == pytest.approx(zeros / head.numel())
    hidden, vocab = 128, len(tiny_tokenizer)
    macs = count_macs(out, CONTEXT)
    assert _head_macs(macs) == hidden * vocab - zeros
    # The decoder layers are pruned by the recipe as without the option.
    assert macs.linear - _head_macs(macs) == pytest.approx(
        (macs.dense_linear - hidden * vocab) * 0.5, rel=0.01
    )


def test_draft_vocab_on_layer_dropped_drafter(tiny_model_dir, chat_rows_file, tmp_path):
    out = tmp_path / "layers-vocab"
    result = prune(
        tiny_model_dir, out, chat_rows_file, method="layers", drop=1, draft_vocab_size=32
    )
    assert result.num_layers == 1 and result.head["draft_vocab_size"] == 32
    report = json.loads((out / "layer_distances.json").read_text())
    assert len(report["head"]["kept_token_ids"]) == 32
    vocab = AutoModelForCausalLM.from_pretrained(out).config.vocab_size
    assert count_macs(out, CONTEXT).per_module["lm_head"] == 127 * 32 + (vocab - 32)


@pytest.fixture(scope="module")
def trained_target_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny target trained on the word cycle (`tests/tiny.py: trained_model`): what its
    drafters accept is measurable, unlike a random-init target's near-tied logits."""
    path = tmp_path_factory.mktemp("trained-target")
    return save_model(trained_model(tiny_tokenizer), tiny_tokenizer, path)


HEAD_PROMPTS = ["hello world the draft", "sparse layers prune the quick dog"]


@pytest.mark.parametrize("option", [{"draft_vocab_size": 48}, {"head_sparsity": 0.7}])
def test_cheaper_head_drafter_loads_and_is_accepted(
    option, trained_target_dir, tiny_tokenizer, chat_rows_file, tmp_path, single_torch_thread
):
    """Load test: greedy assisted generation with the drafter runs and keeps the target's own
    output (verification guarantees that for any drafter that loads, a random one included).
    What can fail: the drafter's MAL (K = 3) must be well above a random drafter's, e.g. a draft
    vocabulary that dropped the tokens the target writes, or a head pruned into noise, fails."""
    drafter_dir = tmp_path / "drafter"
    prune(trained_target_dir, drafter_dir, chat_rows_file, recipe="sparsegpt-50", **option)
    target = AutoModelForCausalLM.from_pretrained(trained_target_dir).eval()
    drafter = AutoModelForCausalLM.from_pretrained(drafter_dir).eval()
    plain = []
    for text in HEAD_PROMPTS:
        ids = tiny_tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            out = target.generate(**ids, max_new_tokens=24, do_sample=False)
        plain.append(out[0, ids["input_ids"].shape[1] :].tolist())
    assisted, mal = assisted_greedy(target, drafter, tiny_tokenizer, HEAD_PROMPTS)
    assert assisted == plain
    random_drafter = build_model(tiny_tokenizer, seed=1)
    random_assisted, random_mal = assisted_greedy(
        target, random_drafter, tiny_tokenizer, HEAD_PROMPTS
    )
    assert random_assisted == plain
    assert mal > random_mal + 0.5, (mal, random_mal)


def test_sparse_head_mask_is_held_in_fine_tuning(
    tiny_tokenizer, chat_rows, chat_rows_file, tmp_path
):
    model = build_model(tiny_tokenizer)
    model_dir = save_model(model, tiny_tokenizer, tmp_path / "dense")
    out = tmp_path / "vocab"
    prune(model_dir, out, chat_rows_file, recipe="sparsegpt-50", draft_vocab_size=40)
    drafter = AutoModelForCausalLM.from_pretrained(out)
    zero_rows = ~kept_rows(drafter)
    channel = find_floor_channel(drafter)
    floor = {
        "embed": drafter.model.embed_tokens.weight[:, channel].detach().clone(),
        "norm": drafter.model.norm.weight[channel].detach().clone(),
        "head": drafter.lm_head.weight[:, channel].detach().clone(),
    }
    trainer = SD2Trainer(
        drafter,
        args=SD2Config(**trainer_kwargs(tmp_path / "run", max_steps=3, learning_rate=1e-2)),
        train_dataset=Dataset.from_list(chat_rows[:8]),
        processing_class=tiny_tokenizer,
    )
    before = drafter.lm_head.weight.detach().clone()
    trainer.train()
    assert "lm_head" in trainer.mask_callback.masks
    head = trainer.model.lm_head.weight
    others = [c for c in range(head.shape[1]) if c != channel]
    assert torch.all(head[zero_rows][:, others] == 0)
    assert not torch.equal(head[~zero_rows], before[~zero_rows])  # the kept rows did train
    # The floor channel is held exactly (FloorChannelCallback), though the embeddings trained.
    model = trainer.model
    assert torch.equal(model.model.embed_tokens.weight[:, channel], floor["embed"])
    assert torch.equal(model.model.norm.weight[channel], floor["norm"])
    assert torch.equal(head[:, channel], floor["head"])


@pytest.mark.parametrize("loss", ["none", "fkl"])
def test_a_draft_vocabulary_drafter_trains_on_its_own_vocabulary(
    tiny_tokenizer, chat_rows, chat_rows_file, tmp_path, loss
):
    # Dropped labels and the teacher's mass on dropped tokens meet logits below -1e4: without
    # restricting the targets to the kept vocabulary the loss is in the thousands and the
    # drafter is wrecked in a few steps.
    model = build_model(tiny_tokenizer)
    model_dir = save_model(model, tiny_tokenizer, tmp_path / "dense")
    out = tmp_path / "vocab"
    prune(model_dir, out, chat_rows_file, recipe="sparsegpt-50", draft_vocab_size=20)
    drafter = AutoModelForCausalLM.from_pretrained(out)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir) if loss != "none" else None
    kwargs = trainer_kwargs(tmp_path / "run", max_steps=4, learning_rate=1e-3, logging_steps=1)
    trainer = SD2Trainer(
        drafter,
        args=SD2Config(**kwargs, distill_loss=loss),
        teacher_model=teacher,
        train_dataset=Dataset.from_list(chat_rows[:16]),
        processing_class=tiny_tokenizer,
    )
    dropped = set(trainer._dropped_ids.tolist())
    assert dropped == set(range(drafter.config.vocab_size)) - set(
        kept_rows(drafter).nonzero().flatten().tolist()
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses), losses


def test_train_stage_reports_the_held_head_zeros(tiny_model_dir, chat_rows_file, tmp_path):
    """`sd2 train`'s sparsity report counts what the trainer holds: the sparse head too."""
    from sd2_hf.training.config import TrainStageConfig
    from sd2_hf.training.stage import run_train

    pruned = tmp_path / "vocab"
    prune(tiny_model_dir, pruned, chat_rows_file, recipe="sparsegpt-50", draft_vocab_size=40)
    drafter = AutoModelForCausalLM.from_pretrained(pruned)
    linears = [m for m in drafter.modules() if isinstance(m, torch.nn.Linear)]
    assert drafter.lm_head in linears
    by_hand = sum(int((m.weight == 0).sum()) for m in linears) / sum(
        m.weight.numel() for m in linears
    )
    report = run_train(
        TrainStageConfig(
            model=str(pruned),
            dataset=chat_rows_file,
            output=str(tmp_path / "trained"),
            max_steps=2,
            learning_rate=1e-2,
            max_length=64,
        )
    )
    assert report["sparsity_before"] == pytest.approx(by_hand)
    assert report["sparsity_after"] == pytest.approx(by_hand)


def test_dense_untied_head_stays_unmasked(tiny_tokenizer, chat_rows, tmp_path):
    trainer = SD2Trainer(
        build_model(tiny_tokenizer),
        args=SD2Config(**trainer_kwargs(tmp_path / "run", max_steps=1)),
        train_dataset=Dataset.from_list(chat_rows[:4]),
        processing_class=tiny_tokenizer,
    )
    trainer.mask_callback.record(trainer.model)
    assert "lm_head" not in trainer.mask_callback.masks


def test_head_options_need_a_dataset(tmp_path):
    for option in ({"draft_vocab_size": 8}, {"head_sparsity": 0.5}):
        with pytest.raises(ValidationError, match="need `dataset`"):
            PruneConfig(model="m", output=str(tmp_path / "o"), **option)
    with pytest.raises(ValidationError):
        PruneConfig(model="m", output="o", dataset="d", head_sparsity=1.0)


def test_export_card_and_metadata_describe_the_cheaper_head(
    tiny_model_dir, chat_rows_file, tmp_path
):
    from sd2_hf.export.export import ExportConfig, run_export
    from sd2_hf.utils.io import read_json

    pruned = tmp_path / "vocab"
    prune(tiny_model_dir, pruned, chat_rows_file, recipe="sparsegpt-50", draft_vocab_size=64)
    export = run_export(
        ExportConfig(drafter=str(pruned), output=str(tmp_path / "export"), format="dense")
    )
    metadata = read_json(tmp_path / "export" / "sd2_drafter.json")
    head = metadata["recipe"]["head"]
    assert head["draft_vocab_size"] == 64 and "kept_token_ids" not in head
    card = (tmp_path / "export" / "README.md").read_text()
    assert "most frequent" in card and "`lm_head` stay dense" not in card
    # The exported head still has exactly the kept rows.
    model = AutoModelForCausalLM.from_pretrained(export.output)
    assert int(kept_rows(model).sum()) == 64


def test_draft_vocab_on_a_tied_model_saves_an_untied_head(tiny_tokenizer, chat_rows_file, tmp_path):
    """SmolLM2's head is tied: it is untied before llm-compressor dispatches the model (untied
    afterwards, saving failed with shared tensors)."""
    model = build_model(tiny_tokenizer)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    tied_dir = save_model(model, tiny_tokenizer, tmp_path / "tied")
    out = tmp_path / "vocab"
    prune(tied_dir, out, chat_rows_file, recipe="sparsegpt-50", draft_vocab_size=32)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    keep = json.loads((out / "sparsity_report.json").read_text())["head"]["kept_token_ids"]
    head, embed = reloaded.lm_head.weight, model.model.embed_tokens.weight
    dropped = torch.ones(head.shape[0], dtype=torch.bool)
    dropped[keep] = False
    others = [c for c in range(head.shape[1]) if c != find_floor_channel(reloaded)]
    assert len(keep) == 32 and torch.all(head[dropped][:, others] == 0)
    # kept rows: the tied embedding rows (but for the floor channel)
    assert torch.equal(head[keep][:, others], embed[keep][:, others])
    assert torch.equal(reloaded.model.embed_tokens.weight[:, others], embed[:, others])
