"""Recovery on several processes: PyTorch DDP under a launcher (`torchrun`, `accelerate launch --multi_gpu`).

A launcher starts one process per device and sets WORLD_SIZE, RANK and LOCAL_RANK; `process_group()` then joins
torch.distributed once (gloo for CPU tensors, NCCL for CUDA ones) and every recovery in the process runs as one
member of the group. Without WORLD_SIZE > 1 it is `SINGLE` and nothing in the run changes.

How a run splits (mbconvert.recovery uses these): every process computes the same global batch (the seeded batch
order) and runs its contiguous share of the rows (`Group.rows`); each share's loss is weighted so that the shares add
up to the whole batch's loss (mbconvert.transfer, mbconvert.optim), and DDP's all-reduce averages the gradients, so
`--batch-size` stays the global batch and N processes train the weights of one. Inference over a whole dataset (the
source's logits, dev evaluation) runs in shares and is gathered (`Group.map_rows`). Only the main process writes
files; the others wait at a barrier.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import torch

from . import cache
from .data import Encoded
from .errors import ConfigError


@dataclass(frozen=True)
class Group:
    """This process's place among the processes of a run (rank 0 is the main process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local(self, device: torch.device) -> torch.device:
        """The device this process trains on: with CUDA, the GPU of its local rank (one process per GPU)."""
        if self.size == 1 or device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def rows(self, n: int, rank: int | None = None) -> slice:
        """The contiguous share of n rows that process `rank` (default: this one) computes: equal shares, the first
        n % size processes one row more; empty when there are fewer rows than processes."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (rank < extra))

    def map_rows(self, data: Encoded, fn) -> torch.Tensor:
        """`fn(data)` (a tensor with one row per data row), computed on each process's share of the rows and
        gathered in row order."""
        if self.size == 1:
            return fn(data)
        rows = self.rows(len(data))
        count = rows.stop - rows.start
        part = fn(shard(data, rows if count else slice(0, 1)))[:count]  # an empty share still gives the shape
        width = -(-len(data) // self.size)
        padded = part.new_zeros((width, *part.shape[1:]))
        padded[:count] = part
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        torch.distributed.all_gather(parts, padded)
        counts = [share.stop - share.start for share in (self.rows(len(data), r) for r in range(self.size))]
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` (a tensor) over the processes."""
        if self.size == 1:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value

    def max(self, *values: float) -> list[float]:
        """Each of `values` (numbers) maximised over the processes: one decision for all of them."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def wrap(self, student: torch.nn.Module, projections: torch.nn.Module | None, device: torch.device):
        """The trained modules (never the frozen teacher) under DDP; None with one process. Call it as
        `wrapped(loss_fn)`: the step's loss runs inside DDP's forward, so DDP all-reduces the gradients even where a
        step calls only parts of the student (the layer-wise stage runs the bottom layers and a projection)."""
        if self.size == 1:
            return None
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(_Trained(student, projections), device_ids=[device.index] if
                                       device.type == "cuda" else None, broadcast_buffers=False,
                                       find_unused_parameters=True)


SINGLE = Group()


class _Trained(torch.nn.Module):
    """The student and its learned projections as one module whose forward runs a step's loss closure."""

    def __init__(self, student, projections):
        super().__init__()
        self.student, self.projections = student, projections

    def forward(self, loss_fn):
        return loss_fn()


def shard(data: Encoded, rows: slice) -> Encoded:
    """`rows` of an encoded dataset (of a streamed mbconvert.corpus.Corpus: a Corpus of them, read when used)."""
    if not isinstance(data, Encoded):
        return data.shard(rows)
    return Encoded(data.input_ids[rows], data.attention_mask[rows], data.token_type_ids[rows],
                   data.labels[rows] if data.labels is not None else None)


_GROUP: Group | None = None


def process_group() -> Group:
    """This process's group: SINGLE unless a launcher set WORLD_SIZE > 1, then torch.distributed is joined once
    (from the launcher's RANK, MASTER_ADDR and MASTER_PORT)."""
    global _GROUP
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return SINGLE
    if _GROUP is None:
        dist = torch.distributed
        if not dist.is_available():
            raise ConfigError(f"WORLD_SIZE={size} asks for several processes but this torch has no torch.distributed")
        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            atexit.register(_leave)
        _GROUP = Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))
        if not _GROUP.main:  # the main process tells the story; the others only warn
            logging.getLogger("mbconvert").setLevel(logging.WARNING)
    return _GROUP


def _leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cached(group: Group, cache_dir, kind: str, key: str, compute) -> dict[str, torch.Tensor]:
    """mbconvert.cache.cached when `compute` is collective (each process computes a share): the processes read the
    entry only when every one of them can, else all compute; only the main process writes it."""
    if group.size == 1:
        return cache.cached(cache_dir, kind, key, compute)
    try:
        value = cache.cached(cache_dir, kind, key, _missing)
    except _Missing:
        value = None
    if group.max(float(value is None))[0]:
        value = compute()
        if group.main:
            cache.cached(cache_dir, kind, key, lambda: value)
    return value


class _Missing(Exception):
    pass


def _missing():
    raise _Missing
