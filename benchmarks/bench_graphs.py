"""The graphs step alone, on a finished run's selection: seconds per phase, per prompt, for the config and
for variants of it, interleaved, each figure the minimum over the repeats.

    python benchmarks/bench_study.py --shape study --keep /tmp/rs          # a run at the real shapes
    python benchmarks/bench_graphs.py -c /tmp/rs/study-1550/config.yaml --run /tmp/rs/store-1550/0/runs/* \\
        --vs graphs.zero_bos=false --repeats 2

Phases: the prompt's forward (prompt_state); every batched backward (Forward.gradients), of which
output_gradients holds those with a forward of their own (the outputs, the kept features before the last
position; forward included); the outputs' node weights (node_weights, the norm correction included) and the
edges' (pool_weights); replay; the scores. "total" is the whole ``prompt_graphs`` call. Prints JSON last,
with each variant's total over the default's.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECONDS: dict[str, float] = {}  # the wrapped phases add to it; cleared per prompt
PHASES = {"graphs": ("prompt_state", "output_gradients", "Forward.gradients", "node_weights", "pool_weights",
                     "replay_nodes", "_score"),
          "scores": ("faithfulness", "circuit_tracer_scores", "completeness")}


def _timers() -> None:
    """Wrap the phases' functions (once) so that each call adds its time to ``SECONDS``."""
    import pathflow.graphs as graphs
    import pathflow.scores as scores

    for mod, names in ((graphs, PHASES["graphs"]), (scores, PHASES["scores"])):
        for name in names:
            owner, _, attr = name.rpartition(".")
            holder = getattr(mod, owner) if owner else mod  # a class's method: wrapped on the class
            f = getattr(holder, attr)
            if getattr(f, "_timed", False):
                continue

            def wrap(f=f, name=name):
                @functools.wraps(f)
                def w(*a, **k):
                    t0 = time.perf_counter()
                    try:
                        return f(*a, **k)
                    finally:
                        SECONDS[name] = SECONDS.get(name, 0.0) + time.perf_counter() - t0
                w._timed = True
                return w
            setattr(holder, attr, wrap())


def time_graphs(cfg, targets: list[dict], prompts: list[str] | None) -> dict:
    """{prompt: {phase: seconds, "total", "kept_features"}} of one config."""
    import torch

    from pathflow.context import get_context
    from pathflow.graphs import Target, configured_graphs, decision_ids, graph_targets

    torch.set_grad_enabled(True)
    ctx = get_context(cfg)
    chosen = graph_targets(targets, cfg.graphs.max_targets)
    bet, stop = decision_ids(cfg, ctx.tokenizer)
    saes = ctx.saes_up_to(max(t["layer"] for t in chosen))
    out = {}
    for prompt, ids in ctx.prompt_ids.items():
        if prompts and prompt not in prompts:
            continue
        p = ctx.prefixes()[prompt].position
        SECONDS.clear()
        _timers()
        t0 = time.perf_counter()
        _, graphs, _ = configured_graphs(cfg, ctx.model, ctx.tokenizer, saes, ids,
                                         [Target(t["feature"], t["layer"], t["feature_id"], p) for t in chosen],
                                         bet, stop)
        out[prompt] = {**SECONDS, "total": time.perf_counter() - t0,
                       "kept_features": len({k for g in graphs for k in g.nodes if k[0] == "f"})}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True, help="the run's config")
    ap.add_argument("--run", required=True, type=Path,
                    help="the finished run's folder (its features/causal_features.json)")
    ap.add_argument("--vs", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a variant: the config with this key set (YAML value); repeatable, one variant each")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--prompt", action="append", help="only this prompt (repeatable; default: all)")
    args = ap.parse_args(argv)
    from pathflow.config import Config, load_config

    base = load_config(args.config)
    configs = {"default": base}
    for item in args.vs:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        data = base.model_dump()
        data[section][name] = yaml.safe_load(value)
        configs[item] = Config.model_validate(data)
    selected = json.loads((args.run / "features" / "causal_features.json").read_text())["features"]
    targets = [s for s in selected if s["layer"] > 0]
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(args.repeats):  # interleaved: a stall of the machine hits one sample, the minimum drops it
        for label, cfg in configs.items():
            runs[label].append(time_graphs(cfg, targets, args.prompt))
            print(label, json.dumps({p: round(v["total"], 1) for p, v in runs[label][-1].items()}), file=sys.stderr)
    result = {}
    for label, samples in runs.items():
        result[label] = {p: {k: min(s[p].get(k, 0.0) for s in samples) for k in samples[0][p]} for p in samples[0]}
        result[label]["total"] = sum(v["total"] for v in result[label].values())
    for label in configs:
        if label != "default":
            result[label]["total_over_default"] = result[label]["total"] / result["default"]["total"]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
