"""Steps 0–1 as Prefect tasks: audit the study, select the causal features."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from pathflow.config import Config
from pathflow.errors import PathflowError
from pathflow.study import audit, missing_features, select

from .common import open_run, step


@task(name="audit", task_run_name="audit", cache_policy=NONE)
def audit_study(cfg: Config, store_url: str, run_id: str) -> dict:
    run = open_run(store_url, run_id)
    with step(run, "audit"):
        report, features = audit(cfg)
        run.write_json("audit/data_validation.json", report)
    logger = get_run_logger()
    c = report["counts"]
    logger.info("audit: %d features, %d causal, %d errors, %d warnings", c["features_total"],
                c["causal_total"], len(report["errors"]), len(report["warnings"]))
    for e in report["errors"][:10]:
        logger.warning("study error %s: %s (%s, record %s)", e["code"], e["message"], e["file"], e["record"])
    rows = [{"what": "features", "count": c["features_total"]}, {"what": "causal", "count": c["causal_total"]}]
    rows += [{"what": f"causal {k}", "count": v} for k, v in c["causal_by_direction"].items()]
    rows += [{"what": f"causal in layer {k}", "count": v} for k, v in c["causal_by_layer"].items()]
    rows += [{"what": "errors", "count": len(report["errors"])}, {"what": "warnings", "count": len(report["warnings"])}]
    create_table_artifact(key="pathflow-audit", table=rows, description=f"study audit of run {run_id}")
    return {"report": report, "features": {k: v.model_dump() for k, v in features.items()}}


@task(name="select", task_run_name="select", cache_policy=NONE)
def select_features(cfg: Config, store_url: str, run_id: str, audited: dict, feature: str | None = None) -> dict:
    """Top-N causal features per layer, plus the one feature the prototype traces."""
    from pathflow.study import FeatureResult

    run = open_run(store_url, run_id)
    with step(run, "select"):
        features = {k: FeatureResult(**v) for k, v in audited["features"].items()}
        include = [feature] if feature else []
        selected = select(features, cfg, include=include)
        run.write_json("features/causal_features.json", {"selection": cfg.selection.model_dump(),
                                                          "n_selected": len(selected), "features": selected})
        if feature:
            problem = missing_features(features, [feature], audited["report"]["ranges"])
            if problem:
                raise PathflowError(f"--feature {problem}")
            chosen = next(s for s in selected if s["feature"] == feature)
        else:
            eligible = [s for s in selected if s["layer"] > 0]  # layer 0 has no upstream SAE features
            if not eligible:
                raise PathflowError("no causal feature above layer 0 to trace; check study.checkpoints "
                                    "and audit/data_validation.json")
            chosen = max(eligible, key=lambda s: (s["rank_value"] or 0, s["layer"]))
        if chosen["layer"] == 0:
            raise PathflowError(f"{chosen['feature']} is in layer 0: it has no upstream SAE features to trace")
    return {"selected": selected, "target": chosen}
