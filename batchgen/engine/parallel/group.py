"""The tensor-parallel process group: joined once per engine, over a localhost TCP rendezvous.

gloo on the CPU, NCCL on CUDA (NCCL_NVLS_ENABLE=0: NVLink multicast is never turned on). The rendezvous
address is the group's own init_method (MASTER_ADDR / MASTER_PORT are not touched). One group per
process: a second tensor-parallel engine is refused until the first is closed.
"""
from __future__ import annotations

import socket
from datetime import timedelta

import torch

from .. import switches


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine failed (or could not start): the engine is closed."""


def timeout() -> timedelta:
    """BATCHGEN_TP_TIMEOUT (seconds, default 600): the group's init and every collective give up after it."""
    raw = switches.Switches.from_env().tp_timeout  # read when a group starts (once per engine)
    try:
        seconds = float(raw) if raw else 600.0
    except ValueError:
        raise TensorParallelError(f"BATCHGEN_TP_TIMEOUT={raw!r}: expected a number of seconds") from None
    if not 0 < seconds < 10**9:  # NaN, infinity and the absurd too: timedelta can't hold them
        raise TensorParallelError(f"BATCHGEN_TP_TIMEOUT={raw!r}: expected a number of seconds > 0 (and < 1e9)")
    return timedelta(seconds=seconds)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class TPGroup:
    """This process's rank in the tensor-parallel group, and the collectives the sharded model uses."""

    def __init__(self, rank: int, world: int, backend: str) -> None:
        self.rank, self.world, self.backend = rank, world, backend

    @classmethod
    def join(cls, rank: int, world: int, init_method: str, backend: str) -> "TPGroup":
        import torch.distributed as dist

        if dist.is_initialized():
            raise TensorParallelError("tensor_parallel: this process already has a torch.distributed group "
                                      "(another tensor-parallel engine is open): close it first")
        if backend == "nccl":
            switches.disable_nvlink_multicast()
            torch.cuda.set_device(rank)  # rank r runs on cuda:r; NCCL binds its communicator to it
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout())
        return cls(rank, world, backend)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n] from every rank -> [..., world * n], rank order along the last dim."""
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    def min_int(self, n: int, device: torch.device) -> int:
        """The smallest n over the ranks (the KV cache blocks: every scheduler must see the same count)."""
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
