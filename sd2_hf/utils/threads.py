"""A thread pool whose workers never hold up the exit of the process.

`concurrent.futures.ThreadPoolExecutor` joins its workers when the interpreter exits, so after
Ctrl-C or SIGTERM a blocking HTTP request still in flight (minutes, up to its timeout) keeps
the process alive, and with it any vLLM server it started. The project's requests have nothing
to finish after an interrupt (their results are only journaled once returned), so this pool
runs them on daemon threads and `shutdown` never waits for a running one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_STOP = object()


class DaemonThreadPool:
    """`submit(fn, *args) -> Future`, `map`, `shutdown`, with daemon worker threads."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "sd2-worker"):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{thread_name_prefix}_{i}", daemon=True)
            for i in range(max_workers)
        ]
        for thread in self._threads:
            thread.start()
        self._closed = False

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the caller via the future
                future.set_exception(err)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._closed:
            raise RuntimeError("cannot submit to a pool that was shut down")
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """Results in the order of `items`; the first exception is raised."""
        futures = [self.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    def shutdown(self, cancel_futures: bool = True) -> None:
        """Stop the workers once they are idle; queued work is cancelled; nothing is awaited."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(_STOP)

    def __enter__(self) -> DaemonThreadPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
