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


@app.command("audit")
def audit_cmd(config: Path | None = ConfigOpt,
              out: Path | None = typer.Option(None, "--out", "-o", help="write the JSON report here")) -> None:
    """Step 0: read every study file, check and count it. Exit 0 validated, 1 errors found, 2 usage error."""
    from .study import audit

    cfg = _load(config, None)
    report, _ = audit(cfg)
    c = report["counts"]
    t = Table(title="study audit")
    t.add_column("what")
    t.add_column("count", justify="right")
    for k in ("features_total", "causal_total"):
        t.add_row(k, str(c[k]))
    for k, v in c["causal_by_direction"].items():
        t.add_row(f"causal {k}", str(v))
    for k, v in c["causal_by_layer"].items():
        t.add_row(f"causal in layer {k}", str(v))
    t.add_row("errors", str(len(report["errors"])))
    t.add_row("warnings", str(len(report["warnings"])))
    console.print(t)
    for e in report["errors"][:20]:
        console.print(f"[red]{e['code']}[/] {e['message']} ({e['file']}, record {e['record']})", highlight=False)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        console.print(f"report: {out}")
    raise typer.Exit(0 if report["validated"] else 1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
