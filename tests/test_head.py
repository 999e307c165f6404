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
    assistant_token_counts,
    draft_vocabulary,
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
    assert torch.equal(model.model.embed_tokens.weight, before)  # embeddings untouched
    assert int((model.lm_head.weight.abs().sum(-1) != 0).sum()) == 3
    assert not model.config.tie_word_embeddings
    assert sparse_head_name(model) == "lm_head"
    untie_head(model)  # already untied: no-op
    assert int((model.lm_head.weight.abs().sum(-1) != 0).sum()) == 3


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
    rows = model.lm_head.weight.abs().sum(-1) != 0
    assert sorted(torch.nonzero(rows).flatten().tolist()) == keep
    # Hand count: the head costs hidden × kept rows; everything else is as before.
    dense = count_macs(tiny_model_dir, CONTEXT)
    pruned = count_macs(out, CONTEXT)
    assert _head_macs(dense) == hidden * vocab
    assert _head_macs(pruned) == hidden * 64
    assert dense.total - pruned.total == hidden * (vocab - 64) + (
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
    assert count_macs(out, CONTEXT).per_module["lm_head"] == 128 * 32


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
    zero_rows = drafter.lm_head.weight.abs().sum(-1) == 0
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
    assert torch.all(head[zero_rows] == 0)
    assert not torch.equal(head[~zero_rows], before[~zero_rows])  # the kept rows did train


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
    assert int((model.lm_head.weight.abs().sum(-1) != 0).sum()) == 64


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
    assert len(keep) == 32 and torch.all(head[dropped] == 0)
    assert torch.equal(head[keep], embed[keep])  # kept rows: the tied embedding rows
    assert torch.equal(reloaded.model.embed_tokens.weight, embed)
