"""`sd2 serve`: a vLLM OpenAI-compatible server with the drafter, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2_hf.serving.metrics import SpecDecodeCounters
from sd2_hf.utils.schema_cli import add_model_arguments, model_from_args
from sd2_hf.utils.signals import sigterm_as_interrupt


class ServeConfig(BaseModel):
    """Options of `sd2 serve` (target, drafter, speculative length, server settings)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="target model: checkpoint dir, Hub id or asset:<name>")
    drafter: str | None = Field(
        None,
        description="draft model: checkpoint dir, Hub id or asset:<name>; none = plain decoding",
    )
    num_draft_tokens: int | None = Field(
        None,
        gt=0,
        le=64,
        description="draft tokens per step (K); default: the drafter's num_assistant_tokens",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int | None = Field(None, gt=0, lt=65536, description="port; default: a free one")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="weight and activation dtype; `auto`: vLLM's choice, but a float32 "
        "checkpoint stays float32 on a CPU without bf16 instructions (vLLM would emulate bf16)",
    )
    max_model_len: int | None = Field(
        None, gt=0, description="context length; default: the model's"
    )
    startup_timeout: float = Field(600, gt=0, description="seconds to wait for the server")
    log_path: str | None = Field(None, description="server log file; default: a temporary file")
    vllm_args: str = Field(
        "", description="more vLLM server options as one string, e.g. --vllm-args='--seed 1'"
    )

    @model_validator(mode="after")
    def _draft_length_needs_drafter(self) -> ServeConfig:
        if self.num_draft_tokens is not None and self.drafter is None:
            raise ValueError("num_draft_tokens is only allowed with a drafter: add --drafter")
        return self


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
    config = model_from_args(ServeConfig, args)
    # httpx logs every request at INFO: the health polls would bury the server's address.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_serve(config)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a target with its drafter (vLLM speculative decoding, OpenAI API)",
        description=(
            "Start a vLLM OpenAI-compatible server in the vLLM environment with the drafter as "
            "draft model (heterogeneous vocabularies handled automatically); on Ctrl-C/SIGTERM "
            "stop it and print the mean accepted length (MAL) from its counters."
        ),
    )
    add_model_arguments(parser, ServeConfig)
    parser.set_defaults(func=_serve_command)
