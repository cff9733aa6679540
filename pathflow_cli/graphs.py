"""`pathflow graphs`: a run's attribution graphs in circuit-tracer's page, served locally."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from pathflow.errors import PathflowError

from .common import JsonOpt, StoreOpt, _fail, _print_json, _run_or_fail, app, console, styled


@app.command("graphs")
def graphs_cmd(run_id: str = typer.Argument(..., help="the run whose attribution graphs to show"),
               store: str | None = StoreOpt,
               port: int = typer.Option(8032, "--port", min=0, max=65535, help="port on 127.0.0.1 (0: any free one)"),
               frontend: Path | None = typer.Option(None, "--frontend", help="circuit-tracer's frontend/assets folder "
                                                    "(default: circuit-tracer 0.5.0's page, shipped with pathflow)"),
               as_json: bool = JsonOpt) -> None:
    """Serve a run's whole-prompt attribution graphs in circuit-tracer's page, offline, until Ctrl-C.

    The page's scripts come with pathflow, and its feature panel shows the run's own top activations and
    logit lens."""
    from pathflow.viewer import frontend_dir, graph_list, make_server

    run = _run_or_fail(store, run_id)
    try:
        graphs = graph_list(run)
        server = make_server(run, frontend_dir(frontend), port)
    except PathflowError as e:
        _fail(str(e))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [{"slug": g["slug"], "title": g.get("title_prefix", ""),
             "url": f"{base}/index.html?slug={g['slug']}"} for g in graphs]
    if as_json:
        _print_json({"run_id": run_id, "url": base, "graphs": urls})
    else:
        t = Table(title=f"{len(graphs)} attribution graphs of run {run_id}")
        t.add_column("graph")
        t.add_column("open")
        for u in urls:
            t.add_row(u["title"] or u["slug"], u["url"])
        console.print(t)
        console.print(styled("serving at ", (base, "bold"), " (offline: nothing is fetched from the internet); "
                             "Ctrl-C stops"))
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

