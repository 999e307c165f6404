"""Sampled MAL on the transformers backend: speculative sampling keeps the target's
distribution (a statistical test against the exact distribution, with a control showing the
test can fail), and `sd2 eval` reports the sampled runs next to greedy."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from sd2_hf.evaluation.backend import DrafterPlan
from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.evaluation.prompts import render
from sd2_hf.evaluation.report import mal_ratio_interval
from sd2_hf.evaluation.runner import run_eval
from sd2_hf.evaluation.transformers_backend import TransformersBackend
from sd2_hf.pruning.head import restrict_vocab

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DRAWS = 1500
TEMPERATURE = 1.0


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for a chi-square variable with `dof` degrees of freedom."""
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2.0, dtype=torch.float64),
            torch.tensor(statistic / 2.0, dtype=torch.float64),
        )
    )


def chi2_pvalue(counts: dict[int, int], probs: torch.Tensor, n: int) -> float:
    """Pearson's test of observed token counts against `probs`, tokens expected under 5 times
    pooled into one bin."""
    expected = probs * n
    big = (expected >= 5).nonzero().flatten().tolist()
    observed = [counts.get(t, 0) for t in big]
    exp = [float(expected[t]) for t in big]
    rest_obs = n - sum(observed)
    rest_exp = n - sum(exp)
    if rest_exp >= 1:
        observed.append(rest_obs)
        exp.append(rest_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, exp, strict=True))
    return chi2_sf(stat, len(exp) - 1)


def peaked(model, scale: float):
    """Sharpen the output distribution (fewer likely tokens: a test with power at few draws)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def mtbench_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "question.jsonl"
    categories = ["writing", "coding", "math", "reasoning"]
    rows = [
        {"question_id": i + 1, "category": c, "turns": [f"Tell me about the {c} of a quick dog."]}
        for i, c in enumerate(categories)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("sampled")
    target = peaked(tiny.build_model(tiny_tokenizer, seed=0), 12.0)
    drafter = tiny.build_model(tiny_tokenizer, seed=0)
    drafter.load_state_dict(target.state_dict())
    with torch.no_grad():  # a perturbed copy: partly agrees, partly not
        g = torch.Generator().manual_seed(1)
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.25 * p.std())
    # The same drafter with a draft vocabulary (`sd2 prune --draft-vocab-size`): the 128 tokens
    # the target finds likeliest after the test's prompt, every other token impossible.
    prompt = render(tiny_tokenizer, [{"role": "user", "content": "the quick brown"}])
    p1, p2 = exact_marginals(target, prompt, TEMPERATURE)
    keep = sorted((p1 + p2).topk(128).indices.tolist())
    restricted = tiny.build_model(tiny_tokenizer, seed=0)
    restricted.load_state_dict(drafter.state_dict())
    restrict_vocab(restricted, keep, [prompt])
    return {
        "target": str(tiny.save_model(target, tiny_tokenizer, root / "target")),
        "drafter": str(tiny.save_model(drafter, tiny_tokenizer, root / "drafter")),
        "draft-vocab": str(tiny.save_model(restricted, tiny_tokenizer, root / "draft-vocab")),
        "keep": keep,
    }


@torch.no_grad()
def exact_marginals(
    model, prompt: list[int], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's exact distribution of its first and second sampled tokens."""
    x = torch.tensor([prompt])
    p1 = torch.softmax(model(input_ids=x).logits[0, -1].double() / temperature, -1)
    vocab = p1.shape[0]
    batch = torch.cat([x.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
    p2_given = torch.softmax(model(input_ids=batch).logits[:, -1].double() / temperature, -1)
    return p1, p1 @ p2_given


@pytest.mark.parametrize("drafter", ["drafter", "draft-vocab"])
def test_speculative_sampling_keeps_the_target_distribution(models, tiny_tokenizer, drafter):
    target_path, drafter_path = models["target"], models[drafter]
    config = EvalConfig(
        target=target_path,
        temperature=TEMPERATURE,
        max_new_tokens=3,  # the first step drafts two tokens: both positions are speculative
        num_draft_tokens=2,
        seed=0,
        baselines=["none"],
    )
    backend = TransformersBackend(config, target_path, tiny_tokenizer)
    prompt = render(tiny_tokenizer, [{"role": "user", "content": "the quick brown"}])
    p1, p2 = exact_marginals(backend.target, prompt, TEMPERATURE)
    plan = DrafterPlan("drafter", "model", drafter_path)
    first, second = {}, {}
    accepted = drafts = 0
    with backend.session(plan) as generate:
        for _ in range(DRAWS):
            g = generate(prompt)
            first[g.token_ids[0]] = first.get(g.token_ids[0], 0) + 1
            second[g.token_ids[1]] = second.get(g.token_ids[1], 0) + 1
            accepted += g.counters.num_accepted_tokens
            drafts += g.counters.num_draft_tokens
    # Both branches of the rule ran: drafts accepted and drafts replaced from the residual.
    assert 0.15 < accepted / drafts < 0.85, accepted / drafts
    assert chi2_pvalue(first, p1, DRAWS) > 1e-3
    assert chi2_pvalue(second, p2, DRAWS) > 1e-3

    # Control: the same test rejects the drafter's own distribution, so it has the power to
    # see a sampler that leaks the drafter into the output.
    model = AutoModelForCausalLM.from_pretrained(drafter_path).eval()
    q1, q2 = exact_marginals(model, prompt, TEMPERATURE)
    assert chi2_pvalue(first, q1, DRAWS) < 1e-6
    if drafter == "draft-vocab":
        # The drafter proposes only kept tokens; the target's output still has the others.
        dropped = torch.ones_like(q1, dtype=torch.bool)
        dropped[models["keep"]] = False
        assert q1[dropped].sum() == 0 and q2[dropped].sum() == 0


def test_eval_reports_sampled_runs_next_to_greedy(models, tmp_path, tiny_tokenizer, mtbench_file):
    target_path, drafter_path = models["target"], models["drafter"]
    out = tmp_path / "eval"
    report = run_eval(
        EvalConfig(
            target=target_path,
            drafters=[
                f"pert={drafter_path}",
                f"self={target_path}",
                f"vocab={models['draft-vocab']}",
            ],
            prompts=str(mtbench_file),
            limit=4,
            max_new_tokens=12,
            num_draft_tokens=3,
            sampled_temperatures=[1.0, 0.5],
            output=str(out),
        )
    )
    assert report["sampled_temperatures"] == [1.0, 0.5]
    rows = {d["name"]: d for d in report["drafters"]}
    for name in ("pert", "self", "vocab"):
        assert set(rows[name]["sampled"]) == {"1", "0.5"}
        for run in rows[name]["sampled"].values():
            assert run["mal"] is not None and 1.0 <= run["mal"] <= 4.0
            assert len(run["per_prompt"]) == report["num_prompts"]
            assert run["improvement_factor"] == pytest.approx(
                run["mal"] / (3 * rows[name]["relative_macs"] + 1)
            )
    # The target drafting for itself is accepted at every temperature: MAL K+1 up to the
    # last steps the length limit shortens.
    assert rows["self"]["sampled"]["1"]["mal"] > 3.4
    md = (out / "eval.md").read_text()
    assert "## Sampled decoding" in md and "MAL T=0.5" in md
    assert (out / "mal_by_temperature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "eval.json").read_text())
    assert (
        saved["drafters"][1]["sampled"]["1"]["mal"]
        == rows[saved["drafters"][1]["name"]]["sampled"]["1"]["mal"]
    )


def test_sampled_temperatures_are_checked():
    with pytest.raises(ValueError, match="must all be > 0"):
        EvalConfig(target="t", sampled_temperatures=[0.0])
    with pytest.raises(ValueError, match="transformers backend only"):
        EvalConfig(target="t", backend="vllm", sampled_temperatures=[1.0])


def test_paired_bootstrap_interval():
    # Drafter a accepts twice as much per step as b on every prompt: a tight interval at the ratio.
    a = [[10, 20]] * 12
    b = [[10, 10]] * 12
    ratio, low, high = mal_ratio_interval(a, b)
    assert ratio == pytest.approx(1.5) and low == pytest.approx(1.5) and high == pytest.approx(1.5)
    # Noisy per-prompt differences widen it, and the point estimate lies inside.
    a = [[10, 10 + (i % 3) * 5] for i in range(12)]
    ratio, low, high = mal_ratio_interval(a, b)
    assert low < ratio < high
    assert mal_ratio_interval(a, b[:5]) is None
