"""Step 4c as a Prefect task: the contrast of the two prompts, one target and the whole study."""

from __future__ import annotations

import logging

import numpy as np
import zarr
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pathflow.compute_thread import on_compute_thread
from pathflow.config import Config
from pathflow.context import get_context
from pathflow.contrast import CONTRAST_DIR, align, contrast_run, summary_doc
from pathflow.graphs import decision_ids
from storage.arrays import write_contrast

from .common import open_run, step

log = logging.getLogger(__name__)


@task(name="contrast", task_run_name="contrast", tags=["gpu"], cache_policy=NONE)
@on_compute_thread
def contrast_prompts(cfg: Config, store_url: str, run_id: str, targets: list[dict]) -> dict[str, dict]:
    """``integrated/contrast/``: the prompts' alignment, one record per target graphed on both prompts
    (``targets.json``), the study's summary (``summary.json``) and its arrays (``contrast.zarr``).
    Returns {feature: its record}; {} when the contrast cannot run (said in ``summary.json``)."""
    run = open_run(store_url, run_id)
    a, b = cfg.contrast.prompts
    with step(run, "contrast"):
        ctx = get_context(cfg)
        groups = zarr.open_group(run.zarr_store("graphs.zarr"), mode="r") if run.exists("graphs.zarr/zarr.json") \
            else None
        missing = [p for p in (a, b) if p not in ctx.prompt_ids]
        if not cfg.contrast.enabled or missing or groups is None or a not in groups or b not in groups:
            why = ("contrast.enabled is false" if not cfg.contrast.enabled else
                   f"the study has no prompt {missing[0]!r} (its prompts: {', '.join(ctx.prompt_ids)}); set "
                   "contrast.prompts to two of them" if missing else
                   "no whole-prompt graphs to contrast (graphs.max_targets is 0)")
            log.warning("no contrast: %s", why)
            run.write_json(f"{CONTRAST_DIR}/summary.json", {"run_id": run_id, "skipped": why})
            return {}
        g = {p: groups[p] for p in (a, b)}
        names = {p: list(g[p].attrs["targets"]) for p in (a, b)}
        both = set(names[a]) & set(names[b])
        chosen = [t for t in targets if t["feature"] in both]
        tok = {p: list(g[p].attrs["tokens"]) for p in (a, b)}
        ids = {p: ctx.prompt_ids[p] for p in (a, b)}
        special = set(getattr(ctx.tokenizer, "all_special_ids", []) or [])
        al = align((a, b), (tok[a], tok[b]), (ids[a][0].tolist(), ids[b][0].tolist()),
                   first_alone=int(ids[a][0, 0]) in special and int(ids[b][0, 0]) in special)
        more = "" if len(chosen) == len(targets) else "; set graphs.max_targets: null to cover every traced target"
        covers = {"n_targets": len(chosen), "of": len(targets),
                  "which": "the targets with whole-prompt graphs on both prompts (graphs.max_targets = "
                           f"{cfg.graphs.max_targets}, the strongest first){more}"}
        saes = ctx.saes_up_to(max(t["layer"] for t in chosen)) if chosen else {}
        last = {"logged": 0}

        def progress(done: int, total: int) -> None:
            if done == total or done - last["logged"] >= max(1, total // 10):
                log.info("contrast: %d of %d targets", done, total)
                last["logged"] = done

        records, study = contrast_run(
            ctx.model, saes, al, ids, g, names, chosen, {p: int(g[p].attrs["position"]) for p in (a, b)},
            decision_ids(cfg, ctx.tokenizer), cfg.replay, cfg.contrast.top, cfg.contrast.patch_top,
            cfg.contrast.batch_size, progress) if chosen else ([], None)
        run.write_json(f"{CONTRAST_DIR}/alignment.json", al.to_json())
        run.write_json(f"{CONTRAST_DIR}/targets.json", {"run_id": run_id, "prompts": [a, b], "covers": covers,
                                                         "targets": records})
        summary = summary_doc(al, records, study, covers, run_id)
        run.write_json(f"{CONTRAST_DIR}/summary.json", summary)
        if study is not None:
            dirs = list(study.sums)
            L = study.n_layers
            write_contrast(run.zarr_store(f"{CONTRAST_DIR}/contrast.zarr"), {
                "heatmap": np.stack([study.sums[d]["layer_span"] for d in dirs]).astype(np.float32),
                "feature_difference": np.stack([study.sums[d]["feature_diff"].reshape(L, -1) for d in dirs]
                                               ).astype(np.float32),
                "feature_targets": np.stack([study.sums[d]["feature_targets"].reshape(L, -1) for d in dirs]
                                            ).astype(np.int32),
                "target_span": np.array([[s["difference"] for s in sorted(r["spans"], key=lambda s: s["span"])]
                                         for r in records], dtype=np.float32),
                "target_difference": np.array([r["difference"] for r in records], dtype=np.float64)},
                {"direction": dirs, "layer": ["embeddings"] + [f"L{l}" for l in range(L)],
                 "span": [s["name"] for s in al.spans], "target": [r["feature"] for r in records]},
                {"prompts": [a, b], "meaning": f"weight on {a} minus weight on {b} (a weight is −(the target's change "
                 "when the node is ablated)), summed over the targets of each direction", "covers": covers})
    create_markdown_artifact(key="pathflow-contrast", markdown=contrast_md(summary, run),
                             description=f"what drives the {a} features: {a} vs {b}, run {run_id}")
    return {r["feature"]: r for r in records}


def contrast_md(summary: dict, run, shown: int = 10) -> str:
    """The ``pathflow-contrast`` artifact: what the summary covers, then per direction the top features,
    the spans and the differing spans' swaps, and how cross-prompt patching fared."""
    if "skipped" in summary:
        return f"# No contrast\n\n{summary['skipped']}.\n"
    a, b = summary["prompts"]
    c = summary["covers"]
    lines = [f"# What drives the features: `{a}` vs `{b}`", "",
             f"Covers {c['n_targets']} of {c['of']} traced targets: {c['which']}. Files: "
             f"`{run.url}/integrated/contrast/` (summary.json, targets.json, alignment.json, contrast.zarr); the study "
             f"page `{run.url}/integrated/study.html`.", "", summary["meaning"] + ".", ""]
    for d, out in summary["directions"].items():
        lines += [f"## {d}-direction targets ({out['n_targets']})", "",
                  "| upstream feature | targets fed | Σ weight " + f"({a} − {b}) |", "|---|---|---|"]
        lines += [f"| {f['feature']} | {f['n_targets']} | {f['difference']:+.3g} |" for f in out["feeds_most"][:shown]]
        lines += ["", f"| span | weight carried ({a} − {b}) |", "|---|---|"]
        lines += [f"| {s['name']}{' (differs)' if s['differs'] else ''} | {s['difference']:+.3g} |"
                  for s in out["spans"][:shown]]
        if out["drivers"]:
            lines += ["", f"| differing span | Σ target change when {b} takes {a}'s text |", "|---|---|"]
            lines += [f"| {s['name']} | {s['sum']:+.3g} |" for s in out["drivers"][:shown]]
        p = out["patching"].get(f"{b}_with_{a}", {})
        if p.get("n_targets"):
            lines += ["", f"Cross-prompt patching ({b} with {a}'s top features): the joint patch is validated for "
                      f"{p['joint_validated']} of {p['n_targets']} targets (signs agree for {p['joint_sign_agrees']}); "
                      f"{p['features_validated']} of {p['n_features']} single-feature patches validated."]
        lines.append("")
    return "\n".join(lines) + "\n"
