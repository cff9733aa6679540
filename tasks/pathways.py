"""Step 3 as Prefect tasks: Jacobians (3A), top-k (3B), replay (3C). GPU work: tagged ``gpu``."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from pathflow.config import Config
from pathflow.context import get_context
from pathflow.jacobian import jacobians
from pathflow.replay import faithfulness, replay
from pathflow.topk import top_candidates
from storage.arrays import create_jacobians, write_target

from .common import open_run, step


@task(name="jacobians", task_run_name="jacobians-{target[feature]}", tags=["gpu"], cache_policy=NONE)
def target_jacobians(cfg: Config, store_url: str, run_id: str, target: dict, index: int, targets: list[str]):
    """Phase A for one target on every prompt; writes its row of jacobians.zarr.

    Returns {prompt: TargetJacobians} for the next phases (in memory).
    """
    ctx = get_context(cfg)
    run = open_run(store_url, run_id)
    with step(run, "jacobians", target=target["feature"]):
        layer, fid = target["layer"], target["feature_id"]
        saes = ctx.saes_up_to(layer)
        prompts = list(ctx.prompt_ids)
        d_sae = saes[layer].d_sae
        out = {}
        grad = np.full((len(prompts), ctx.n_layers, d_sae), np.nan, np.float32)  # NaN: not computed
        attr = grad.copy()
        for p, name in enumerate(prompts):
            tj = jacobians(ctx.model, saes, ctx.prompt_ids[name], layer, [fid], cfg.gradients.position)
            grad[p, :layer] = tj.grad[0].cpu().numpy()
            attr[p, :layer] = tj.attribution[0].cpu().numpy()
            out[name] = tj
        group = create_jacobians(run.zarr_store("jacobians.zarr"), targets, prompts, ctx.n_layers, d_sae)
        write_target(group, index, grad, attr)
    return out


@task(name="topk", task_run_name="topk-{target[feature]}", cache_policy=NONE)
def topk_candidates(cfg: Config, store_url: str, run_id: str, target: dict, tjs: dict) -> dict:
    run = open_run(store_url, run_id)
    with step(run, "topk", target=target["feature"]):
        k = cfg.topk
        cands = {p: top_candidates(tj.grad[0], tj.activation, tj.layers, k.k, k.score, k.min_abs_gradient)
                 for p, tj in tjs.items()}
        run.write_json("pathways/candidates.json", {"topk": k.model_dump(), "targets": {target["feature"]: cands}})
    return cands


@task(name="replay", task_run_name="replay-{target[feature]}", tags=["gpu"], cache_policy=NONE)
def replay_candidates(cfg: Config, store_url: str, run_id: str, target: dict, cands: dict) -> dict:
    ctx = get_context(cfg)
    run = open_run(store_url, run_id)
    with step(run, "replay", target=target["feature"]):
        layer, fid = target["layer"], target["feature_id"]
        saes = ctx.saes_up_to(layer)
        result = {}
        for prompt, cs in cands.items():
            base, recs = replay(ctx.model, saes, ctx.prompt_ids[prompt], layer, fid, cs,
                                cfg.gradients.position, cfg.replay.scale)
            faith = faithfulness(recs, cfg.replay.min_sign_agreement)
            result[prompt] = {"baseline_pre": base, "faithfulness": faith, "candidates": recs}
            get_run_logger().info("%s on %s: %d candidates, sign agreement %.2f, spearman %s", target["feature"],
                                  prompt, len(recs), faith["sign_agreement"] or 0, faith["spearman"])
        run.write_json("pathways/validated_pathways.json",
                       {"replay": cfg.replay.model_dump(), "targets": {target["feature"]: result}})
    return result
