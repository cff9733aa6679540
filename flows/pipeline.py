"""The full pipeline of DESIGN §1 as one flow run: ``pathflow run`` and the deployments."""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import TerminationSignal
from prefect.futures import as_completed
from prefect.utilities.annotations import quote

from flows.common import auto_run_id, current_flow_run_id, result_of, run_name
from pathflow import interrupt
from pathflow.config import Config
from pathflow.errors import PathflowError, quiet_user_errors
from pathflow.integrate import summary_rows
from pathflow.pathways import plan_batches
from pathflow.preflight import preflight
from pathflow.provenance import changed_inputs, provenance, sae_provenance
from pathflow.study import audit_errors
from pathflow.weights import check_files
from storage.store import Run, Store, git_commit, new_run_id, redact
from tasks.common import open_run, run_folder_artifact, step
from tasks.contrast import contrast_prompts
from tasks.graphs import attribution_graphs
from tasks.integrate import integrate_features
from tasks.pathways import batch_pathways, merge_pathways, prepare_jacobians, write_plan
from tasks.study import audit_study, select_features
from tasks.tokens import token_associations

quiet_user_errors()


def trace_pathways(config: Config, store_url: str, run_id: str, targets: list[dict]) -> dict:
    """Phases A–C over every target: batches by layer, mapped, with a progress artifact."""
    with step(open_run(store_url, run_id), "pathways", targets=len(targets)):
        prepare_jacobians(config, store_url, run_id, targets)
        batches = plan_batches(targets, config.gradients.batch_size)
        write_plan(open_run(store_url, run_id), batches)
        progress = create_progress_artifact(0.0, key="pathflow-progress",
                                            description=f"pathway batches of run {run_id}")
        futures = batch_pathways.map(unmapped(config), unmapped(store_url), unmapped(run_id), batches)
        done: dict[str, dict] = {}
        for fut in as_completed(futures):
            r = fut.result()
            done[r["marker"]["batch"]] = r
            update_progress_artifact(progress, 100.0 * len(done) / len(batches))
        return merge_pathways(config, store_url, run_id, quote([done[b.name] for b in batches]))


def audit_and_select(config: Config, run_id: str, run, allow_audit_errors: bool = False) -> tuple[dict, list[dict]]:
    """Steps 1–2: the audited study and the targets to trace (each with its row ``index``). A study
    whose audit found errors stops the run unless ``allow_audit_errors``."""
    logger = get_run_logger()
    audited = audit_study(config, config.store.url, run_id)
    if audited["report"]["errors"]:
        if not allow_audit_errors:
            raise PathflowError(audit_errors(audited["report"]))
        logger.warning("going on despite %d study audit errors (allow_audit_errors)", len(audited["report"]["errors"]))
    selected = select_features(config, config.store.url, run_id, quote(audited))["selected"]
    skipped = [s["feature"] for s in selected if s["layer"] == 0]
    if skipped:
        logger.warning("not traced (layer 0 has no upstream SAE features): %s", ", ".join(skipped))
    targets = [{**s, "index": i} for i, s in enumerate(s for s in selected if s["layer"] > 0)]
    if not targets:
        raise PathflowError("no selected feature above layer 0 to trace")
    check_files(config, list(range(max(t["layer"] for t in targets) + 1)))  # remembered from the CLI's check
    logger.info("tracing %d features in %d layers", len(targets), len({t["layer"] for t in targets}))
    run.update(sae=sae_provenance(config, sorted({l for t in targets for l in range(t["layer"] + 1)})))
    return audited, targets


def run_steps(config: Config, run, trace, allow_audit_errors: bool = False) -> dict:
    """Steps 1–5 of a started run around ``trace(targets) -> validated`` (step 3), then the run marked
    complete; any error marks it failed (what it wrote stays, for a resume) and is raised again.
    The run's lease is released either way."""
    try:
        audited, targets = audit_and_select(config, run.run_id, run, allow_audit_errors)
        validated = trace(targets)
        tokens = token_associations(config, config.store.url, run.run_id, quote(targets))
        graphs = attribution_graphs(config, config.store.url, run.run_id, quote(targets), quote(tokens))
        contrast = contrast_prompts(config, config.store.url, run.run_id, quote(targets))
        # quote(): results pass to the next task as they are; Prefect would otherwise walk every nested
        # value looking for futures (minutes at 1,500 features)
        records = integrate_features(config, config.store.url, run.run_id, quote(targets), quote(audited["features"]),
                                     quote(validated), quote(tokens), quote(graphs), quote(contrast))
        manifest = run.complete()
    except BaseException as e:
        mark_failed(run, e)
        raise
    finally:
        run.lease.release()
    run_folder_artifact(run, manifest["status"])
    # the summary rows, not the records: a flow's return value is walked by Prefect too
    return {"run_id": run.run_id, "run_url": run.url, "status": manifest["status"], "n_targets": len(targets),
            "rows": summary_rows(records), "flow_run_id": current_flow_run_id()}


def mark_failed(run, e: BaseException) -> None:
    """Mark the run failed with what happened. A signal (KeyboardInterrupt, Prefect's
    TerminationSignal — not Exceptions) also asks the batches still running in other threads to
    stop, so the task runner's shutdown does not wait for them to finish."""
    if not isinstance(e, Exception):
        if not interrupt.requested():
            interrupt.request("SIGTERM" if isinstance(e, TerminationSignal) else "SIGINT")
        run.fail(f"interrupted ({interrupt.reason()}); resumable")
    else:
        run.fail(f"{type(e).__name__}: {e}")


def check_resumable(run, config: Config) -> dict:
    """The manifest of a run that ``config`` may resume (exists, not complete, same config hash)."""
    if not run.exists():
        raise PathflowError(f"no run {run.run_id} in store {redact(config.store.url)}")
    m = run.manifest()
    if m["status"] == "complete":
        raise PathflowError(f"run {run.run_id} is complete; a complete run is never changed (start a new run)")
    if m.get("config_hash") != config.hash():
        raise PathflowError(f"run {run.run_id} was made with another config (hash {str(m.get('config_hash'))[:12]}…); "
                            "resume it with the config in its manifest")
    changes = changed_inputs(m, config)
    if changes:  # a resume would mix batches computed on the old and the new inputs
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise PathflowError(f"run {run.run_id} cannot be resumed: {changes[0]}{more} since it started; its finished "
                            "batches were computed on the old inputs. Restore them, or start a new run")
    return m


def start_or_resume(config: Config, run_id: str, resume: bool, kind: str, **extra) -> Run:
    """Check everything that can be checked before work (``preflight``), take the run's lease (one
    writer at a time), then start a new run or reopen an unfinished one. The returned run carries
    its lease (``run.lease``); ``run_steps`` releases it."""
    store = Store(config.store.url)
    run = store.run(run_id)  # a run id that could leave the store is refused here, before anything
    store.check_writable()
    positions = preflight(config)
    if resume:
        check_resumable(run, config)
    elif run.exists():
        raise PathflowError(f"run {run_id} already exists in {redact(config.store.url)}: choose another run id, or "
                            f"finish it with resume (pathflow run --resume {run_id})")
    lease = run.acquire(note=kind)
    lease.on_lost = lambda: interrupt.request(f"run {run_id}'s lease was taken by another process")
    try:
        if resume:  # read again under the lease: another writer may have finished it meanwhile
            m = check_resumable(run, config)
            removed = run.remove_temporaries()  # of writes a killed process never finished
            if removed:
                get_run_logger().info("removed %d unfinished temporary files of run %s", removed, run_id)
            resumes = m["resumes"] if isinstance(m.get("resumes"), int) else 0
            run.update(status="running", resumes=resumes + 1, error=None)
        else:
            run.start({**provenance(config), "git_commit": git_commit(), "kind": kind, "positions": positions,
                       **extra})
    except BaseException:
        lease.release()
        raise
    run.lease = lease
    return run


@flow(name="pathflow-run", flow_run_name=run_name("run"), log_prints=True)
def pipeline_flow(config: Config | str, run_id: str | None = None, resume: bool = False,
                  allow_audit_errors: bool = False) -> dict:
    """Audit → select → Jacobians → top-k → replay (mapped over batches) → tokens → graphs → contrast → integrate.

    ``config``: the config, or the path of its YAML file on the worker (``PATHFLOW_STORE`` there
    overrides its store). ``run_id``: a new run's id (default: the date and the flow run's id), or
    the run to finish when ``resume``.
    """
    from pathflow.config import load_config

    config = load_config(config) if isinstance(config, str) else config
    run_id = run_id or auto_run_id()
    store_url = config.store.url
    run = start_or_resume(config, run_id, resume, "pipeline")
    return run_steps(config, run, lambda targets: trace_pathways(config, store_url, run_id, targets),
                     allow_audit_errors)


def run_pipeline(config: Config, run_id: str | None = None, resume: bool = False,
                 allow_audit_errors: bool = False) -> dict:
    """Run the flow; a failed run raises PathflowError with the failure's message."""
    state = pipeline_flow(config=config, run_id=run_id or new_run_id(), resume=resume,
                          allow_audit_errors=allow_audit_errors, return_state=True)
    return result_of(state)
