"""The study's model work at the real shapes with random weights, on one device: phases A (Jacobians),
B (top-k) and C (replay) over 1,550 targets in layers 1–31 on two prompts, the tokens step's one-pass
read, the graphs step's whole-prompt graphs of a few targets and the contrast step on those graphs, with
32 distinct 32K-wide SAEs in bf16 (preset llama31-8b). Prints seconds per phase, peak memory
and the projected full run; JSON last.

    python benchmarks/bench_study_gpu.py --preset llama31-8b --budget-s 240   # a GPU (H100/H200)
    python benchmarks/bench_study_gpu.py --preset cpu-small --budget-s 30     # the same code, small, here

Nothing is downloaded: the model, SAEs, prompts and tokenizer are made in memory. Within ``--budget-s``
it traces batches taken in turn from every layer (so the sample spans shallow and deep targets), then
projects phases A–C to all targets from each layer's measured cost per target; the tokens step reads the
two prompts and --responses distinct synthetic responses for --token-features features and is projected
to every feature by its texts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pathways import PRESETS, make_model, make_sae, peak_memory, sync  # noqa: E402

from pathflow.config import ReplayConfig  # noqa: E402
from pathflow.contrast import align, contrast_run  # noqa: E402
from pathflow.demo import _corpus, _game_prompt, _tokenizer  # noqa: E402
from pathflow.graphs import Target, answer_id, bos_positions, prompt_graphs, sparse_arrays  # noqa: E402
from pathflow.model import prefix_cache  # noqa: E402
from pathflow.pathways import phase_a, phase_b, phase_c, plan_batches  # noqa: E402
from pathflow.tokens import feature_reads, reading_plan, token_text  # noqa: E402

STUDY = {"llama31-8b": {"targets": 1550, "batch": 32}, "cpu-small": {"targets": 70, "batch": 8}}


def responses(rng: random.Random, n: int) -> list[str]:
    """Distinct answers shaped like the study's logs: half short choices, half a few game lines."""
    out: set[str] = set()
    while len(out) < n:
        if rng.random() < 0.5:
            out.add(f"{rng.choice(['1', '2'])}\n{rng.choice(['Bet', 'Stop', 'I stop'])} ${rng.randint(1, 500)}")
        else:
            hist = [(rng.choice([5, 10, 20, 50]), rng.random() < 0.3) for _ in range(rng.randint(1, 4))]
            out.add(_game_prompt(hist, rng.randint(20, 300), "Bet $10")[-rng.randint(60, 400):])
    return sorted(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(STUDY), default="cpu-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--targets", type=int, help="targets of the study (default: the preset's, 1,550 for 8B)")
    ap.add_argument("--batch", type=int, help="targets per batch (gradients.batch_size)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="seconds of phases A–C before projecting")
    ap.add_argument("--token-features", type=int, default=200)
    ap.add_argument("--responses", type=int, default=64)
    ap.add_argument("--graph-targets", type=int, default=4, help="targets whose whole-prompt graphs are timed "
                    "(the graphs step, default config), both prompts; projected to 32 targets and to every one")
    args = ap.parse_args(argv)
    p, study = PRESETS[args.preset], STUDY[args.preset]
    device, dtype = torch.device(args.device), getattr(torch, p["dtype"])
    n_targets, batch_size = args.targets or study["targets"], args.batch or study["batch"]
    torch.manual_seed(0)
    rng = random.Random(0)
    t0 = time.perf_counter()
    model = make_model(p["model"], dtype, device)
    d_model, n_layers = p["model"]["hidden_size"], p["model"]["num_hidden_layers"]
    d_sae = p["expansion"] * d_model
    saes = {l: make_sae(l, d_model, d_sae, dtype, device) for l in range(n_layers)}  # distinct, as in the study
    tok = _tokenizer(_corpus(rng), 384)
    prompts = {"safe": _game_prompt([(10, True), (10, False), (10, True)], 100, "Bet $10"),
               "risky": _game_prompt([(10, True), (90, False), (10, False)], 100, "Bet (choose $5-$100)")}
    ids = {k: torch.tensor([tok(v).input_ids], device=device) for k, v in prompts.items()}
    prefixes = {k: prefix_cache(model, v) for k, v in ids.items()}
    sync(device)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 1,550 targets spread evenly over layers 1..n-1, as the study's selection is
    layers = list(range(1, n_layers))
    targets = [{"feature": f"L{layers[i % len(layers)]}-{rng.randrange(d_sae)}", "layer": layers[i % len(layers)]}
               for i in range(n_targets)]
    for i, t in enumerate(targets):
        t.update(feature_id=int(t["feature"].split("-")[1]), index=i)
    batches = plan_batches(targets, batch_size)
    by_layer: dict[int, list] = {}
    for b in batches:
        by_layer.setdefault(b.layer, []).append(b)
    order = [b for j in range(max(len(v) for v in by_layer.values())) for l in layers for b in by_layer[l][j:j + 1]]
    rc = ReplayConfig()
    cost = {l: {"targets": 0, "a": 0.0, "b": 0.0, "c": 0.0} for l in layers}
    done, t_start = 0, time.perf_counter()
    for b in order:
        if time.perf_counter() - t_start > args.budget_s and all(cost[l]["targets"] for l in layers):
            break
        sync(device)
        ta = time.perf_counter()
        bj = phase_a(model, saes, prefixes, b, device)
        sync(device)
        tb = time.perf_counter()
        cands = phase_b(bj, k=25, score="attribution", min_abs_gradient=0.0)
        tc = time.perf_counter()
        phase_c(model, saes, prefixes, b, cands, rc)
        sync(device)
        td = time.perf_counter()
        c = cost[b.layer]
        c["targets"] += len(b.targets)
        c["a"], c["b"], c["c"] = c["a"] + tb - ta, c["b"] + tc - tb, c["c"] + td - tc
        done += len(b.targets)
    per_layer_targets = {l: sum(len(b.targets) for b in by_layer[l]) for l in layers}
    projected = {k: sum(cost[l][k] / cost[l]["targets"] * per_layer_targets[l] for l in layers if cost[l]["targets"])
                 for k in ("a", "b", "c")}
    measured = {k: sum(cost[l][k] for l in layers) for k in ("a", "b", "c")}

    # the tokens step: one pass over the prompts and every feature's distinct responses
    n_tok = min(args.token_features, n_targets)
    own = [responses(random.Random(i), args.responses) for i in range(n_tok)]
    texts, readers, _ = reading_plan(list(prompts.values()), own)
    keys = [(t["layer"], t["feature_id"]) for t in targets[:n_tok]]
    sync(device)
    tt = time.perf_counter()
    feature_reads(model, saes, tok, texts, keys, top=10, window=6, batch_size=64, max_tokens=512, readers=readers)
    sync(device)
    tokens_s = time.perf_counter() - tt
    tokens_projected = tokens_s * (n_targets / n_tok)

    # the graphs step: whole-prompt graphs (default config) of targets from deep, middle and shallow layers
    graphed = sorted(targets, key=lambda t: -t["layer"])[:: max(1, n_targets // max(1, args.graph_targets))]
    graphed = graphed[: args.graph_targets]
    bet, stop = answer_id(tok, "1", "bet"), answer_id(tok, "2", "stop")
    from pathflow.config import AttributionConfig, ContrastConfig, GraphsConfig

    def time_graphs(method: str, replay_top: int, keep: dict | None = None) -> tuple[float, list[int]]:
        """Seconds of the graphs step for ``graphed`` on both prompts, and the graphs' node counts;
        ``keep``: filled with each prompt's ``graphs.zarr`` arrays (what the contrast step reads)."""
        sync(device)
        tg = time.perf_counter()
        nodes = []
        for name, v in ids.items():
            chosen = [Target(t["feature"], t["layer"], t["feature_id"], int(v.shape[1]) - 1) for t in graphed]
            up_to = {l: saes[l] for l in range(max(t.layer for t in chosen) + 1)}
            state, graphs, dense = prompt_graphs(model, up_to, v, chosen, bet, stop, max_nodes=200,
                                                 batch_size=GraphsConfig().batch_size, method=method,
                                                 replay_top=replay_top,
                                                 first=bos_positions(tok, v, GraphsConfig().zero_bos))
            nodes += [len(g.nodes) for g in graphs]
            if keep is not None:
                keep[name] = sparse_arrays(state, dense)
            del state, graphs, dense
        sync(device)
        return time.perf_counter() - tg, nodes

    # first order and no replay before pruning (the old default), then the default attribution
    first_s, _ = time_graphs("gradient", 0)
    default = AttributionConfig()
    arrays: dict[str, dict] = {}
    graphs_s, graph_nodes = time_graphs(default.method, default.replay_top, arrays)
    per_target = graphs_s / max(1, len(graphed))  # both prompts

    # the contrast step on those graphs (default config): each target's difference, the differing spans
    # swapped and its strongest features patched across, both ways
    cc = ContrastConfig()
    a, b = cc.prompts
    special = set(tok.all_special_ids)
    al = align((a, b), tuple([token_text(tok, int(i)) for i in ids[p][0]] for p in (a, b)),
               (ids[a][0].tolist(), ids[b][0].tolist()),
               first_alone=int(ids[a][0, 0]) in special and int(ids[b][0, 0]) in special)
    specs = [{"feature": t["feature"], "layer": t["layer"], "feature_id": t["feature_id"], "direction": "risky"}
             for t in graphed]
    sync(device)
    tc = time.perf_counter()
    records, _ = contrast_run(model, {l: saes[l] for l in range(max(t["layer"] for t in graphed) + 1)}, al, ids,
                              arrays, {p: [t["feature"] for t in graphed] for p in (a, b)}, specs,
                              {p: int(ids[p].shape[1]) - 1 for p in (a, b)}, (bet, stop), ReplayConfig(), cc.top,
                              cc.patch_top, cc.batch_size)
    sync(device)
    contrast_s = time.perf_counter() - tc
    contrast_per_target = contrast_s / max(1, len(records))

    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": {"d_model": d_model, "n_layers": n_layers, "d_sae": d_sae, "dtype": p["dtype"], "targets": n_targets,
                   "batch": batch_size, "prompt_tokens": {k: int(v.shape[1]) for k, v in ids.items()}},
        "seconds": {"setup": setup_s, "measured": {"targets": done, "phase_a": measured["a"],
                                                   "phase_b": measured["b"], "phase_c": measured["c"],
                                                   "tokens": tokens_s, "tokens_features": n_tok,
                                                   "tokens_texts": len(texts), "graphs": graphs_s,
                                                   "graph_targets": len(graphed), "graph_nodes": graph_nodes,
                                                   "graphs_first_order": first_s,
                                                   "attribution": f"{default.method}+replay{default.replay_top}",
                                                   "attribution_cost_ratio": graphs_s / max(first_s, 1e-9),
                                                   "contrast": contrast_s, "contrast_targets": len(records),
                                                   "contrast_spans": len(al.spans)},
                    "per_target_by_layer": {l: (cost[l]["a"] + cost[l]["b"] + cost[l]["c"]) / cost[l]["targets"]
                                            for l in layers if cost[l]["targets"]}},
        "projected_full_run_seconds": {"phase_a": projected["a"], "phase_b": projected["b"],
                                       "phase_c": projected["c"], "tokens": tokens_projected,
                                       "total": sum(projected.values()) + tokens_projected,
                                       "graphs_per_target_both_prompts": per_target,
                                       "graphs_32_targets": 32 * per_target,
                                       "graphs_every_target": n_targets * per_target,
                                       # linear in targets: its span swaps are shared, so an upper bound
                                       "contrast_32_targets": 32 * contrast_per_target},
        "peak_memory_bytes": peak_memory(device),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
