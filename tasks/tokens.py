"""Step 4 as a Prefect task: token associations of the traced features."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from pathflow.config import Config
from pathflow.context import get_context
from pathflow.model import unembed
from pathflow.tokens import writes

from .common import open_run, step


@task(name="tokens", task_run_name="tokens", cache_policy=NONE)
def token_associations(cfg: Config, store_url: str, run_id: str, features: list[dict]) -> dict:
    ctx = get_context(cfg)
    run = open_run(store_url, run_id)
    with step(run, "tokens"):
        norm_w, W_U = unembed(ctx.model)
        out = {f["feature"]: {"writes": writes(ctx.sae(f["layer"]), f["feature_id"], norm_w, W_U, ctx.tokenizer)}
               for f in features}
        run.write_json("tokens/token_associations.json", {"method": {"writes": "logit lens of W_D[i]/s through "
                       "the final norm weight and the unembedding"}, "features": out})
    return out
