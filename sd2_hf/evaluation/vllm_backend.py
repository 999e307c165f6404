"""MAL with vLLM speculative decoding: one server per drafter (in the vLLM environment), prompts
sent as token ids (rendered in the main env, so both backends see identical prompts), and
vLLM's own spec-decode counters read before and after every request.

vLLM counts a draft step for every verification of a request that had drafts; the prefill step
commits the first token without drafts, and the last drafts are not shortened near
`max_tokens` (tokens past it are discarded). So with the target drafting for itself MAL is
exactly K+1 whatever `max_tokens` is, as long as no EOS is drafted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from sd2_hf.evaluation.backend import Decode, DrafterPlan, Generate, Generation
from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.serving.metrics import SpecDecodeCounters
from sd2_hf.utils.threads import DaemonThreadPool


class VLLMBackend:
    """Starts and stops a `VLLMServer` per session; never imports vllm."""

    name = "vllm"

    def __init__(
        self,
        config: EvalConfig,
        target_path: str,
        max_model_len: int,
        stop_token_ids: list[int],
        log_dir: Path,
    ):
        self.config = config
        self.target_path = target_path
        self.max_model_len = max_model_len
        # The servers run with `--generation-config vllm` (neutral defaults), so the target's
        # own EOS ids are sent with each request to stop where transformers' generate stops.
        self.stop_token_ids = stop_token_ids
        self.log_dir = log_dir
        self._versions: dict[str, str] = {}

    def versions(self) -> dict[str, str]:
        return dict(self._versions)

    def _server(self, drafter: DrafterPlan | None):
        from sd2_hf.serving import VLLMServer

        name = drafter.name if drafter else "target"
        common = dict(
            dtype=self.config.dtype,
            max_model_len=self.max_model_len,
            log_path=str(self.log_dir / f"vllm-{name}.log"),
        )
        extra = list(self.config.vllm_extra_args)
        if drafter is None:
            return VLLMServer(self.target_path, extra_args=extra, **common)
        if drafter.kind == "ngram":
            # Same n-gram sizes as transformers' prompt lookup (max_matching_ngram_size 2).
            spec = {
                "method": "ngram",
                "num_speculative_tokens": self.config.num_draft_tokens,
                "prompt_lookup_min": 1,
                "prompt_lookup_max": 2,
            }
            return VLLMServer(
                self.target_path,
                extra_args=[*extra, "--speculative-config", json.dumps(spec)],
                **common,
            )
        return VLLMServer(
            self.target_path,
            drafter=drafter.path,
            num_draft_tokens=self.config.num_draft_tokens,
            extra_args=extra,
            **common,
        )

    @contextmanager
    def decoder(self, drafter: DrafterPlan | None) -> Iterator[Decode]:
        """`decode(prompt_ids, n) -> (seconds, new tokens)`: `drafter`'s model (the target with
        None) served alone by a vLLM server of the evaluation's settings, one request at a
        time, exactly `n` new tokens (`min_tokens` = `max_tokens` = n, EOS ignored)."""
        from sd2_hf.serving import OpenAIClient, VLLMServer

        path = self.target_path if drafter is None else drafter.path
        name = "target-alone" if drafter is None else f"{drafter.name}-alone"
        server = VLLMServer(
            path,
            dtype=self.config.dtype,
            max_model_len=self.max_model_len,
            extra_args=list(self.config.vllm_extra_args),
            log_path=str(self.log_dir / f"vllm-{name}.log"),
        )
        with server, OpenAIClient(server.url, server.model_name) as client:

            def decode(prompt_ids: list[int], n: int) -> tuple[float, int]:
                start = time.perf_counter()
                response = client.completion(
                    prompt_ids,
                    max_tokens=n,
                    min_tokens=n,
                    ignore_eos=True,
                    temperature=0.0,
                    return_token_ids=True,
                )
                seconds = time.perf_counter() - start
                return seconds, len(response["choices"][0]["token_ids"])

            yield decode

    @contextmanager
    def session(self, drafter: DrafterPlan | None) -> Iterator[Generate]:
        from sd2_hf.serving import OpenAIClient

        server = self._server(drafter)
        with server, OpenAIClient(server.url, server.model_name) as client:
            version = httpx.get(f"{server.url}/version", timeout=30).json().get("version")
            if version:
                self._versions["vllm"] = version

            def request(prompt_ids: list[int]) -> list[int]:
                response = client.completion(
                    prompt_ids,
                    max_tokens=self.config.max_new_tokens,
                    temperature=0.0,
                    stop_token_ids=self.stop_token_ids,
                    return_token_ids=True,
                )
                return list(response["choices"][0]["token_ids"])

            def generate(prompt_ids: list[int]) -> Generation:
                before = server.spec_counters() if drafter else None
                start = time.perf_counter()
                token_ids = request(prompt_ids)
                seconds = time.perf_counter() - start
                counters = server.spec_counters() - before if drafter else None
                return Generation(token_ids, seconds, counters=counters)

            def many(group: list[list[int]]) -> list[Generation]:
                """A group of prompts at once (`config.concurrency` in flight). The counters
                cover the whole group: they go with the first generation, as does the group's
                wall time; the others carry zero counters and zero seconds, so sums over the
                group are exact."""
                before = server.spec_counters() if drafter else None
                start = time.perf_counter()
                with DaemonThreadPool(min(self.config.concurrency, len(group))) as pool:
                    outputs = pool.map(request, group)
                seconds = time.perf_counter() - start
                counters = server.spec_counters() - before if drafter else None
                zero = SpecDecodeCounters() if drafter else None
                return [
                    Generation(
                        token_ids,
                        seconds if i == 0 else 0.0,
                        counters=counters if i == 0 else zero,
                    )
                    for i, token_ids in enumerate(outputs)
                ]

            generate.many = many  # type: ignore[attr-defined]
            yield generate
