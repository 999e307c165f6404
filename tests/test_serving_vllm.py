"""Real vLLM servers (in .venv-vllm) on the tiny fixtures: two server starts in all."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sd2_hf.serving import OpenAIClient, VLLMServer
from sd2_hf.serving.server import free_port

pytestmark = pytest.mark.vllm

K = 3
PROMPTS = ["Hello the quick brown", "Why does the draft model", "Python code data set", "Three"]
# ignore_eos: the random tiny models may emit <|im_end|> at any point; fixed lengths keep the
# number of verification steps, and so the expected counters, independent of that.
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
SERVE = [sys.executable, "-m", "sd2_hf.cli", "serve"]


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


def _wait_for(pattern: str, path, process: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text())
        if match:
            return match
        assert process.poll() is None, f"sd2 serve exited early:\n{path.read_text()}"
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in sd2 serve output after {timeout} s")


def test_sd2_serve_cross_family_drafter_is_lossless_and_stops_cleanly_on_sigterm(
    vllm_python, tiny_model_dir, other_family_dir, reference_texts, tmp_path
):
    """`sd2 serve` as a user runs it, with a drafter of another tokenizer (one server start
    covers the CLI, heterogeneous vocabularies and clean shutdown)."""
    port = free_port()
    output, log = tmp_path / "serve.out", tmp_path / "vllm.log"
    command = [
        *SERVE,
        "--target",
        str(tiny_model_dir),
        "--drafter",
        str(other_family_dir),
        "--num-draft-tokens",
        str(K),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--log-path",
        str(log),
    ]
    with open(output, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        ready = _wait_for(r"ready in \d+ s at (http://\S+)", output, process, timeout=600)
        assert ready[1] == f"http://127.0.0.1:{port}"
        banner = output.read_text()
        assert "use_heterogeneous_vocab=True" in banner
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in banner
        family = psutil.Process(process.pid).children(recursive=True)
        assert len(family) >= 2, "expected the API server and its engine core under sd2 serve"
        with OpenAIClient(ready[1], str(tiny_model_dir)) as client:
            texts = [client.completion(p, **GREEDY)["choices"][0]["text"] for p in PROMPTS]
            chat = client.chat_completion(
                [{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
            )
        assert chat["choices"][0]["message"]["role"] == "assistant"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Greedy speculative decoding with a cross-vocabulary drafter equals plain greedy decoding.
    assert texts == reference_texts
    assert "VocabMapping initialized" in log.read_text()
    text = output.read_text()
    summary = re.search(r"drafts (\d+)  draft tokens (\d+)  accepted (\d+)\nMAL ([\d.]+)", text)
    assert summary, text
    drafts, draft_tokens, accepted, mal = (float(g) for g in summary.groups())
    assert drafts > 0 and draft_tokens == K * drafts
    assert mal == pytest.approx(1 + accepted / drafts, abs=1e-3)
    assert "acceptance per position  0:" in text
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes left behind: {alive}"
