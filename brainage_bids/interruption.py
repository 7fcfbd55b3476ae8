"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (SLURM's time limit, ``docker stop``).

The main process turns either signal into :class:`Interrupted`, which unwinds the run: the
job queue ends its worker processes (and whatever they started) and removes the half-written
outputs of the images in flight, no record, report or summary is written after the signal,
and the command prints one line and exits 130 (SIGINT) or 143 (SIGTERM), as a shell does for
a process killed by that signal. Worker processes ignore SIGINT, so that Ctrl-C (which the
terminal sends to every process of the foreground group) is handled once, by the main
process. The nipype work directory keeps every finished step, so rerunning with the same
``-w`` resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator

#: Signals that stop a run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds a process gets to end after SIGTERM before it is killed.
GRACE_S = 3.0


class Interrupted(BaseException):
    """The run received a stop signal; not an ``Exception``, so no handler swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise :class:`Interrupted` in the main thread on SIGINT or SIGTERM, once.

    A second signal while the run is being stopped is ignored (stopping takes at most a few
    seconds). The previous handlers are restored on exit. Outside the main thread (where
    Python allows no signal handler) nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame) -> None:
        if received:
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ignore_interrupts() -> None:
    """In a worker process: leave SIGINT to the main process (SIGTERM still ends it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _parents() -> dict[int, int]:
    """``{pid: parent pid}`` of every process, from ``/proc`` (empty where there is none)."""
    parents = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields and fields[0] != b"Z":  # a zombie has ended already
            parents[int(name)] = int(fields[1])
    return parents


def descendants(pids: Iterable[int]) -> list[int]:
    """The processes started by ``pids``, their children and so on (not ``pids`` themselves)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def terminate(pids: Iterable[int], *, grace_s: float = GRACE_S) -> list[int]:
    """End ``pids`` and every process they started: SIGTERM, then SIGKILL after ``grace_s``.

    Returns the processes that were signalled. Descendants are collected before anything is
    signalled, since a process that ends hands its children to init.
    """
    pids = list(pids)
    targets = [*descendants(pids), *pids]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(alive(pid) for pid in targets) and time.monotonic() < deadline:
            _reap(targets)
            time.sleep(0.05)
        if not any(alive(pid) for pid in targets):
            break
    _reap(targets)
    return targets


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"multiprocessing.resource_tracker" in fh.read()
    except OSError:
        return False


def terminate_children(*, grace_s: float = GRACE_S) -> list[int]:
    """End every process this one started (workers, the tools they run, the forkserver).

    multiprocessing's resource tracker is left alone: it ignores SIGTERM by design and ends
    by itself when this process does, after removing what the workers left behind.
    """
    pids = [pid for pid in descendants([os.getpid()]) if not _is_resource_tracker(pid)]
    return terminate(pids, grace_s=grace_s)


def _reap(pids: Iterable[int]) -> None:
    """Collect those of ``pids`` that are our ended children (no zombies left behind)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
