"""Splitting an evaluation across ranks: batch b goes to rank b mod W, results are gathered
on rank 0. With batches seeded by their index (:func:`mmtrain.inference.batch_generator`)
the gathered result does not depend on the number of ranks."""
from __future__ import annotations

import os
from dataclasses import dataclass

from mmtrain import distributed


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self, num_items: int, batch_size: int) -> list[tuple[int, range]]:
        """This rank's (batch index, item indices) pairs."""
        count = (num_items + batch_size - 1) // batch_size
        return [(b, range(b * batch_size, min(num_items, (b + 1) * batch_size))) for b in range(self.rank, count, self.world_size)]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
        return [obj] if self.world_size == 1 else distributed.gather_objects(obj)

    def barrier(self) -> None:
        if self.world_size > 1:
            distributed.barrier()


def init_ranks(timeout_s: int = 7200) -> Ranks:
    """The ranks torchrun (or another launcher) started: ``RANK`` / ``WORLD_SIZE`` /
    ``MASTER_ADDR`` / ``MASTER_PORT``. One process without them. The timeout is long: rank 0
    computes reference statistics while the others wait."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks()
    rank, world, _ = distributed.init(timeout_s)
    return Ranks(rank, world)
