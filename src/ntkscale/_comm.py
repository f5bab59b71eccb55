"""Collectives over a ``torch.distributed`` process group that fail with a clear error.

Every collective the library makes goes through :func:`collective`: a rank that died, raised
outside a collective, or never reached it makes the others' call fail (at once when its
connection closes, else at the process group's timeout), and that failure is re-raised as a
:class:`DistributedError` naming the operation and this rank. Nothing here knows of networks.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistributedError", "all_gather", "all_reduce_sum", "collective", "group_rank", "group_size"]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed, or another rank reported an error, so this rank stops too."""


def group_rank(group) -> int:
    return dist.get_rank(group)


def group_size(group) -> int:
    return dist.get_world_size(group)


def collective(what: str, group, fn: Callable[[], T]) -> T:
    """Run ``fn`` (one or more collectives on ``group``) and turn a failure into a clear error."""
    try:
        return fn()
    except RuntimeError as err:  # DistBackendError, DistNetworkError, gloo/NCCL timeouts
        if isinstance(err, DistributedError):
            raise
        rank, world = group_rank(group), group_size(group)
        raise DistributedError(
            f"rank {rank} of {world}: {what} failed: another rank died, raised outside a collective, "
            f"or did not reach it within the process group's timeout (set by "
            f"torch.distributed.init_process_group(timeout=...)). Cause: {type(err).__name__}: {err}"
        ) from err


def all_reduce_sum(t: torch.Tensor, group, what: str = "an all-reduce") -> torch.Tensor:
    """The sum of ``t`` over the ranks of ``group`` (a new tensor; ``t`` is left as it was)."""
    out = t.detach().clone().contiguous()
    collective(what, group, lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group))
    return out


def all_gather(t: torch.Tensor, group, what: str = "an all-gather") -> list[torch.Tensor]:
    """``t`` from every rank of ``group`` (same shape on every rank), in rank order."""
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(group_size(group))]
    collective(what, group, lambda: dist.all_gather(out, t, group=group))
    return out
