"""The vLLM backend of self-data distillation: fan-out, failures and resume against small local
OpenAI-compatible HTTP servers, then one real vLLM server (started by `run_distill` in the vLLM
environment) compared with the transformers backend on the same fp32 tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fake_http
import psutil
import pytest
import tiny
from datasets import load_dataset
from fake_http import JSONHandler
from test_distill import assert_accounting_closes, read_rows, two_turn_rows, write_jsonl

from sd2_hf.data.distill import DistillConfig, run_distill

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class FakeVLLM(JSONHandler):
    """Answers /v1/completions with token ids derived from the prompt (or with HTTP 500)."""

    def do_GET(self):  # noqa: N802 (http.server API)
        if self.path == "/v1/models":
            self.reply(200, {"data": [{"id": "fake", "max_model_len": 512}]})
        elif self.path == "/version":
            self.reply(200, {"version": "fake-0"})
        else:
            self.reply(404, {"error": "no"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server, shared = self.server, self.server.shared
        with shared["lock"]:
            server.requests.append(body)
            shared["in_flight"] += 1
            shared["max_in_flight"] = max(shared["max_in_flight"], shared["in_flight"])
        time.sleep(server.delay)  # long enough for concurrent requests to overlap
        with shared["lock"]:
            shared["in_flight"] -= 1
        if server.status != 200:
            self.reply(server.status, {"error": {"message": "engine exploded"}})
            return
        # A deterministic "reply": the last few prompt tokens, then the first stop token.
        ids = body["prompt"][-4:] + [body["stop_token_ids"][0]]
        choice = {"text": "", "token_ids": ids, "finish_reason": "stop"}
        self.reply(200, {"choices": [choice], "usage": {"completion_tokens": len(ids)}})


@pytest.fixture()
def fake_servers():
    """Start fake servers on demand: `start(status)` returns (server, url).

    All servers share one in-flight counter, so the test sees the concurrency across them.
    """
    started = []
    shared = {"lock": threading.Lock(), "in_flight": 0, "max_in_flight": 0}

    def start(status: int = 200, delay: float = 0.02):
        server = fake_http.start(FakeVLLM, status=status, requests=[], shared=shared, delay=delay)
        started.append(server)
        return server, fake_http.url(server)

    yield start
    for server in started:
        fake_http.stop(server)


@pytest.fixture()
def seed_file(tmp_path, chat_rows):
    rows = [{"id": f"row-{i}", **r} for i, r in enumerate(chat_rows[:8])] + two_turn_rows(2)
    return write_jsonl(tmp_path / "seed.jsonl", rows)


def vllm_config(tmp_path, tiny_model_dir, seed_file, urls, **overrides) -> DistillConfig:
    values = {
        "target": str(tiny_model_dir),
        "source": str(seed_file),
        "output": str(tmp_path / "out"),
        "backend": "vllm",
        "server_urls": urls,
        "max_retries": 1,
        "backoff": 0.01,
        "request_timeout": 30,
        "max_new_tokens": 16,
    }
    return DistillConfig(**(values | overrides))


def test_fan_out_spreads_requests_with_bounded_concurrency(
    tmp_path, tiny_model_dir, seed_file, fake_servers
):
    # Replies slow enough that three requests overlap even on a busy machine.
    (a, url_a), (b, url_b) = fake_servers(delay=0.2), fake_servers(delay=0.2)
    cfg = vllm_config(tmp_path, tiny_model_dir, seed_file, [url_a, url_b], concurrency=3)
    result = run_distill(cfg)
    assert (result.written, result.failed) == (10, 0)
    # 8 one-turn + 2 two-turn conversations = 12 requests, spread over both servers.
    assert len(a.requests) + len(b.requests) == 12
    assert len(a.requests) >= 3 and len(b.requests) >= 3
    assert a.shared["max_in_flight"] == 3
    request = a.requests[0]
    # Prompts are token ids rendered in the main env; sampling is explicit (greedy, no penalties).
    assert isinstance(request["prompt"], list) and all(
        isinstance(t, int) for t in request["prompt"]
    )
    assert request["temperature"] == 0.0 and request["return_token_ids"] is True
    assert request["model"] == "fake"
    manifest = assert_accounting_closes(Path(cfg.output), 10)
    assert manifest["versions"]["vllm"] == "fake-0"


def test_failing_server_rows_are_failed_then_filled_on_resume(
    tmp_path, tiny_model_dir, seed_file, fake_servers
):
    broken, broken_url = fake_servers(status=500)
    cfg = vllm_config(tmp_path, tiny_model_dir, seed_file, [broken_url, "http://127.0.0.1:9"])
    first = run_distill(cfg)
    assert (first.written, first.filtered, first.failed) == (0, 0, 10)
    assert first.failed_by_reason == {"request_failed": 10}
    # Each request was retried (max_retries=1) on the 500 server before failing over.
    assert len(broken.requests) == 2 * 10
    manifest = assert_accounting_closes(Path(cfg.output), 10)
    assert "HTTP 500" in manifest["failed_examples"][0]["error"]
    assert manifest["complete"] is False

    # Resume: the dead server is still listed, the good one takes every request.
    good, good_url = fake_servers()
    second = run_distill(cfg.model_copy(update={"server_urls": ["http://127.0.0.1:9", good_url]}))
    assert (second.written, second.failed, second.resumed) == (10, 0, 0)
    assert len(good.requests) == 12
    assert_accounting_closes(Path(cfg.output), 10)
    assert sorted(r["id"] for r in read_rows(Path(cfg.output))) == sorted(
        json.loads(line)["id"] for line in seed_file.read_text().splitlines()
    )


def test_sigterm_stops_at_once_and_the_rerun_completes(
    tmp_path, tiny_model_dir, seed_file, fake_servers
):
    """SIGTERM (like Ctrl-C) ends `sd2 distill` without waiting for the requests in flight
    (here each would take 10 minutes); nothing of them is journaled, and the rerun fills them."""
    slow, slow_url = fake_servers(delay=600)
    out = tmp_path / "out"
    args = [
        "--target", str(tiny_model_dir), "--source", str(seed_file), "--output", str(out),
        "--backend", "vllm", "--max-new-tokens", "16", "--request-timeout", "900",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "sd2_hf.cli", "distill", *args, "--server-urls", slow_url],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not slow.requests and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.requests, "no request reached the server"
    stopped_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - stopped_at < 30
    assert "interrupted" in err
    assert not (out / "manifest.json").exists()

    fast, fast_url = fake_servers()
    result = run_distill(
        DistillConfig.model_validate(
            {
                "target": str(tiny_model_dir),
                "source": str(seed_file),
                "output": str(out),
                "backend": "vllm",
                "max_new_tokens": 16,
                "server_urls": [fast_url],
            }
        )
    )
    assert (result.written, result.failed) == (10, 0)
    assert_accounting_closes(out, 10)


@pytest.mark.vllm
def test_vllm_server_distills_and_agrees_with_transformers(
    tmp_path, tiny_model_dir, seed_file, vllm_python, monkeypatch, capsys
):
    monkeypatch.setenv("SD2_VLLM_PYTHON", str(vllm_python))
    common = {
        "target": str(tiny_model_dir),
        "source": str(seed_file),
        "max_new_tokens": 16,
        "filter_truncated": False,
        "dtype": "float32",
    }
    # run_distill starts (and stops) its own server in the vLLM environment.
    vllm_cfg = DistillConfig(**common, output=str(tmp_path / "vllm"), backend="vllm")
    result = run_distill(vllm_cfg)
    manifest = assert_accounting_closes(tmp_path / "vllm", 10)
    assert (result.written, result.failed) == (10, 0)
    assert manifest["versions"]["vllm"].startswith("0.")
    assert len(load_dataset(str(tmp_path / "vllm"), split="train")) == 10

    run_distill(DistillConfig(**common, output=str(tmp_path / "hf"), batch_size=4))
    by_id_vllm = {r["id"]: r["messages"] for r in read_rows(tmp_path / "vllm")}
    by_id_hf = {r["id"]: r["messages"] for r in read_rows(tmp_path / "hf")}
    assert by_id_vllm.keys() == by_id_hf.keys()
    agree = sum(by_id_vllm[i] == by_id_hf[i] for i in by_id_hf)
    # Same prompt tokens, same fp32 weights, greedy: rows differ only where fp32 kernels of the
    # two engines round differently and flip an argmax between near-tied logits.
    with capsys.disabled():
        print(
            f"\n[distill] greedy rows identical between vLLM and transformers: {agree}/{len(by_id_hf)}"
        )
    assert agree >= len(by_id_hf) // 2


def _processes_with_marker(marker: str) -> list[psutil.Process]:
    """Live processes whose environment holds `marker`: the run's own and every process of
    the vLLM server it started (the environment is inherited by the server's launcher, API
    server and engine-core processes, whose command lines vLLM rewrites)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if (
                proc.status() != psutil.STATUS_ZOMBIE
                and proc.environ().get("SD2_TEST_RUN_MARKER") == marker
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _journal_outcomes(output: Path) -> dict[str, str]:
    latest = {}
    for commit in sorted((output / "journal").glob("commit-*.json")):
        latest.update(json.loads(commit.read_text())["rows"])
    return {row_id: entry["status"] for row_id, entry in latest.items()}


@pytest.mark.slow
@pytest.mark.vllm
def test_sigkill_mid_run_leaves_no_vllm_process_and_the_rerun_completes(
    tmp_path, tiny_model_dir, vllm_python
):
    """`kill -9` on the process group of `sd2 distill --backend vllm` (no atexit, no signal
    handler runs) takes the vLLM server it started down with it; the rerun starts a fresh
    server, resumes the committed rows and accounts for every input row exactly once."""
    rows = [{"id": f"row-{i}", **r} for i, r in enumerate(tiny.conversations(48))]
    rows += two_turn_rows(4)
    # Prompts over --max-prompt-tokens (about 380 tokens against 30-45): filtered as too_long.
    long = [{"role": "user", "content": "tell me a long story please " * 20}]
    rows += [{"id": f"long-{i}", "messages": long} for i in range(4)]
    seed = write_jsonl(tmp_path / "seed.jsonl", rows)
    ids = {r["id"] for r in rows}
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "sd2_hf.cli", "distill", "--target", str(tiny_model_dir),
        "--source", str(seed), "--output", str(out), "--backend", "vllm", "--dtype", "float32",
        "--max-new-tokens", "32", "--no-filter-truncated", "--max-prompt-tokens", "200",
        "--shard-size", "2", "--concurrency", "2",
    ]  # fmt: skip
    marker = uuid.uuid4().hex
    env = {**os.environ, "SD2_VLLM_PYTHON": str(vllm_python), "SD2_TEST_RUN_MARKER": marker}
    log = tmp_path / "killed-run.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            command, env=env, stdout=stderr, stderr=stderr, start_new_session=True
        )
    try:
        first_commit = out / "journal" / "commit-00000.json"
        deadline = time.monotonic() + 600
        while not first_commit.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()}"
        server = [p for p in _processes_with_marker(marker) if p.pid != proc.pid]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # vLLM's API server and its engine core at least: the scan sees the server.
        assert len(server) >= 2, server
        commits = len(list((out / "journal").glob("commit-*.json")))
        assert 1 <= commits < 28  # 56 rows in shards of 2: killed mid-run
        assert not (out / "manifest.json").exists()

        # Liveness bound, not a timing claim: vLLM gets 10 s after SIGTERM before SIGKILL.
        deadline = time.monotonic() + 120
        while _processes_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with_marker(marker) == []
    finally:
        for leftover in _processes_with_marker(marker):
            leftover.kill()

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _processes_with_marker(marker) == []  # the rerun stopped its own server
    manifest = assert_accounting_closes(out, len(ids))
    counts = manifest["counts"]
    assert (counts["written"], counts["filtered"], counts["failed"]) == (52, 4, 0)
    assert counts["filtered_by_reason"] == {"too_long": 4}
    assert manifest["this_run"]["rows_resumed"] == 2 * commits
    outcomes = _journal_outcomes(out)
    assert outcomes.keys() == ids  # every input row has exactly one latest outcome
    written = [r["id"] for r in read_rows(out)]
    assert len(written) == len(set(written))  # no duplicates
    assert set(written) == {i for i, status in outcomes.items() if status == "written"}
