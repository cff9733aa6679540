"""Several GPUs, several machines: the pipeline with its pathway batches fanned out over child runs.

The parent (``pathflow-sharded``) audits, selects, creates ``jacobians.zarr`` and the plan, then
starts one child run of a shard deployment (``pathflow-shard``) per shard with Prefect's
``run_deployment``: the children land on whatever workers serve that deployment's pool, each
writing its batches' rows and parts into the same run folder (an ``s3://`` or ``gs://`` store
when the workers are on several machines). When every child has finished, the parent merges the
parts, finds the token views and integrates, as ``pathflow-run`` does.

A failed child is started again (``shard_retries`` times); its batches' done markers make the new
child skip what the failed one finished. A shard that still fails fails the parent with its name,
and every batch that any child finished stays in the run folder: ``resume=true`` with the same
``run_id`` computes only the missing batches.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.utilities.annotations import quote

from flows.common import auto_run_id, run_name
from flows.pipeline import run_steps, start_or_resume
from pathflow.config import Config, load_config
from pathflow.errors import PathflowError, quiet_user_errors
from pathflow.pathways import plan_batches, shard_batches
from tasks.common import open_run, step
from tasks.pathways import (
    batch_pathways,
    done_batches,
    merge_pathways,
    prepare_jacobians,
    read_batch,
    shard_of_plan,
    write_plan,
)

quiet_user_errors()

SHARD_FLOW = "pathflow-shard"


def _shard_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"shard{p.get('shard')}-{p.get('run_id')}"


@flow(name=SHARD_FLOW, flow_run_name=_shard_run_name, log_prints=True)
def shard_flow(config: Config | str, run_id: str, shard: int) -> dict:
    """One shard of a sharded run: phases A–C for the batches the parent's plan gives shard ``shard``
    (one task run per batch). Batches already marked done are read back, not recomputed."""
    logger = get_run_logger()
    config = load_config(config) if isinstance(config, str) else config
    run = open_run(config.store.url, run_id)
    if run.manifest()["status"] == "complete":  # a complete run is never written to
        raise PathflowError(f"run {run_id} is complete: shard {shard} has nothing to do")
    batches = shard_of_plan(run, shard)
    logger.info("shard %d of run %s: %d batches, %d targets", shard, run_id, len(batches),
                sum(len(b.targets) for b in batches))
    progress = create_progress_artifact(0.0, key="pathflow-shard-progress",
                                        description=f"shard {shard} of run {run_id}")
    futures = batch_pathways.map(unmapped(config), unmapped(config.store.url), unmapped(run_id), batches)
    done = []
    for fut in as_completed(futures):
        done.append(fut.result())
        update_progress_artifact(progress, 100.0 * len(done) / len(batches))
    return {"shard": shard, "batches": [b.name for b in batches],
            "computed": sorted(r["marker"]["batch"] for r in done if not r["resumed"])}


def run_shards(config: Config, run_id: str, n_shards: int, deployment: str, retries: int,
               job_variables: dict | None, poll_seconds: float, batch_names: list[str]) -> dict[int, dict]:
    """Start one child run per shard and wait for all of them; retry failed ones. Returns
    {shard: {"flow_run": name, "state": ..., "attempts": n}}; raises PathflowError naming the shards
    that failed after their retries (the others' results stay in the run folder)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    run = open_run(config.store.url, run_id)
    params = {"config": config.model_dump(mode="json"), "run_id": run_id}

    def start(shard: int):
        fr = run_deployment(deployment, parameters={**params, "shard": shard}, timeout=0, as_subflow=True,
                            job_variables=job_variables)
        logger.info("shard %d: started flow run %s (%s)", shard, fr.name, fr.id)
        return fr

    progress = create_progress_artifact(0.0, key="pathflow-progress", description=f"pathway batches of run {run_id}")
    pending = {i: start(i) for i in range(n_shards)}
    attempts = dict.fromkeys(pending, 1)
    outcome: dict[int, dict] = {}
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(poll_seconds)
            for shard, fr in list(pending.items()):
                fr = client.read_flow_run(fr.id)
                if not fr.state or not fr.state.is_final():
                    pending[shard] = fr
                    continue
                del pending[shard]
                info = {"flow_run": fr.name, "flow_run_id": str(fr.id), "state": fr.state.name,
                        "message": fr.state.message, "attempts": attempts[shard]}
                if fr.state.is_completed():
                    outcome[shard] = info
                elif attempts[shard] <= retries:
                    logger.warning("shard %d: flow run %s ended %s (%s); starting it again (%d of %d retries)",
                                   shard, fr.name, fr.state.name, fr.state.message, attempts[shard], retries)
                    attempts[shard] += 1
                    pending[shard] = start(shard)
                else:
                    logger.error("shard %d: flow run %s ended %s: %s", shard, fr.name, fr.state.name,
                                 fr.state.message)
                    outcome[shard] = info
            update_progress_artifact(progress, 100.0 * len(done_batches(run) & set(batch_names)) / len(batch_names))
    failed = {s: o for s, o in outcome.items() if o["state"] != "Completed"}
    if failed:
        which = "; ".join(f"shard {s} (flow run {o['flow_run']}, {o['state']} after {o['attempts']} attempts: "
                          f"{o['message']})" for s, o in sorted(failed.items()))
        raise PathflowError(f"{len(failed)} of {n_shards} shards failed: {which}. The batches that finished are "
                            f"kept; run again with run_id={run_id} and resume=true to compute only the rest")
    return outcome


@flow(name="pathflow-sharded", flow_run_name=run_name("sharded"), log_prints=True)
def sharded_flow(config: Config | str, shards: int = 2, shard_deployment: str = "pathflow-shard/pathways-shard-process",
                 run_id: str | None = None, resume: bool = False, shard_retries: int = 1,
                 shard_job_variables: dict | None = None, poll_seconds: float = 5.0,
                 allow_audit_errors: bool = False) -> dict:
    """The pipeline with its pathway batches spread over ``shards`` child runs of ``shard_deployment``.

    ``config``: the config, or the path of its YAML file on the worker (``PATHFLOW_STORE`` there
    overrides its store; children get the parent's config, store included). Every child must reach
    the store: use an ``s3://`` or ``gs://`` store when they run on other machines.
    ``shard_job_variables``: job variables for the children's runs (image, env, …).
    """
    logger = get_run_logger()
    if shards < 1:
        raise PathflowError(f"shards must be at least 1, got {shards}")
    config = load_config(config) if isinstance(config, str) else config
    run_id = run_id or auto_run_id()
    store_url = config.store.url
    run = start_or_resume(config, run_id, resume, "sharded", shards=shards, shard_deployment=shard_deployment)
    if run.store.is_local:
        logger.warning("store %s is a local folder: shards on other machines cannot reach it "
                       "(use an s3:// or gs:// store for several machines)", store_url)
    def trace(targets: list[dict]) -> dict:
        with step(run, "pathways", targets=len(targets), shards=shards):
            prepare_jacobians(config, store_url, run_id, targets)
            batches = plan_batches(targets, config.gradients.batch_size)
            groups = shard_batches(batches, shards)
            write_plan(run, batches, groups)
            logger.info("%d batches in %d shards: %s", len(batches), len(groups),
                        "; ".join(f"shard {i}: {', '.join(b.name for b in g)}" for i, g in enumerate(groups)))
            outcome = run_shards(config, run_id, len(groups), shard_deployment, shard_retries, shard_job_variables,
                                 poll_seconds, [b.name for b in batches])
            run.update(shard_runs={str(s): o for s, o in sorted(outcome.items())})
            return merge_pathways(config, store_url, run_id, quote([read_batch(run, b.name) for b in batches]))

    result = run_steps(config, run, trace, allow_audit_errors)
    return {**result, "shards": len(run.manifest()["shard_runs"])}  # fewer than asked when batches are few
