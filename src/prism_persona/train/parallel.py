"""Data parallelism for distillation under ``accelerate launch`` or ``torchrun``.

Both launchers start one process per device and set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``.
PRISM then trains the LoRA data-parallel with plain ``torch.distributed``: each process takes every
``world``-th micro-batch of an optimisation step, the LoRA gradients are summed across processes
(all-reduce) before the optimiser step, and only rank 0 writes files. An optimisation step therefore
covers ``grad_accum × world`` micro-batches, and N processes give exactly the update of one process
with ``grad_accum × N`` (a test checks this on CPU with the gloo backend).

Without those variables (a plain ``prism distill``) everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch


class DataParallel:
    """The process group of one distillation run (or a single process)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.active = self.world > 1
        if self.active:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                if backend == "nccl":
                    torch.cuda.set_device(self.local_rank)
                dist.init_process_group(backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, configured: str) -> str:
        """One GPU per process under a launcher; the configured device otherwise."""
        if self.active and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return configured

    def shard(self, items: Sequence) -> list:
        """This process's share of one optimisation step's micro-batches."""
        return list(items[self.rank :: self.world]) if self.active else list(items)

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over all processes (missing ones count as zero)."""
        if not self.active:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def sum_scalar(self, value: float, device) -> float:
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()
