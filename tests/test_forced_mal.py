"""Teacher-forced greedy MAL: the step replay by hand, and the same counters as transformers
assisted generation on tiny models."""

from __future__ import annotations

import pytest
import tiny
import torch

from sd2_hf.evaluation.backend import DrafterPlan
from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.evaluation.forced import forced_greedy_mal, replay_greedy_steps
from sd2_hf.evaluation.prompts import render
from sd2_hf.evaluation.transformers_backend import TransformersBackend

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_replay_by_hand():
    # t=0: drafts 3, matches T,T,F -> accept 2, commit 3 (t=3)
    # t=3: drafts 3, matches F -> accept 0 (t=4)
    # t=4: drafts 3, matches T,T,T -> accept 3 (t=8)
    # t=8: limit 10 -> drafts min(3, 10-8-1)=1, match T -> accept 1 (t=10): end
    matches = [True, True, False, False, True, True, True, True, True, True]
    c = replay_greedy_steps(matches, k=3, max_new_tokens=10)
    assert (c.num_drafts, c.num_accepted_tokens, c.num_draft_tokens) == (4, 6, 10)
    assert c.accepted_per_position == [3, 2, 1]
    # a step whose drafts would pass the limit is plain decoding and not counted
    c = replay_greedy_steps([False, True], k=3, max_new_tokens=2)
    assert (c.num_drafts, c.num_accepted_tokens) == (1, 0)
    # an output that ended (EOS) before the limit: acceptance cannot run past its end
    c = replay_greedy_steps([True, True], k=4, max_new_tokens=16)
    assert (c.num_drafts, c.num_accepted_tokens) == (1, 2)


def test_same_counters_as_assisted_generation(tmp_path, tiny_tokenizer):
    target = tiny.build_model(tiny_tokenizer, seed=0)
    drafter = tiny.build_model(tiny_tokenizer, seed=0)
    drafter.load_state_dict(target.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
    target_dir = tiny.save_model(target, tiny_tokenizer, tmp_path / "target")
    drafter_dir = tiny.save_model(drafter, tiny_tokenizer, tmp_path / "drafter")
    config = EvalConfig(target=str(target_dir), max_new_tokens=24, num_draft_tokens=3)
    backend = TransformersBackend(config, str(target_dir), tiny_tokenizer)
    prompts = [
        render(tiny_tokenizer, [{"role": "user", "content": row["messages"][0]["content"]}])
        for row in tiny.conversations(6, seed=4)
    ]
    measured, sequences = [], []
    with backend.session(None) as plain:
        outputs = [plain(p).token_ids for p in prompts]
    with backend.session(DrafterPlan("d", "model", str(drafter_dir))) as generate:
        for p, reference in zip(prompts, outputs, strict=True):
            result = generate(p)
            assert result.token_ids == reference  # lossless, so the replay's premise holds
            measured.append(result.counters)
            sequences.append((p, reference))
    _, forced = forced_greedy_mal(drafter.eval(), sequences, k=3, max_new_tokens=24)
    assert sum(c.num_accepted_tokens for c in measured) > 0
    for m, f in zip(measured, forced, strict=True):
        assert (m.num_drafts, m.num_accepted_tokens) == (f.num_drafts, f.num_accepted_tokens)
        assert m.accepted_per_position[:3] == f.accepted_per_position
