"""Sharing a stage's shards between processes started by `accelerate launch` (or torchrun).

Each process takes the shards whose number modulo the process count is its rank, so no two
processes ever write the same shard file and no coordination is needed while they work. At
the end the processes meet once: their counts are summed and the main process writes the
manifest run.

The launchers describe the process in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). We read it there rather than through `accelerate.PartialState`, which on a
machine without GPUs reports a single process even when several were launched.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable
from dataclasses import dataclass

# Processes meet only after finishing all their shards, which can take many hours.
_MEETING_TIMEOUT = _dt.timedelta(hours=72)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one stage run."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_shards(self, shards: Iterable[int]) -> list[int]:
        """The shards this process works on: shard number % world_size == rank."""
        return [s for s in shards if s % self.world_size == self.rank]

    def wait_for_everyone(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """Every process's `value` (any picklable object), in rank order, on every process."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def current() -> Processes:
    """The processes of this run, joining their group when launched with several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    import torch.distributed as dist

    if not dist.is_initialized():
        # Coordination only moves a few small objects, so gloo (CPU) serves every machine.
        dist.init_process_group(backend="gloo", timeout=_MEETING_TIMEOUT)
    return Processes(rank=dist.get_rank(), world_size=dist.get_world_size())


def sum_counts(all_counts: list[dict]) -> dict:
    """Add up dicts of numbers (nested dicts too) gathered from every process."""
    total: dict = {}
    for counts in all_counts:
        for name, value in counts.items():
            if isinstance(value, dict):
                total[name] = sum_counts([total.get(name, {}), value])
            else:
                total[name] = total.get(name, 0) + value
    return total
