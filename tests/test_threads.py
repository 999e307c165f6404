"""DaemonThreadPool: ordered results, errors through futures, and no wait at exit."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from sd2_hf.utils.threads import DaemonThreadPool


def test_map_keeps_order_and_bounds_concurrency():
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def work(x):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.01)
        with lock:
            state["now"] -= 1
        return x * x

    with DaemonThreadPool(3) as pool:
        assert pool.map(work, list(range(12))) == [x * x for x in range(12)]
    assert state["most"] == 3


def test_errors_reach_the_caller_and_shutdown_cancels_queued_work():
    release = threading.Event()
    started = threading.Event()

    def hold():
        started.set()
        return release.wait()

    pool = DaemonThreadPool(1)
    busy = pool.submit(hold)
    queued = pool.submit(lambda: 1)
    # The worker must hold `busy` before shutdown drains the queue; otherwise shutdown
    # rightly cancels `busy` too, and the test raced the worker's pickup.
    assert started.wait(timeout=10)
    failing = DaemonThreadPool(1).submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    pool.shutdown()
    assert queued.cancelled()
    release.set()
    assert busy.result(timeout=10) is True
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: 1)
    with pytest.raises(ValueError, match="max_workers"):
        DaemonThreadPool(0)


def test_a_running_task_does_not_hold_the_exit():
    code = (
        "import time\n"
        "from sd2_hf.utils.threads import DaemonThreadPool\n"
        "pool = DaemonThreadPool(2)\n"
        "pool.submit(time.sleep, 600)\n"
        "time.sleep(0.2)\n"
        "pool.shutdown()\n"
    )
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert time.monotonic() - started < 30
