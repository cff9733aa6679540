"""``pathflow local``: one causal feature through every step of DESIGN §1, as one flow run."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from flows.common import auto_run_id, current_flow_run_id, result_of, run_name
from flows.pipeline import mark_failed, start_or_resume, trace_pathways
from pathflow.config import Config
from pathflow.errors import quiet_user_errors
from pathflow.provenance import sae_provenance
from storage.store import new_run_id
from tasks.common import run_folder_artifact, step
from tasks.contrast import contrast_prompts
from tasks.graphs import attribution_graphs
from tasks.integrate import integrate_features
from tasks.study import audit_study, select_features
from tasks.tokens import token_associations

quiet_user_errors()


@flow(name="pathflow-local", flow_run_name=run_name("local"), log_prints=True)
def local_flow(config: Config | str, run_id: str | None = None, feature: str | None = None) -> dict:
    """Audit → select → Jacobians → top-k → replay → tokens → integrate, for one feature (the
    strongest causal one unless ``feature`` names it). ``config``: the config or its YAML path on
    the worker; this is the smoke test of a deployment (``pathways-smoke``)."""
    from pathflow.config import load_config

    logger = get_run_logger()
    config = load_config(config) if isinstance(config, str) else config
    run_id = run_id or auto_run_id()
    store_url = config.store.url
    run = start_or_resume(config, run_id, False, "local", feature=feature)
    t0 = time.perf_counter()
    try:
        audited = audit_study(config, store_url, run_id)
        sel = select_features(config, store_url, run_id, audited, feature)
        target = sel["target"]
        logger.info("tracing %s (layer %d)", target["feature"], target["layer"])
        run.update(sae={**run.manifest()["sae"], **sae_provenance(config, list(range(target["layer"] + 1)))})
        replayed = trace_pathways(config, store_url, run_id, [{**target, "index": 0}])
        tokens = token_associations(config, store_url, run_id, [target])
        graphs = attribution_graphs(config, store_url, run_id, [target], tokens)
        contrast = contrast_prompts(config, store_url, run_id, [target])
        records = integrate_features(config, store_url, run_id, [target], audited["features"], replayed, tokens,
                                     graphs, contrast)
        with step(run, "prototype"):
            steps = run.manifest()["steps"]
            proto = {"target": target, "seconds": {k: v.get("seconds") for k, v in steps.items()},
                     "wall_seconds": round(time.perf_counter() - t0, 3), "record": records[0]}
            run.write_json("prototype/single_feature_test.json", proto)
        manifest = run.complete()
    except BaseException as e:
        mark_failed(run, e)
        raise
    finally:
        run.lease.release()
    run_folder_artifact(run, manifest["status"])
    return {"run_id": run_id, "run_url": run.url, "status": manifest["status"], "target": target,
            "record": records[0], "seconds": proto["seconds"], "flow_run_id": current_flow_run_id()}


def run_local(config: Config, feature: str | None = None, run_id: str | None = None) -> dict:
    """Run the flow; a failed run raises PathflowError with the failure's message."""
    return result_of(local_flow(config=config, run_id=run_id or new_run_id(), feature=feature, return_state=True))
