"""Attribution against the ground truth: exhaustive single-feature ablation (issue 18).

For a few targets on each prompt, every active upstream SAE entry (every layer below the target,
every position up to the target's token) is ablated alone — f·W_D[:, i]/s subtracted from h_l[q] —
in batched rows of a plain forward, and the target's real change measured. The ablation here is
its own code (forward hooks on the decoder layers), sharing nothing with pathflow's replay.

Each method ranks the same nodes by |weight| (``pathflow.graphs.output_weights``: the estimate, then
the ``replay_top`` strongest replayed and ranked by their measured change). Printed per method:
recall@10/25/50 of the true top-k over the whole prompt and at the target's position, Spearman of the
predicted and the real change, how many true top-10 nodes it ranks below 100 ("missed"), seconds per
target.

    python benchmarks/bench_attribution.py [--demo DIR] [--targets 6] [--replay-top 0 50 100]
    python benchmarks/bench_attribution.py --planted       # the massive-activation case (benchmarks/planted.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from pathflow.graphs import FlatNodes, Target, graph_targets, output_weights, prompt_state  # noqa: E402

MISSED_BELOW = 100  # a true top-10 node ranked below this is "missed": no graph or replay budget reaches it


@torch.no_grad()
def exhaustive_ablation(model, saes, ids: torch.Tensor, entries: list[tuple[int, int, int, float]],
                        targets: list[Target], rows: int = 256) -> torch.Tensor:
    """The real change of each target [e, t] when entry e = (layer, position, feature, activation) alone is
    ablated: plain forwards, ``rows`` ablations a forward, every target read off each."""
    layers = model.model.layers
    top = max(t.layer for t in targets)

    def forward(edits: dict[int, list[tuple[int, int, torch.Tensor]]], k: int) -> torch.Tensor:
        seen: dict[int, torch.Tensor] = {}

        def hook(l):
            def fn(_m, _i, out):
                h = out[0] if isinstance(out, tuple) else out
                if l in edits:
                    h = h.clone()
                    for r, q, v in edits[l]:
                        h[r, q] -= v
                seen[l] = h
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return fn

        hs = [layers[l].register_forward_hook(hook(l)) for l in range(top + 1)]
        try:
            model(input_ids=ids.expand(k, -1), use_cache=False)
        finally:
            for h in hs:
                h.remove()
        cols = []
        for t in targets:
            sae = saes[t.layer]
            cols.append((sae.scale * seen[t.layer][:, t.pos]) @ sae.W_enc[t.feature] + sae.b_enc[t.feature])
        return torch.stack(cols, 1)  # [k, t]

    base = forward({}, 1)[0]
    out = torch.zeros(len(entries), len(targets))
    for s in range(0, len(entries), rows):
        part = entries[s:s + rows]
        edits: dict[int, list] = {}
        for r, (l, q, i, a) in enumerate(part):
            sae = saes[l]
            edits.setdefault(l, []).append((r, q, a * sae.W_dec[:, i] / sae.scale))
        out[s:s + len(part)] = forward(edits, len(part)) - base
    # an entry at or above a target's layer, or after its position, cannot change it
    for j, t in enumerate(targets):
        for e, (l, q, _, _) in enumerate(entries):
            if l >= t.layer or q > t.pos:
                out[e, j] = 0.0
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-30))


def scores(true: torch.Tensor, pred: torch.Tensor, at_target: torch.Tensor) -> dict:
    """Recall of the true top-k (by |change|) in the predicted top-k, over all nodes and at the target's position."""
    order_t, order_p = true.abs().argsort(descending=True), pred.abs().argsort(descending=True)
    rank_p = torch.empty_like(order_p)
    rank_p[order_p] = torch.arange(len(order_p))
    out = {}
    for k in (10, 25, 50):
        out[f"recall@{k}"] = len(set(order_t[:k].tolist()) & set(order_p[:k].tolist())) / min(k, len(true))
    idx = torch.nonzero(at_target).flatten()
    tt, pp = true[idx], pred[idx]
    ot, op = tt.abs().argsort(descending=True), pp.abs().argsort(descending=True)
    out["recall@25_at_target"] = len(set(ot[:25].tolist()) & set(op[:25].tolist())) / max(1, min(25, len(idx)))
    out["spearman"] = spearman(true, pred)
    out["missed_top10"] = int((rank_p[order_t[:10]] >= MISSED_BELOW).sum())
    return out


def evaluate(model, saes, prompts: dict[str, torch.Tensor], targets_of, methods: list[tuple[str, int]],
             batch_size: int, bet: int, stop: int, firsts: dict[str, int] | None = None) -> dict:
    """{method label: {score: mean, score_worst: min, seconds_per_target}} over every (prompt, target).
    ``firsts``: per prompt, the positions before which nothing is a node (graphs.zero_bos), for the
    ground truth and the methods alike."""
    results: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    truth_seconds = 0.0
    n_graphs = 0
    for prompt, ids in prompts.items():
        targets = targets_of(ids)
        first = (firsts or {}).get(prompt, 0)
        state = prompt_state(model, saes, ids, first=first)
        flat = FlatNodes(state)
        entries = [flat.key(i) for i in range(flat.m)]
        acts = state.activations
        t0 = time.perf_counter()
        true = exhaustive_ablation(model, saes, ids, [(k[1], k[2], k[3], acts[k]) for k in entries], targets)
        truth_seconds += time.perf_counter() - t0
        n_graphs += len(targets)
        for method, top in methods:
            label = f"{method}" + (f"+replay{top}" if top else "")
            t0 = time.perf_counter()
            _, _, _, dense, _, _ = output_weights(model, saes, ids, targets, bet, stop, method, top, batch_size,
                                                  first)
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t0
            for j, (t, row) in enumerate(zip(targets, dense["targets"])):
                live = (flat.layer[:flat.m] < t.layer) & (flat.pos[:flat.m] <= t.pos)
                idx = torch.nonzero(live).flatten()
                s = scores(true[idx, j], -row["weight"][idx], flat.pos[idx] == t.pos)
                s.update(prompt=prompt, target=t.name)
                results.setdefault(label, []).append(s)
    out = {}
    for label, rs in results.items():
        keys = [k for k in rs[0] if k not in ("prompt", "target")]
        out[label] = {**{k: sum(r[k] for r in rs) / len(rs) for k in keys},
                      **{f"{k}_worst": (max if k == "missed_top10" else min)(r[k] for r in rs) for k in keys},
                      "seconds_per_target": seconds[label] / n_graphs, "per_graph": rs}
    out["_truth_seconds_per_target"] = truth_seconds / n_graphs
    return out


def print_table(res: dict, title: str) -> None:
    print(f"\n{title}  (exhaustive ablation: {res['_truth_seconds_per_target']:.2f} s per target)")
    cols = ["recall@10", "recall@25", "recall@50", "recall@25_at_target", "spearman", "missed_top10"]
    print(f"{'method':<20}" + "".join(f"{c:>21}" for c in cols) + f"{'s/target':>10}")
    for label, r in res.items():
        if label.startswith("_"):
            continue
        cells = "".join(f"{r[c]:>11.3f} (≥{r[c + '_worst']:.2f})" if c != "missed_top10"
                        else f"{r[c]:>13.2f} (≤{r[c + '_worst']})" for c in cols)
        print(f"{label:<20}{cells}{r['seconds_per_target']:>10.3f}")


def demo_case(demo: Path | None, n_targets: int, zero_bos: bool = True):
    from pathflow.config import load_config
    from pathflow.context import get_context
    from pathflow.demo import write_demo
    from pathflow.graphs import bos_positions, decision_ids
    from pathflow.study import audit, select

    if demo is None or not (demo / "config.yaml").is_file():
        demo = demo or Path(tempfile.mkdtemp(prefix="pathflow-demo-"))
        write_demo(demo, seed=0)
    cfg = load_config(demo / "config.yaml")
    ctx = get_context(cfg)
    _, features = audit(cfg)
    chosen = graph_targets(select(features, cfg), n_targets)
    saes = ctx.saes_up_to(max(t["layer"] for t in chosen))
    bet, stop = decision_ids(cfg, ctx.tokenizer)

    def targets_of(ids):
        return [Target(t["feature"], t["layer"], t["feature_id"], ids.shape[1] - 1) for t in chosen]

    firsts = {p: bos_positions(ctx.tokenizer, ids, zero_bos) for p, ids in ctx.prompt_ids.items()}
    return ctx.model, saes, dict(ctx.prompt_ids), targets_of, bet, stop, firsts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, help="a demo bundle (written there if missing; default: a temporary one)")
    ap.add_argument("--targets", type=int, default=6, help="graph targets of the demo study (the strongest first)")
    ap.add_argument("--planted", action="store_true", help="the planted massive-activation case instead of the demo")
    ap.add_argument("--replay-top", type=int, nargs="+", default=[0, 50, 100], help="replay budgets to compare")
    ap.add_argument("--methods", nargs="+", default=["gradient", "norm"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--keep-bos", action="store_true", help="the BOS position's features as nodes too (graphs.zero_bos "
                    "false); by default, as in a run, they are not nodes, for the truth and the methods alike")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.planted:
        from planted import planted_case

        model, saes, ids, target, node = planted_case()
        prompts, targets_of, bet, stop, firsts = {"planted": ids}, (lambda _ids: [target]), 1, 2, {}
        title = f"planted massive activation {node} → {target.name}"
    else:
        model, saes, prompts, targets_of, bet, stop, firsts = demo_case(args.demo, args.targets, not args.keep_bos)
        title = f"demo bundle, {args.targets} targets × {len(prompts)} prompts" + (
            ", BOS features not nodes (graphs.zero_bos)" if any(firsts.values()) else "")
    methods = [(m, k) for m in args.methods for k in args.replay_top]
    res = evaluate(model, saes, prompts, targets_of, methods, args.batch_size, bet, stop, firsts)
    print_table(res, title)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
