"""Graph scores (pathflow/scores.py) against independent computations: circuit-tracer's own
compute_graph_scores, a spliced-SAE forward written here with the full encoder and a mask, and a
hand-worked completeness."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pathflow.graphs import Target, prompt_graphs
from pathflow.scores import circuit_tracer_scores, completeness, faithfulness, graph_matrix, graph_scores

from .conftest import clean_env
from .test_report import CT_VENV, circuit_tracer  # noqa: F401  (the fixture)

BET, STOP = 18, 19


@pytest.fixture(scope="module")
def demo_graphs(ctx):
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["safe"]
    n = ids.shape[1]
    targets = [Target("L3-443", 3, 443, n - 1), Target("L2-151", 2, 151, n - 1)]
    state, graphs, dense = prompt_graphs(ctx.model, saes, ids, targets, BET, STOP, batch_size=8, method="norm",
                                         replay_top=20)
    return saes, ids, state, graphs, dense


def test_completeness_by_hand():
    row = {"weight": torch.tensor([1.0, -2.0, 3.0, 0.5]), "error": torch.tensor([[1.0, -1.0], [0.0, 0.0]])}
    c = completeness(row, torch.tensor([0, 0, 1, 1]), [0, 1])
    assert c["per_layer"] == {"0": pytest.approx(3 / 5), "1": pytest.approx(1.0)}
    assert c["overall"] == pytest.approx(6.5 / 8.5)


def test_circuit_tracer_scores_are_circuit_tracers(demo_graphs, circuit_tracer, tmp_path):  # noqa: F811
    """The same adjacency through circuit_tracer.graph.compute_graph_scores itself (circuit-tracer 0.5.0
    from its own venv, run on this torch)."""
    _, _, state, graphs, _ = demo_graphs
    (site,) = CT_VENV.glob("lib/python*/site-packages")
    for j, g in enumerate(graphs):
        adj, layout = graph_matrix(g.nodes, g.edges, len(state.acts), len(state.ids))
        ours = circuit_tracer_scores(adj, layout)
        # what the pipeline computes: the same system built from the edges, without the full matrix
        assert graph_scores(g.edges) == pytest.approx(ours, rel=1e-12)
        assert g.scores["circuit_tracer"] == pytest.approx(ours, rel=1e-12)
        torch.save(adj.float(), tmp_path / f"adj{j}.pt")  # circuit-tracer's logit weights are float32
        code = (
            "import sys, json, types, torch\n"
            f"sys.path.append({str(site)!r})\n"
            "from circuit_tracer.graph import compute_graph_scores\n"
            f"adj = torch.load({str(tmp_path / f'adj{j}.pt')!r}, weights_only=True)\n"
            f"g = types.SimpleNamespace(adjacency_matrix=adj, logit_targets=[0, 0],"
            f" input_tokens=[0] * {layout['n_tokens']}, selected_features=[0] * {layout['n_features']},"
            f" cfg=types.SimpleNamespace(n_layers={layout['n_layers']}),"
            " logit_probabilities=torch.tensor([0.5, 0.5], dtype=adj.dtype))\n"
            "print(json.dumps(compute_graph_scores(g)))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=clean_env())
        assert r.returncode == 0, r.stderr[-2000:]
        replacement, complete = json.loads(r.stdout.strip().splitlines()[-1])
        assert ours["replacement"] == pytest.approx(replacement, abs=1e-4)
        assert ours["completeness"] == pytest.approx(complete, abs=1e-4)
        assert 0 < ours["completeness"] <= 1


def _spliced(ctx, saes, ids, target_layer, keep, err):
    """The target layer's output and the last layer's with SAEs spliced below ``target_layer``: each
    layer's stream replaced by decode(encode(h) · mask) + the clean error, written here from the full encoder."""
    from pathflow.model import resid_hooks, run

    def edit(l):
        def fn(h):
            sae = saes[l]
            f = sae.encode(h[0].to(sae.W_enc.dtype))  # [n, d_sae], every feature
            mask = torch.zeros_like(f)
            for (ll, q, i) in keep:
                if ll == l:
                    mask[q, i] = 1.0
            return (sae.decode(f * mask) + err[l])[None].to(h.dtype)
        return fn

    top = ctx.n_layers - 1
    with torch.no_grad(), resid_hooks(ctx.model, capture={target_layer, top},
                                      edits={l: edit(l) for l in range(target_layer)}) as hs:
        run(ctx.model, ids)
    return hs[target_layer][0], hs[top][0, -1]


def _measure(ctx, saes, ids, t, keep, err) -> tuple[float, float]:
    """(the target's pre-activation, the decision) with only the features ``keep`` spliced below the target."""
    from pathflow.jacobian import target_pre
    from pathflow.model import logit_difference

    h, last = _spliced(ctx, saes, ids, t.layer, keep, err)
    return (float(target_pre(saes[t.layer], h[t.pos][None], [t.feature])[0]),
            float(logit_difference(ctx.model, last, BET, STOP)))


def test_faithfulness_against_a_spliced_forward(ctx, demo_graphs):
    saes, ids, state, graphs, _ = demo_graphs
    g = graphs[0]
    t = g.target

    def m(keep):
        return _measure(ctx, saes, ids, t, keep, state.err)

    all_active = {(l, q, i) for l, (p, f, _) in state.acts.items() if l < t.layer
                  for q, i in zip(p.tolist(), f.tolist())}
    full, none = m(all_active), m(set())
    graph = m({(k[1], k[2], k[3]) for k in g.nodes if k[0] == "f"})
    want = [(graph[j] - none[j]) / (full[j] - none[j]) for j in (0, 1)]
    assert g.scores["faithfulness"]["target"] == pytest.approx(want[0], abs=1e-4)
    assert g.scores["faithfulness"]["decision"] == pytest.approx(want[1], abs=1e-4)
    # a graph of every active feature is the whole model; a graph of none explains nothing
    every = replace(g, nodes={("f", l, q, i) for l, q, i in all_active})
    empty = replace(g, nodes=set())
    f_every, f_empty = faithfulness(ctx.model, saes, ids, state.err, [every, empty], (BET, STOP))
    assert f_every["target"] == pytest.approx(1.0, abs=1e-4) and f_every["decision"] == pytest.approx(1.0, abs=1e-4)
    assert f_empty["target"] == pytest.approx(0.0, abs=1e-6)


def test_faithfulness_with_the_bos_position_not_nodes(ctx, demo_graphs):
    """graphs.zero_bos: position 0 keeps its clean stream in every row, the same as a spliced forward that keeps
    every BOS feature (decode(encode(h)) + the clean error is h there)."""
    saes, ids, state, graphs, _ = demo_graphs
    g = graphs[0]
    t = g.target

    def m(keep):
        return _measure(ctx, saes, ids, t, keep, state.err)

    active = {(l, q, i) for l, (p, f, _) in state.acts.items() if l < t.layer for q, i in zip(p.tolist(), f.tolist())}
    bos = {k for k in active if k[1] == 0}
    assert bos, "the demo's BOS position has active features"
    kept = {(k[1], k[2], k[3]) for k in g.nodes if k[0] == "f" and k[2] > 0}
    full, none, graph = m(active), m(bos), m(kept | bos)
    want = [(graph[j] - none[j]) / (full[j] - none[j]) for j in (0, 1)]
    (got,) = faithfulness(ctx.model, saes, ids, state.err, [replace(g, nodes={("f", *k) for k in kept})], (BET, STOP),
                          first=1)
    assert got["target"] == pytest.approx(want[0], abs=1e-4) and got["decision"] == pytest.approx(want[1], abs=1e-4)
    (plain,) = faithfulness(ctx.model, saes, ids, state.err, [replace(g, nodes={("f", *k) for k in kept})], (BET, STOP))
    # splicing BOS too is a different measurement, by more than the tolerance above
    assert max(abs(plain[k] - got[k]) for k in ("target", "decision")) > 5e-4


def test_scores_reach_the_graph_json(demo_graphs):
    from pathflow.graphs import graph_json

    _, _, state, graphs, _ = demo_graphs
    doc = graph_json(graphs[0], state, [str(i) for i in state.ids], "p", "s", "scan", 4, 100, "d", 0.8)
    info = doc["metadata"]["info"]
    assert set(info["scores"]) == {"completeness", "circuit_tracer", "faithfulness"}
    assert "validated" in info["validated_means"] and info["replay"]["n_validated"] <= info["replay"]["n_replayed"]


def test_circuit_tracer_scores_solve_only_live_nodes():
    """Nodes that feed no edge are dropped from the solve: the scores equal the dense series summed term by term
    (Σ_k w·A^k over a random DAG with most error nodes empty, as at the real shapes)."""
    g = torch.Generator().manual_seed(0)
    n_feat, n_layers, n_tok = 6, 3, 4
    n = n_feat + n_layers * n_tok + n_tok + 2
    adj = torch.zeros(n, n, dtype=torch.float64)
    sources = [*range(n_feat), n_feat + 1, n_feat + 7, n - 2 - n_tok, n - 3]  # a few errors and tokens
    order = {s: i for i, s in enumerate(sources)}
    for tgt in [*range(n_feat), n - 2, n - 1]:
        for s in sources:
            if s != tgt and (tgt >= n - 2 or order[s] < order.get(tgt, 0)) and torch.rand(1, generator=g) < 0.7:
                adj[tgt, s] = torch.randn(1, generator=g, dtype=torch.float64)
    layout = {"n_features": n_feat, "n_tokens": n_tok, "n_layers": n_layers, "n_logits": 2}
    A = adj.abs() / adj.abs().sum(1, keepdim=True).clamp(min=1e-10)
    w = torch.zeros(n, dtype=torch.float64)
    w[-2:] = 0.5
    x, term = w.clone(), w.clone()
    for _ in range(n):  # a DAG: the series ends
        term = term @ A
        x += term
    infl = x - w
    e0, e1 = n_feat, n_feat + n_layers * n_tok
    tok, err = float(infl[e1:e1 + n_tok].sum()), float(infl[e0:e1].sum())
    ours = circuit_tracer_scores(adj, layout)
    assert ours["replacement"] == pytest.approx(tok / (tok + err), rel=1e-9)
    assert ours["completeness"] == pytest.approx(float(((1 - A[:, e0:e1].sum(1)) * x).sum() / x.sum()), rel=1e-9)
