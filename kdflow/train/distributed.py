"""Data-parallel training under ``torchrun``: the process group, ranks, and each rank's batch share.

``torchrun --nproc-per-node N`` starts N copies of a command with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. ``init_from_env`` joins them (gloo on CPU,
nccl on CUDA, each rank on ``cuda:LOCAL_RANK``); ``fit`` then wraps the model in
``DistributedDataParallel`` and gives each rank its contiguous share of every global batch, so the
optimiser sees the gradient one process would compute on the whole batch:

    grad = sum_r (n_r / n) * grad(mean loss over share r)     # what one process computes
         = mean_r grad(world * n_r / n * loss_r)              # what DDP's all-reduce averages

With a loss that is a mean over samples, and a model without batch statistics or random ops, the
run matches one process up to float reduction order. Batch norm normalises each share with its own
statistics (running statistics follow rank 0), and dropout draws its masks per rank, so such models
follow the one-process curve only statistically. Without torchrun every helper here does nothing.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from kdflow.errors import KdflowError

if TYPE_CHECKING:  # torch is imported where a group is made or used: asking whether this process is
    import torch  # the main one (a current `kdflow stage`) imports none
    from torch import nn

logger = logging.getLogger(__name__)

T = TypeVar("T")
MIN_SHARE = 2  # a share of one sample breaks batch norm (as a lone last batch does in one process)
TIMEOUT = timedelta(hours=1)  # longest wait in a collective: the others wait while rank 0 commits


class LaunchError(KdflowError):
    """Something was started under torchrun that cannot run there."""

    exit_code = 2


def _group() -> Any:
    """``torch.distributed`` when a process group is initialised, else None (while torch is not
    imported, none can be)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def launched() -> bool:
    """Whether this process is one of several that torchrun started (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> bool:
    """Join torchrun's process group: gloo for a CPU ``device``, nccl for CUDA (this process on
    ``cuda:LOCAL_RANK``). Returns whether it initialised a group (False without torchrun, or when
    one is already initialised)."""
    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return False
    if device.type not in ("cpu", "cuda"):
        raise LaunchError(f"device {device.type!r} cannot train data-parallel under torchrun; use cpu or cuda")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=TIMEOUT)
    rank, size = world()
    logger.info("rank %d of %d joined the %s process group", rank, size, backend)
    return True


def shutdown() -> None:
    """Leave the process group. No barrier: a rank that failed must not pass for one that is done."""
    dist = _group()
    if dist is not None:
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group; ``(0, 1)`` without one."""
    dist = _group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return world()[1] > 1


def is_main() -> bool:
    """Rank 0 of the group; before the group exists, torchrun's ``RANK`` (absent: main)."""
    dist = _group()
    if dist is not None:
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def train_device(device: torch.device) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for CUDA under DDP, else ``device``."""
    if device.type == "cuda" and is_distributed():
        import torch

        return torch.device("cuda", local_rank())
    return device


def shard(idx: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, int]:
    """This rank's share of the global batch ``idx`` and how many of its samples count.

    The batch is cut into contiguous shares, as equal as possible, of at least ``MIN_SHARE``
    samples each (ranks in order; a batch of one sample goes whole to rank 0). A rank left
    without samples still has to take part in the gradient all-reduce: it gets the batch's first
    samples as a stand-in, counted 0 (its loss is scaled by 0).

    Returns:
        ``(indices, n_r)``: the indices to run and the number of them that count.
    """
    n = len(idx)
    active = max(1, min(world_size, n // MIN_SHARE))
    if rank >= active:
        return idx[:MIN_SHARE], 0
    base, extra = divmod(n, active)
    start = rank * base + min(rank, extra)
    size = base + (rank < extra)
    return idx[start : start + size], size


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` under a group of several processes, else itself."""
    if not is_distributed():
        return model
    from torch import nn

    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _comm_device() -> torch.device:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (in float64)."""
    if not is_distributed():
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects; CPU tensors stay on the CPU)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (e.g. batch-norm running statistics) to every rank."""
    if is_distributed():
        import torch.distributed as dist

        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def barrier() -> None:
    """Wait until every rank is here (no-op without a group)."""
    if is_distributed():
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def check_stage(stage: str, allowed: tuple[str, ...]) -> None:
    """Refuse to run ``stage`` under torchrun with several processes unless it is ``allowed``."""
    if launched() and stage not in allowed:
        size = os.environ.get("WORLD_SIZE")
        raise LaunchError(
            f"stage {stage!r} cannot run under torchrun (WORLD_SIZE={size}): only "
            f"{', '.join(map(repr, allowed))} trains data-parallel; run `kdflow stage {stage}` "
            "without torchrun (one process), then the student under torchrun"
        )

