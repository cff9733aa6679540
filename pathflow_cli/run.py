"""`pathflow demo`, `pathflow local` and `pathflow run`: the demo bundle and the flows, with progress and Ctrl-C."""

from __future__ import annotations

import gc
import json
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from pathflow.config import load_config
from pathflow.errors import PathflowError

from .common import (
    CONSOLE,
    DEFAULT_DEMO_DIR,
    ConfigOpt,
    DirectionOpt,
    FeaturesOpt,
    LayersOpt,
    StoreOpt,
    TopOpt,
    _apply_selection,
    _check_run_id,
    _config_of_run,
    _demo_written,
    _fail,
    _load,
    _prefect_imported,
    _study_checked,
    _write_demo,
    app,
    console,
    err,
    styled,
)


@app.command()
def demo(directory: Path = typer.Argument(Path(DEFAULT_DEMO_DIR), help="where to write the bundle "
                                         "(default ./pathflow-demo, where `pathflow run` and `pathflow local` "
                                         "look for it when no --config is given; PATHFLOW_DEMO_DIR moves it)"),
         seed: int = typer.Option(0, help="random seed (the bundle is deterministic in it)")) -> None:
    """Write the embedded demo bundle: tiny LLaMA model + tokenizer, LlamaScope-format SAEs, a study.

    About half a minute on a laptop CPU, offline. Safe to repeat: a folder that already holds the bundle
    of this seed is left as it is."""
    if _demo_written(directory, seed):
        err.print(styled("the demo bundle (seed ", str(seed), ") is already in ", (directory, "bold"),
                         ": nothing written"))
        cfg = directory / "config.yaml"
    else:
        cfg = _write_demo(directory, seed)
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
    from pathflow.study import parse_feature

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
    """Where the results are: the run folder, its report, and the flow run's page when the Prefect
    server is one the user runs (PREFECT_API_URL); a temporary server's page is gone at exit."""
    # paths and URLs whole, never folded: a terminal wraps them and they still copy as one
    console.print(styled("run ", (result["run_id"], "bold"), f" {result['status']}: ", (result["run_url"], "bold")),
                  soft_wrap=True)
    console.print(styled("report: ", (f"{result['run_url']}/integrated/report.html", "bold")), soft_wrap=True)
    if os.environ.get("PREFECT_API_URL") and result.get("flow_run_id"):
        try:
            from prefect.settings import PREFECT_UI_URL

            ui = PREFECT_UI_URL.value()
        except Exception:  # a setting Prefect cannot derive: the URL is a convenience only
            ui = None
        if ui:
            console.print(styled("flow run: ", (f"{ui.rstrip('/')}/runs/flow-run/{result['flow_run_id']}", "bold")),
                          soft_wrap=True)


def _preflight(cfg, resume: str | None = None):
    """Everything checkable before a server starts or work begins: the store (persistent, writable,
    not inside a run), the run id, the device, the prompts and the target position. Returns the Run."""
    from flows.pipeline import check_resumable
    from pathflow.preflight import preflight
    from storage.store import Store, new_run_id

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


def _same_config(store, cfg, newest: int = 50) -> str | None:
    """The newest complete run among the store's last ``newest`` whose config hash is ``cfg``'s, if any."""
    try:
        ids = store.run_ids()[-newest:]
    except (PathflowError, OSError):
        return None
    want = cfg.hash()
    for rid in reversed(ids):
        try:
            m = store.run(rid).manifest()
        except (PathflowError, OSError, ValueError):
            continue
        if m.get("status") == "complete" and m.get("config_hash") == want:
            return rid
    return None


def _reused(run) -> str:
    """What a resume keeps of ``run``: its finished pathway batches (each with its completion marker);
    every later step is computed again from them."""
    from tasks.pathways import done_batches

    try:
        done = len(done_batches(run))
        planned = len(run.read_json("pathways/plan.json")["batches"]) if run.exists("pathways/plan.json") else None
    except (PathflowError, OSError, ValueError, KeyError):
        return f"resuming run {run.run_id}"
    of = f" of {planned}" if planned is not None else ""
    return (f"resuming run {run.run_id}: {done}{of} pathway batches are finished and kept; the other batches, then "
            "tokens, graphs, contrast and integrate, are computed now")


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
    from pathflow.envvars import INTERRUPT_GRACE_S

    return INTERRUPT_GRACE_S.read()


@contextmanager
def _interruptible(run, resumable: bool = True):
    """Ctrl-C and SIGTERM end the run promptly as resumable: the first signal asks the work to stop
    (batches stop between sub-batches, the flow marks the run failed and releases its lease);
    if that has not finished after PATHFLOW_INTERRUPT_GRACE_S seconds, or at a second signal, the
    run is marked and the process exits at once. Either way the temporary server is stopped and,
    for a ``resumable`` run, the resume command printed."""
    from pathflow import interrupt
    from storage.store import release_all

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
    if resume is not None:
        err.print(_reused(run))
    else:
        err.print(styled("run ", (run.run_id, "bold"), f" in {run.store.url}"))
        twin = _same_config(run.store, cfg)
        if twin:
            err.print(styled(("note: ", "yellow"), "run ", (twin, "bold"), " in this store is complete with the same "
                             "config: this run recomputes it (Ctrl-C stops; `pathflow runs diff "
                             f"{twin} {run.run_id}` compares them after)"))
    try:
        with _interruptible(run), prefect_api(server), _batch_progress(run):
            result = run_pipeline(cfg, run_id=run.run_id, resume=resume is not None,
                                  allow_audit_errors=allow_audit_errors)
    except PathflowError as e:
        _fail(str(e), 1)
    rows = result["rows"]
    t = Table(title=f"{result['n_targets']} features traced", box=box.SIMPLE_HEAD, pad_edge=False,
              collapse_padding=True)  # fits 80 columns with every header whole
    for col in ("feature", "direction", "prompt", "validated", "sign agr.", "Spearman", "top upstream"):
        t.add_column(col, justify="right" if col in ("validated", "sign agr.", "Spearman") else "left", no_wrap=True)
    for r in rows[:80]:
        t.add_row(r["feature"], r["direction"], r["prompt"], f"{r['n_validated']}/{r['n_candidates']}",
                  *[f"{r[c]:.2f}" if isinstance(r[c], float) else "–" for c in ("sign_agreement", "spearman")],
                  str(r["top_upstream"]))
    console.print(t)
    if len(rows) > 80:
        console.print(f"the first 80 of {len(rows)} rows; every row is in integrated/summary.csv, every feature in "
                      "integrated/report.html")
    _print_done(result)


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


def _settle() -> None:
    """Before a long flow in the console process: move the objects of start-up (imports, the study,
    the tokenizer) out of the collector's generations; each full collection during the run then walks
    only what the run makes."""
    if CONSOLE[0]:
        gc.collect()
        gc.freeze()

