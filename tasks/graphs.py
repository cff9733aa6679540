"""Step 4b as a Prefect task: whole-prompt attribution graphs in circuit-tracer's format."""

from __future__ import annotations

import time
from gc import collect as collect_garbage

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pathflow.compute_thread import on_compute_thread
from pathflow.config import Config
from pathflow.context import get_context
from pathflow.feature_examples import feature_file, feature_path, prompt_entries
from pathflow.graphs import (
    GRAPHS_DIR,
    Target,
    configured_graphs,
    decision_ids,
    graph_json,
    graph_path,
    graph_targets,
    scan_name,
    slug,
    sparse_arrays,
)
from pathflow.model import unembed
from pathflow.tokens import token_text, writes_many
from storage.arrays import write_prompt_graph

from .common import open_run, step


@task(name="graphs", task_run_name="graphs", tags=["gpu"], cache_policy=NONE)
@on_compute_thread
def attribution_graphs(cfg: Config, store_url: str, run_id: str, targets: list[dict],
                       tokens: dict | None = None) -> dict[str, dict[str, str]]:
    """``integrated/graphs/{slug}.json`` for the strongest ``graphs.max_targets`` targets on each
    prompt, and ``graph-metadata.json`` beside them: the folder circuit-tracer's frontend serves;
    ``graphs.zarr``: every position's unpruned node weights of those targets, one group per prompt.
    ``features/{n}.json``: circuit-tracer's feature file of every feature a graph shows, from
    ``tokens`` (step 4's records by feature name) where it has one. Returns {feature: {prompt: slug}}."""
    ctx = get_context(cfg)
    run = open_run(store_url, run_id)
    study = tokens or {}  # step 4's records by name (the prompt loop below names its tokens ``tokens``)
    gc = cfg.graphs
    chosen = graph_targets(targets, gc.max_targets)
    with step(run, "graphs", graphs=len(chosen) * len(ctx.prompt_ids)):
        bet, stop = decision_ids(cfg, ctx.tokenizer)
        label = f'"{cfg.decision.bet}" − "{cfg.decision.stop}"'
        scan = gc.scan or scan_name(cfg.sae.root, cfg.sae.pattern)
        vocab = len(ctx.tokenizer)
        slugs: dict[str, dict[str, str]] = {}
        metadata = []
        examples: dict[tuple[int, int], dict[str, tuple]] = {}  # feature -> {prompt: (tokens, positions, values)}
        if chosen:
            saes = ctx.saes_up_to(max(t["layer"] for t in chosen))
            for prompt, ids in ctx.prompt_ids.items():
                p = ctx.prefixes()[prompt].position
                tokens = [token_text(ctx.tokenizer, int(i)) for i in ids[0]]
                t0 = time.perf_counter()
                state, graphs, dense = configured_graphs(
                    cfg, ctx.model, ctx.tokenizer, saes, ids,
                    [Target(t["feature"], t["layer"], t["feature_id"], p) for t in chosen], bet, stop)
                write_prompt_graph(run.zarr_store("graphs.zarr"), prompt, [t["feature"] for t in chosen],
                                   sparse_arrays(state, dense), {"position": p, "n_tokens": len(state.ids),
                                                                 "decision": label, "tokens": tokens,
                                                                 "decision_value": float(dense["decision_value"]),
                                                                 "attribution_method": cfg.attribution.method,
                                                                 "replay_top": cfg.attribution.replay_top,
                                                                 "first_node_position": state.first},
                                   cfg.gradients.keepbits)
                get_run_logger().info("graphs on %s: %d targets, %d distinct kept features, %.1f s", prompt,
                                      len(graphs), len({k for g in graphs for k in g.nodes if k[0] == "f"}),
                                      time.perf_counter() - t0)
                for g in graphs:
                    s = slug(prompt, g.target.name)
                    doc = graph_json(g, state, tokens, ctx.prompts[prompt], s, scan, ctx.n_layers, vocab, label,
                                     gc.node_threshold, info={"run_id": run_id, "prompt_name": prompt},
                                     rc=cfg.replay)
                    run.write_json(graph_path(s), doc)
                    metadata.append(doc["metadata"])
                    slugs.setdefault(g.target.name, {})[prompt] = s
                shown = {(k[1], k[3]) for g in graphs for k in g.nodes if k[0] == "f"} | {
                    (g.target.layer, g.target.feature) for g in graphs}
                for key, (positions, values) in prompt_entries(state.activations, shown).items():
                    examples.setdefault(key, {})[prompt] = (tokens, positions, values)
                del state, graphs, dense  # one prompt's graphs at a time: freed before the next is computed
                collect_garbage()
        write_feature_examples(run, ctx, examples, targets, study, scan)
        run.write_json(f"{GRAPHS_DIR}/graph-metadata.json", {"graphs": metadata})
    create_markdown_artifact(key="pathflow-graphs", markdown=graphs_md(run, metadata),
                             description=f"whole-prompt attribution graphs of run {run_id}")
    return slugs


def write_feature_examples(run, ctx, examples: dict[tuple[int, int], dict[str, tuple]], targets: list[dict],
                           study: dict, scan: str) -> None:
    """circuit-tracer's feature files for every feature the graphs show: step 4's reads and writes for
    study features (``study``: its records by name), the logit lens computed here for the others, each
    prompt's activations."""
    names = {(t["layer"], t["feature_id"]): t["feature"] for t in targets}
    by_layer: dict[int, list[int]] = {}
    for layer, fid in examples:
        if names.get((layer, fid)) not in study:
            by_layer.setdefault(layer, []).append(fid)
    norm_w, W_U = unembed(ctx.model)
    lens = {(layer, fid): w for layer, fids in by_layer.items()
            for fid, w in zip(fids, writes_many(ctx.saes[layer], fids, norm_w, W_U, ctx.tokenizer))}
    for (layer, fid), prompts in sorted(examples.items()):
        record = study.get(names.get((layer, fid)))
        run.write_json(feature_path(layer, fid), feature_file(
            layer, fid, scan, prompts, record["writes"] if record else lens[(layer, fid)], record))


def graphs_md(run, metadata: list[dict], shown: int = 20) -> str:
    """The graphs artifact: how to open them, and the first ``shown`` with replay's verdict."""
    lines = [f"# {len(metadata)} whole-prompt attribution graphs", "",
             f"In circuit-tracer's viewer: `pathflow graphs {run.run_id} --store {run.store.url}`; the files are "
             f"`{run.url}/{GRAPHS_DIR}/` (circuit-tracer 0.5.0's format).", "",
             "Kept features are replayed: " + (metadata[0]["info"].get("validated_means", "") if metadata else ""), "",
             "Scores: completeness = the target's attribution carried by SAE features rather than errors; "
             "replacement = circuit-tracer's score of the pruned graph; faithfulness = (m(graph) − m(none)) / "
             "(m(full) − m(none)) with every feature outside the graph ablated, for the target.", "",
             "The decision is logit(bet) − logit(stop) at the prompt's last token; the last two columns are the "
             "prompt's own value (the same for every graph of a prompt) and its measured change when the target is "
             "ablated.", "",
             "| graph | target | features replayed | signs agree | above noise | within factor | validated | "
             "completeness | replacement | faithfulness | the prompt's decision, baseline | "
             "Δdecision when the target is ablated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in metadata[:shown]:
        info, rp = m["info"], m["info"].get("replay") or {}
        counts = " | ".join(str(rp.get(f"n_{k}", "–")) for k in ("sign_agrees", "above_noise", "magnitude_agrees",
                                                                   "validated"))
        sc = info.get("scores") or {}
        vals = (sc.get("completeness", {}).get("target", {}).get("overall"),
                sc.get("circuit_tracer", {}).get("replacement"), sc.get("faithfulness", {}).get("target"))
        nums = " | ".join("–" if v is None else f"{v:.2f}" for v in vals)
        own = info.get("target_decision_change")
        lines.append(f"| {m['slug']} | {info['target']} | {rp.get('n_replayed', 0)} | {counts} | {nums} | "
                     f"{info['decision_value']:+.3f} | {'–' if own is None else f'{own:+.3f}'} |")
    if len(metadata) > shown:
        lines.append(f"\n… and {len(metadata) - shown} more in `graph-metadata.json`.")
    return "\n".join(lines) + "\n"
