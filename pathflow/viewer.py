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
    """The run's graphs (``graph-metadata.json``); a run without graphs is an error saying why."""
    if not run.exists(f"{GRAPHS}/graph-metadata.json"):
        raise PathflowError(f"run {run.run_id} has no attribution graphs ({GRAPHS}/graph-metadata.json): it was made "
                            "before pathflow wrote them, with graphs.max_targets 0, or it has not finished")
    return run.read_json(f"{GRAPHS}/graph-metadata.json")["graphs"]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """circuit-tracer's routes: /data/NAME and /graph_data/NAME from the run, the rest from the page."""

    def __init__(self, *args, run, **kwargs):
        self.run = run
        super().__init__(*args, **kwargs)

    def log_message(self, fmt, *args):  # a person's terminal shows the URL, not every request
        pass

    def do_GET(self):
        for prefix in ("/data/", "/graph_data/"):
            if self.path.startswith(prefix):
                name = self.path[len(prefix):].split("?")[0]
                if not _NAME.match(name) or not self.run.exists(f"{GRAPHS}/{name}"):
                    self.send_error(404)
                    return
                body = self.run.read_bytes(f"{GRAPHS}/{name}")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
        super().do_GET()


def make_server(run, frontend: Path, port: int, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``run``'s graphs on ``host:port`` (0: a free port)."""
    handler = functools.partial(_Handler, run=run, directory=str(frontend))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise PathflowError(f"cannot serve on {host}:{port}: {e.strerror or e} (choose another --port)") from None
