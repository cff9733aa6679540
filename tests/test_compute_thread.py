"""One thread for a process's tensor work (``pathflow.compute_thread``): whoever calls, the work runs on
one thread, so PyTorch's OpenMP keeps one team of workers instead of one per Prefect task thread."""

import contextvars
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pathflow.compute_thread import is_compute_thread, on_compute_thread, run_on_compute_thread

VAR = contextvars.ContextVar("VAR", default="unset")


def native_threads() -> int:
    """The process's OS threads that Python did not start (OpenMP's workers among them)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def settled_native_threads() -> int:
    """``native_threads`` once the workers of threads that ended have gone (they exit after them)."""
    n, deadline = native_threads(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        n, before = native_threads(), n
        if n == before:
            break
    return n


def parallel_op() -> float:
    return float(torch.ones(4_000_000).exp().sum())  # far above ATen's grain size: runs on the OpenMP team


def test_work_from_many_threads_runs_on_one_with_the_callers_context():
    seen = []

    @on_compute_thread
    def work(i: int) -> tuple[int, str]:
        seen.append(threading.get_ident())
        if i == 3:
            raise KeyError(i)
        return i * i, VAR.get()

    def call(i: int):
        VAR.set(f"caller {i}")
        return work(i)

    with ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(call, i) for i in range(6)]
        results = [f.exception() or f.result() for f in futs]
    assert results[:3] == [(0, "caller 0"), (1, "caller 1"), (4, "caller 2")] and results[4:] == [
        (16, "caller 4"), (25, "caller 5")]
    assert isinstance(results[3], KeyError) and results[3].args == (3,)  # the work's own, to its caller
    assert len(set(seen)) == 1 and seen[0] != threading.get_ident() and seen[0] not in {
        t.ident for t in pool._threads}
    # a call made on the compute thread runs inline (no deadlock waiting on itself)
    assert run_on_compute_thread(lambda: run_on_compute_thread(is_compute_thread)) is True
    assert not is_compute_thread()


def test_compute_thread_off_runs_on_the_caller(monkeypatch):
    monkeypatch.setenv("PATHFLOW_COMPUTE_THREAD", "0")
    assert run_on_compute_thread(threading.get_ident) == threading.get_ident()


@pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs OpenMP teams of 2+ threads and Linux's /proc")
def test_threads_handing_work_over_add_no_openmp_teams():
    """Each thread that runs a parallel operator itself gets a team of get_num_threads() − 1 workers,
    alive as long as it is; handed to the compute thread, the work of any number of threads uses one."""
    run_on_compute_thread(parallel_op)  # the compute thread's own team, made once

    def teams_added(fn) -> int:
        started, release = threading.Barrier(5), threading.Event()

        def in_thread():
            fn()
            started.wait()
            release.wait()  # alive while counted

        before = settled_native_threads()
        threads = [threading.Thread(target=in_thread) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait()
        added = native_threads() - before
        release.set()
        for t in threads:
            t.join()
        return added

    assert teams_added(parallel_op) >= 4 * (torch.get_num_threads() - 1)  # the premise: a team per thread
    assert teams_added(lambda: run_on_compute_thread(parallel_op)) == 0


def test_a_prefect_task_runs_on_the_compute_thread_with_its_run_context():
    from prefect import flow, get_run_logger, task, unmapped
    from prefect.runtime import task_run
    from prefect.testing.utilities import prefect_test_harness

    @task(task_run_name="item-{i}")
    @on_compute_thread
    def item(i: int, tag: str) -> tuple[str, str, bool]:
        get_run_logger().info("item %d", i)  # needs the task run's context, carried over
        return task_run.name, tag, is_compute_thread()

    @flow
    def mapped() -> list:
        return [f.result() for f in item.map(range(4), unmapped("t"))] + [item(9, "direct")]

    with prefect_test_harness(server_startup_timeout=120):
        out = mapped()
    assert out == [(f"item-{i}", "t", True) for i in range(4)] + [("item-9", "direct", True)]
