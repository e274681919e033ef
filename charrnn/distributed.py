"""Data-parallel training on PyTorch's own engine: torch.distributed + DDP, via torchrun.

    torchrun --nproc_per_node=N -m charrnn train corpus.txt ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `init_from_env` joins
the group (NCCL on CUDA GPUs, gloo on CPUs) with a timeout, so a rank that dies brings
the others down with an error instead of a hang. `--batch-size` is always the global
batch: each of the N ranks takes batch_size / N of the streams (or windows).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from charrnn.errors import UsageError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's share of the global batch's rows (streams)."""
        if batch_size % self.world_size:
            raise UsageError(f"--batch-size {batch_size} must be a multiple of the number of ranks ({self.world_size})")
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def current() -> Group:
    """The process group this process belongs to (a group of one when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_spec: str) -> Group:
    """Join the torchrun group, if launched by torchrun: NCCL when training on CUDA, else gloo."""
    if not launched_by_torchrun():
        return Group()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    timeout = timedelta(seconds=float(os.environ.get("CHARRNN_DIST_TIMEOUT", "600")))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return current()


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank drives the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and current().world_size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shutdown(clean: bool = True) -> None:
    """Leave the group. After a clean run every rank first waits for the others: a rank
    tearing gloo down while a peer still talks to it aborts the peer."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End a torchrun rank's process now, skipping the interpreter's own teardown.

    After the group was destroyed, about 1 launch in 40 on a loaded 2-core machine had a
    rank abort at exit ("terminate called without an active exception", no Python frame
    left: PyTorch's C++ teardown of gloo), which turned a finished run into exit code 1
    (measured before and after the start mix: 1 of 40, 1 of 40, 1 of 50; with this exit,
    0 of 100). By then everything charrnn writes is closed and checkpoints are fsynced,
    so the rank flushes its streams and exits at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks (a no-op in one process)."""
    if current().world_size > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def agree(stop: bool, elapsed_s: float, device: torch.device) -> tuple[bool, float]:
    """Whether any rank stops (Ctrl-C) and the largest elapsed time: every rank takes the
    same decision and the same clock. One process: its own."""
    if current().world_size == 1:
        return stop, elapsed_s
    flags = torch.tensor([float(stop), elapsed_s], dtype=torch.float64, device=device)
    all_reduce(flags, "max")
    return bool(flags[0].item()), flags[1].item()


def gather_rows(tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's tensor along dim, in rank order (the full carried state)."""
    group = current()
    if group.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(group.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def broadcast_text(text: str | None) -> str:
    """Rank 0's text, on every rank (without broadcast_object_list, which needs numpy)."""
    if current().world_size == 1:
        return text
    data = (text or "").encode("utf-8") if current().is_main else b""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    length = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(length, src=0)
    buffer = torch.zeros(int(length), dtype=torch.uint8, device=device)
    if current().is_main and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).decode("utf-8")
