"""img2dataset's processes end with the fetch that started them.

With --processes N, img2dataset's multiprocessing distributor spawns a pool of N workers and a
logger process. Killed with SIGKILL (kill -9, the OOM killer, a scheduler), a process cannot
stop them, and they do not stop by themselves: the logger polls until told to finish, forever,
and a worker finishes the shard it is downloading into the staging folder while the re-run
writes it too. Inside `processes_end_with_this_one` each of them ends itself the moment the
process that started it is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator


def _end_with(parent: int) -> None:
    """In a process that `parent` started: end this one as soon as `parent` is gone.

    On Linux the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG); elsewhere a
    thread looks every 0.2 s. Either way a parent that died before this ran is noticed too.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # gone before the kernel was asked
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    watch = threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True)
    watch.start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _start_worker(parent: int, initializer, initargs) -> None:
    _end_with(parent)
    if initializer is not None:
        initializer(*initargs)


def _reduce_spawned(process):
    """How a process object is pickled for the process it starts: first a call to `_end_with`
    (this process), then its class, whose module may take seconds to import there."""
    return _rebuild_spawned, (_EndsWithParent(os.getpid()), type(process), process.__dict__)


def _rebuild_spawned(_ended, cls, state: dict):
    process = cls.__new__(cls)
    process.__dict__.update(state)
    return process


class _EndsWithParent:
    """Unpickled in a new process, which then ends with the one that pickled it."""

    def __init__(self, parent: int):
        self.parent = parent

    def __reduce__(self):
        return _end_with, (self.parent,)


class _PoolsEndWithParent:
    """A multiprocessing context whose pools' workers end with the process that made them."""

    def __init__(self, method: str | None = None):
        import multiprocessing

        self._context = multiprocessing.get_context(method)

    def __getattr__(self, name: str):
        return getattr(self._context, name)

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        guarded = (os.getpid(), initializer, initargs)
        return self._context.Pool(processes, _start_worker, guarded, maxtasksperchild)


@contextlib.contextmanager
def processes_end_with_this_one() -> Iterator[None]:
    """Inside the block, the pool workers and the logger process that img2dataset's
    multiprocessing distributor spawns end when this process does (see the module docstring).
    """
    from multiprocessing.reduction import ForkingPickler

    from img2dataset import distributor
    from img2dataset.logger import LoggerProcess

    saved = distributor.get_context
    distributor.get_context = _PoolsEndWithParent
    # The logger process is spawned with its object pickled by ForkingPickler.
    reducers = ForkingPickler._extra_reducers
    saved_reducer = reducers.get(LoggerProcess)
    ForkingPickler.register(LoggerProcess, _reduce_spawned)
    try:
        yield
    finally:
        distributor.get_context = saved
        if saved_reducer is None:
            reducers.pop(LoggerProcess, None)
        else:
            reducers[LoggerProcess] = saved_reducer
