"""Generation backends for self-data distillation, behind one interface.

A backend turns a batch of conversations (message lists ending with a user turn) into one
assistant reply each. Both backends render prompts with the *target's* chat template in the
main environment and decode the generated token ids with the same tokenizer, so they see
identical prompt tokens and produce text the same way; only the forward passes differ.

- `TransformersBackend`: in-process batched `generate` (left padding, KV cache).
- `VLLMBackend`: token-id prompts sent to one or more OpenAI-compatible vLLM servers
  (`sd2_hf.serving`), with bounded concurrency and least-loaded fan-out across servers.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

from sd2_hf.utils.threads import DaemonThreadPool

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "too_long", "error"]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by every backend (greedy when `temperature == 0`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Generation(NamedTuple):
    """One reply: decoded text, generated token count (EOS included), and why it ended.

    finish_reason: "stop" (EOS), "length" (hit `max_new_tokens`), "too_long" (prompt plus
    `max_new_tokens` does not fit the model's context; nothing generated), "error" (the
    request failed; `error` says why).
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason
    prompt_tokens: int
    error: str | None = None


ResultCallback = Callable[[Generation], None]


class GenerationBackend(Protocol):
    name: str

    def generate(
        self,
        conversations: Sequence[list[dict]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[Generation]:
        """One reply per conversation, in order; `seeds` are per-request (reproducible sampling)."""
        ...

    def versions(self) -> dict[str, str]: ...

    def close(self) -> None: ...


class ChatRenderer:
    """Applies the target's chat template and decodes replies (shared by all backends)."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the target tokenizer ({getattr(tokenizer, 'name_or_path', tokenizer)!r}) has no chat "
                "template; self-data distillation needs the target's chat template "
                "(use an instruct/chat checkpoint or set `tokenizer.chat_template`)"
            )
        self.tokenizer = tokenizer
        eos = set()
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.stop_token_ids: set[int] = eos

    def add_stop_tokens(self, token_ids: int | Sequence[int] | None) -> None:
        """Merge the model's `generation_config.eos_token_id` (chat models often stop on several)."""
        if token_ids is None:
            return
        self.stop_token_ids.update([token_ids] if isinstance(token_ids, int) else token_ids)

    def render(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        ).strip()

    def finish_reason(self, token_ids: Sequence[int], max_new_tokens: int) -> FinishReason:
        if token_ids and token_ids[-1] in self.stop_token_ids:
            return "stop"
        return "length" if len(token_ids) >= max_new_tokens else "stop"


def _fits(
    prompt_len: int,
    sampling: Sampling,
    context_length: int | None,
    max_prompt_tokens: int | None = None,
) -> bool:
    if max_prompt_tokens is not None and prompt_len > max_prompt_tokens:
        return False
    return context_length is None or prompt_len + sampling.max_new_tokens <= context_length


class TransformersBackend:
    """In-process batched generation with `model.generate` (left padding, KV cache)."""

    name = "transformers"

    def __init__(
        self,
        model_path: str,
        *,
        batch_size: int = 8,
        dtype: str = "auto",
        device: str | None = None,
        max_prompt_tokens: int | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        # Decoder-only batched generation needs left padding so every row's last prompt token
        # sits at the same position.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.renderer = ChatRenderer(tokenizer)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.renderer.add_stop_tokens(self.model.generation_config.eos_token_id)
        text_config = self.model.config.get_text_config(decoder=True)
        self.context_length: int | None = getattr(text_config, "max_position_embeddings", None)

    def generate(
        self,
        conversations: Sequence[list[dict]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[Generation]:
        prompts = [self.renderer.render(m) for m in conversations]
        results: list[Generation | None] = [None] * len(prompts)
        runnable = []
        for i, ids in enumerate(prompts):
            if _fits(len(ids), sampling, self.context_length, self.max_prompt_tokens):
                runnable.append(i)
            else:
                results[i] = Generation("", 0, "too_long", len(ids))
                if on_result:
                    on_result(results[i])
        # Similar lengths share a batch (less padding); the order is deterministic, so the
        # same rows always form the same batches and greedy outputs reproduce on resume.
        runnable.sort(key=lambda i: (-len(prompts[i]), i))
        for start in range(0, len(runnable), self.batch_size):
            chunk = runnable[start : start + self.batch_size]
            # One seed per row (not per batch): a sampled row then depends on its own prompt
            # and seed only, not on its neighbours or the batch size, which a resume may change.
            row_seeds = [seeds[i] if seeds is not None else sampling.seed for i in chunk]
            gens = self._generate_batch([prompts[i] for i in chunk], sampling, row_seeds)
            for i, gen in zip(chunk, gens, strict=True):
                results[i] = gen
                if on_result:
                    on_result(gen)
        return results  # type: ignore[return-value]

    def _generate_batch(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]
    ) -> list[Generation]:
        import torch

        tok = self.renderer.tokenizer
        batch = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": sorted(self.renderer.stop_token_ids),
            "pad_token_id": tok.pad_token_id,
            # The checkpoint's generation_config may carry its own penalties; both backends
            # must sample from the plain distribution, so neutralise them explicitly.
            "repetition_penalty": 1.0,
        }
        # Greedy decoding also when sampling: the sampling happens in a logits processor
        # with one generator per row (generate's own sampler draws the whole batch from one
        # RNG; see sd2_hf.data.sampling). No top-k: vLLM applies none either.
        kwargs["do_sample"] = False
        if not sampling.greedy:
            from sd2_hf.data.sampling import per_row_sampling_processors

            kwargs["logits_processor"] = per_row_sampling_processors(
                seeds, sampling.temperature, sampling.top_p, self.device
            )
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
        gens = []
        for prompt, ids in zip(prompts, new_tokens, strict=True):
            # Rows that finished early are right-padded with pad tokens after their EOS.
            for end, t in enumerate(ids):
                if t in self.renderer.stop_token_ids:
                    ids = ids[: end + 1]
                    break
            reason = self.renderer.finish_reason(ids, sampling.max_new_tokens)
            gens.append(Generation(self.renderer.decode(ids), len(ids), reason, len(prompt)))
        return gens

    def versions(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        self.model = None


def get_json(url: str, timeout: float = 10.0) -> Any:
    """GET a small JSON document (vLLM's `/v1/models`, `/version`)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


class _ServerPool:
    """Least-loaded choice among server URLs (ties broken round-robin), for data-parallel fan-out."""

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self._in_flight = dict.fromkeys(self.urls, 0)
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self, exclude: set[str]) -> str | None:
        with self._lock:
            candidates = [u for u in self.urls if u not in exclude]
            if not candidates:
                return None
            n = len(self.urls)
            rotated = sorted(
                candidates,
                key=lambda u: (self._in_flight[u], (self.urls.index(u) - self._next) % n),
            )
            url = rotated[0]
            self._next = (self.urls.index(url) + 1) % n
            self._in_flight[url] += 1
            return url

    def release(self, url: str) -> None:
        with self._lock:
            self._in_flight[url] -= 1


class VLLMBackend:
    """Token-id completions from OpenAI-compatible vLLM servers, `concurrency` requests at a time.

    A request is retried with backoff by `OpenAIClient`; when it still fails on one server it is
    tried on each other server once, then reported as an "error" generation (the caller records
    the row as failed and retries it on the next resume).
    """

    name = "vllm"

    def __init__(
        self,
        tokenizer_path: str,
        urls: Sequence[str],
        *,
        model_name: str | None = None,
        concurrency: int = 16,
        request_timeout: float = 600.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_prompt_tokens: int | None = None,
    ):
        from transformers import AutoTokenizer, GenerationConfig

        self.max_prompt_tokens = max_prompt_tokens

        if not urls:
            raise ValueError("VLLMBackend needs at least one server URL")
        self.renderer = ChatRenderer(AutoTokenizer.from_pretrained(tokenizer_path))
        try:
            gen_config = GenerationConfig.from_pretrained(tokenizer_path)
            self.renderer.add_stop_tokens(gen_config.eos_token_id)
        except OSError:
            pass  # no generation_config.json: the tokenizer's EOS is the stop token
        self.urls = [u.rstrip("/") for u in urls]
        self.pool = _ServerPool(self.urls)
        self._client_kwargs = {
            "timeout": request_timeout,
            "max_retries": max_retries,
            "backoff": backoff,
        }
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._executor = DaemonThreadPool(concurrency, thread_name_prefix="sd2-vllm")
        self.model_name = model_name
        self.context_length: int | None = None
        self._server_versions: dict[str, str] = {}
        self._probe_servers()

    def _probe_servers(self) -> None:
        """Learn the served model name, its context length and the vLLM version from live servers.

        Unreachable servers are not an error here: their requests fail and are retried on resume.
        """
        for url in self.urls:
            try:
                models = get_json(f"{url}/v1/models")["data"]
            except (OSError, ValueError, KeyError) as err:
                logger.warning(
                    "vLLM server %s is not reachable (%s); its requests will fail", url, err
                )
                continue
            if models:
                self.model_name = self.model_name or models[0]["id"]
                max_len = models[0].get("max_model_len")
                if max_len:
                    self.context_length = min(self.context_length or max_len, max_len)
            try:
                self._server_versions[url] = str(get_json(f"{url}/version")["version"])
            except (OSError, ValueError, KeyError):
                pass

    def _client(self, url: str):
        from sd2_hf.serving.client import OpenAIClient

        # One client per worker thread and server: no HTTP connection is shared across threads.
        clients = self._local.__dict__.setdefault("clients", {})
        if url not in clients:
            clients[url] = OpenAIClient(url, self.model_name or "", **self._client_kwargs)
            with self._clients_lock:
                self._clients.append(clients[url])
        return clients[url]

    def _request(self, prompt: list[int], sampling: Sampling, seed: int) -> Generation:
        params: dict[str, Any] = {
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if not sampling.greedy else 1.0,
            "top_k": -1,
            "repetition_penalty": 1.0,
            "seed": seed,
            "stop_token_ids": sorted(self.renderer.stop_token_ids),
            # Token ids come back so the main env decodes them exactly like the transformers
            # backend (vLLM's incremental detokenizer can differ on byte-level edge cases).
            "return_token_ids": True,
        }
        tried: set[str] = set()
        errors = []
        while (url := self.pool.acquire(tried)) is not None:
            tried.add(url)
            try:
                response = self._client(url).completion(prompt, **params)
                choice = response["choices"][0]
                ids = list(choice.get("token_ids") or [])
                text = self.renderer.decode(ids) if ids else choice.get("text", "").strip()
                num = len(ids) or int(response.get("usage", {}).get("completion_tokens", 0))
                reason = "length" if choice.get("finish_reason") == "length" else "stop"
                return Generation(text, num, reason, len(prompt))
            # Any failure of one request (connection, HTTP status, malformed reply) must not
            # stop the run: the row is recorded as failed and retried on the next resume.
            except Exception as err:  # noqa: BLE001
                errors.append(f"{url}: {type(err).__name__}: {err}")
            finally:
                self.pool.release(url)
        return Generation("", 0, "error", len(prompt), error="; ".join(errors)[:2000])

    def generate(
        self,
        conversations: Sequence[list[dict]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[Generation]:
        results: list[Generation | None] = [None] * len(conversations)
        futures = {}
        for i, messages in enumerate(conversations):
            ids = self.renderer.render(messages)
            if not _fits(len(ids), sampling, self.context_length, self.max_prompt_tokens):
                results[i] = Generation("", 0, "too_long", len(ids))
                if on_result:
                    on_result(results[i])
                continue
            seed = seeds[i] if seeds is not None else sampling.seed
            futures[self._executor.submit(self._request, ids, sampling, seed)] = i
        for future in as_completed(futures):
            results[futures[future]] = gen = future.result()
            if on_result:
                on_result(gen)
        return results  # type: ignore[return-value]

    def versions(self) -> dict[str, str]:
        found = sorted(set(self._server_versions.values()))
        return {"vllm": ", ".join(found)} if found else {}

    def close(self) -> None:
        # Never waits: after an interrupt (Ctrl-C, SIGTERM) the requests still in flight would
        # hold the exit for minutes; their rows are not journaled, so a resume redoes them.
        # After a normal run nothing is in flight.
        self._executor.shutdown(cancel_futures=True)
        for client in self._clients:
            client.close()
