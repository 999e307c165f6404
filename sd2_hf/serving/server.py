"""Lifecycle of a vLLM OpenAI-compatible server running in the project's vLLM environment.

The main environment never imports vllm (llm-compressor and vLLM pin different
compressed-tensors versions, SPEC §3), so vLLM runs as a server process started with the
`.venv-vllm` interpreter; everything else talks to it over HTTP.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from sd2_hf import assets
from sd2_hf.serving.metrics import SpecDecodeCounters
from sd2_hf.utils import environment
from sd2_hf.utils.environment import vllm_python
from sd2_hf.utils.models import (
    default_num_draft_tokens,
    is_hybrid_attention,
    resolve_model_path,
    served_dtype,
    vocabularies_differ,
)

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
# `ValueError: ...` at the start of a line or after vLLM's `(EngineCore pid=1) ERROR ... ]` prefix.
_EXCEPTION_LINE = re.compile(r"(?:^|\] )([A-Za-z_.]*(?:Error|Exception): .*)$")


class ServerError(RuntimeError):
    """The vLLM server could not be started or died; the message holds the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# A strong set: a server whose object was dropped without stop() must still be stopped at exit.
_live_servers: set[VLLMServer] = set()

# Every server runs under this launcher, which kills the server's process group when the
# process that started it dies (the launcher's docstring says how and why).
LIFELINE = Path(__file__).with_name("lifeline.py")
# How long a server whose starter died gets to shut down after SIGTERM before SIGKILL.
LIFELINE_GRACE_SECONDS = 10


def _disown_inherited_servers() -> None:
    """In a child forked without exec (a data-loader worker, `multiprocessing` with fork):
    the parent's servers are not the child's. Their inherited lifeline write ends would keep
    them alive after the parent died for as long as the child lives, and the atexit hook would
    stop them when the child exits. (Children started with exec get neither: os.pipe() makes
    non-inheritable descriptors.)"""
    for server in _live_servers:
        server._close_lifeline()
    _live_servers.clear()


os.register_at_fork(after_in_child=_disown_inherited_servers)


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_live_servers):
        server.stop()


class VLLMServer:
    """A vLLM OpenAI-compatible server (optionally with a draft model) as a context manager.

    ```
    with VLLMServer(target, drafter=drafter, num_draft_tokens=4) as server:
        client = OpenAIClient(server.url, server.model_name)
        before = server.spec_counters()
        client.completion("Hello", max_tokens=32, temperature=0)
        print((server.spec_counters() - before).mal)
    ```
    The server runs in its own process group with its output in a log file; `stop()` (also
    called at interpreter exit) terminates the whole group, and a launcher in the group
    terminates it when the starting process dies without stopping it (SIGKILL, OOM killer).
    """

    def __init__(
        self,
        model: str,
        *,
        drafter: str | None = None,
        num_draft_tokens: int | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 600,
        log_path: str | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        if num_draft_tokens is not None and num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        if num_draft_tokens is not None and drafter is None:
            raise ValueError("num_draft_tokens needs a drafter; pass drafter=<model> too")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout}")
        self.model_name = model
        self.model_path = resolve_model_path(model)
        self.drafter = drafter
        self.drafter_path = resolve_model_path(drafter) if drafter is not None else None
        if self.drafter_path is not None and num_draft_tokens is None:
            num_draft_tokens = default_num_draft_tokens(self.drafter_path)
            if num_draft_tokens is None:
                raise ValueError(
                    f"drafter {drafter} has no num_assistant_tokens in its "
                    "generation_config.json: pass num_draft_tokens (K, e.g. 4)"
                )
        self.num_draft_tokens = num_draft_tokens
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.requested_dtype = dtype
        self.dtype = served_dtype(self.model_path, dtype)
        if self.dtype != dtype:
            logger.info(
                "serving %s in %s: vLLM's dtype 'auto' would emulate bfloat16 on this CPU "
                "(no bf16 instructions); pass dtype='bfloat16' to force it",
                model,
                self.dtype,
            )
        self.max_model_len = max_model_len
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        self.environment = dict(environment or {})
        self.speculative_config = self._speculative_config()
        self.process: subprocess.Popen | None = None
        self._lifeline: int | None = None  # write end of the launcher's lifeline pipe
        self.startup_seconds: float | None = None

    def _speculative_config(self) -> dict[str, Any] | None:
        if self.drafter_path is None:
            return None
        config: dict[str, Any] = {
            "method": "draft_model",
            "model": self.drafter_path,
            "num_speculative_tokens": self.num_draft_tokens,
        }
        if vocabularies_differ(self.model_path, self.drafter_path):
            config["use_heterogeneous_vocab"] = True
        return config

    def command(self) -> list[str]:
        """The server command line (without the interpreter's environment)."""
        cmd = [
            str(vllm_python()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_path,
            "--served-model-name",
            self.model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            # Neutral sampling defaults instead of the model's generation_config.json, so a
            # request gets exactly the sampling parameters it sends (reproducible MAL).
            "--generation-config",
            "vllm",
            "--disable-uvicorn-access-log",
        ]
        # Request logging is already off by default in vLLM 0.32 (`--enable-log-requests`
        # turns it on; the old `--disable-log-requests` flag is gone).
        # vLLM's "auto": the model's context length if its KV cache fits in the memory given
        # (VLLM_CPU_KVCACHE_SPACE on CPU), else the longest that fits, instead of refusing
        # to start (Gemma-3's 32k context needs 1.3 GiB at the default 1 GiB).
        cmd += ["--max-model-len", str(self.max_model_len or "auto")]
        if not environment.has_gpu():
            # CUDA graphs do not exist on CPU and torch.compile doubles the start time.
            cmd.append("--enforce-eager")
        if self.speculative_config is not None:
            cmd += ["--speculative-config", json.dumps(self.speculative_config)]
            # With sliding-window + full-attention layers the draft model's layers land in a
            # different KV-cache group and vLLM refuses to start ("All drafting layers should
            # belong to the same kv cache group"); one manager for all layers works.
            if is_hybrid_attention(self.model_path) or is_hybrid_attention(self.drafter_path):
                cmd.append("--disable-hybrid-kv-cache-manager")
        # Last, so a caller's option overrides ours (vLLM's argparse keeps the last value).
        return cmd + self.extra_args

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CACHE_ROOT", str(assets.home() / "vllm"))
        # The main env's interpreter must not leak its site-packages into the vLLM env.
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env | self.environment

    def start(self) -> VLLMServer:
        """Start the server and wait until it answers; raises ServerError with the log tail."""
        if self.process is not None:
            return self
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="sd2-vllm-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        logger.info("starting vLLM: %s (log: %s)", shlex.join(cmd), self.log_path)
        started = time.monotonic()
        # The launcher watches the read end and kills the server's process group when the
        # write end, held by this process only, closes: when this process dies, also by
        # SIGKILL, where neither atexit nor a signal handler runs (sd2_hf/serving/lifeline.py).
        lifeline_read, self._lifeline = os.pipe()
        _live_servers.add(self)  # from here on, forked children close the write end
        grace = str(LIFELINE_GRACE_SECONDS)
        launcher = [sys.executable, "-I", str(LIFELINE), str(lifeline_read), grace, "--"]
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    launcher + cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(),
                    start_new_session=True,
                    pass_fds=(lifeline_read,),
                )
        except BaseException:
            _live_servers.discard(self)
            self._close_lifeline()
            raise
        finally:
            os.close(lifeline_read)
        try:
            self._wait_until_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        logger.info("vLLM server ready at %s after %.1f s", self.url, self.startup_seconds)
        return self

    def _wait_until_ready(self, started: float) -> None:
        deadline = started + self.startup_timeout
        with httpx.Client(timeout=5.0) as http:
            while True:
                self.raise_if_dead("during start-up")
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        models = http.get(f"{self.url}/v1/models").json()
                        served = [m["id"] for m in models.get("data", [])]
                        if self.model_name in served:
                            return
                        raise ServerError(
                            f"a server at {self.url} serves {served}, not {self.model_name!r}: "
                            "another process owns this port; pick another port"
                        )
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"vLLM server not ready after {self.startup_timeout:.0f} s "
                        f"(startup_timeout).\n{self._log_tail_message()}"
                    )
                time.sleep(0.5)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        if self.log_path is None or not self.log_path.exists():
            return []
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return [line.rstrip("\n") for line in deque(log, maxlen=lines)]

    def _log_tail_message(self) -> str:
        tail = self.log_tail()
        message = f"last {len(tail)} lines of {self.log_path}:\n" + "\n".join(tail)
        # vLLM's engine core logs the root cause well before the API server's own traceback
        # ("Engine core initialization failed. See root cause above"), out of the tail.
        causes = [line for line in self.error_lines() if line not in tail]
        if causes:
            message = "errors earlier in the log:\n" + "\n".join(causes) + "\n" + message
        return message

    def error_lines(self, limit: int = 5) -> list[str]:
        """The last distinct exception lines (`SomeError: message`) of the log."""
        if self.log_path is None or not self.log_path.exists():
            return []
        found: dict[str, None] = {}
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            for line in log:
                match = _EXCEPTION_LINE.search(line)
                if match:
                    found.pop(match[1], None)
                    found[match[1]] = None
        return list(found)[-limit:]

    def raise_if_dead(self, when: str = "") -> None:
        """Raise ServerError with the end of the log if the started server has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ServerError(
                f"vLLM server exited with code {self.process.returncode} {when}".rstrip()
                + f"\n{self._log_tail_message()}"
            )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the server's process group, wait, then SIGKILL whatever is left of it."""
        process = self.process
        if process is None:
            return
        pgid = process.pid  # start_new_session made the server's launcher its group's leader
        _signal_group(pgid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM server did not stop in %.0f s; killing it", timeout)
        # The engine-core child can outlive the API process; wait for the whole group.
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
            # Delivery is asynchronous: return only once the group's processes are gone.
            deadline = time.monotonic() + timeout
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        process.wait()
        # Only now: if this stop is interrupted, the atexit hook still finds the server.
        self.process = None
        _live_servers.discard(self)
        self._close_lifeline()

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def spec_counters(self) -> SpecDecodeCounters:
        """Current cumulative speculative-decoding counters (zeros when there is no drafter)."""
        response = httpx.get(f"{self.url}/metrics", timeout=30)
        response.raise_for_status()
        return SpecDecodeCounters.from_prometheus_text(response.text)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return (
            f"VLLMServer({self.model_name!r}, drafter={self.drafter!r}, url={self.url!r}, {state})"
        )


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running.

    `os.killpg(pgid, 0)` also succeeds for zombies, which stay around in containers whose
    PID 1 does not reap orphans, so on Linux the group's processes are read from /proc.
    """
    if not sys.platform.startswith("linux"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the command name: state, ppid, pgrp, ...
            state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False
