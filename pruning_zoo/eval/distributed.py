"""The processes of one sweep: one, or several started by `accelerate launch` or `torchrun` (which set RANK,
WORLD_SIZE and LOCAL_RANK). lmms-eval splits each task's documents across them; rank 0 writes the results."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


class Ranks:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local = int(os.environ.get("LOCAL_RANK", 0))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def default_device(self) -> str:
        """This process's GPU (cuda:LOCAL_RANK), or the CPU."""
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{self.local}" if self.world > 1 else "cuda"

    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL between GPUs, gloo between CPU processes)."""
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, on every rank, in rank order."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def finish(self) -> None:
        """Leave the process group this sweep joined."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class ProcessGroupAccelerator:
    """What lmms-eval asks of `lm.accelerator` in a multi-process run (`gather`, `wait_for_everyone`), over
    the process group the sweep joined. accelerate's own gather hands lmms-eval a scalar for the 0-dim
    counts it gathers between CPU processes, and gloo has no all_gather_into_tensor for lmms-eval's torchrun
    path; this works with gloo and NCCL alike."""

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.reshape(1) if tensor.ndim == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def wait_for_everyone(self) -> None:
        dist.barrier()
