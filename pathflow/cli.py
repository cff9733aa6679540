"""The ``pathflow`` command line. Prints for people; errors are one clear line and a non-zero exit.

User text (run ids, paths, study values, error messages) is always printed as text, never parsed
as Rich markup: both consoles have markup off, and styling comes from ``Text`` spans.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from .config import ConfigError, load_config
from .errors import PathflowError
from .safe_text import SafeConsole

app = typer.Typer(help="pathflow: find and validate the pathways to causal SAE features.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = SafeConsole(markup=False, highlight=False)
err = SafeConsole(stderr=True, markup=False, highlight=False)
VERBOSE = [0]
CONSOLE = [False]  # set by console_main: this process is the command, not a caller (tests) importing main


def styled(*parts) -> Text:
    """Text from plain strings and (string, style) pairs: nothing in it is read as markup."""
    return Text.assemble(*[(str(p[0]), p[1]) if isinstance(p, tuple) else str(p) for p in parts])

DEFAULT_DEMO_DIR = "pathflow-demo"

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: the demo bundle's)")
JsonOpt = typer.Option(False, "--json", help="print JSON (for scripts) instead of tables")
# the selection flags `select`, `local` and `run` share (each overrides its selection.* key)
FeaturesOpt = typer.Option(None, "--feature", "-f", help="only this feature, L{layer}-{id} (repeatable)")
LayersOpt = typer.Option(None, "--layer", help="only these layers (repeatable; selection.layers)")
DirectionOpt = typer.Option(None, "--direction", help="safe or risky (selection.direction)")
TopOpt = typer.Option(None, "--top", help="top N per layer (selection.top_per_layer)")


def _apply_selection(cfg, features=None, layers=None, direction=None, top=None) -> None:
    """Put the selection flags into the config, validated like the config file (before any work)."""
    from pydantic import ValidationError

    try:
        for key, value in (("features", features or None), ("layers", layers or None), ("direction", direction),
                           ("top_per_layer", top)):
            if value is not None:
                setattr(cfg.selection, key, value)
    except ValidationError as e:
        flag = {"features": "--feature", "layers": "--layer", "top_per_layer": "--top"}.get(
            str(e.errors()[0]["loc"][0]), "--direction")
        _fail(f"{flag}: {e.errors()[0]['msg'].removeprefix('Value error, ')}")


def _study_checked(cfg, allow_audit_errors: bool) -> list[dict]:
    """Audit and select before any server starts: audit errors stop the command unless allowed,
    requested features must be in the study, and something above layer 0 must be selected.
    Returns the selection."""
    from .study import audit_errors, missing_features, select

    try:
        report, features = _audit_with_progress(cfg, remember=True)  # the flow's audit step takes it again
    except PathflowError as e:
        _fail(str(e))
    if report["errors"] and not allow_audit_errors:
        _fail(audit_errors(report), 1)
    if report["errors"]:
        err.print(styled(("warning", "yellow"), f": going on despite {len(report['errors'])} study audit errors"))
    problem = missing_features(features, cfg.selection.features or [], report["ranges"])
    if problem:
        _fail(f"--feature {problem}")
    problem = missing_features(features, cfg.selection.include, report["ranges"])
    if problem:
        _fail(f"selection.include: {problem}")
    selected = select(features, cfg)
    if not any(s["layer"] > 0 for s in selected):
        _fail("nothing to trace: no selected feature above layer 0 (check --feature/--layer/--direction and "
              "`pathflow select`)")
    from .weights import check_files

    try:  # the model's and the SAEs' files, before any work (a damaged file fails here, not mid-run)
        check_files(cfg, list(range(max(s["layer"] for s in selected) + 1)))
    except PathflowError as e:
        _fail(str(e))
    return selected


def _print_json(obj) -> None:
    """JSON on stdout, plain (no Rich wrapping or colour), so that it always parses."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")
StoreOpt = typer.Option(None, "--store", help="artifact store URL; overrides store.url and $PATHFLOW_STORE")


def _fail(message: str, code: int = 2) -> None:
    err.print(styled(("error: ", "bold red"), message))
    raise typer.Exit(code)


def _demo_dir() -> Path:
    return Path(os.environ.get("PATHFLOW_DEMO_DIR", DEFAULT_DEMO_DIR))


def _ensure_demo(directory: Path) -> Path:
    cfg = directory / "config.yaml"
    if not cfg.is_file():
        from .demo import write_demo

        try:
            with console.status(f"writing the demo bundle to {directory} (tiny model, SAEs, study)…"):
                write_demo(directory)
        except PathflowError as e:
            _fail(str(e))
        console.print(styled("demo bundle written to ", (directory, "bold")))
    return cfg


def _load(config: Path | None, store: str | None):
    try:
        return load_config(config if config is not None else _ensure_demo(_demo_dir()), store=store)
    except ConfigError as e:
        _fail(str(e))


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"pathflow {__version__}")
        raise typer.Exit()


OWN_LOGGERS = ("pathflow", "flows", "tasks", "storage")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # what pathflow's tasks say through get_run_logger


class _Terminal(logging.Filter):
    """Which log records reach the terminal: warnings and errors (without tracebacks unless -v);
    with -v also pathflow's own debug logs and its tasks' messages; with -vv everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        level = VERBOSE[0]
        if level < 1 and record.exc_info:
            record.exc_info, record.exc_text = None, None  # the one clean error line says it
        if level < 1 and record.name in RUN_LOGGERS and record.levelno >= logging.ERROR:
            return False  # a run's failure is the command's own one error line
        if level >= 2 or record.levelno >= logging.WARNING:
            return True
        if level == 1:
            return record.name.split(".")[0] in OWN_LOGGERS or (record.name in RUN_LOGGERS and
                                                                  not record.getMessage().startswith("Finished in"))
        return False


def _setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    root = logging.getLogger()
    # ours from an earlier call, and Prefect's terminal handler (importing prefect installs it on the
    # root logger; it would print every state line and every traceback a second time)
    for h in [h for h in root.handlers if getattr(h, "_pathflow", False) or type(h).__name__ ==
              "PrefectConsoleHandler"]:
        root.removeHandler(h)
    # a Rich handler on the same console as the progress bars: log lines print above them, not into them
    handler = RichHandler(console=err, show_time=False, show_path=verbose >= 2, markup=False,
                          rich_tracebacks=False, level=logging.DEBUG)
    handler._pathflow = True
    handler.addFilter(_Terminal())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in ("uvicorn", "fastapi"):
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if type(h).__name__ == "PrefectConsoleHandler"]:
            lg.removeHandler(h)


def _prefect_imported() -> None:
    """Call once flows (and so prefect) are imported: take the terminal back from Prefect's handler."""
    _setup_logging(VERBOSE[0])


@app.callback()
def _main(verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                      help="-v: pathflow's debug logs and its tasks' messages; -vv: every library's"),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    VERBOSE[0] = verbose
    _setup_logging(verbose)
    from .envvars import check_all

    try:
        check_all()  # every PATHFLOW_* variable, before any work
    except PathflowError as e:
        _fail(str(e))
    # a GPU node or laptop may have no internet: no telemetry attempts, no download bars in our output
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # transformers reads HF_HUB_DISABLE_PROGRESS_BARS when first imported (after this): importing it
    # here only to switch its bars off cost every command half a second


@app.command()
def demo(directory: Path = typer.Argument(Path(DEFAULT_DEMO_DIR), help="where to write the bundle"),
         seed: int = typer.Option(0, help="random seed (the bundle is deterministic in it)")) -> None:
    """Write the embedded demo bundle: tiny LLaMA model + tokenizer, LlamaScope-format SAEs, a study."""
    from .demo import write_demo

    try:
        with console.status(f"writing the demo bundle to {directory}…"):
            cfg = write_demo(directory, seed=seed)
    except PathflowError as e:
        _fail(str(e))
    metrics = json.loads((directory / "demo_metrics.json").read_text())
    t = Table(title="demo SAEs (fitted on the demo model's resid_post)")
    t.add_column("layer")
    t.add_column("FVU", justify="right")
    t.add_column("L0", justify="right")
    for layer, m in metrics["layers"].items():
        t.add_row(layer, f"{m['fvu']:.3f}", f"{m['l0']:.1f}")
    console.print(t)
    console.print(styled("config: ", (cfg, "bold"), f"   causal features: {', '.join(metrics['causal'])}"))


@app.command()
def local(
    feature: str | None = typer.Option(None, "--feature", "-f", help="feature to trace, L{layer}-{id} "
                                          "(default: the top-ranked causal feature of the selection)"),
    layer: list[int] | None = LayersOpt, direction: str | None = DirectionOpt, top: int | None = TopOpt,
    config: Path | None = ConfigOpt,
    store: str | None = StoreOpt,
) -> None:
    """Run one causal feature through every step as a Prefect flow (the demo bundle by default)."""
    from .study import parse_feature

    if feature is not None and parse_feature(feature) is None:
        _fail(f"--feature {feature!r} is not of the form L{{layer}}-{{id}}, e.g. L3-142")
    cfg = _load(config, store)
    _apply_selection(cfg, [feature] if feature else None, layer, direction, top)
    with _server_booting() as server:
        run = _preflight(cfg)
        _study_checked(cfg, allow_audit_errors=True)  # a prototype runs on a study with findings, with a warning
        from flows.local import run_local
    from flows.server import prefect_api

    _prefect_imported()
    _settle()

    try:
        with _interruptible(run, resumable=False), prefect_api(server), console.status(
                "running pathflow-local (audit → select → jacobians → top-k → replay → tokens → graphs → integrate)…"):
            result = run_local(cfg, feature=feature, run_id=run.run_id)
    except PathflowError as e:
        _fail(str(e), 1)
    _print_local(result)


def _print_local(result: dict) -> None:
    rec = result["record"]
    console.print(styled("\n", ("target", "bold"), f" {rec['feature']} ({rec['direction']}), selected by "
                         f"|{rec['selection']['rank_key']}| = {rec['selection']['rank_value']:.3g}"))
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
    console.print(styled(("promotes", "bold"), "  " + "  ".join(repr(t["token"]) for t in w["promoted"][:8])))
    console.print(styled(("suppresses", "bold"), " " + "  ".join(repr(t["token"]) for t in w["suppressed"][:8])))
    secs = ", ".join(f"{k} {v:.2f}s" for k, v in result["seconds"].items() if v is not None)
    console.print(f"\nsteps: {secs}")
    _print_done(result)


def _print_done(result: dict) -> None:
    console.print(styled("run ", (result["run_id"], "bold"), f" {result['status']}: ", (result["run_url"], "bold")))


def _audit_with_progress(cfg, remember: bool = False):
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
        return audit(cfg, progress=lambda _p, n: bar.advance(task, n), remember=remember)


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
    from .study import missing_features, select

    cfg = _load(config, None)
    _check_out(out)
    _apply_selection(cfg, feature, layer, direction, top)
    try:
        report, features = _audit_with_progress(cfg)
    except PathflowError as e:
        _fail(str(e), 2)
    problem = missing_features(features, cfg.selection.features or [], report["ranges"])
    if problem:
        _fail(f"--feature {problem}")
    problem = missing_features(features, cfg.selection.include, report["ranges"])
    if problem:
        _fail(f"selection.include: {problem}")
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
    from .locations import check_out_path

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


def _preflight(cfg, resume: str | None = None):
    """Everything checkable before a server starts or work begins: the store (persistent, writable,
    not inside a run), the run id, the device, the prompts and the target position. Returns the Run."""
    from flows.pipeline import check_resumable
    from storage.store import Store, new_run_id

    from .preflight import preflight

    try:
        store = Store(cfg.store.url)
        store.check_writable()
        run = store.run(new_run_id() if resume is None else resume)
        if resume is not None:
            check_resumable(run, cfg)
            holder = run.writer()
            if holder:
                _fail(f"run {run.run_id} is being written by another process ({holder.get('host')}, pid "
                      f"{holder.get('pid')}): wait for it to finish, or stop it first")
        preflight(cfg)
    except PathflowError as e:
        _fail(str(e))
    return run


@contextmanager
def _server_booting():
    """A temporary Prefect server launched now (None where PREFECT_API_URL names one), so that it
    boots — seconds — while the command imports PyTorch, reads the tokenizer and audits the study
    rather than after; stopped at once if any of that fails. Launched only after the flags and the
    config are checked, so a usage error never starts one."""
    from flows.server import check_prefect_env, early_server, stop

    try:
        check_prefect_env()
    except PathflowError as e:
        _fail(str(e))
    server = early_server()
    try:
        yield server
    except BaseException:
        if server:
            stop(server[0])
        raise


def _resume_hint(run) -> str:
    """How to finish ``run``: only for a run that exists and is not complete."""
    try:
        if run.exists() and run.manifest().get("status") != "complete":
            return f"\nthe run folder {run.url} can be resumed: pathflow run --resume {run.run_id}" + (
                f" --store {run.store.url}" if run.store.url != load_config(None).store.url else "")
    except Exception:  # the store is unreachable: no hint rather than a second error
        pass
    return ""


def _grace_seconds() -> float:
    from .envvars import INTERRUPT_GRACE_S

    return INTERRUPT_GRACE_S.read()


@contextmanager
def _interruptible(run, resumable: bool = True):
    """Ctrl-C and SIGTERM end the run promptly as resumable: the first signal asks the work to stop
    (batches stop between sub-batches, the flow marks the run failed and releases its lease);
    if that has not finished after PATHFLOW_INTERRUPT_GRACE_S seconds, or at a second signal, the
    run is marked and the process exits at once. Either way the temporary server is stopped and,
    for a ``resumable`` run, the resume command printed."""
    from storage.store import release_all

    from . import interrupt

    interrupt.clear()
    done = threading.Event()
    said = threading.Lock()

    def hint() -> str:
        return _resume_hint(run) if resumable else ""

    def stopped() -> None:
        """Leases the flow did not release (it did not unwind) are released with the run marked;
        the interruption is said once, whichever path gets here first."""
        if said.acquire(blocking=False):
            reason = interrupt.reason() or "SIGINT"
            release_all(fail=f"interrupted ({reason}); resumable")
            err.print(styled(("interrupted", "bold red"), f" ({reason})" + hint()))

    def hard_exit(code: int) -> None:
        from flows.server import stop_all

        stopped()
        stop_all()
        os._exit(code)

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        code = 128 + signum
        if interrupt.requested():
            hard_exit(code)
        interrupt.request(name)
        err.print(styled(("stopping", "yellow"), f" ({name}): finishing the current step; signal again to stop now"))

        def watchdog():
            if not done.wait(_grace_seconds()):
                hard_exit(code)

        threading.Thread(target=watchdog, daemon=True).start()
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        stopped()
        raise typer.Exit(128 + (signal.SIGTERM if interrupt.reason() == "SIGTERM" else signal.SIGINT)) from None
    except PathflowError as e:
        raise PathflowError(f"{e}{hint()}") from None
    finally:
        done.set()
        for s, h in old.items():
            signal.signal(s, h)


@app.command("run")
def run_cmd(config: Path | None = ConfigOpt, store: str | None = StoreOpt,
            resume: str | None = typer.Option(None, "--resume", help="finish run RUN_ID: recompute only what is "
                                              "missing"),
            allow_audit_errors: bool = typer.Option(False, "--allow-audit-errors",
                                                    help="run even when the study audit finds errors"),
            feature: list[str] | None = FeaturesOpt, layer: list[int] | None = LayersOpt,
            direction: str | None = DirectionOpt, top: int | None = TopOpt) -> None:
    """The full pipeline as a Prefect flow: every selected feature through every step."""
    if resume is not None:  # --resume "" is an invalid id, not a new run
        _check_run_id(resume)
        if feature or layer or direction or top:
            _fail("--resume finishes a run with its own selection: drop --feature/--layer/--direction/--top")
    cfg = _config_of_run(store, resume) if resume is not None and config is None else _load(config, store)
    _apply_selection(cfg, feature, layer, direction, top)
    with _server_booting() as server:
        run = _preflight(cfg, resume)
        _study_checked(cfg, allow_audit_errors)
        from flows.pipeline import run_pipeline
    from flows.server import prefect_api

    _prefect_imported()
    _settle()
    err.print(styled("run ", (run.run_id, "bold"), f" in {run.store.url}"))
    try:
        with _interruptible(run), prefect_api(server), _batch_progress(run):
            result = run_pipeline(cfg, run_id=run.run_id, resume=resume is not None,
                                  allow_audit_errors=allow_audit_errors)
    except PathflowError as e:
        _fail(str(e), 1)
    rows = result["rows"]
    t = Table(title=f"{result['n_targets']} features traced")
    for col in ("feature", "direction", "prompt", "n_validated", "sign_agreement", "spearman", "top_upstream"):
        t.add_column(col)
    for r in rows[:80]:
        t.add_row(*[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in
                    ("feature", "direction", "prompt", "n_validated", "sign_agreement", "spearman", "top_upstream")])
    console.print(t)
    if len(rows) > 80:
        console.print(f"the first 80 of {len(rows)} rows; every row is in integrated/summary.csv, every feature in "
                      "integrated/report.html")
    _print_done(result)


def _check_run_id(run_id: str) -> str:
    from .locations import check_run_id

    try:
        return check_run_id(run_id)
    except PathflowError as e:
        _fail(str(e))


def _config_of_run(store: str | None, run_id: str):
    """The resolved config a run was started with, from its manifest."""
    from pydantic import ValidationError

    from .config import Config

    run = _run_or_fail(store, run_id)
    try:
        cfg = Config.model_validate(run.manifest()["config"])
        cfg.store.url = run.store.url
    except ValidationError as e:
        _fail(f"the config in run {run_id}'s manifest is not valid here: {e.errors()[0]['msg']}")
    except PathflowError as e:
        _fail(str(e))
    return cfg


class _batch_progress:
    """A terminal progress bar fed by the run folder's batch markers (works for any executor)."""

    def __init__(self, run) -> None:
        self.run = run

    def __enter__(self):
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
            try:
                if plan is None:  # written once per run, before the first batch starts
                    plan = set(self.run.read_json("pathways/plan.json")["batches"])
                    task = self.bar.add_task("batches", total=len(plan))
                self.bar.update(task, completed=len(done_batches(self.run) & plan))
            except Exception:  # not written yet, or the store hiccuped: the next poll tries again
                continue

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(2)
        self.bar.stop()


@app.command("graphs")
def graphs_cmd(run_id: str = typer.Argument(..., help="the run whose attribution graphs to show"),
               store: str | None = StoreOpt,
               port: int = typer.Option(8032, "--port", min=0, max=65535, help="port on 127.0.0.1 (0: any free one)"),
               frontend: Path | None = typer.Option(None, "--frontend", help="circuit-tracer's frontend/assets folder "
                                                    "(default: the installed circuit-tracer's)"),
               as_json: bool = JsonOpt) -> None:
    """Serve a run's whole-prompt attribution graphs in circuit-tracer's page until Ctrl-C."""
    from .viewer import frontend_dir, graph_list, make_server

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
        console.print(styled("serving at ", (base, "bold"), " (the page loads d3 from the internet); Ctrl-C stops"))
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


runs_app = typer.Typer(help="the runs in a store: list, show, verify, diff, rm", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


def _store(store: str | None):
    from storage.store import Store

    try:
        return Store(load_config(None, store=store).store.url)
    except PathflowError as e:
        _fail(str(e))


def _run_or_fail(store: str | None, run_id: str):
    _check_run_id(run_id)
    run = _store(store).run(run_id)
    try:
        found = run.exists()
    except OSError as e:
        _fail(f"cannot read store {run.store.url}: {e}")
    if not found:
        _fail(f"no run {run_id} in store {run.store.url} (give --store or set PATHFLOW_STORE)")
    return run


def _manifest(run) -> dict:
    try:
        return run.manifest()
    except PathflowError as e:
        _fail(str(e), 1)


@runs_app.command("list")
def runs_list(store: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Every run in the store, newest last."""
    s = _store(store)
    rows = []
    t = Table(title=f"runs in {s.url}")
    t.add_column("run", no_wrap=True, min_width=22)
    for col in ("status", "kind", "created", "outputs", "config"):
        t.add_column(col, overflow="fold", no_wrap=col != "created")
    try:
        ids = s.run_ids()
    except PathflowError as e:
        _fail(str(e), 1)
    for rid in ids:
        try:
            m = s.run(rid).manifest()
        except (PathflowError, OSError) as e:
            rows.append({"run_id": rid, "status": "unreadable", "error": str(e)})
            t.add_row(rid, Text("unreadable", style="red"), "", "", "", str(e)[:60])
            continue
        rows.append({"run_id": rid, "status": m.get("status"), "kind": m.get("kind"), "created": m.get("created"),
                     "outputs": len(m.get("outputs") or {}), "config_hash": m.get("config_hash"),
                     "error": m.get("error")})
        t.add_row(rid, str(m.get("status", "?")), str(m.get("kind", "")),
                  str(m.get("created", "")).replace("+00:00", "Z"), str(len(m.get("outputs", {}))),
                  str(m.get("config_hash", ""))[:8])
    if as_json:
        _print_json({"store": s.url, "runs": rows})
        return
    console.print(t)


@runs_app.command("show")
def runs_show(run_id: str, store: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """A run's manifest: status, versions, inputs, steps, outputs."""
    m = _manifest(_run_or_fail(store, run_id))
    if as_json:
        _print_json(m)
        return
    model, sae = m.get("model") or {}, m.get("sae") or {}
    console.print(styled((run_id, "bold"), f" {m['status']}  created {m.get('created')}  pathflow "
                         f"{m.get('pathflow_version')}  commit {m.get('git_commit') or '–'}  config "
                         f"{str(m.get('config_hash', ''))[:12]}"))
    console.print(f"model {model.get('name_or_path')} @ {model.get('revision') or 'local'};  "
                  f"SAEs {sae.get('root')} ({len(sae.get('layers') or {})} layers hashed);  "
                  f"{len(m.get('inputs') or {})} input files hashed;  positions {m.get('positions') or '–'}")
    t = Table(title="steps")
    for col in ("step", "status", "seconds"):
        t.add_column(col)
    for name, st in (m.get("steps") or {}).items():
        st = st if isinstance(st, dict) else {}
        t.add_row(str(name), str(st.get("status", "")), str(st.get("seconds", "")))
    console.print(t)
    console.print(f"{len(m.get('outputs') or {})} outputs with sha256" + (f"; error: {m['error']}" if m.get("error")
                                                                           else ""))


@runs_app.command("rm")
def runs_rm(run_ids: list[str] = typer.Argument(..., help="runs to delete (failed or interrupted ones only)"),
            store: str | None = StoreOpt,
            yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")) -> None:
    """Delete failed or interrupted runs. A complete run is never deleted, nor one being written."""
    runs = [_run_or_fail(store, rid) for rid in run_ids]
    for run in runs:
        status = _manifest(run).get("status")
        if status == "complete":
            _fail(f"run {run.run_id} is complete; a complete run is never deleted")
        if run.writer():
            _fail(f"run {run.run_id} is being written by another process; stop it first")
    if not yes:
        if not sys.stdin.isatty():
            _fail("pass --yes to delete without a prompt")
        if not typer.confirm(f"delete {len(runs)} run folder(s): {', '.join(r.run_id for r in runs)}?"):
            raise typer.Exit(1)
    for run in runs:
        try:
            n = run.remove()
        except PathflowError as e:
            _fail(str(e), 1)
        console.print(styled("removed ", (run.run_id, "bold"), f" ({n} files)"))


@runs_app.command("verify")
def runs_verify(run_id: str, store: str | None = StoreOpt) -> None:
    """Check every output's sha256 against the manifest, and that the folder holds nothing else.
    Exit 1 on a mismatch, a missing file or a file the manifest does not list."""
    from storage.store import TMP  # the infix of an unfinished write's temporary

    run = _run_or_fail(store, run_id)
    m = _manifest(run)
    if m.get("status") != "complete":
        _fail(f"run {run_id} is {m.get('status')}, not complete: nothing to verify yet", 1)
    try:
        present = set(run.files())
    except OSError as e:
        _fail(f"run {run_id} cannot be listed: {e}", 1)
    bad = []
    for rel, digest in sorted(m["outputs"].items()):
        what = run.not_regular(rel)
        if rel not in present:
            bad.append((rel, "missing"))
        elif what:
            bad.append((rel, f"{what}, not a regular file (not read)"))
        elif run.sha256(rel) != digest:
            bad.append((rel, "sha256 differs"))
    extra = run.unlisted(m)
    for rel, why in bad:
        console.print(styled((why, "red"), f" {rel}"))
    for rel in extra:
        what = run.not_regular(rel)
        why = ("leftover temporary (a write that never finished)" if TMP in rel else
               f"not in the manifest ({what})" if what else "not in the manifest")
        console.print(styled((why, "red"), f" {rel}"))
    if bad or extra:
        _fail(f"run {run_id} does not match its manifest: {len(bad)} of {len(m['outputs'])} outputs missing or "
              f"changed, {len(extra)} files it does not list", 1)
    console.print(styled(("ok", "green"), f": {len(m['outputs'])} outputs match the manifest, nothing else in the "
                         "folder"))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@runs_app.command("diff")
def runs_diff(run_a: str, run_b: str, store: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Config and result differences between two runs. Results are compared as results: run ids,
    graph slugs, timings, hosts and other bookkeeping are ignored, floats to float32 precision, Zarr
    arrays to the precision they were stored with. Exit 0 when the
    results are the same, 1 when they differ."""
    from storage.diff import result_differences

    a, b = _run_or_fail(store, run_a), _run_or_fail(store, run_b)
    for r in (a, b):
        for rel in r.files():
            what = r.not_regular(rel)
            if what:
                _fail(f"run {r.run_id} holds {rel}, {what}, not a regular file: check it with `pathflow runs verify "
                      f"{r.run_id}`", 1)
    ma, mb = _manifest(a), _manifest(b)
    ca, cb = _flat(ma.get("config") or {}), _flat(mb.get("config") or {})
    config = {k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
    results = result_differences(a, b)
    pathways = []
    try:
        va = a.read_json("pathways/validated_pathways.json")["targets"]
        vb = b.read_json("pathways/validated_pathways.json")["targets"]
    except Exception:
        va = vb = {}
    for feat in sorted(set(va) | set(vb)):
        for prompt in sorted(set(va.get(feat, {})) | set(vb.get(feat, {}))):
            ta = [c["feature"] for c in va.get(feat, {}).get(prompt, {}).get("candidates", [])[:5]]
            tb = [c["feature"] for c in vb.get(feat, {}).get(prompt, {}).get("candidates", [])[:5]]
            if ta != tb:
                pathways.append({"feature": feat, "prompt": prompt, "top5_a": ta, "top5_b": tb})
    same = not (results["differ"] or results["only_in_a"] or results["only_in_b"])
    if as_json:
        _print_json({"a": run_a, "b": run_b, "config": config, "results": results, "pathways": pathways,
                     "same_results": same})
        raise typer.Exit(0 if same else 1)
    t = Table(title="config")
    for col in ("key", run_a, run_b):
        t.add_column(col)
    for k, (x, y) in config.items():
        t.add_row(k, json.dumps(x), json.dumps(y))
    console.print(t if t.row_count else "config: identical")
    if same:
        console.print(styled(("results: identical", "green"), f" ({results['compared']} files compared; run ids, "
                             "timings and other bookkeeping ignored)"))
    else:
        t = Table(title=f"results: {len(results['differ'])} of {results['compared']} files differ")
        for col in ("file", "first difference"):
            t.add_column(col)
        for d in results["differ"][:40]:
            t.add_row(d["file"], d["where"])
        for rel in results["only_in_a"][:10]:
            t.add_row(rel, f"only in {run_a}")
        for rel in results["only_in_b"][:10]:
            t.add_row(rel, f"only in {run_b}")
        console.print(t)
    if pathways:
        t = Table(title="pathways")
        for col in ("feature", "prompt", f"top-5 {run_a}", f"top-5 {run_b}"):
            t.add_column(col)
        for p in pathways:
            t.add_row(p["feature"], p["prompt"], " ".join(p["top5_a"]) or "–", " ".join(p["top5_b"]) or "–")
        console.print(t)
    raise typer.Exit(0 if same else 1)


def console_main() -> None:
    """The ``pathflow`` console script and ``python -m pathflow``: ``main`` in a process of its own.
    Such a process freezes what it has built before a run's flow (``_settle``) and again at exit, so the
    garbage collector never walks those objects again — at 1,500 features the final collection of
    half a million objects alone took 1.2 s."""
    CONSOLE[0] = True
    _bound_malloc_arenas()
    try:
        main()
    finally:
        gc.freeze()


def _bound_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena and keeps it (~0.2 GiB each after large
    tensor work); Prefect runs every task in a thread of its own, so a long run grows by an arena per batch.
    Two arenas (MALLOC_ARENA_MAX=2, here set from inside) halved a 16-layer run's peak with no slowdown.
    A MALLOC_ARENA_MAX the user set wins."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


def _settle() -> None:
    """Before a long flow in the console process: move the objects of start-up (imports, the study,
    the tokenizer) out of the collector's generations; each full collection during the run then walks
    only what the run makes."""
    if CONSOLE[0]:
        gc.collect()
        gc.freeze()


def _is_prefect_api_error(e: BaseException) -> bool:
    """An HTTP transport error on the way to the Prefect API (its server died, the network went)."""
    try:
        import httpx
    except ImportError:
        return False
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (httpx.TransportError, httpx.HTTPStatusError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def main() -> None:
    """Entry point: a user's problem is one line and exit 2 (usage) or 1; an unexpected error is one
    line too (with ``-v``, its traceback), never a bare traceback."""
    try:
        app()
    except KeyboardInterrupt:
        err.print(styled(("interrupted", "bold red")))
        sys.exit(130)
    except PathflowError as e:
        err.print(styled(("error: ", "bold red"), str(e)))
        sys.exit(1)
    except Exception as e:
        if VERBOSE[0]:
            import traceback

            traceback.print_exc()
        name = type(e).__name__
        if _is_prefect_api_error(e):
            err.print(styled(("error: ", "bold red"), f"the Prefect API stopped answering ({name}: {str(e)[:120]}); "
                             "was its server stopped? The run can be resumed: pathflow runs list shows it"))
            sys.exit(1)
        if isinstance(e, OSError) or any(w in name for w in ("Connection", "Endpoint", "Timeout", "Credentials")):
            # the environment, not pathflow: an unreachable store, missing credentials, a full disk
            err.print(styled(("error: ", "bold red"), f"{name}: {e}",
                             ("  (check the store URL, credentials and network; -v shows the traceback)", "dim")))
        else:
            err.print(styled(("error: ", "bold red"), f"unexpected {name}: {e}",
                             ("  (a bug in pathflow: run again with -v for the traceback and report it)", "dim")))
        sys.exit(1)
