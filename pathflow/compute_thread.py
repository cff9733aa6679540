"""One thread for all of a process's tensor work.

PyTorch's CPU build runs parallel operators on GNU OpenMP, and every thread that runs one gets an
OpenMP team of its own that lives as long as the thread. Once a process's teams hold more threads
than it has CPUs, libgomp "throttles": its idle workers stop spinning between parallel regions
almost at once (100 spins instead of 300,000) and every operator pays a futex wake-up per worker.
Prefect runs each mapped task on a thread of its pool (a real-shape run's 62 pathway batches are 62
threads, alive until the flow ends), so a run held dozens of teams and its operators ran throttled:
on a 2-core machine, the same backwards ran 25–35% slower in such a thread than in the first thread
to use OpenMP, and the 1,536-feature demo study's graphs step took 16.5 s against 9.3 s on one thread
(docs/benchmarks.md, stop 30, has the side-by-side runs; at the real shapes, whose operators are
larger, the gain was small).

(The pathways step's sub-batches now go to ``pathflow.streams``: on a CPU, two long-lived threads of one
OpenMP thread each, so the teams still hold no more threads than there are cores; with one stream, here.)

``on_compute_thread`` runs a function on one long-lived thread of the process instead, the caller
waiting for it: one OpenMP team whatever thread (Prefect's or the main one) asks. The caller's
context variables go with the call, so Prefect's run context (its logger, ``prefect.runtime``)
works inside. A call made on the compute thread itself runs inline. The thread is a daemon: a
process that is exiting (Ctrl-C) does not wait for the work in hand, which checks ``interrupt``
between its units anyway. ``PATHFLOW_COMPUTE_THREAD=0`` turns it off (to measure it). On a GPU
nothing changes but where the host code runs: model work was one batch at a time already.
"""

from __future__ import annotations

import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import ParamSpec, TypeVar

from .envvars import COMPUTE_THREAD

P = ParamSpec("P")
R = TypeVar("R")

_LOCK = threading.Lock()
_QUEUE: queue.SimpleQueue | None = None
_THREAD: threading.Thread | None = None


def serve_calls(q: queue.SimpleQueue) -> None:
    """Run the calls put on ``q`` (future, context, fn, args, kwargs) one after another until a ``None``;
    each call's result or error goes to its future. The loop of the compute thread and of each stream thread."""
    while (call := q.get()) is not None:
        fut, ctx, fn, args, kwargs = call
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fut.set_result(ctx.run(fn, *args, **kwargs))
        except BaseException as e:  # handed to the caller, which raises it
            fut.set_exception(e)
        del call, fut, ctx, fn, args, kwargs  # nothing of a finished call kept alive while waiting for the next


def _queue() -> queue.SimpleQueue:
    global _QUEUE, _THREAD
    with _LOCK:
        if _THREAD is None or not _THREAD.is_alive():
            _QUEUE = queue.SimpleQueue()
            _THREAD = threading.Thread(target=serve_calls, args=(_QUEUE,), name="pathflow-compute", daemon=True)
            _THREAD.start()
        return _QUEUE


def is_compute_thread() -> bool:
    return _THREAD is not None and threading.current_thread() is _THREAD


def run_on_compute_thread(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` on the process's compute thread, with the caller's context variables;
    returns its result or raises its exception. Calls from several threads run one at a time, in the
    order they came."""
    if is_compute_thread() or not COMPUTE_THREAD.read():
        return fn(*args, **kwargs)
    fut: Future = Future()
    _queue().put((fut, contextvars.copy_context(), fn, args, kwargs))
    return fut.result()


def on_compute_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: every call of ``fn`` runs on the compute thread (``run_on_compute_thread``). Its
    signature is kept (``functools.wraps``), so Prefect's ``@task`` above it sees ``fn``'s parameters."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return run_on_compute_thread(fn, *args, **kwargs)

    return wrapper
