"""One writer per dataset folder at a time: a lock per dataset and output folder.

A stage takes the lock of each folder it writes (captions, scores, curated, ...) for its whole
run. A second writer of the same folder is refused at once with a message naming the holder;
readers never take a lock. Under `accelerate launch` the main process holds the lock for the
whole group (`Processes.is_main`), and the others learn the outcome from it.

On a local filesystem the lock is an advisory `flock` on DATASET/.capfilt-NAME.lock, released
by the kernel when the holder exits or is killed, so a killed run never leaves a stale lock.
Object stores have no such primitive (fsspec offers no atomic create-if-absent), so there the
lock is not taken: run one writer per stage folder, as a scheduler does; provenance still
marks a shard made with other options as stale rather than done.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
from collections.abc import Iterator

from capfilt.core.errors import CapfiltError


class LockedError(CapfiltError):
    """Another process is writing the same folder of this dataset."""


def _holder(command: str) -> dict:
    return dict(
        command=command,
        pid=os.getpid(),
        host=socket.gethostname(),
        since=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _describe(holder: dict) -> str:
    if not holder:
        return "another capfilt process"
    return (
        f"`{holder.get('command', 'capfilt')}` (pid {holder.get('pid')} on "
        f"{holder.get('host')}, since {holder.get('since')})"
    )


@contextlib.contextmanager
def _local_lock(path: str, command: str) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    # "a+": opening must not erase the holder's note before we know we hold the lock.
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            raise LockedError(_describe(holder)) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(_holder(command)))
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def path_lock(fs, path: str, what: str, command: str) -> Iterator[None]:
    """The write lock of one folder outside a dataset (an export's --out), local only."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" not in protocols:
        yield
        return
    head, _, name = path.rstrip("/").rpartition("/")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_local_lock(f"{head or '/'}/.{name}.capfilt.lock", command))
        except LockedError as e:
            raise LockedError(f"{what} is being written by {e}; wait for it to finish") from None
        yield


@contextlib.contextmanager
def folder_locks(dataset, folders: tuple[str, ...], command: str, processes=None) -> Iterator[None]:
    """Hold the write locks of `folders` of `dataset`, or raise LockedError for every process.

    `processes` (capfilt.core.distributed.Processes): the main process takes the locks; all
    processes agree on the outcome before anyone writes.
    """
    from capfilt.core.distributed import Processes

    processes = processes or Processes()
    with contextlib.ExitStack() as stack:
        refusal = None
        if processes.is_main and dataset.is_local:
            for folder in folders:
                try:
                    path = os.path.join(dataset.path, f".capfilt-{folder}.lock")
                    stack.enter_context(_local_lock(path, command))
                except LockedError as e:
                    refusal = (
                        f"{folder}/ of {dataset.root!r} is being written by {e}; wait for it "
                        "to finish, or stop it, then run this command again"
                    )
                    break
        refusal = processes.gather(refusal)[0]
        if refusal:
            raise LockedError(refusal)
        yield
