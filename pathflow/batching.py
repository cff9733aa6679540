"""Batches of targets, out-of-memory back-off and per-batch memory accounting.

The batch size is the one knob that trades memory for speed (k targets = k rows in one
backward). A batch that runs out of memory is split in half and retried, down to one target,
with the allocator's cache freed in between; rows are independent, so the results do not
depend on the batch size. A Prefect retry gets the same halving from its attempt number
(``batch_size_for_attempt``).

``PATHFLOW_SIMULATE_OOM_ABOVE=N`` makes any batch larger than N raise out-of-memory, so the
back-off can be exercised on a CPU.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

SIMULATE_ENV = "PATHFLOW_SIMULATE_OOM_ABOVE"


class SimulatedOutOfMemory(torch.OutOfMemoryError):
    """Raised for batches above ``PATHFLOW_SIMULATE_OOM_ABOVE``."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def check_memory(batch_len: int) -> None:
    """Raise a (simulated) out-of-memory error if the batch exceeds ``PATHFLOW_SIMULATE_OOM_ABOVE``."""
    from .envvars import SIMULATE_OOM_ABOVE

    limit = SIMULATE_OOM_ABOVE.read()
    if limit >= 0 and batch_len > limit:
        raise SimulatedOutOfMemory(f"CUDA out of memory (simulated: batch of {batch_len} > {SIMULATE_ENV}={limit})")


def batch_size_for_attempt(base: int, attempt: int) -> int:
    """Batch size of retry ``attempt`` (1 = first try): halved each time, down to 1."""
    return max(1, base >> max(0, attempt - 1))


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def free_memory() -> None:
    """Give the CUDA caching allocator's blocks back (a cycle can hold a tensor: collect it first). On
    the CPU tensors go back as their last reference does, and a collection per split costs seconds."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def run_with_backoff(fn: Callable[[Sequence[T]], R], items: Sequence[T], on_split=None) -> list[tuple[Sequence[T], R]]:
    """``fn(items)``; on out-of-memory, the two halves separately (recursively, down to one item).

    Returns [(sub-batch, result)] in order. ``on_split(len)`` is called before each split.
    """
    try:
        check_memory(len(items))
        return [(items, fn(items))]
    except Exception as e:  # torch raises OutOfMemoryError; some backends a RuntimeError saying so
        if not is_oom(e) or len(items) <= 1:
            raise
        log.warning("out of memory on a batch of %d: retrying as two batches of %d and %d (%s)",
                    len(items), len(items) // 2, len(items) - len(items) // 2, e)
        if on_split:
            on_split(len(items))
    free_memory()
    half = len(items) // 2
    return run_with_backoff(fn, items[:half], on_split) + run_with_backoff(fn, items[half:], on_split)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak device memory since ``reset_peak`` on CUDA; the process's resident memory on CPU."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    try:
        with open("/proc/self/status") as fh:
            rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": "process_rss", "bytes": rss}
