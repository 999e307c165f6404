"""VLLMServer's process handling, against a stand-in server script (no vLLM, seconds each).

The stand-in takes the place of the vLLM interpreter (`SD2_VLLM_PYTHON`), answers /health,
/v1/models and /metrics like vLLM, and starts a child process the way vLLM starts its engine
core, so stopping must take down the whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from test_serving_units import METRICS_SAMPLE

from sd2_hf.serving import ServerError, SpecDecodeCounters, VLLMServer

FAKE_SERVER = textwrap.dedent(
    """\
    import http.server, json, os, signal, subprocess, sys, time

    argv = sys.argv[1:]
    port = int(argv[argv.index("--port") + 1])
    name = argv[argv.index("--served-model-name") + 1]
    mode = os.environ["FAKE_MODE"]
    print("fake vLLM starting", " ".join(argv), flush=True)
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["FAKE_PIDS"], "w") as f:
        f.write(f"{os.getpid()} {engine.pid}")
    if mode == "die":
        print("(EngineCore pid=7) ERROR 11-22 05:29:25 [core.py:1510] ValueError: KV cache too small")
        for i in range(60):
            print(f"loading layer {i}", flush=True)
        print("RuntimeError: no kernel for this head size", flush=True)
        sys.exit(3)
    if mode == "hang":
        time.sleep(600)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {
                "/health": b"",
                "/v1/models": json.dumps({"data": [{"id": name}]}).encode(),
                "/metrics": os.environ["FAKE_METRICS"].encode(),
            }[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


@pytest.fixture()
def fake_vllm(tmp_path, monkeypatch):
    """Point SD2_VLLM_PYTHON at the stand-in; returns a function giving the started pids."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    script.chmod(0o755)
    pids = tmp_path / "pids"
    monkeypatch.setenv("SD2_VLLM_PYTHON", str(script))
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    monkeypatch.setenv("FAKE_METRICS", METRICS_SAMPLE)
    monkeypatch.setenv("FAKE_MODE", "ok")

    def started_pids() -> list[int]:
        deadline = time.monotonic() + 30
        while not (pids.exists() and pids.read_text()):
            assert time.monotonic() < deadline, "the stand-in server never started"
            time.sleep(0.05)
        return [int(p) for p in pids.read_text().split()]

    return started_pids


def _running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_start_health_metrics_and_stop_of_the_whole_group(fake_vllm, tiny_model_dir, tmp_path):
    log = tmp_path / "server.log"
    with VLLMServer(str(tiny_model_dir), port=None, log_path=str(log)) as server:
        pids = fake_vllm()
        assert server.is_running() and server.startup_seconds > 0
        assert _running(pids) == pids
        assert server.spec_counters() == SpecDecodeCounters.from_prometheus_text(METRICS_SAMPLE)
        assert "fake vLLM starting" in log.read_text()
        assert f"--port {server.port}" in log.read_text()
    assert not server.is_running()
    assert _running(pids) == []


def test_server_dying_at_start_raises_with_the_log_tail(
    fake_vllm, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("FAKE_MODE", "die")
    server = VLLMServer(str(tiny_model_dir), log_path=str(tmp_path / "server.log"))
    with pytest.raises(ServerError, match="exited with code 3 during start-up") as err:
        server.start()
    message = str(err.value)
    assert "RuntimeError: no kernel for this head size" in message
    assert "loading layer 59" in message and "loading layer 10\n" not in message  # last 40 lines
    assert str(tmp_path / "server.log") in message
    # The engine's root cause, long before the tail, is quoted first.
    assert message.index("ValueError: KV cache too small") < message.index("loading layer 59")
    assert _running(fake_vllm()) == []  # the orphaned engine child is gone too


def test_startup_timeout_stops_the_server(fake_vllm, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "hang")
    server = VLLMServer(str(tiny_model_dir), startup_timeout=3)
    started = time.monotonic()
    with pytest.raises(ServerError, match="not ready after 3 s"):
        server.start()
    assert time.monotonic() - started < 30
    assert server.log_path.exists()  # a temporary log file when none was given
    assert _running(fake_vllm()) == []


def test_stop_kills_a_server_that_ignores_sigterm(fake_vllm, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "stubborn")
    server = VLLMServer(str(tiny_model_dir)).start()
    pids = fake_vllm()
    started = time.monotonic()
    server.stop(timeout=1)
    assert time.monotonic() - started < 10
    assert _running(pids) == []


def test_servers_left_running_are_stopped_at_interpreter_exit(fake_vllm, tiny_model_dir):
    code = (
        "from sd2_hf.serving import VLLMServer\n"
        f"server = VLLMServer({str(tiny_model_dir)!r}).start()\n"
        "print(server.url)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("http://127.0.0.1:")
    assert _running(fake_vllm()) == []


STARTER = textwrap.dedent(
    """\
    import os, sys, time
    from sd2_hf.serving import VLLMServer

    server = VLLMServer(sys.argv[1]).start()
    forked = os.fork()
    if forked == 0:  # like a data-loader worker: a forked child that outlives its parent
        time.sleep(600)
        os._exit(0)
    print(server.url, flush=True)
    print(forked, flush=True)  # the forked child's pid (the starter's other child is the launcher)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("mode", ["ok", "stubborn"])
def test_servers_die_with_a_starter_killed_by_sigkill(fake_vllm, tiny_model_dir, monkeypatch, mode):
    """SIGKILL runs no atexit hook and no signal handler: the server's launcher sees its
    lifeline pipe close and takes down the server's process group (the stubborn server, which
    ignores SIGTERM, after the grace period). A forked child of the starter that lives on
    does not hold the lifeline open."""
    monkeypatch.setenv("FAKE_MODE", mode)
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tiny_model_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    forked = None
    descendants: list[int] = []
    try:
        assert starter.stdout.readline().startswith("http://127.0.0.1:")
        forked = int(starter.stdout.readline())
        pids = fake_vllm()
        # The forked child, not the server's launcher (the starter's other child): a copy of the
        # starter (same command line), outside the server's process group.
        child = psutil.Process(forked)
        assert child.ppid() == starter.pid
        assert child.cmdline() == psutil.Process(starter.pid).cmdline()
        assert os.getpgid(forked) != os.getpgid(pids[0])
        descendants = [c.pid for c in psutil.Process(starter.pid).children(recursive=True)]
        assert _running(pids) == pids
        starter.kill()
        starter.wait()
        assert _running([forked]) == [forked]
        # Liveness bound, not a timing claim: the grace period is 10 s.
        deadline = time.monotonic() + 60
        while _running(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _running(pids) == []
        assert _running([forked]) == [forked]  # it lives on, and did not keep the server up
    finally:
        if starter.poll() is None:  # a failure before the kill: take its descendants too
            descendants += [c.pid for c in psutil.Process(starter.pid).children(recursive=True)]
        starter.kill()
        starter.wait()
        leftovers = {*fake_vllm(), *descendants, *([forked] if forked else [])}
        for pid in _running(sorted(leftovers)):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _running(sorted(leftovers)) and time.monotonic() < deadline:
            time.sleep(0.05)
