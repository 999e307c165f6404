"""A small OpenAI-compatible HTTP client for the project's vLLM servers.

The `openai` package is not a dependency of the main environment, and the two endpoints used
here need nothing beyond a JSON POST with bounded retries, which httpx gives directly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """A request failed for good: a 4xx answer, or a 5xx/connection error after the last retry."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


class OpenAIClient:
    """`/v1/completions` and `/v1/chat/completions` of one served model.

    Connection errors, timeouts and 5xx answers are retried `max_retries` times with
    exponential backoff (`backoff`, `2·backoff`, `4·backoff`, ... seconds); 4xx answers are the
    caller's mistake and raise at once with the server's message.
    """

    def __init__(
        self,
        url: str,
        model: str,
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff: float = 1.0,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0 or timeout <= 0:
            raise ValueError(f"need timeout > 0 and backoff >= 0, got {timeout} and {backoff}")
        self.url = url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def completion(self, prompt: str | list[int], **sampling: Any) -> dict:
        """POST /v1/completions; `prompt` is text or a list of token ids (no chat template)."""
        return self.post("/v1/completions", {"prompt": prompt, **sampling})

    def chat_completion(self, messages: list[dict[str, str]], **sampling: Any) -> dict:
        """POST /v1/chat/completions with `[{"role": ..., "content": ...}, ...]`."""
        return self.post("/v1/chat/completions", {"messages": messages, **sampling})

    def post(self, path: str, payload: dict[str, Any]) -> dict:
        """POST `payload` (plus the model name) to `path` with retries; returns the JSON answer."""
        body = {"model": self.model, **payload}
        attempt = 0
        while True:
            last_try = attempt == self.max_retries
            try:
                response = self._http.post(path, json=body)
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
                if last_try:
                    raise RequestFailed(
                        f"POST {self.url}{path} failed after {attempt + 1} attempts: {problem}"
                    ) from err
            else:
                if response.is_success:
                    return response.json()
                problem = f"HTTP {response.status_code}: {_server_message(response)}"
                if response.status_code < 500 or last_try:
                    tries = "" if response.status_code < 500 else f" after {attempt + 1} attempts"
                    raise RequestFailed(
                        f"POST {self.url}{path} failed{tries}: {problem}", response.status_code
                    )
            delay = self.backoff * 2**attempt
            logger.warning("POST %s: %s; retrying in %.1f s", path, problem, delay)
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
