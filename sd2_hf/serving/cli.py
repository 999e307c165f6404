"""`sd2 serve`: a vLLM OpenAI-compatible server with the drafter, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time

from sd2_hf.serving.config import ServeConfig
from sd2_hf.serving.metrics import SpecDecodeCounters
from sd2_hf.utils.schema_cli import add_command, model_from_args
from sd2_hf.utils.signals import sigterm_as_interrupt


def curl_example(url: str, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
        "max_tokens": 64,
        "temperature": 0,
    }
    return (
        f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d {shlex.quote(json.dumps(body))}"
    )


def run_serve(config: ServeConfig) -> SpecDecodeCounters:
    """Serve until Ctrl-C or SIGTERM, then stop the server and return its final counters."""
    from sd2_hf.serving.server import VLLMServer

    server = VLLMServer(
        config.target,
        drafter=config.drafter,
        num_draft_tokens=config.num_draft_tokens,
        host=config.host,
        port=config.port,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        extra_args=shlex.split(config.vllm_args),
        startup_timeout=config.startup_timeout,
        log_path=config.log_path,
    )
    # SIGTERM takes the same path as Ctrl-C, so the server (in its own process group, which a
    # terminal's Ctrl-C does not reach) is stopped in order, even mid-start.
    with sigterm_as_interrupt():
        with server:
            if server.speculative_config:
                spec = ", ".join(f"{k}={v}" for k, v in server.speculative_config.items())
            else:
                spec = "none (plain decoding)"
            print(
                f"vLLM server ready in {server.startup_seconds:.0f} s at {server.url}\n"
                f"  model: {server.model_name}\n"
                f"  speculative decoding: {spec}\n"
                f"  log: {server.log_path}\n"
                f"try:\n  {curl_example(server.url, server.model_name)}\n"
                "Ctrl-C (or SIGTERM) stops the server.",
                flush=True,
            )
            try:
                while True:
                    time.sleep(1.0)
                    server.raise_if_dead()
            except KeyboardInterrupt:
                pass
            print("stopping the vLLM server ...", flush=True)
            counters = server.spec_counters()
    if server.speculative_config:
        print(f"server stopped. Speculative decoding over its lifetime:\n{counters.summary()}")
    else:
        print("server stopped (no drafter, so no speculative-decoding counters).")
    return counters


def _serve_command(args: argparse.Namespace) -> int:
    """serve a target with its drafter (vLLM speculative decoding, OpenAI API)

    Start a vLLM OpenAI-compatible server in the vLLM environment with the drafter as draft
    model (heterogeneous vocabularies handled automatically); on Ctrl-C/SIGTERM stop it and
    print the mean accepted length (MAL) from its counters.
    """
    config = model_from_args(ServeConfig, args)
    # httpx logs every request at INFO: the health polls would bury the server's address.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_serve(config)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "serve", _serve_command, ServeConfig)
