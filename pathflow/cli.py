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


@app.command("run")
def run_cmd(config: Path | None = ConfigOpt, store: str | None = StoreOpt,
            resume: str | None = typer.Option(None, "--resume", help="finish run RUN_ID: recompute only what is "
                                              "missing")) -> None:
    """The full pipeline as a Prefect flow: every selected feature through every step."""
    from .errors import PathflowError

    if resume and config is None:
        cfg = _config_of_run(store, resume)
    else:
        cfg = _load(config, store)
    from flows.pipeline import run_pipeline
    from storage.store import Store, new_run_id

    run_id = resume or new_run_id()
    run = Store(cfg.store.url).run(run_id)
    try:
        with _batch_progress(run):
            result = run_pipeline(cfg, run_id=run_id, resume=bool(resume))
    except PathflowError as e:
        _fail(f"{e}\nthe run folder {run.url} can be resumed: pathflow run --resume {run_id}", 1)
    from .integrate import summary_rows

    rows = summary_rows(result["records"])
    t = Table(title=f"{result['n_targets']} features traced")
    for col in ("feature", "direction", "prompt", "n_validated", "sign_agreement", "spearman", "top_upstream"):
        t.add_column(col)
    for r in rows[:80]:
        t.add_row(*[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in
                    ("feature", "direction", "prompt", "n_validated", "sign_agreement", "spearman", "top_upstream")])
    console.print(t)
    console.print(f"run [bold]{result['run_id']}[/] {result['status']}: [bold]{result['run_url']}[/]")


def _config_of_run(store: str | None, run_id: str):
    """The resolved config a run was started with, from its manifest."""
    from storage.store import Store

    from .config import Config, load_config

    url = load_config(None, store=store).store.url
    run = Store(url).run(run_id)
    if not run.exists():
        _fail(f"no run {run_id} in store {url} (give --store or set PATHFLOW_STORE)")
    cfg = Config.model_validate(run.manifest()["config"])
    cfg.store.url = url
    return cfg


class _batch_progress:
    """A terminal progress bar fed by the run folder's batch markers (works for any executor)."""

    def __init__(self, run) -> None:
        self.run = run

    def __enter__(self):
        import threading

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("pathway batches"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, transient=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.bar.start()
        self.thread.start()
        return self

    def _poll(self) -> None:
        from tasks.pathways import done_batches

        task, plan = None, None
        while not self.stop.wait(0.5):
            if plan is None:  # written once per run, before the first batch starts
                try:
                    plan = set(self.run.read_json("pathways/plan.json")["batches"])
                except Exception:
                    continue
                task = self.bar.add_task("batches", total=len(plan))
            self.bar.update(task, completed=len(done_batches(self.run) & plan))

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(2)
        self.bar.stop()


runs_app = typer.Typer(help="the runs in a store: list, show, verify, diff", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


def _store(store: str | None):
    from storage.store import Store

    from .config import load_config

    return Store(load_config(None, store=store).store.url)


def _run_or_fail(store: str | None, run_id: str):
    run = _store(store).run(run_id)
    if not run.exists():
        _fail(f"no run {run_id} in store {run.store.url}")
    return run


@runs_app.command("list")
def runs_list(store: str | None = StoreOpt) -> None:
    """Every run in the store, newest last."""
    s = _store(store)
    t = Table(title=f"runs in {s.url}")
    t.add_column("run", no_wrap=True, min_width=22)
    for col in ("status", "kind", "created", "outputs", "config"):
        t.add_column(col, overflow="fold", no_wrap=col != "created")
    for rid in s.run_ids():
        try:
            m = s.run(rid).manifest()
        except Exception:
            t.add_row(rid, "[red]no manifest[/]", "", "", "", "")
            continue
        t.add_row(rid, m.get("status", "?"), m.get("kind", ""), m.get("created", "").replace("+00:00", "Z"),
                  str(len(m.get("outputs", {}))), m.get("config_hash", "")[:8])
    console.print(t)


@runs_app.command("show")
def runs_show(run_id: str, store: str | None = StoreOpt) -> None:
    """A run's manifest: status, versions, inputs, steps, outputs."""
    m = _run_or_fail(store, run_id).manifest()
    console.print(f"[bold]{run_id}[/] {m['status']}  created {m['created']}  pathflow {m.get('pathflow_version')}"
                  f"  commit {m.get('git_commit') or '–'}  config {m['config_hash'][:12]}")
    console.print(f"model {m['model']['name_or_path']} @ {m['model'].get('revision') or 'local'};  "
                  f"SAEs {m['sae']['root']} ({len(m['sae'].get('layers', {}))} layers hashed);  "
                  f"{len(m.get('inputs', {}))} input files hashed")
    t = Table(title="steps")
    for col in ("step", "status", "seconds"):
        t.add_column(col)
    for name, st in m.get("steps", {}).items():
        t.add_row(name, st.get("status", ""), str(st.get("seconds", "")))
    console.print(t)
    console.print(f"{len(m.get('outputs', {}))} outputs with sha256" + (f"; error: {m['error']}" if m.get("error")
                                                                         else ""))


@runs_app.command("verify")
def runs_verify(run_id: str, store: str | None = StoreOpt) -> None:
    """Check every output's sha256 against the manifest. Exit 1 on any mismatch or missing file."""
    run = _run_or_fail(store, run_id)
    m = run.manifest()
    if m.get("status") != "complete":
        _fail(f"run {run_id} is {m.get('status')}, not complete: nothing to verify yet", 1)
    present = set(run.files())
    bad = []
    for rel, digest in sorted(m["outputs"].items()):
        if rel not in present:
            bad.append((rel, "missing"))
        elif run.sha256(rel) != digest:
            bad.append((rel, "sha256 differs"))
    extra = sorted(present - set(m["outputs"]))
    for rel, why in bad:
        console.print(f"[red]{why}[/] {rel}", highlight=False)
    for rel in extra:
        console.print(f"[yellow]not in the manifest[/] {rel}", highlight=False)
    if bad:
        _fail(f"{len(bad)} of {len(m['outputs'])} outputs do not match run {run_id}'s manifest", 1)
    console.print(f"[green]ok[/]: {len(m['outputs'])} outputs match the manifest")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@runs_app.command("diff")
def runs_diff(run_a: str, run_b: str, store: str | None = StoreOpt) -> None:
    """Config and result differences between two runs."""
    a, b = _run_or_fail(store, run_a), _run_or_fail(store, run_b)
    ma, mb = a.manifest(), b.manifest()
    ca, cb = _flat(ma["config"]), _flat(mb["config"])
    t = Table(title="config")
    for col in ("key", run_a, run_b):
        t.add_column(col)
    for k in sorted(set(ca) | set(cb)):
        if ca.get(k) != cb.get(k):
            t.add_row(k, json.dumps(ca.get(k)), json.dumps(cb.get(k)))
    console.print(t if t.row_count else "config: identical")
    oa, ob = ma.get("outputs", {}), mb.get("outputs", {})
    differ = sorted(k for k in set(oa) | set(ob) if oa.get(k) != ob.get(k))
    console.print(f"outputs: {len(differ)} of {len(set(oa) | set(ob))} differ" + (": " + ", ".join(differ[:12])
                                                                                  if differ else ""))
    try:
        va = a.read_json("pathways/validated_pathways.json")["targets"]
        vb = b.read_json("pathways/validated_pathways.json")["targets"]
    except Exception:
        return
    t = Table(title="pathways")
    for col in ("feature", "prompt", f"top-5 {run_a}", f"top-5 {run_b}"):
        t.add_column(col)
    for feat in sorted(set(va) | set(vb)):
        for prompt in sorted(set(va.get(feat, {})) | set(vb.get(feat, {}))):
            ta = [c["feature"] for c in va.get(feat, {}).get(prompt, {}).get("candidates", [])[:5]]
            tb = [c["feature"] for c in vb.get(feat, {}).get(prompt, {}).get("candidates", [])[:5]]
            if ta != tb:
                t.add_row(feat, prompt, " ".join(ta) or "–", " ".join(tb) or "–")
    console.print(t if t.row_count else "pathways: the same top candidates")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
