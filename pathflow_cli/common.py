"""What every command shares: the app, the consoles, the options, config loading, the demo bundle, errors."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer
from rich.text import Text

from pathflow.config import ConfigError, load_config
from pathflow.errors import PathflowError
from pathflow.safe_text import SafeConsole


def _flags_take_no_value() -> None:
    """typer 0.29's help prints "<bool>" after an on/off flag, as if it took a value: show nothing there."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_pathflow", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) or getattr(self, "count", False) else shown(self, ctx)

    display_type_rich._pathflow = True
    TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()


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


def _check_requested(features: list[dict], cfg, report: dict) -> None:
    """Every feature asked for by name (--feature, selection.include) is in the study's results."""
    from pathflow.study import missing_features

    for asked, what in ((cfg.selection.features or [], "--feature"), (cfg.selection.include, "selection.include")):
        problem = missing_features(features, asked, report["ranges"])
        if problem:
            _fail(f"{what} {problem}" if what.startswith("--") else f"{what}: {problem}")


def _study_checked(cfg, allow_audit_errors: bool) -> list[dict]:
    """Audit and select before any server starts: audit errors stop the command unless allowed,
    requested features must be in the study, and something above layer 0 must be selected.
    Returns the selection."""
    from pathflow.study import audit_errors, select

    try:
        report, features = _audit_with_progress(cfg, remember=True)  # the flow's audit step takes it again
    except PathflowError as e:
        _fail(str(e))
    if report["errors"] and not allow_audit_errors:
        _fail(audit_errors(report), 1)
    if report["errors"]:
        err.print(styled(("warning", "yellow"), f": going on despite {len(report['errors'])} study audit errors"))
    _check_requested(features, cfg, report)
    selected = select(features, cfg)
    if not any(s["layer"] > 0 for s in selected):
        _fail("nothing to trace: no selected feature above layer 0 (check --feature/--layer/--direction and "
              "`pathflow select`)")
    from pathflow.weights import check_files

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


def _demo_written(directory: Path, seed: int = 0) -> bool:
    """Whether ``directory`` holds a complete demo bundle of ``seed`` (written last: its metrics)."""
    try:
        metrics = json.loads((directory / "demo_metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (directory / "config.yaml").is_file() and metrics.get("seed", 0) == seed


def _write_demo(directory: Path, seed: int = 0) -> Path:
    """Write the demo bundle with a progress bar on stderr (about half a minute on a laptop CPU)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pathflow.demo import write_demo

    with Progress(TextColumn(f"demo bundle → {directory}: {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("starting", total=None)
        try:
            return write_demo(directory, seed=seed, progress=lambda done, total, what: bar.update(
                task, completed=done, total=total, description=what))
        except PathflowError as e:
            bar.stop()
            _fail(str(e))


def _ensure_demo(directory: Path) -> Path:
    cfg = directory / "config.yaml"
    if not cfg.is_file():
        err.print(styled("no --config given: using the demo bundle, written now to ", (directory.resolve(), "bold"),
                         " (PATHFLOW_DEMO_DIR chooses where)"), soft_wrap=True)
        _write_demo(directory)
    return cfg


def _load(config: Path | None, store: str | None):
    try:
        path = config if config is not None else _ensure_demo(_demo_dir())
        cfg = load_config(path, store=store)
    except ConfigError as e:
        _fail(str(e))
    where = cfg.store.url if "://" in cfg.store.url else os.path.abspath(cfg.store.url)
    err.print(styled("config ", (Path(path).resolve(), "bold"), "" if config is not None else " (the demo bundle)",
                     "   store ", (where, "bold")), soft_wrap=True)
    return cfg


def _version(value: bool) -> None:
    if value:
        from pathflow import __version__

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
    from pathflow.envvars import check_all

    try:
        check_all()  # every PATHFLOW_* variable, before any work
    except PathflowError as e:
        _fail(str(e))
    # a GPU node or laptop may have no internet: no telemetry attempts, no download bars in our output
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _audit_with_progress(cfg, remember: bool = False):
    """Run the audit with a progress bar over the bytes of every study file."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from pathflow.readers import expand
    from pathflow.study import audit

    s = cfg.study
    files = expand(s.checkpoints + s.response_logs + s.revalidation)
    total = sum(p.stat().st_size for p in files if p.is_file())
    with Progress(TextColumn("reading the study"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=total < 50 * 2**20) as bar:
        task = bar.add_task("read", total=total)
        return audit(cfg, progress=lambda _p, n: bar.advance(task, n), remember=remember)


def _check_run_id(run_id: str) -> str:
    from pathflow.locations import check_run_id

    try:
        return check_run_id(run_id)
    except PathflowError as e:
        _fail(str(e))


def _config_of_run(store: str | None, run_id: str):
    """The resolved config a run was started with, from its manifest."""
    from pydantic import ValidationError

    from pathflow.config import Config

    run = _run_or_fail(store, run_id)
    try:
        cfg = Config.model_validate(run.manifest()["config"])
        cfg.store.url = run.store.url
    except ValidationError as e:
        _fail(f"the config in run {run_id}'s manifest is not valid here: {e.errors()[0]['msg']}")
    except PathflowError as e:
        _fail(str(e))
    return cfg


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

