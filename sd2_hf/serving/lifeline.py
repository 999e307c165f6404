"""Run a command in this process's group and kill the whole group when its starter dies.

    python -I lifeline.py FD GRACE -- COMMAND [ARG ...]

FD is the read end of a pipe whose only write end the starting process holds. The kernel
closes that write end when the starter exits, however it ends (SIGKILL and the OOM killer
included), and a read on FD then returns EOF. On EOF this launcher sends SIGTERM to its
process group (the command and everything the command started, e.g. vLLM's engine-core
processes), waits up to GRACE seconds for the command to exit, then SIGKILLs what is left of
the group, itself included.

Why a pipe and not `prctl(PR_SET_PDEATHSIG)`: the death signal is Linux-only, it fires when
the parent *thread* exits (a server started from a worker thread would die with that
thread), and it reaches only the direct child, not the processes the server starts. The
pipe works on every POSIX system and, with the group kill, reaches every process of the
server.

The launcher runs with the main environment's interpreter in isolated mode (`-I`) and
imports nothing but the standard library: it must not depend on the package being
importable, and the command (vLLM's interpreter) gets the environment it was given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading


def _watch(fd: int, grace: float, command: subprocess.Popen, broken: threading.Event) -> None:
    try:
        while os.read(fd, 4096):
            pass  # the starter never writes; only EOF matters
    except OSError:
        pass
    broken.set()
    os.killpg(0, signal.SIGTERM)  # our own handler ignores it
    try:
        command.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)  # stragglers (engine processes, a command ignoring SIGTERM)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(f"usage: {sys.argv[0]} FD GRACE -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    fd, grace, command = int(argv[0]), float(argv[1]), argv[3:]
    # SIGTERM/SIGINT sent to the group (VLLMServer.stop, the watcher) reach the command too;
    # the launcher only waits for it. A Python handler, not SIG_IGN: an ignored disposition
    # would be inherited by the command through exec.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    child = subprocess.Popen(command)
    broken = threading.Event()
    watcher = threading.Thread(target=_watch, args=(fd, grace, child, broken), daemon=True)
    watcher.start()
    code = child.wait()
    if broken.is_set():
        watcher.join()  # ends with the group's SIGKILL, this process included
    if code < 0:  # killed by a signal: end the same way, so the starter sees that signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
