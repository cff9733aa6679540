"""``pathflow graphs RUN``: a run's attribution graphs in circuit-tracer's page, served locally, offline.

The page is circuit-tracer 0.5.0's ``frontend/assets`` (MIT), shipped in ``viewer_static/circuit-tracer``
unchanged, or a folder given. It is served as circuit-tracer's own ``local_server`` serves it — static
files, with ``/data/`` and ``/graph_data/`` answered from the run's ``integrated/graphs/`` — so the run's
files are read from its store (a folder or S3) as they are. Three things make it work without internet:

- the scripts the page loads from transformer-circuits.pub and unpkg (d3, d3-jetpack, dagre, pako) are
  answered from ``viewer_static/vendor`` (npm's builds with their licences; ``tests/ui/vendor_viewer.mjs``);
- each graph is served with its ``scan`` pointed at ``./pathflow-features``, so the page's feature panel
  reads the files pathflow wrote (``feature_examples``) instead of Hugging Face;
- nothing else outside is referenced (the page's live-reload client and .npy reader are left out).
"""

from __future__ import annotations

import functools
import http.server
import json
import re
from pathlib import Path

from .errors import PathflowError
from .feature_examples import FEATURES_DIR
from .graphs import GRAPHS_DIR as GRAPHS

STATIC = Path(__file__).parent / "viewer_static"
PAGE = STATIC / "circuit-tracer"
VENDOR = STATIC / "vendor"
FEATURES_URL = "pathflow-features"
# the page's outside scripts -> the vendored file that answers each ("" leaves it out)
OUTSIDE = {
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/hotserver-client-ws.js": "",
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/d3.js": "d3.min.js",
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/jetpack_2024-07-20.js": "jetpack.js",
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/npy_v0.js": "",
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": "dagre.min.js",
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": "pako.min.js",
}
_SCRIPT = re.compile(r"<script src='(https?://[^']+)'></script>\n?")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "localhost.localdomain"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.json$")  # a graph file's name; nothing that leaves the folder
_FEATURE = re.compile(r"^[0-9]{1,20}\.json$")


def frontend_dir(given: Path | None = None) -> Path:
    """The folder of circuit-tracer's page: ``given``, else the copy shipped with pathflow."""
    if given is None:
        return PAGE
    if not (given / "index.html").is_file():
        raise PathflowError(f"--frontend {given} has no index.html: give circuit-tracer's frontend/assets folder")
    return given


def offline_page(html: str) -> str:
    """circuit-tracer's index.html with its outside scripts answered from ``/pathflow-vendor/``; a script
    from elsewhere that pathflow does not know is an error (a newer page: its scripts must be vendored)."""
    def swap(m: re.Match) -> str:
        url = m.group(1)
        if url not in OUTSIDE:
            raise PathflowError(f"the page loads {url}, which pathflow does not ship: use circuit-tracer 0.5.0's page")
        return f"<script src='./pathflow-vendor/{OUTSIDE[url]}'></script>\n" if OUTSIDE[url] else ""

    return _SCRIPT.sub(swap, html)


def with_local_features(doc: dict) -> dict:
    """A graph whose feature panel reads pathflow's feature files (``./pathflow-features/{n}.json``)."""
    doc["metadata"] = {**doc.get("metadata", {}), "scan": f"./{FEATURES_URL}"}
    return doc


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

    def __init__(self, *args, run, page: str, features: bool, **kwargs):
        self.run, self.page, self.features = run, page, features
        super().__init__(*args, **kwargs)

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read(self, rel: str) -> bytes | None:
        try:
            return self.run.read_bytes(rel) if self.run.exists(rel) else None
        except (OSError, PathflowError):
            return None

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
        path = self.path.split("?")[0]
        if path in ("/", "/index.html"):
            return self._send(self.page.encode(), "text/html; charset=utf-8")
        if path.startswith("/pathflow-vendor/"):
            name = path[len("/pathflow-vendor/"):]
            if name not in set(OUTSIDE.values()) - {""}:
                return self.send_error(404)
            return self._send((VENDOR / name).read_bytes(), "application/javascript")
        if path.startswith(f"/{FEATURES_URL}/"):
            name = path[len(FEATURES_URL) + 2:]
            body = self._read(f"{FEATURES_DIR}/{name}") if _FEATURE.match(name) else None
            return self._send(body, "application/json") if body is not None else self.send_error(404)
        for prefix in ("/data/", "/graph_data/"):
            if path.startswith(prefix):
                name = path[len(prefix):]
                body = self._read(f"{GRAPHS}/{name}") if _NAME.match(name) else None
                if body is None:
                    return self.send_error(404)
                if prefix == "/graph_data/" and self.features:
                    try:
                        body = json.dumps(with_local_features(json.loads(body))).encode()
                    except (ValueError, AttributeError):
                        return self.send_error(500, "damaged graph file: check the run with pathflow runs verify")
                return self._send(body, "application/json")
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
    """An HTTP server (not yet serving) for ``run``'s graphs on ``host:port`` (0: a free port). A run made
    before pathflow wrote feature files keeps its graphs' own ``scan`` (its feature panel then needs the
    internet)."""
    page = offline_page((frontend / "index.html").read_text(encoding="utf-8"))
    features = run.exists(FEATURES_DIR)
    handler = functools.partial(_Handler, run=run, page=page, features=features, directory=str(frontend))
    try:
        return _Server((host, port), handler)
    except OSError as e:
        raise PathflowError(f"cannot serve on {host}:{port}: {e.strerror or e} (choose another --port)") from None
