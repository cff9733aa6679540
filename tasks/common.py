"""Shared by the tasks: the run folder a task writes into, and step bookkeeping."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from pathflow import interrupt
from storage.store import Run, Store


def open_run(store_url: str, run_id: str) -> Run:
    return Store(store_url).run(run_id)


def browse_url(run: Run) -> str | None:
    """A web page showing the run folder, where the store has one (AWS S3, Google Cloud Storage)."""
    if run.store.is_local or os.environ.get("AWS_ENDPOINT_URL"):
        return None  # a local path or a private S3-compatible server: no page to link
    bucket, _, prefix = run.path.partition("/")
    proto = run.fs.protocol if isinstance(run.fs.protocol, str) else run.fs.protocol[0]
    if proto in ("s3", "s3a"):
        return f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={prefix}/"
    if proto in ("gs", "gcs"):
        return f"https://console.cloud.google.com/storage/browser/{bucket}/{prefix}"
    return None


def run_folder_artifact(run: Run, status: str) -> None:
    """The ``pathflow-run-folder`` markdown artifact: where the run, its report and summary are, and how
    to check it (a local path cannot be a link in the UI; an object store's console page can)."""
    from prefect.artifacts import create_markdown_artifact

    page = browse_url(run)
    lines = [f"### pathflow run `{run.run_id}`: {status}", "", "| what | where |", "|---|---|",
             f"| run folder | `{run.url}`" + (f" ([open]({page}))" if page else "") + " |",
             f"| report (index) | `{run.url}/integrated/report.html` |",
             f"| feature pages | `{run.url}/integrated/features/<feature>.html` |",
             f"| summary table | `{run.url}/integrated/summary.csv` |", "",
             f"Check every output against the manifest: `pathflow runs verify {run.run_id} --store {run.store.url}`"]
    create_markdown_artifact(key="pathflow-run-folder", markdown="\n".join(lines),
                             description=f"where run {run.run_id} is")


def reset_peak_rss() -> None:
    """Start a new peak of this process's resident memory (Linux: ``5`` to /proc/self/clear_refs). This
    resets what ``getrusage``'s ``ru_maxrss`` reports too: a run's peak is the largest of its steps'."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory since the last ``reset_peak_rss`` (VmHWM), else since it started."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def step(run: Run, name: str, **info):
    """Mark a pipeline step running, then done (with its wall time and the process's peak resident
    memory during it) or failed in the manifest."""
    interrupt.check()
    t0 = time.perf_counter()
    run.step(name, "running", **info)
    reset_peak_rss()
    try:
        yield
    except BaseException as e:
        run.step(name, "failed", error=f"{type(e).__name__}: {e}", seconds=round(time.perf_counter() - t0, 3),
                 peak_rss_bytes=peak_rss_bytes())
        raise
    run.step(name, "done", seconds=round(time.perf_counter() - t0, 3), peak_rss_bytes=peak_rss_bytes())
