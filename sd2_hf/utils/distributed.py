"""Tear down torch.distributed before the interpreter finalizes (gloo worker threads joined).

Why: a gloo process group runs its collectives on C++ worker threads ("pt_gloo_runloop").
A worker signals a collective's completion, then drops its own reference to the finished work
object; the work holds the collective's tensors, and a tensor that has a Python object needs
the GIL to be released. `destroy_process_group` does not stop these threads (gloo's
`shutdown` leaves them running); only the destructor of the last reference to the group joins
them, and the model (FSDP2's mesh info, DDP's reducer) keeps such a reference. So when the
main thread returns from the last collective and the script ends before a descheduled worker
(a loaded CPU) has dropped its work, the worker asks for the GIL while Python finalizes: the
interpreter ends the thread with `pthread_exit`, the unwinding meets a `noexcept` destructor,
and the process dies with "terminate called without an active exception" (SIGABRT) after all
of its work was done. (A core dump of such a rank: main thread in `Py_FinalizeEx`, a
`pt_gloo_runloop` thread in `~AsyncAllgatherCoalescedWork` -> `decref_pyobject` -> `take_gil`
-> `pthread_exit` -> `std::terminate`.) torch has no fix for it (an `atexit` teardown was
proposed upstream and abandoned).

The fix: drop the process group while the interpreter is fully alive, once nothing refers to
it any more, so that its destructor joins the worker threads (the binding releases the GIL for
it, so a worker still waiting for the GIL to free its last work gets it and finishes).
"""

from __future__ import annotations

import atexit
import gc
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

GLOO_WORKER_THREAD = "pt_gloo_runloop"


def gloo_worker_threads() -> int | None:
    """How many gloo collective worker threads this process runs (None where /proc is absent).

    A worker takes its name when it first runs a collective: one that never did (and so has
    no work to release) is not counted.
    """
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    count = 0
    for task in tasks.iterdir():
        try:
            count += (task / "comm").read_text().strip() == GLOO_WORKER_THREAD
        except OSError:  # the thread ended meanwhile
            continue
    return count


def destroy_process_groups(barrier: bool = True) -> int | None:
    """Destroy every process group and let their gloo worker threads end, now.

    Call it once this process's collectives are over and after dropping the objects that hold
    the group (a model wrapped by FSDP2 or DDP, a trainer, a device mesh): a group still
    referenced elsewhere stays alive, threads included. `barrier` first waits for every rank to
    arrive, so that no peer is still inside a collective with this one.
    Returns the gloo worker threads still running afterwards (0 once torn down, None without
    /proc); a no-op returning the same count when torch.distributed is not initialized. A
    count above 0 means something still holds a group (in torch 2.13, e.g., a DTensor made
    with `DTensor.from_local` or `distribute_tensor` outside FSDP2 leaves references that
    Python cannot reach): the exit race is then still possible.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        gc.collect()  # reference cycles of FSDP states and hooks that still hold the group
        dist.destroy_process_group()
        _forget_mesh_groups()
        gc.collect()
    return gloo_worker_threads()


def _forget_mesh_groups() -> None:
    """Drop the groups that DeviceMeshes still cache (`_pg_registry`) once they are destroyed.

    DTensor's caches (`MeshTopoInfo.build_from_mesh`, sharding propagation) keep every mesh of
    the run alive until the interpreter ends, and a mesh keeps its groups: after FSDP2 the
    group's destructor, and with it the join of its threads, would never run before finalization.
    """
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # torch without distributed
        return
    for obj in gc.get_objects():
        # The MRO, not isinstance: DeviceMesh's metaclass check warns on some torch objects.
        if DeviceMesh in type(obj).__mro__ and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


_registered = False


def _destroy_at_exit() -> None:
    # After an uncaught exception (Python sets sys.last_value before the exit functions run)
    # a collective of this rank may still be in flight, waiting for peers that never join it:
    # joining its thread could hold the exit up to the group's timeout. Leave that case as is.
    if getattr(sys, "last_value", None) is not None:
        return
    left = destroy_process_groups(barrier=False)
    if left:
        # A live object (e.g. a model at module level) still holds the group.
        logger.debug("%d gloo worker threads still running at exit", left)


def destroy_process_groups_at_exit() -> None:
    """Register `destroy_process_groups` (without barrier) to run at interpreter exit.

    `atexit` functions run before finalization starts, when the training objects of a function
    that has returned (a stage, a CLI command) are garbage: the group's last reference is then
    dropped there and its threads joined. No barrier: every rank runs it on its own. Skipped
    after an uncaught exception. Idempotent; a no-op in a process whose groups are already
    destroyed.
    """
    global _registered
    if not _registered:
        atexit.register(_destroy_at_exit)
        _registered = True


__all__ = [
    "GLOO_WORKER_THREAD",
    "destroy_process_groups",
    "destroy_process_groups_at_exit",
    "gloo_worker_threads",
]
