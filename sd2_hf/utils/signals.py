"""SIGTERM handled like Ctrl-C, so `finally` blocks and context managers run.

The vLLM servers the project starts live in their own process group (a terminal's Ctrl-C does
not reach them); they are stopped by the context managers that started them, which a plain
SIGTERM (default action: die at once) would skip. (Where no handler can run, SIGKILL, the
servers' lifeline pipe stops them: sd2_hf/serving/lifeline.py.)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt in the main thread (no-op elsewhere:
    only the main thread may set signal handlers); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
