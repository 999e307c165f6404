"""`sd2 serve` as a user runs it: a subprocess that serves until SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sd2_hf.serving import OpenAIClient
from sd2_hf.serving.server import free_port

SERVE = [sys.executable, "-m", "sd2_hf.cli", "serve"]


def test_serve_rejects_a_missing_model_quickly(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [*SERVE, "--target", str(tmp_path / "missing-model")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "missing-model does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def _wait_for(pattern: str, path, process: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text())
        if match:
            return match
        assert process.poll() is None, f"sd2 serve exited early:\n{path.read_text()}"
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in sd2 serve output after {timeout} s")


@pytest.mark.vllm
def test_serve_answers_then_stops_on_sigterm_with_a_mal_summary(
    vllm_python, tiny_model_dir, tiny_drafter_dir, tmp_path
):
    port = free_port()
    output = tmp_path / "serve.out"
    with open(output, "w") as out:
        process = subprocess.Popen(
            [
                *SERVE,
                "--target",
                str(tiny_model_dir),
                "--drafter",
                str(tiny_drafter_dir),
                "--num-draft-tokens",
                "3",
                "--port",
                str(port),
                "--dtype",
                "float32",
                "--log-path",
                str(tmp_path / "vllm.log"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = _wait_for(r"ready in \d+ s at (http://\S+)", output, process, timeout=600)
        assert ready[1] == f"http://127.0.0.1:{port}"
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in output.read_text()
        family = psutil.Process(process.pid).children(recursive=True)
        assert family, "no vLLM server process under sd2 serve"
        with OpenAIClient(ready[1], str(tiny_model_dir)) as client:
            answer = client.chat_completion(
                [{"role": "user", "content": "Hello!"}],
                max_tokens=16,
                temperature=0,
                ignore_eos=True,
            )
        assert answer["choices"][0]["message"]["content"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.read_text()
    summary = re.search(r"drafts (\d+)  draft tokens (\d+)  accepted (\d+)\nMAL ([\d.]+)", text)
    assert summary, text
    drafts, draft_tokens, accepted, mal = (float(g) for g in summary.groups())
    assert drafts > 0 and draft_tokens == 3 * drafts
    assert mal == pytest.approx(1 + accepted / drafts, abs=1e-3)
    assert "acceptance per position  0:" in text
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes left behind: {alive}"
