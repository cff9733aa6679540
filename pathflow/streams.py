"""Independent batches of model work on several CPU streams.

On a CPU, PyTorch splits each operator over the process's cores. A graph's replays and backwards, or
a batch of texts read for the tokens step, are many mid-sized operators with Python between them,
and two cores split those poorly: at the real shapes on a 2-core machine, one prompt's kept features'
backwards took 22.3 s on two streams of one intra-op thread each against 29.8 s on one stream of two, its
replays 11.3 s against 15.1 s, and the pathways step 81 s against 100 s (docs/benchmarks.md, stop 33).

``stream_map`` runs independent items on ``n`` long-lived stream threads instead, the cores split
between them, and returns the results in the items' order; ``run_on_stream`` runs one whole call on a
free stream (the pathways step's sub-batches, handed over by Prefect's task threads). Each item is a
whole batch (its own forward, its hooks, its out-of-memory back-off); the model is shared read-only, and
``model.resid_hooks`` and the prefix attention are per thread, so two streams' forwards do not see each
other's hooks.

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
from concurrent.futures import Future
from typing import TypeVar

import torch

from .compute_thread import run_on_compute_thread, serve_calls

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_LOCK = threading.Lock()
_CONFIGURED = False  # ``configure`` has run in this process (the context does, when it loads the model)
_STREAMS = 1
_THREADS = 1  # intra-op threads of each stream
# PyTorch's default for a thread's intra-op threads: a stream thread setting its own also changes it for
# threads started later, so it is put back once the streams have started
_DEFAULT_THREADS = torch.get_num_threads()
_LOCAL = threading.local()  # .inside: this thread is running a stream's item


def default_streams(device: torch.device) -> int:
    """2 on a CPU with at least 2 cores, else 1."""
    return 2 if device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def configure(streams: int | None, device: torch.device) -> int:
    """Run ``stream_map`` on ``streams`` streams from now on (None: ``default_streams``); 1 on a GPU.
    Each stream gets an equal share of the process's intra-op threads. Returns the number set."""
    global _STREAMS, _THREADS, _CONFIGURED
    n = default_streams(device) if streams is None else streams
    if device.type != "cpu":
        n = 1
    with _LOCK:
        cores = _DEFAULT_THREADS  # the process's intra-op threads (its cores, unless set otherwise)
        n = max(1, min(n, cores))
        _STREAMS, _THREADS, _CONFIGURED = n, max(1, cores // n), True
    if n > 1:
        log.debug("%d streams of %d intra-op thread(s) each", n, _THREADS)
    return n


def streams() -> int:
    return _STREAMS


def configured() -> bool:
    return _CONFIGURED


def stream_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` on the streams, the items taken in order by whichever stream is free; the
    results in the items' order. The first exception stops the streams taking more items and is raised here
    once the items in hand are done. Inside an item (or with one stream) it is the plain loop."""
    n = min(_STREAMS, len(items))
    if n <= 1 or getattr(_LOCAL, "inside", False):
        return [fn(x) for x in items]
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    next_item = iter(range(len(items)))
    take = threading.Lock()

    def work() -> None:
        while not errors:
            with take:
                i = next(next_item, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # handed to the caller
                errors.append(e)

    calls = _calls()
    waiting = [Future() for _ in range(n)]
    for fut in waiting:
        calls.put((fut, contextvars.copy_context(), work, (), {}))
    try:
        for fut in waiting:
            fut.result()
    except BaseException as e:  # the caller interrupted: the streams take no more items
        errors.append(e)
        raise
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


def _serve(q: queue.SimpleQueue, threads: int, started: threading.Barrier) -> None:
    torch.get_num_threads()  # PyTorch's first use in a thread sets its default: before ours, not over it
    torch.set_num_threads(threads)
    started.wait()
    _LOCAL.inside = True  # a stream_map inside runs inline
    serve_calls(q)


def _calls() -> queue.SimpleQueue:
    global _CALLS, _CALLS_THREADS
    with _LOCK:
        alive = [t for t in _SERVERS if t.is_alive()]
        if _CALLS is None or len(alive) != _STREAMS or _CALLS_THREADS != _THREADS:
            if _CALLS is not None:  # reconfigured: the old servers finish what they hold and stop taking calls
                for _ in alive:
                    _CALLS.put(None)
            _CALLS, _CALLS_THREADS = queue.SimpleQueue(), _THREADS
            started = threading.Barrier(_STREAMS + 1)
            _SERVERS[:] = [threading.Thread(target=_serve, args=(_CALLS, _THREADS, started), daemon=True,
                                            name=f"pathflow-stream-{i}") for i in range(_STREAMS)]
            for t in _SERVERS:
                t.start()
            started.wait()
            torch.set_num_threads(_DEFAULT_THREADS)  # the default for threads started later, as it was
        return _CALLS


def run_on_stream(fn: Callable[..., R], /, *args, **kwargs) -> R:
    """``fn(*args, **kwargs)`` on a free stream (the caller waits, with its context variables); with one
    stream, on the process's compute thread (``pathflow.compute_thread``); on a stream already, inline."""
    if getattr(_LOCAL, "inside", False):
        return fn(*args, **kwargs)
    if _STREAMS <= 1:
        return run_on_compute_thread(fn, *args, **kwargs)
    fut: Future = Future()
    _calls().put((fut, contextvars.copy_context(), fn, args, kwargs))
    return fut.result()
