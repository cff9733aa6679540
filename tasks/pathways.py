"""Step 3 as Prefect tasks, one per batch of targets: Jacobians (3A), top-k (3B), replay (3C).

Model work is tagged ``gpu`` so a tag concurrency limit can cap it. Each batch writes its own
rows (whole chunks) of ``jacobians.zarr`` and its own JSON part files, so batches never share
a file; the flow merges the parts.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from pathflow.config import Config
from pathflow.context import get_context
from pathflow.pathways import Batch, BatchJacobians, phase_a, phase_b, phase_c
from storage.arrays import create_jacobians, open_jacobians, write_rows

from .common import open_run, step


@task(name="prepare-jacobians", task_run_name="prepare-jacobians", tags=["gpu"], cache_policy=NONE)
def prepare_jacobians(cfg: Config, store_url: str, run_id: str, targets: list[dict]) -> None:
    """Load the model and create jacobians.zarr (one row per target) before any batch writes."""
    ctx = get_context(cfg)
    run = open_run(store_url, run_id)
    d_sae = ctx.saes[targets[0]["layer"]].d_sae
    create_jacobians(run.zarr_store("jacobians.zarr"), [t["feature"] for t in targets], list(ctx.prompt_ids),
                     ctx.n_layers, d_sae)


@task(name="jacobians", task_run_name="jacobians-{batch.name}", tags=["gpu"], cache_policy=NONE)
def batch_jacobians(cfg: Config, store_url: str, run_id: str, batch: Batch) -> BatchJacobians:
    """Phase A for one batch on every prompt; writes the batch's rows of jacobians.zarr."""
    ctx = get_context(cfg)
    run = open_run(store_url, run_id)
    with step(run, f"jacobians/{batch.name}", targets=[t["feature"] for t in batch.targets]):
        bj = phase_a(ctx.model, ctx.saes, ctx.prefixes(), batch, ctx.n_layers, ctx.device)
        write_rows(open_jacobians(run.zarr_store("jacobians.zarr")), [t["index"] for t in batch.targets],
                   bj.grad, bj.attribution)
        run.write_json(f"pathways/parts/{batch.name}.memory.json", {"batch": batch.name, "memory": bj.memory,
                       "seconds": bj.seconds, "oom_splits": bj.splits})
    return bj


@task(name="topk", task_run_name="topk-{bj.batch.name}", cache_policy=NONE)
def batch_topk(cfg: Config, store_url: str, run_id: str, bj: BatchJacobians) -> dict:
    run = open_run(store_url, run_id)
    with step(run, f"topk/{bj.batch.name}"):
        k = cfg.topk
        cands = phase_b(bj, k.k, k.score, k.min_abs_gradient)
        run.write_json(f"pathways/parts/{bj.batch.name}.candidates.json", cands)
    return cands


@task(name="replay", task_run_name="replay-{batch.name}", tags=["gpu"], cache_policy=NONE)
def batch_replay(cfg: Config, store_url: str, run_id: str, batch: Batch, cands: dict) -> dict:
    ctx = get_context(cfg)
    run = open_run(store_url, run_id)
    with step(run, f"replay/{batch.name}"):
        result = phase_c(ctx.model, ctx.saes, ctx.prefixes(), batch, cands, cfg.replay)
        run.write_json(f"pathways/parts/{batch.name}.validated.json", result)
    logger = get_run_logger()
    for feature, per_prompt in result.items():
        for prompt, r in per_prompt.items():
            f = r["faithfulness"]
            logger.info("%s on %s: %d candidates, sign agreement %.2f, Spearman %s", feature, prompt,
                        f["n_candidates"], f["sign_agreement"] or 0, f["spearman"])
    return result


@task(name="merge-pathways", task_run_name="merge-pathways", cache_policy=NONE)
def merge_pathways(cfg: Config, store_url: str, run_id: str, cands: dict, replayed: dict) -> None:
    """Join the batches' parts into pathways/candidates.json and pathways/validated_pathways.json."""
    run = open_run(store_url, run_id)
    with step(run, "merge-pathways"):
        run.write_json("pathways/candidates.json", {"topk": cfg.topk.model_dump(), "targets": cands})
        run.write_json("pathways/validated_pathways.json", {"replay": cfg.replay.model_dump(), "targets": replayed})
