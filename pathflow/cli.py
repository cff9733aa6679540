"""The ``pathflow`` command line. Prints for people; errors are one clear line and a non-zero exit."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .config import ConfigError, load_config

app = typer.Typer(help="pathflow: find and validate the pathways to causal SAE features.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)

DEFAULT_DEMO_DIR = "pathflow-demo"

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: the demo bundle's)")
StoreOpt = typer.Option(None, "--store", help="artifact store URL; overrides store.url and $PATHFLOW_STORE")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _demo_dir() -> Path:
    return Path(os.environ.get("PATHFLOW_DEMO_DIR", DEFAULT_DEMO_DIR))


def _ensure_demo(directory: Path) -> Path:
    cfg = directory / "config.yaml"
    if not cfg.is_file():
        from .demo import write_demo

        with console.status(f"writing the demo bundle to {directory} (tiny model, SAEs, study)…"):
            write_demo(directory)
        console.print(f"demo bundle written to [bold]{directory}[/]")
    return cfg


def _load(config: Path | None, store: str | None):
    try:
        return load_config(config if config is not None else _ensure_demo(_demo_dir()), store=store)
    except ConfigError as e:
        _fail(str(e))


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show debug logs")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # a GPU node or laptop may have no internet: no telemetry attempts, no download bars in our output
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@app.command()
def demo(directory: Path = typer.Argument(Path(DEFAULT_DEMO_DIR), help="where to write the bundle"),
         seed: int = typer.Option(0, help="random seed (the bundle is deterministic in it)")) -> None:
    """Write the embedded demo bundle: tiny LLaMA model + tokenizer, LlamaScope-format SAEs, a study."""
    from .demo import write_demo

    with console.status(f"writing the demo bundle to {directory}…"):
        cfg = write_demo(directory, seed=seed)
    metrics = json.loads((directory / "demo_metrics.json").read_text())
    t = Table(title="demo SAEs (fitted on the demo model's resid_post)")
    t.add_column("layer")
    t.add_column("FVU", justify="right")
    t.add_column("L0", justify="right")
    for layer, m in metrics["layers"].items():
        t.add_row(layer, f"{m['fvu']:.3f}", f"{m['l0']:.1f}")
    console.print(t)
    console.print(f"config: [bold]{cfg}[/]   causal features: {', '.join(metrics['causal'])}")


@app.command()
def local(
    feature: str | None = typer.Option(None, "--feature", "-f", help="feature to trace, L{layer}-{id} "
                                          "(default: the top-ranked causal feature)"),
    config: Path | None = ConfigOpt,
    store: str | None = StoreOpt,
) -> None:
    """Run one causal feature through every step as a Prefect flow (the demo bundle by default)."""
    from .errors import PathflowError
    from .study import parse_feature

    if feature is not None and parse_feature(feature) is None:
        _fail(f"--feature {feature!r} is not of the form L{{layer}}-{{id}}, e.g. L3-142")
    cfg = _load(config, store)
    from flows.local import run_local

    try:
        with console.status("running pathflow-local (audit → select → jacobians → top-k → replay → tokens → "
                            "integrate)…"):
            result = run_local(cfg, feature=feature)
    except PathflowError as e:
        _fail(str(e), 1)
    except Exception as e:  # a failed flow: the cause is in its message; the run folder says failed
        _fail(f"{type(e).__name__}: {e}", 1)
    _print_local(result)


def _print_local(result: dict) -> None:
    rec = result["record"]
    console.print(f"\n[bold]target[/] {rec['feature']} ({rec['direction']}), "
                  f"selected by |{rec['selection']['rank_key']}| = {rec['selection']['rank_value']:.3g}")
    for prompt, faith in rec["faithfulness"].items():
        t = Table(title=f"top upstream features on the '{prompt}' prompt "
                        f"(sign agreement {faith['sign_agreement']:.2f}, Spearman {faith['spearman'] or 0:.2f})")
        for col in ("upstream", "activation", "gradient", "predicted Δpre", "actual Δpre", "agrees"):
            t.add_column(col, justify="right")
        for c in rec["pathways"][prompt][:8] or []:
            t.add_row(c["feature"], f"{c['activation']:.3g}", f"{c['gradient']:+.3g}",
                      f"{c['predicted_change']:+.3g}", f"{c['actual_change']:+.3g}", "✓" if c["sign_agrees"] else "✗")
        console.print(t)
    w = rec["tokens"]["writes"]
    console.print("[bold]promotes[/]  " + "  ".join(repr(t["token"]) for t in w["promoted"][:8]))
    console.print("[bold]suppresses[/] " + "  ".join(repr(t["token"]) for t in w["suppressed"][:8]))
    secs = ", ".join(f"{k} {v:.2f}s" for k, v in result["seconds"].items() if v is not None)
    console.print(f"\nsteps: {secs}")
    console.print(f"run [bold]{result['run_id']}[/] {result['status']}: [bold]{result['run_url']}[/]")


def _audit_with_progress(cfg):
    """Run the audit with a progress bar over the bytes of every study file."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from .readers import expand
    from .study import audit

    s = cfg.study
    files = expand(s.checkpoints + s.response_logs + s.revalidation)
    total = sum(p.stat().st_size for p in files if p.is_file())
    with Progress(TextColumn("reading the study"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=total < 50 * 2**20) as bar:
        task = bar.add_task("read", total=total)
        return audit(cfg, progress=lambda _p, n: bar.advance(task, n))


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
    t.add_row("errors", f"[red]{len(report['errors'])}[/]" if report["errors"] else "0")
    t.add_row("warnings", str(len(report["warnings"])))
    console.print(t)
    for kind, items, style in (("error", report["errors"], "red"), ("warning", report["warnings"], "yellow")):
        for e in items[:15]:
            where = f" ({e['file']}" + (f", record {e['record']}" if e["record"] is not None else "") + ")" \
                if e["file"] else (f" ({e['record']})" if e["record"] is not None else "")
            console.print(f"[{style}]{kind}[/] {e['code']}: {e['message']}{where}", highlight=False)
        if len(items) > 15:
            console.print(f"… and {len(items) - 15} more {kind}s (see the JSON report)")


@app.command("audit")
def audit_cmd(config: Path | None = ConfigOpt,
              out: Path | None = typer.Option(None, "--out", "-o", help="write the JSON report here")) -> None:
    """Step 0: read every study file, check and count it.

    Exit 0 validated (warnings allowed), 1 errors found, 2 usage error (missing file, bad config).
    """
    from .errors import PathflowError

    cfg = _load(config, None)
    try:
        report, _ = _audit_with_progress(cfg)
    except PathflowError as e:
        _fail(str(e), 2)
    _print_audit(report)
    if out:
        _write_json(out, report)
        console.print(f"report: {out}")
    console.print("[green]validated[/]" if report["validated"] else "[red]not validated[/]: fix the errors above")
    raise typer.Exit(0 if report["validated"] else 1)


@app.command("select")
def select_cmd(config: Path | None = ConfigOpt,
               out: Path | None = typer.Option(None, "--out", "-o", help="write causal_features.json here"),
               layer: list[int] | None = typer.Option(None, "--layer", help="only these layers (repeatable)"),
               direction: str | None = typer.Option(None, "--direction", help="safe or risky"),
               top: int | None = typer.Option(None, "--top", help="top N per layer (selection.top_per_layer)"),
               ) -> None:
    """Step 1: the causal features, top-N per layer by |cohen_d| (effect size where cohen_d is absent)."""
    from pydantic import ValidationError

    from .errors import PathflowError
    from .study import select

    cfg = _load(config, None)
    try:
        for key, value in (("layers", layer or None), ("direction", direction), ("top_per_layer", top)):
            if value is not None:
                setattr(cfg.selection, key, value)
    except ValidationError as e:
        _fail(f"invalid option: {e.errors()[0]['msg']}")
    try:
        report, features = _audit_with_progress(cfg)
    except PathflowError as e:
        _fail(str(e), 2)
    selected = select(features, cfg)
    t = Table(title=f"selected features ({len(selected)})")
    for col in ("feature", "direction", "rank_key", "rank_value", "rank"):
        t.add_column(col)
    for s in selected[:60]:
        t.add_row(s["feature"], s["direction"], s["rank_key"], f"{s['rank_value']:.3g}" if s["rank_value"] is not None
                  else "–", str(s["rank"]))
    console.print(t)
    if not report["validated"]:
        console.print(f"[yellow]the study audit found {len(report['errors'])} errors; run `pathflow audit`[/]")
    if out:
        _write_json(out, {"selection": cfg.selection.model_dump(), "n_selected": len(selected), "features": selected})
        console.print(f"written: {out}")


def _write_json(path: Path, obj) -> None:
    """Atomic: a crash never leaves a half-written report where an old one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
