"""Work done ahead in background threads, results in order, memory bounded."""

from __future__ import annotations


def ordered_map(function, items, threads: int, ahead: int | None = None):
    """`function(item)` for each item, in order, computed by `threads` background threads.

    At most `ahead` results (default threads + 1) are in flight or waiting, so memory stays
    bounded. With `threads` 0 it is a plain `map`. An exception in `function` is raised here,
    at the item that raised it.
    """
    if threads < 1:
        yield from map(function, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    ahead = max(1, ahead if ahead is not None else threads + 1)
    pending = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="capfilt-decode") as pool:
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # the caller stopped early: drop what has not started
                future.cancel()
