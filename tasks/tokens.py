"""Step 4 as a Prefect task: the three token views of every traced feature."""

from __future__ import annotations

import random

from prefect import task
from prefect.cache_policies import NONE

from pathflow.compute_thread import on_compute_thread
from pathflow.config import Config
from pathflow.context import get_context
from pathflow.model import unembed
from pathflow.study import collect_responses
from pathflow.tokens import changes, feature_reads, reading_plan, writes_many

from .common import open_run, step

METHOD = {
    "writes": "logit lens: W_U @ (W_D[i]/s ⊙ final norm weight); top promoted and suppressed tokens",
    "reads": "largest activations over the study prompts and a sample of each feature's distinct logged responses",
    "histogram": "activations of the feature over every token of the texts 'reads' scans: counts of the active "
                 "(> 0) ones in equal bins from 0 to the largest",
    "changes": "log-odds ratio with an informative Dirichlet prior (Monroe et al. 2008) of token ids in "
               "responses under a patch vs its baseline; z-scores",
}


@task(name="tokens", task_run_name="tokens", tags=["gpu"], cache_policy=NONE)
@on_compute_thread
def token_associations(cfg: Config, store_url: str, run_id: str, features: list[dict]) -> dict:
    ctx = get_context(cfg)
    run = open_run(store_url, run_id)
    tc = cfg.tokens
    with step(run, "tokens"):
        norm_w, W_U = unembed(ctx.model)
        logged = collect_responses(cfg, {f["feature"] for f in features})
        prompts = list(ctx.prompts.values())
        # responses are cut to tokens.max_tokens; the prompts are read whole
        max_tokens = max([tc.max_tokens] + [int(ids.shape[1]) for ids in ctx.prompt_ids.values()])
        # one pass over every distinct text (the prompts once for all features, each sampled response
        # once), each feature read from its own texts; responses are distinct and cut in characters first
        keys = [(f["layer"], f["feature_id"]) for f in features]
        samples = []
        for f in features:
            pool = [t for texts in logged.get(f["feature"], {}).values() for t in texts]
            pool = [t for t in dict.fromkeys(t[: 8 * tc.max_tokens] for t in pool) if t not in prompts]
            samples.append(random.Random(f["feature"]).sample(pool, min(tc.responses, len(pool))))
        texts, readers, views = reading_plan(prompts, samples)
        scans = feature_reads(ctx.model, ctx.saes, ctx.tokenizer, texts, keys, tc.top, tc.window,
                              batch_size=tc.batch_size, max_tokens=max_tokens, readers=readers)
        by_layer: dict[int, list[dict]] = {}
        for f in features:
            by_layer.setdefault(f["layer"], []).append(f)
        written = {f["feature"]: w for layer, fs in by_layer.items() for f, w in
                   zip(fs, writes_many(ctx.saes[layer], [f["feature_id"] for f in fs], norm_w, W_U, ctx.tokenizer,
                                       tc.top))}
        out = {}
        for f, key, view in zip(features, keys, views):
            name, by_cond = f["feature"], logged.get(f["feature"], {})
            local = {t: i for i, t in enumerate(view)}  # text numbers as the feature sees them: prompts first
            reads = scans[key]["maxima"]
            for r in reads:
                r["text"] = local[r["text"]]
                r["source"] = "prompt" if r["text"] < len(prompts) else "response"
            out[name] = {
                "writes": written[name],
                "reads": reads,
                "histogram": scans[key]["histogram"],
                "changes": {f"{a}_vs_{b}": changes(ctx.tokenizer, by_cond.get(a, []), by_cond.get(b, []), tc.top,
                                                   tc.alpha0)
                            for a, b in tc.contrasts if by_cond.get(a) and by_cond.get(b)},
            }
        run.write_json("tokens/token_associations.json", {"method": METHOD, "features": out})
    return out
