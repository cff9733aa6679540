"""A temporary Prefect API for one CLI command, owned by pathflow rather than by Prefect.

Prefect's own ephemeral server is a plain child process: Ctrl-C to the terminal's process
group kills it while the flow still reports to it (the run then hangs), and a SIGKILLed CLI
leaves it running as an orphan. This one runs in its own session (a terminal's Ctrl-C does not
reach it) and asks the kernel to SIGTERM it when its parent dies (``PR_SET_PDEATHSIG``), so it
never outlives the command, however the command ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pathflow.errors import PathflowError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PROCS: list[subprocess.Popen] = []  # running servers of this process, for stop_all()
_TAIL_CHARS = 2000  # of the server's own output, shown when it fails to start
_STOPPED: set[str] = set()  # API URLs of temporary servers this process has stopped


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the atexit and signal paths still stop it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_log(port: int):
    """A file for the server's own output: ``PREFECT_HOME/logs/pathflow-server-<port>.log``, or an
    unnamed temporary file where PREFECT_HOME cannot be written (``check_prefect_env`` says so later)."""
    import tempfile

    try:
        from prefect.settings import Settings

        folder = Path(Settings().home).expanduser() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / f"pathflow-server-{port}.log", "w+b")  # noqa: SIM115 (closed in stop())
    except Exception:
        return tempfile.TemporaryFile()


def launch_server() -> tuple[subprocess.Popen, str]:
    """Start ``uvicorn prefect.server.api.server:create_app`` on a free loopback port (SQLite in
    PREFECT_HOME, as Prefect's ephemeral mode does) and return at once: (process, api_url). It boots
    while the caller goes on (importing PyTorch, say); ``wait_healthy`` waits for it.

    Its output goes to a file, not the terminal: stopped in the middle of a request (the command
    interrupted), uvicorn prints a traceback that is no failure of the run. The file's tail is shown
    when the server fails to start; a file left non-empty is kept for a look later."""
    import prefect

    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    out = _server_log(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_die_with_parent)
    proc.pathflow_log = out  # type: ignore[attr-defined]
    _PROCS.append(proc)
    return proc, f"http://127.0.0.1:{port}/api"


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    """Wait until a launched server answers; stop it and raise if it exits or does not answer."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = _tail(proc)
                stop(proc)
                raise PathflowError(f"the temporary Prefect server exited with code {proc.returncode}; "
                                    f"set PREFECT_API_URL to a running server instead{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
    tail = _tail(proc)
    stop(proc)
    raise PathflowError(f"the temporary Prefect server did not answer within {timeout:.0f} s; "
                        f"set PREFECT_API_URL to a running server instead{tail}")


def _tail(proc: subprocess.Popen) -> str:
    """The end of a launched server's own output, a few indented lines ('' when it wrote none)."""
    f = getattr(proc, "pathflow_log", None)
    if f is None or f.closed:
        return ""
    with contextlib.suppress(OSError):
        f.flush()
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _TAIL_CHARS))
        # the lines a person reads (the error and uvicorn's verdict), not a traceback's frames
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()
                 if ln.strip() and not ln[:1].isspace() and not ln.startswith("Traceback")]
        if lines:
            where = f" (all of it in {f.name})" if isinstance(f.name, str) else ""
            return f"\nits last output{where}:\n" + "\n".join("  " + ln[:300] for ln in lines[-3:])
    return ""


def check_prefect_env(reach: bool = False) -> None:
    """Prefect's own settings, checked before any work: PREFECT_HOME a writable folder (the temporary
    server keeps its database there), PREFECT_API_URL — when set — an http(s) URL, and with ``reach``
    one that answers (asked only once everything local is checked: no server is contacted before)."""
    from urllib.parse import urlsplit

    import httpx

    try:
        from prefect.settings import Settings

        settings = Settings()  # read now, from the environment and the profile (not a cached copy)
        home, api = Path(settings.home).expanduser(), settings.api.url
    except Exception as e:  # Prefect refuses its own settings (a malformed value)
        raise PathflowError(f"Prefect's settings cannot be read: {str(e).splitlines()[0][:200]}") from None
    if home.exists() and not home.is_dir():
        raise PathflowError(f"PREFECT_HOME {home} is a file, not a folder: set PREFECT_HOME to a writable folder")
    probe = home
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PathflowError(f"PREFECT_HOME {home} cannot be written (Prefect keeps its database there): set "
                            "PREFECT_HOME to a writable folder")
    if not api:
        return
    parts = urlsplit(str(api))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PathflowError(f"PREFECT_API_URL={str(api)[:80]!r} is not an http(s) URL: give the server's API, e.g. "
                            "http://127.0.0.1:4200/api, or unset it for a temporary server")
    if not reach:
        return
    try:
        with httpx.Client(timeout=10) as client:
            code = client.get(f"{str(api).rstrip('/')}/health").status_code
    except httpx.HTTPError as e:
        raise PathflowError(f"the Prefect API at PREFECT_API_URL={str(api)[:80]} does not answer "
                            f"({type(e).__name__}): start that server, or unset PREFECT_API_URL for a temporary "
                            "one") from None
    if code != 200:
        raise PathflowError(f"PREFECT_API_URL={str(api)[:80]} answered HTTP {code} at /health: is it a Prefect "
                            "server's API (ending in /api)?")


def early_server() -> tuple[subprocess.Popen, str] | None:
    """A temporary server launched now, for ``prefect_api(early)`` later, when no PREFECT_API_URL is
    set (None otherwise): it boots while the command imports the flows."""
    from prefect.settings import PREFECT_API_URL

    return None if PREFECT_API_URL.value() else launch_server()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    f = getattr(proc, "pathflow_log", None)
    if f is not None and not f.closed:
        with contextlib.suppress(OSError):
            empty = f.seek(0, os.SEEK_END) == 0
            f.close()
            if isinstance(f.name, str):
                if empty:
                    os.unlink(f.name)
                else:
                    log.debug("the temporary Prefect server's output is in %s", f.name)
    if proc in _PROCS:
        _PROCS.remove(proc)


def stop_all() -> None:
    """Stop every server this process started (used on a hard exit)."""
    for proc in list(_PROCS):
        with contextlib.suppress(Exception):
            stop(proc)


@contextlib.contextmanager
def prefect_api(early: tuple[subprocess.Popen, str] | None = None) -> Iterator[str | None]:
    """The API flows of this command report to: ``PREFECT_API_URL`` when set, else a temporary
    server for the duration of the block (``early``: one ``early_server`` launched). Yields the URL
    (None: the caller's own setting)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if early is None and PREFECT_API_URL.value():
        check_prefect_env(reach=True)  # a server that does not answer is one line now, not a failure mid-run
        yield None
        return
    proc, url = early or launch_server()
    try:
        wait_healthy(proc, url)
        # no heartbeats: they tell a lasting server that a run's process died; this server dies with
        # it, and stopping the heartbeat thread kept the run waiting up to a second at its end
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            try:
                yield url
            finally:
                _drain()  # send queued logs and events while the server still answers
    finally:
        stop(proc)
        if not _STOPPED:
            _no_logs_to_stopped_servers()
        _STOPPED.add(url)


def used_temporary_server() -> bool:
    """This process started (and has stopped) a temporary server: Prefect's sends still queued at its exit
    have nowhere to go."""
    return bool(_STOPPED)


def _no_logs_to_stopped_servers() -> None:
    """Installed at the first stop: Prefect logs emitted after a temporary server stopped (a task thread
    still unwinding after Ctrl-C, a late record on the main thread) are shown on the console but not queued
    for the API: queued, they held the process's exit ~1 min while Prefect's client retried the dead server,
    or, with no API URL left, made Prefect boot an ephemeral server of its own just to send them."""
    from prefect.logging.handlers import APILogWorker, set_api_log_sink
    from prefect.settings import PREFECT_API_URL

    def sink(record: dict) -> None:
        url = PREFECT_API_URL.value()  # the emitting thread's own setting
        if url is None or url in _STOPPED:
            return
        APILogWorker.instance().send(record)

    set_api_log_sink(sink)


def _drain(timeout: float = 5.0) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)
