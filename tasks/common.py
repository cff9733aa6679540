"""Shared by the tasks: the run folder a task writes into, and step bookkeeping."""

from __future__ import annotations

import time
from contextlib import contextmanager

from pathflow import interrupt
from storage.store import Run, Store


def open_run(store_url: str, run_id: str) -> Run:
    return Store(store_url).run(run_id)


@contextmanager
def step(run: Run, name: str, **info):
    """Mark a pipeline step running, then done (with its wall time) or failed in the manifest."""
    interrupt.check()
    t0 = time.perf_counter()
    run.step(name, "running", **info)
    try:
        yield
    except BaseException as e:
        run.step(name, "failed", error=f"{type(e).__name__}: {e}", seconds=round(time.perf_counter() - t0, 3))
        raise
    run.step(name, "done", seconds=round(time.perf_counter() - t0, 3))
