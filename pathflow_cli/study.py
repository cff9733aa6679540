"""`pathflow audit` and `pathflow select`: steps 0 and 1 on their own."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from pathflow.errors import PathflowError

from .common import (
    ConfigOpt,
    DirectionOpt,
    FeaturesOpt,
    JsonOpt,
    LayersOpt,
    TopOpt,
    _apply_selection,
    _audit_with_progress,
    _check_requested,
    _fail,
    _load,
    _print_json,
    app,
    console,
    styled,
)


def _print_audit(report: dict) -> None:
    c = report["counts"]
    t = Table(title="study audit")
    t.add_column("what")
    t.add_column("count", justify="right")
    for kind, key in (("checkpoint files", "checkpoint_files"), ("response-log files", "response_log_files")):
        fc = c[key]
        t.add_row(kind, f"{fc['files_read']} read / {fc['files_found']} found, {fc['files_failed']} failed")
    t.add_row("features", str(c["features_total"]))
    t.add_row("causal features", str(c["causal_total"]))
    for k, v in c["causal_by_direction"].items():
        t.add_row(f"  causal, {k}", str(v))
    for k, v in c["causal_by_layer"].items():
        t.add_row(f"  causal in layer {k}", str(v))
    j = c["join"]
    t.add_row("causal with response logs", f"{j['joined']} ({j['causal_without_logs']} without)")
    t.add_row("logged features without a result", str(j["logs_without_result"]))
    t.add_row("log entries", f"{c['response_log_files']['entries']} ({c['response_log_files']['empty_responses']} "
              "empty)")
    t.add_row("errors", Text(str(len(report["errors"])), style="red") if report["errors"] else "0")
    t.add_row("warnings", str(len(report["warnings"])))
    console.print(t)
    for kind, items, style in (("error", report["errors"], "red"), ("warning", report["warnings"], "yellow")):
        for e in items[:15]:
            where = f" ({e['file']}" + (f", record {e['record']}" if e["record"] is not None else "") + ")" \
                if e["file"] else (f" ({e['record']})" if e["record"] is not None else "")
            console.print(styled((kind, style), f" {e['code']}: {e['message']}{where}"))
        if len(items) > 15:
            console.print(f"… and {len(items) - 15} more {kind}s (see the JSON report)")


@app.command("audit")
def audit_cmd(config: Path | None = ConfigOpt,
              out: Path | None = typer.Option(None, "--out", "-o", help="write the JSON report here"),
              as_json: bool = JsonOpt) -> None:
    """Step 0: read every study file, check and count it.

    Exit 0 validated (warnings allowed), 1 errors found, 2 usage error (missing file, bad config).
    """
    cfg = _load(config, None)
    _check_out(out)
    try:
        report, _ = _audit_with_progress(cfg)
    except PathflowError as e:
        _fail(str(e), 2)
    if out:
        _write_json(out, report)
    if as_json:
        _print_json(report)
        raise typer.Exit(0 if report["validated"] else 1)
    _print_audit(report)
    if out:
        console.print(f"report: {out}")
    console.print(styled(("validated", "green")) if report["validated"] else
                  styled(("not validated", "red"), ": fix the errors above"))
    raise typer.Exit(0 if report["validated"] else 1)


@app.command("select")
def select_cmd(config: Path | None = ConfigOpt,
               out: Path | None = typer.Option(None, "--out", "-o", help="write causal_features.json here"),
               feature: list[str] | None = FeaturesOpt, layer: list[int] | None = LayersOpt,
               direction: str | None = DirectionOpt, top: int | None = TopOpt, as_json: bool = JsonOpt) -> None:
    """Step 1: the causal features, top-N per layer by |cohen_d| (effect size where cohen_d is absent)."""
    from pathflow.study import select

    cfg = _load(config, None)
    _check_out(out)
    _apply_selection(cfg, feature, layer, direction, top)
    try:
        report, features = _audit_with_progress(cfg)
    except PathflowError as e:
        _fail(str(e), 2)
    _check_requested(features, cfg, report)
    selected = select(features, cfg)
    body = {"selection": cfg.selection.model_dump(), "n_selected": len(selected), "features": selected}
    if out:
        _write_json(out, body)
    if as_json:
        _print_json({**body, "audit_errors": len(report["errors"])})
        return
    t = Table(title=f"selected features ({len(selected)})")
    for col in ("feature", "direction", "rank_key", "rank_value", "rank"):
        t.add_column(col)
    for s in selected[:60]:
        t.add_row(s["feature"], s["direction"], s["rank_key"], f"{s['rank_value']:.3g}" if s["rank_value"] is not None
                  else "–", str(s["rank"]))
    console.print(t)
    if not report["validated"]:
        console.print(styled((f"the study audit found {len(report['errors'])} errors; run `pathflow audit`",
                              "yellow")))
    if out:
        console.print(f"written: {out}")


def _check_out(out: Path | None) -> None:
    """An --out file is checked before any work: writable, not a folder, not inside a run folder."""
    from pathflow.locations import check_out_path

    if out is not None:
        try:
            check_out_path(out)
        except PathflowError as e:
            _fail(str(e))


def _write_json(path: Path, obj) -> None:
    """Atomic: a crash never leaves a half-written report where an old one was. (The commands check
    ``path`` with ``_check_out`` before any work.)"""
    import secrets

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(obj, indent=2))
        tmp.replace(path)
    except OSError as e:
        _fail(f"cannot write {path}: {e.strerror or e}", 1)

