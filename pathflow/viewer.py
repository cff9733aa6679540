"""``pathflow graphs RUN``: a run's attribution graphs in circuit-tracer's page, served locally.

The page (circuit-tracer's ``frontend/assets``) is circuit-tracer's, not pathflow's: it is taken
from an installed circuit-tracer or from a folder given. It is served as circuit-tracer's own
``local_server`` serves it — static files, with ``/data/`` and ``/graph_data/`` answered from the
run's ``integrated/graphs/`` — so the run's files are read from its store (a folder or S3) as they are.
"""

from __future__ import annotations

import functools
import http.server
import re
from pathlib import Path

from .errors import PathflowError
from .graphs import GRAPHS_DIR as GRAPHS

LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "localhost.localdomain"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.json$")  # a graph file's name; nothing that leaves the folder
INSTALL = ("circuit-tracer's page is not installed here: `pip install --no-deps circuit-tracer==0.5.0` (only its "
           "frontend is used), or give --frontend with the folder of its frontend/assets")


def frontend_dir(given: Path | None = None) -> Path:
    """The folder of circuit-tracer's page: ``given``, else the installed circuit-tracer's."""
    if given is not None:
        if not (given / "index.html").is_file():
            raise PathflowError(f"--frontend {given} has no index.html: give circuit-tracer's frontend/assets folder")
        return given
    import importlib.util

    spec = importlib.util.find_spec("circuit_tracer")
    if spec is None or not spec.submodule_search_locations:
        raise PathflowError(INSTALL)
    assets = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "assets"
    if not (assets / "index.html").is_file():
        raise PathflowError(INSTALL)
    return assets


def graph_list(run) -> list[dict]:
    """The run's graphs (``graph-metadata.json``); a run without graphs, or with a damaged list, is an
    error saying why."""
    where = f"{GRAPHS}/graph-metadata.json"
    if not run.exists(where):
        raise PathflowError(f"run {run.run_id} has no attribution graphs ({where}): it was made "
                            "before pathflow wrote them, with graphs.max_targets 0, or it has not finished")
    try:
        graphs = run.read_json(where)["graphs"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise PathflowError(f"{run.url}/{where} is damaged ({type(e).__name__}): check the run with "
                            f"`pathflow runs verify {run.run_id}`") from None
    if not isinstance(graphs, list) or not all(isinstance(g, dict) and isinstance(g.get("slug"), str) for g in graphs):
        raise PathflowError(f"{run.url}/{where} is damaged (no list of graphs with slugs): check the run with "
                            f"`pathflow runs verify {run.run_id}`")
    return graphs


class _Handler(http.server.SimpleHTTPRequestHandler):
    """circuit-tracer's routes: /data/NAME and /graph_data/NAME from the run, the rest from the page."""

    def __init__(self, *args, run, **kwargs):
        self.run = run
        super().__init__(*args, **kwargs)

    def log_message(self, fmt, *args):  # a person's terminal shows the URL, not every request
        pass

    def _host_ok(self) -> bool:
        """Only requests addressed to this machine by a loopback name: a page on another site that
        rebinds its own DNS name to 127.0.0.1 sends its own name as Host, and is refused."""
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if name in LOCAL_HOSTS:
            return True
        self.send_error(403, "Forbidden host")
        return False

    def _refuse(self):
        self.send_error(405, "Only GET and HEAD")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_CONNECT = do_TRACE = _refuse

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass  # the browser went away mid-answer: nothing to say

    def do_HEAD(self):
        if self._host_ok():
            super().do_HEAD()

    def do_GET(self):
        if not self._host_ok():
            return
        for prefix in ("/data/", "/graph_data/"):
            if self.path.startswith(prefix):
                name = self.path[len(prefix):].split("?")[0]
                if not _NAME.match(name) or not self.run.exists(f"{GRAPHS}/{name}"):
                    self.send_error(404)
                    return
                try:
                    body = self.run.read_bytes(f"{GRAPHS}/{name}")
                except (OSError, PathflowError):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
        super().do_GET()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A dropped connection is no error worth a traceback; anything else is one line in the log."""
        import logging
        import sys

        exc = sys.exc_info()[1]
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            logging.getLogger(__name__).warning("request from %s failed: %s", client_address[0], exc)


def make_server(run, frontend: Path, port: int, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``run``'s graphs on ``host:port`` (0: a free port)."""
    handler = functools.partial(_Handler, run=run, directory=str(frontend))
    try:
        return _Server((host, port), handler)
    except OSError as e:
        raise PathflowError(f"cannot serve on {host}:{port}: {e.strerror or e} (choose another --port)") from None
