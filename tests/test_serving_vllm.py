"""VLLMServer against real vLLM servers (in .venv-vllm) on the tiny fixtures: two server starts."""

from __future__ import annotations

import psutil
import pytest

from sd2_hf.serving import OpenAIClient, VLLMServer

pytestmark = pytest.mark.vllm

K = 3
PROMPTS = ["Hello the quick brown", "Why does the draft model", "Python code data set", "Three"]
# ignore_eos: the random tiny models may emit <|im_end|> at any point; fixed lengths keep the
# number of verification steps, and so the expected counters, independent of that.
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def self_draft_server(vllm_python, tiny_model_dir, tmp_path_factory):
    """The target drafting for itself: every draft token must be accepted."""
    log = tmp_path_factory.mktemp("vllm-logs") / "self-draft.log"
    # float32 (vLLM "auto" downcasts fp32 checkpoints to bf16 on CPU) so greedy comparisons
    # across servers are not decided by bf16 near-ties of the random tiny models.
    with VLLMServer(
        str(tiny_model_dir),
        drafter=str(tiny_model_dir),
        num_draft_tokens=K,
        dtype="float32",
        log_path=str(log),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def self_draft_client(self_draft_server):
    with OpenAIClient(self_draft_server.url, self_draft_server.model_name) as client:
        yield client


@pytest.fixture(scope="module")
def reference_texts(self_draft_client):
    """Greedy continuations equal to the target's plain greedy output: the drafter has the
    target's weights and decodes one token at a time, and all its tokens are accepted (MAL test)."""
    return [self_draft_client.completion(p, **GREEDY)["choices"][0]["text"] for p in PROMPTS]


def test_server_answers_a_chat_completion(self_draft_server, self_draft_client):
    assert self_draft_server.is_running()
    assert self_draft_server.url.startswith("http://127.0.0.1:")
    answer = self_draft_client.chat_completion(
        [{"role": "user", "content": "Hello! What is speculative decoding?"}],
        max_tokens=12,
        temperature=0,
        ignore_eos=True,
    )
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert answer["model"] == self_draft_server.model_name
    assert answer["usage"]["completion_tokens"] == 12


def test_self_drafting_gives_mal_of_k_plus_one(
    self_draft_server, self_draft_client, reference_texts
):
    before = self_draft_server.spec_counters()
    token_answer = self_draft_client.completion([1, 40, 41, 42, 43], **GREEDY)
    for prompt in PROMPTS:
        self_draft_client.completion(prompt, **GREEDY)
    delta = self_draft_server.spec_counters() - before
    assert token_answer["usage"]["prompt_tokens"] == 5
    assert delta.num_drafts > 0
    assert delta.num_draft_tokens == K * delta.num_drafts
    assert delta.mal == K + 1
    assert delta.acceptance_per_position == [1.0] * K
    # Greedy decoding is deterministic: the same prompts give the same texts again.
    again = [self_draft_client.completion(p, **GREEDY)["choices"][0]["text"] for p in PROMPTS]
    assert again == reference_texts


def test_cross_family_drafter_uses_heterogeneous_vocab_and_stays_lossless(
    vllm_python, tiny_model_dir, other_family_dir, reference_texts, tmp_path
):
    server = VLLMServer(
        str(tiny_model_dir),
        drafter=str(other_family_dir),
        num_draft_tokens=K,
        dtype="float32",
        log_path=str(tmp_path / "cross.log"),
    )
    assert server.speculative_config["use_heterogeneous_vocab"] is True
    with server:
        processes = [psutil.Process(server.process.pid)]
        processes += processes[0].children(recursive=True)
        assert len(processes) >= 2  # API server and engine core
        with OpenAIClient(server.url, server.model_name) as client:
            texts = [client.completion(p, **GREEDY)["choices"][0]["text"] for p in PROMPTS]
        counters = server.spec_counters()
    assert texts == reference_texts
    assert counters.num_drafts > 0 and 1 <= counters.mal <= K + 1
    log = (tmp_path / "cross.log").read_text()
    assert "VocabMapping initialized" in log
    assert server.process is None and not server.is_running()
    alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
