"""sd2_hf.utils.distributed: process groups torn down, gloo worker threads joined, before exit.

Each case runs in a fresh interpreter (a 1-rank gloo group): torch.distributed state must not
leak into the test process. The 2-rank runs are the workers of test_training.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from sd2_hf.utils.distributed import destroy_process_groups, gloo_worker_threads

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts threads through /proc"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(body: str) -> subprocess.CompletedProcess:
    prelude = f"""
    import atexit, os, sys
    import torch
    import torch.distributed as dist
    from sd2_hf.utils.distributed import (
        destroy_process_groups, destroy_process_groups_at_exit, gloo_worker_threads,
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}")
    dist.init_process_group("gloo", rank=0, world_size=1)
    """
    code = textwrap.dedent(prelude) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_outside_torch_distributed_it_only_counts():
    assert gloo_worker_threads() == 0
    assert destroy_process_groups() == 0


def test_groups_that_a_live_device_mesh_holds_are_released_and_their_threads_joined():
    """DTensor's caches keep the meshes of a run, and a mesh its groups, until exit:
    `destroy_process_group` alone left the gloo threads running."""
    proc = _run(
        """
        from torch.distributed.device_mesh import init_device_mesh

        cache = [init_device_mesh("cpu", (1,))]  # as torch's lru caches hold it
        t = torch.ones(4)
        dist.all_reduce(t)
        print("running", gloo_worker_threads())
        print("left", destroy_process_groups())
        assert not dist.is_initialized()
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert int(lines[0].split()[1]) >= 1
    assert lines[1] == "left 0"


@pytest.mark.parametrize("fail", [False, True])
def test_at_exit(fail):
    """Registered, the teardown runs at exit (before finalization); after an uncaught
    exception it is skipped (a collective may still wait for peers)."""
    proc = _run(
        f"""
        # Registered first, so it runs last: what the teardown left.
        atexit.register(lambda: print("at exit", gloo_worker_threads(), flush=True))
        destroy_process_groups_at_exit()
        destroy_process_groups_at_exit()  # idempotent
        if {fail}:
            # A barrier's work holds no Python tensor: releasing it needs no GIL, so the worker
            # that ran it cannot race this exit (what the teardown is for).
            dist.barrier()
            raise RuntimeError("boom")
        t = torch.ones(4)
        dist.all_reduce(t)
        """
    )
    last = proc.stdout.splitlines()[-1]
    if fail:
        assert proc.returncode == 1 and "boom" in proc.stderr
        assert last.startswith("at exit ") and int(last.split()[-1]) >= 1
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert last == "at exit 0"
