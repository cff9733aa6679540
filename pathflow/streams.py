"""Independent batches of model work on several CPU streams.

On a CPU, PyTorch splits each operator over the process's cores. A graph's replays and backwards, or
a batch of texts read for the tokens step, are many mid-sized operators with Python between them,
and two cores split those poorly: at the real shapes on a 2-core machine, a batch of kept features'
backwards took 8.1 s on one stream of two intra-op threads against 6.9 s on two streams of one each
(docs/benchmarks.md, stop 33). ``stream_map`` runs independent items on ``n`` streams instead — the
calling thread and ``n − 1`` long-lived helper threads, the cores split between them — and returns
the results in the items' order. Each item is a whole batch (its own forward, its hooks, its
out-of-memory back-off); the model is shared read-only, and ``model.resid_hooks`` and the prefix
attention are per thread, so two streams' forwards do not see each other's hooks.

On a GPU there is one stream: kernels are queued in order whatever thread sends them.
``configure`` sets the number for the process (``model.streams`` in the config; the context calls it).
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_LOCK = threading.Lock()
_STREAMS = 1
_THREADS = 1  # intra-op threads of each stream
_POOL: ThreadPoolExecutor | None = None
_LOCAL = threading.local()  # .inside: this thread is running a stream's item


def default_streams(device: torch.device) -> int:
    """2 on a CPU with at least 2 cores, else 1."""
    return 2 if device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def configure(streams: int | None, device: torch.device) -> int:
    """Run ``stream_map`` on ``streams`` streams from now on (None: ``default_streams``); 1 on a GPU.
    Each stream gets an equal share of the process's intra-op threads. Returns the number set."""
    global _STREAMS, _THREADS, _POOL
    n = default_streams(device) if streams is None else streams
    if device.type != "cpu":
        n = 1
    with _LOCK:
        cores = torch.get_num_threads()  # the process's intra-op threads (its cores, unless set otherwise)
        n = max(1, min(n, cores))
        if n != _STREAMS and _POOL is not None:
            _POOL.shutdown(wait=True)
            _POOL = None
        _STREAMS, _THREADS = n, max(1, cores // n)
    if n > 1:
        log.debug("%d streams of %d intra-op thread(s) each", n, _THREADS)
    return n


def streams() -> int:
    return _STREAMS


def _helper_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_STREAMS - 1, thread_name_prefix="pathflow-stream",
                                       initializer=_helper_init, initargs=(_THREADS,))
        return _POOL


def stream_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``, the items taken in order by whichever stream is free; the results in
    the items' order. The first exception stops the streams taking more items and is raised here once
    the items in hand are done. Inside an item (or with one stream) it is the plain loop."""
    n = min(_STREAMS, len(items))
    if n <= 1 or getattr(_LOCAL, "inside", False):
        return [fn(x) for x in items]
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    next_item = iter(range(len(items)))
    take = threading.Lock()

    def work() -> None:
        _LOCAL.inside = True
        try:
            while not errors:
                with take:
                    i = next(next_item, None)
                if i is None:
                    return
                try:
                    results[i] = fn(items[i])
                except BaseException as e:  # handed to the caller
                    errors.append(e)
        finally:
            _LOCAL.inside = False

    pool = _pool()
    helpers: list[Future] = [pool.submit(contextvars.copy_context().run, work) for _ in range(n - 1)]
    before = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        work()
    finally:
        for h in helpers:
            h.result()
        torch.set_num_threads(before)
    if errors:
        raise errors[0]
    return results


# -- whole calls on a stream: the pathways step's sub-batches -------------------------------------------
# Prefect runs the pathways step's batches as mapped tasks on threads of its own; each hands its model work
# to ``on_stream``: with several streams, to whichever of the long-lived stream threads is free (each with
# its share of the intra-op threads), so that two batches' Jacobians and replays run at once; with one, to
# the process's compute thread as before.
_CALLS: queue.SimpleQueue | None = None
_CALLS_THREADS = 0  # the intra-op threads ``_CALLS``' servers were started with
_SERVERS: list[threading.Thread] = []


def _serve(q: queue.SimpleQueue, threads: int) -> None:
    torch.set_num_threads(threads)
    _LOCAL.inside = True  # a stream_map inside runs inline
    while True:
        fut, ctx, fn, args, kwargs = q.get()
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fut.set_result(ctx.run(fn, *args, **kwargs))
        except BaseException as e:  # handed to the caller, which raises it
            fut.set_exception(e)
        del fut, ctx, fn, args, kwargs


def _calls() -> queue.SimpleQueue:
    global _CALLS, _CALLS_THREADS
    with _LOCK:
        alive = [t for t in _SERVERS if t.is_alive()]
        if _CALLS is None or len(alive) != _STREAMS or _CALLS_THREADS != _THREADS:
            if _CALLS is not None:  # reconfigured: the old servers finish what they hold and stop taking calls
                for _ in alive:
                    _CALLS.put((_STOP, None, None, None, None))
            _CALLS, _CALLS_THREADS = queue.SimpleQueue(), _THREADS
            _SERVERS[:] = [threading.Thread(target=_serve, args=(_CALLS, _THREADS), name=f"pathflow-stream-call-{i}",
                                            daemon=True) for i in range(_STREAMS)]
            for t in _SERVERS:
                t.start()
        return _CALLS


class _Stop:
    def set_running_or_notify_cancel(self) -> bool:
        raise SystemExit  # ends the server thread quietly


_STOP = _Stop()


def run_on_stream(fn: Callable[..., R], /, *args, **kwargs) -> R:
    """``fn(*args, **kwargs)`` on a free stream (the caller waits, with its context variables); with one
    stream, on the process's compute thread (``pathflow.compute_thread``); on a stream already, inline."""
    from .compute_thread import run_on_compute_thread

    if getattr(_LOCAL, "inside", False):
        return fn(*args, **kwargs)
    if _STREAMS <= 1:
        return run_on_compute_thread(fn, *args, **kwargs)
    fut: Future = Future()
    _calls().put((fut, contextvars.copy_context(), fn, args, kwargs))
    return fut.result()
