"""Whole-prompt attribution graphs (pathflow/graphs.py) against independent computations: step 3's
cached-prefix Jacobians, an SAE spliced in at an earlier position and differentiated by autograd,
finite differences of real interventions, the model's own logits, and hand-worked pruning."""

import pytest
import torch

from pathflow.graphs import (
    Output,
    Target,
    cantor,
    cumulative_influence,
    decision_output,
    dense_jacobian,
    drop_dangling,
    find_threshold,
    graph_targets,
    node_weights,
    output_gradients,
    pool_weights,
    prompt_graphs,
    prompt_state,
    prune_edges,
    select_nodes,
)
from pathflow.jacobian import jacobians, target_pre
from pathflow.model import resid_hooks, run

from .conftest import assert_same_graphs

BET, STOP = 18, 19  # "1" and "2" in the demo tokenizer (checked below)


def _pre_at(ctx, ids, layer, feature, pos, edits=None):
    """A target's pre-activation at ``pos`` with ``edits`` applied to the residual stream."""
    with torch.no_grad(), resid_hooks(ctx.model, capture={layer}, edits=edits or {}, stop_after=layer) as hs:
        run(ctx.model, ids)
    return float(target_pre(ctx.sae(layer), hs[layer][:, pos], [feature])[0])


def test_decision_tokens_of_the_demo(ctx):
    from pathflow.errors import PathflowError
    from pathflow.graphs import answer_id

    assert answer_id(ctx.tokenizer, "1", "bet") == BET and answer_id(ctx.tokenizer, "2", "stop") == STOP
    with pytest.raises(PathflowError, match="decision.bet 'Bet 1' is 3 tokens"):
        answer_id(ctx.tokenizer, "Bet 1", "bet")


def test_position_p_slice_equals_step3(ctx):
    """At the target's own position the whole-prompt gradients are step 3's Jacobians."""
    saes = ctx.saes_up_to(3)
    for prompt in ("safe", "risky"):
        ids = ctx.prompt_ids[prompt]
        p = ids.shape[1] - 1
        outs = [Output(layer=3, feature=5, pos=p), Output(layer=2, feature=17, pos=p),
                Output(layer=3, feature=101, pos=p)]
        g = output_gradients(ctx.model, saes, ids, outs)
        for r, o in enumerate(outs):
            tj = jacobians(ctx.model, ctx.saes_up_to(o.layer), ids, o.layer, [o.feature])
            assert torch.allclose(g.value[r], tj.pre[0], atol=1e-5)
            for j, up in enumerate(tj.layers):
                assert torch.allclose(dense_jacobian(g, saes, r, up, p), tj.grad[0, j], atol=1e-5, rtol=1e-4)


def test_rows_are_independent(ctx):
    """k outputs in one batch give each output's own gradients (as k separate backwards)."""
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["risky"]
    n = ids.shape[1]
    outs = [Output(layer=3, feature=56, pos=n - 1), Output(layer=2, feature=151, pos=n - 4),
            decision_output(ctx.model, BET, STOP, n)]
    together = output_gradients(ctx.model, saes, ids, outs)
    for r, o in enumerate(outs):
        alone = output_gradients(ctx.model, saes, ids, [o])
        for l in alone.resid:
            assert torch.allclose(together.resid[l][r], alone.resid[l][0], atol=1e-6)
        assert torch.allclose(together.emb[r], alone.emb[0], atol=1e-6)
    # one forward and a vmapped backward (the default) against k copies of the prompt and one backward
    copies = output_gradients(ctx.model, saes, ids, outs, vmap=False)
    assert torch.allclose(together.value, copies.value, atol=1e-6)
    assert torch.allclose(together.emb, copies.emb, atol=1e-6)
    for l in copies.resid:
        assert torch.allclose(together.resid[l], copies.resid[l], atol=1e-6)
    assert set(together.resid) == set(copies.resid)


def test_earlier_positions_match_spliced_autograd_and_finite_differences(ctx):
    """An upstream feature at q < p reaches the target only through attention: its weight
    (activation × gradient) against an SAE spliced in at q, and a finite-difference edit there."""
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["risky"]
    p = ids.shape[1] - 1
    layer, feature, up = 3, 56, 1
    state = prompt_state(ctx.model, saes, ids)
    g = output_gradients(ctx.model, saes, ids, [Output(layer=layer, feature=feature, pos=p)])
    w = node_weights(state, saes, g)
    pos, feat, val = state.acts[up]
    checked = 0
    for q in sorted({int(x) for x in pos if int(x) < p - 2}, reverse=True)[:3]:
        holder = {}

        def splice(h, q=q, holder=holder):
            x = h[:, q]
            f = saes[up].encode(x).detach().requires_grad_(True)
            holder["f"] = f
            h = h.clone()
            h[:, q] = saes[up].decode(f) + (x - saes[up].decode(f)).detach()
            return h

        with torch.enable_grad(), resid_hooks(ctx.model, capture={layer}, edits={up: splice}, stop_after=layer) as hs:
            run(ctx.model, ids)
            pre = target_pre(saes[layer], hs[layer][:, p], [feature])
            (gf,) = torch.autograd.grad(pre.sum(), [holder["f"]])
        for j in torch.nonzero(pos == q).flatten().tolist():
            i, a = int(feat[j]), float(val[j])
            assert w.feature[up][0, j].item() == pytest.approx(a * float(gf[0, i]), rel=1e-3, abs=1e-6)
            checked += 1
        # central finite differences of a small edit of the feature with the largest weight at q
        j = max(torch.nonzero(pos == q).flatten().tolist(), key=lambda j: abs(w.feature[up][0, j].item()))
        eps = 1e-2
        d = saes[up].decoder_direction(int(feat[j])) * float(val[j])

        def nudge(sign, q=q, d=d, eps=eps):
            def edit(h):
                h = h.clone()
                h[:, q] += sign * eps * d
                return h
            return {up: edit}

        slope = (_pre_at(ctx, ids, layer, feature, p, nudge(+1)) - _pre_at(ctx, ids, layer, feature, p, nudge(-1)))
        assert slope / (2 * eps) == pytest.approx(w.feature[up][0, j].item(), rel=1e-2, abs=2e-5)
    assert checked >= 3
    # nothing downstream of the target, and nothing after its position
    late = Output(layer=2, feature=151, pos=p - 5)
    w2 = node_weights(state, saes, output_gradients(ctx.model, saes, ids, [late]))
    assert torch.all(w2.feature[up][0, pos > p - 5] == 0) and torch.all(w2.error[up][0, p - 4:] == 0)
    assert 2 not in w2.feature or torch.all(w2.feature[2] == 0)


def test_edge_weights_of_a_pool_equal_every_node_weight_gathered(ctx):
    """The edges' weights are computed for the kept nodes only: the same numbers as the weights of every
    node (node_weights, checked by finite differences above) at those nodes, with a leading position
    that is not a node, rows of different layers and positions, and nodes they cannot depend on."""
    from pathflow.graphs import FlatNodes, _flat_rows, _vec

    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["risky"]
    n = ids.shape[1]
    state = prompt_state(ctx.model, saes, ids, first=1)
    flat = FlatNodes(state)
    g = output_gradients(ctx.model, saes, ids, [Output(layer=3, feature=5, pos=n - 1), Output(layer=2, feature=151,
                                                                                               pos=n - 6)])
    every = torch.stack([_vec(r) for r in _flat_rows(node_weights(state, saes, g), state)])  # [2, N]
    pool = torch.randperm(flat.size, generator=torch.Generator().manual_seed(0))[:400]
    pool = torch.cat([pool, torch.tensor([flat.size - 1, flat.m, flat.m + n])])  # an embedding, errors at 0 and 0
    got = pool_weights(state, saes, g, flat, pool)
    assert got.shape == (2, len(pool))
    assert torch.allclose(got, every[:, pool], rtol=1e-5, atol=1e-7)
    assert (got[1] == 0).sum() > (got[0] == 0).sum()  # the lower, earlier row depends on fewer of them
    assert (every[:, pool] != 0).sum() > 200


def test_embedding_and_error_weights_by_finite_differences(ctx):
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["safe"]
    p = ids.shape[1] - 1
    state = prompt_state(ctx.model, saes, ids)
    o = Output(layer=3, feature=5, pos=p)
    w = node_weights(state, saes, output_gradients(ctx.model, saes, ids, [o]))
    eps = 1e-2
    for q in (p - 3, p - 1):
        emb = ctx.model.get_input_embeddings()

        def scaled(sign, q=q, emb=emb):
            hook = emb.register_forward_hook(lambda _m, _i, out: torch.cat(
                [out[:, :q], out[:, q:q + 1] * (1 + sign * eps), out[:, q + 1:]], 1))
            try:
                return _pre_at(ctx, ids, 3, 5, p)
            finally:
                hook.remove()

        assert (scaled(+1) - scaled(-1)) / (2 * eps) == pytest.approx(w.emb[0, q].item(), rel=1e-2, abs=2e-5)
        # the error term at (layer 1, q), grown and shrunk a little
        e = state.err[1][q]

        def grown(sign, q=q, e=e):
            def edit(h):
                h = h.clone()
                h[:, q] += sign * eps * e
                return h
            return _pre_at(ctx, ids, 3, 5, p, {1: edit})

        assert (grown(+1) - grown(-1)) / (2 * eps) == pytest.approx(w.error[1][0, q].item(), rel=1e-2, abs=2e-5)


def test_the_decision_is_the_models_logit_difference(ctx):
    saes = ctx.saes_up_to(3)
    for prompt in ("safe", "risky"):
        ids = ctx.prompt_ids[prompt]
        n = ids.shape[1]
        with torch.no_grad():
            logits = ctx.model(ids).logits[0, -1]
        g = output_gradients(ctx.model, saes, ids, [decision_output(ctx.model, BET, STOP, n)])
        assert float(g.value[0]) == pytest.approx(float(logits[BET] - logits[STOP]), abs=1e-4)
        # a target's pull on the decision: finite differences of a small edit of that feature at the end
        dj = dense_jacobian(g, saes, 0, 2, n - 1)
        d = saes[2].decoder_direction(151)
        eps = 1e-2

        def add(h, d=d, n=n, eps=eps):
            h = h.clone()
            h[:, n - 1] += eps * d
            return h

        with torch.no_grad(), resid_hooks(ctx.model, edits={2: add}):
            moved = ctx.model(ids).logits[0, -1]
        assert float((moved[BET] - moved[STOP]) - (logits[BET] - logits[STOP])) / eps == pytest.approx(
            float(dj[151]), rel=2e-2, abs=1e-4)


def test_node_weights_add_up_to_the_residual_stream(ctx):
    """Features + errors + the decoder bias of a layer, over every position, make up h_l · g_l: the
    SAE decomposition is exact, so no weight is lost or counted twice."""
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["risky"]
    p = ids.shape[1] - 1
    state = prompt_state(ctx.model, saes, ids)
    g = output_gradients(ctx.model, saes, ids, [Output(layer=3, feature=56, pos=p)])
    w = node_weights(state, saes, g)
    with torch.no_grad(), resid_hooks(ctx.model, capture={0, 1, 2}, stop_after=2) as hs:
        run(ctx.model, ids)
    for l in (0, 1, 2):
        total = float((hs[l][0] * g.resid[l][0]).sum())
        bias = float((g.resid[l][0] @ (saes[l].b_dec / saes[l].scale)).sum())
        assert float(w.feature[l].sum() + w.error[l].sum()) + bias == pytest.approx(total, rel=1e-4, abs=1e-5)


def test_pruning_as_circuit_tracer_prunes():
    # find_threshold: the smallest score among the largest that make up the fraction
    s = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    assert float(find_threshold(s, 0.5)) == 0.3  # 0.4 + 0.3 = 0.7 ≥ 0.5
    assert float(find_threshold(s, 0.3)) == 0.4
    assert float(find_threshold(s, 1.0)) == 0.1
    # cumulative influence: the most influential has the smallest value
    assert cumulative_influence(s).tolist() == pytest.approx([1.0, 0.4, 0.9, 0.7])
    # nodes: half the target's |weight| share, half the decision's
    to_t = {("f", 0, 1, 7): 3.0, ("f", 1, 2, 9): -1.0, ("e", 0, 1): 0.0, ("E", 0): 0.5}
    to_d = {("f", 0, 1, 7): 0.0, ("f", 1, 2, 9): 2.0, ("e", 0, 1): -2.0, ("E", 0): 0.0}
    kept, cum, infl = select_nodes(to_t, to_d, node_threshold=0.5)
    assert infl[("f", 0, 1, 7)] == pytest.approx(0.5 * 3 / 4.5)
    assert infl[("f", 1, 2, 9)] == pytest.approx(0.5 * 1 / 4.5 + 0.5 * 0.5)
    assert set(kept) == {("f", 0, 1, 7), ("f", 1, 2, 9), ("E", 0)}  # 0.333 + 0.361 ≥ 0.5; embeddings stay
    assert cum[("f", 1, 2, 9)] == pytest.approx(infl[("f", 1, 2, 9)])
    kept_one, *_ = select_nodes(to_t, to_d, node_threshold=0.99, max_nodes=1)
    assert [k for k in kept_one if k[0] != "E"] == [("f", 1, 2, 9)]
    # edges: share of the target's incoming |weight| × the target's influence
    a, b, c, T = ("f", 0, 0, 1), ("f", 0, 1, 2), ("f", 1, 1, 3), ("t",)
    edges = {(a, T): 1.0, (b, T): 1.0, (c, T): 2.0, (a, c): 0.5, (b, c): -0.01}
    keptE = prune_edges(edges, {T: 1.0, c: 0.5}, edge_threshold=0.9)
    assert (b, c) not in keptE and (a, c) in keptE and (c, T) in keptE
    nodes, left = drop_dangling({a, b, c, T, ("f", 2, 0, 4)}, keptE)
    assert ("f", 2, 0, 4) not in nodes and T in nodes  # no outgoing edge: dropped; outputs stay


def test_cantor_pairing_and_which_targets_get_graphs():
    assert cantor(2, 151) == 11932 and cantor(0, 0) == 0
    assert cantor(31, 32767) == (31 + 32767) * (31 + 32768) // 2 + 32767
    sel = [{"feature": f"L1-{i}", "direction": d, "rank": i} for i, d in
           enumerate(["risky", "risky", "risky", "safe", "safe"])]
    assert [s["feature"] for s in graph_targets(sel, 4)] == ["L1-0", "L1-3", "L1-1", "L1-4"]
    assert len(graph_targets(sel, None)) == 5 and graph_targets(sel, 0) == []


def test_prompt_graphs_are_pathways_not_stars(ctx):
    """Kept upstream nodes are linked among themselves, so multi-hop pathways show; every kept
    feature or error reaches an output; the target is linked to the decision."""
    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["risky"]
    p = ids.shape[1] - 1
    state, graphs, _ = prompt_graphs(ctx.model, saes, ids, [Target("L3-56", 3, 56, p)], BET, STOP,
                                  max_nodes=60, batch_size=16)
    (g,) = graphs
    inner = [(s, d) for s, d in g.edges if s[0] == "f" and d[0] == "f"]
    assert inner, "no edges between upstream features"
    assert all(s[1] < d[1] and s[2] <= d[2] for s, d in inner)  # lower layer, no later position
    # an edge's weight is the source's first-order effect on the kept feature: central differences of
    # the source's own contribution, scaled by 1 ± eps (the strongest edges, from earlier positions too)
    eps = 1e-3
    strongest = sorted(inner, key=lambda e: -abs(g.edges[e]))
    for s, d in strongest[:2] + [e for e in strongest if e[0][2] < p][:1]:
        a_s = g.activation[s]

        def nudge(sign, s=s, a_s=a_s):
            def edit(h):
                h = h.clone()
                h[:, s[2]] += sign * eps * a_s * saes[s[1]].decoder_direction(s[3])
                return h
            return {s[1]: edit}

        slope = (_pre_at(ctx, ids, d[1], d[3], d[2], nudge(+1)) - _pre_at(ctx, ids, d[1], d[3], d[2], nudge(-1)))
        assert slope / (2 * eps) == pytest.approx(g.edges[(s, d)], rel=2e-2, abs=1e-5)
    assert {s[2] for s in g.nodes if s[0] == "f"} - {p}, "every feature at the target's own position"
    sources = {s for s, _ in g.edges}
    assert all(k in sources for k in g.nodes if k[0] in ("f", "e"))
    # the target's own link to the decision: −Δdecision measured by a forward with the target ablated
    a_t = g.activation[("f", 3, p, 56)]

    def ablate(h, d=saes[3].decoder_direction(56) * a_t):
        h = h.clone()
        h[:, p] -= d
        return h

    with torch.no_grad():
        base = ctx.model(ids).logits[0, -1]
        with resid_hooks(ctx.model, edits={3: ablate}):
            moved = ctx.model(ids).logits[0, -1]
    want = float((moved[BET] - moved[STOP]) - (base[BET] - base[STOP]))
    assert g.decision_change == pytest.approx(want, abs=1e-4) and want
    assert g.edges.get((("t",), ("D",))) == pytest.approx(-want, abs=1e-4)
    assert sum(k[0] in ("f", "e") for k in g.nodes) <= 60
    # replay judged every kept feature, at its own position; most agree with the gradient in sign
    assert {k for k in g.nodes if k[0] == "f"} <= set(g.replay)
    judged = [j for j in g.replay.values() if abs(j["predicted"]) > 1e-3]
    assert judged and sum(j["predicted"] * j["actual"] > 0 for j in judged) / len(judged) > 0.7


def test_zero_bos_leaves_the_first_position_without_nodes(ctx):
    """graphs.zero_bos, as circuit-tracer's setup_attribution: a prompt opening with a special token has no feature
    or error node there (its embedding stays); the other nodes' weights are unchanged; without it, BOS is nodes."""
    from pathflow.graphs import bos_positions

    ids = ctx.prompt_ids["safe"]
    assert int(ids[0, 0]) in ctx.tokenizer.all_special_ids
    assert bos_positions(ctx.tokenizer, ids, True) == 1 and bos_positions(ctx.tokenizer, ids, False) == 0
    assert bos_positions(ctx.tokenizer, ids[:, 1:], True) == 0  # no special token first: nothing to leave out
    saes = ctx.saes_up_to(3)
    p = ids.shape[1] - 1
    targets = [Target("L3-56", 3, 56, p)]
    kw = dict(node_threshold=0.8, edge_threshold=0.98, max_nodes=60, batch_size=8, method="norm", replay_top=10)
    s1, (g1,), d1 = prompt_graphs(ctx.model, saes, ids, targets, BET, STOP, first=1, **kw)
    s0, (g0,), d0 = prompt_graphs(ctx.model, saes, ids, targets, BET, STOP, first=0, **kw)
    assert all(int((pos == 0).sum()) == 0 for pos, _, _ in s1.acts.values())
    assert sum(int((pos == 0).sum()) for pos, _, _ in s0.acts.values()) > 0
    assert not any(k[0] in ("f", "e") and k[2] == 0 for k in g1.nodes)
    assert ("E", 0) in g1.nodes or any(k[0] == "E" for k in g1.nodes)
    assert float(d1["targets"][0]["error"][:, 0].abs().sum()) == 0.0
    assert float(d0["targets"][0]["error"][:, 0].abs().sum()) > 0.0
    # an entry after BOS has the same first-order weight either way (one backward, the same gradient)
    later0 = {k: v for k, v in zip(_keys(s0), d0["targets"][0]["gradient"].tolist()) if k[1] > 0}
    later1 = dict(zip(_keys(s1), d1["targets"][0]["gradient"].tolist()))
    assert later0.keys() == later1.keys()
    assert max(abs(later0[k] - later1[k]) for k in later1) < 1e-5


def _keys(state):
    return [(l, q, i) for l in sorted(state.acts) for q, i in zip(state.acts[l][0].tolist(), state.acts[l][1].tolist())]


def test_replay_measures_the_decision_free_and_with_the_target_held(ctx):
    """Each candidate's Δdecision against a plain full forward with the same edit; held at its
    baseline, the target passes nothing on, so the share through it is what holding removes."""
    from pathflow.replay import replay

    ids = ctx.prompt_ids["risky"]
    n = ids.shape[1]
    layer, feature = 3, 56
    saes = ctx.saes_up_to(layer)
    state = prompt_state(ctx.model, saes, ids)
    pos, feat, val = state.acts[1]
    at_end = [j for j in range(len(pos)) if int(pos[j]) == n - 1][:3]
    cands = [{"feature": f"L1-{int(feat[j])}", "layer": 1, "feature_id": int(feat[j]), "activation": float(val[j]),
              "gradient": 0.0, "attribution": 0.0} for j in at_end]
    assert cands
    base, recs = replay(ctx.model, saes, ids, layer, feature, cands, decision=(BET, STOP))
    without = replay(ctx.model, saes, ids, layer, feature, cands)[1]
    with torch.no_grad():
        logits = ctx.model(ids).logits[0, -1]
    d0 = float(logits[BET] - logits[STOP])
    for c, r, w in zip(cands, recs, without):
        assert r["actual_change"] == pytest.approx(w["actual_change"], abs=1e-6)  # the target's change as before
        d = saes[1].decoder_direction(c["feature_id"]) * c["activation"]

        def ablate(h, d=d):
            h = h.clone()
            h[:, n - 1] -= d
            return h

        with torch.no_grad(), resid_hooks(ctx.model, edits={1: ablate}):
            moved = ctx.model(ids).logits[0, -1]
        assert r["decision_change"] == pytest.approx(float(moved[BET] - moved[STOP]) - d0, abs=1e-4)
        # held: the same edit, and the target's activation put back at layer 3
        sae = saes[layer]
        with torch.no_grad(), resid_hooks(ctx.model, capture={layer}, stop_after=layer) as hs:
            run(ctx.model, ids)
        f0 = float(sae.gate(target_pre(sae, hs[layer][:, -1], [feature]))[0])

        def hold(h, sae=sae, f0=f0):
            f = float(sae.gate(target_pre(sae, h[:, -1], [feature]))[0])
            h = h.clone()
            h[:, n - 1] += (f0 - f) * sae.decoder_direction(feature)
            return h

        with torch.no_grad(), resid_hooks(ctx.model, edits={1: ablate, layer: hold}):
            held = ctx.model(ids).logits[0, -1]
        assert r["decision_change_held"] == pytest.approx(float(held[BET] - held[STOP]) - d0, abs=1e-4)
        if abs(r["decision_change"]) > 1e-6:
            assert r["decision_share_through_target"] == pytest.approx(
                1 - r["decision_change_held"] / r["decision_change"], rel=1e-6)
    assert "decision_change" not in without[0]
    # not at the last token: no decision fields (the decision is read there)
    _, early = replay(ctx.model, saes, ids, layer, feature, cands, position=n - 3, decision=(BET, STOP))
    assert "decision_change" not in early[0]


def test_nodes_at_earlier_positions_are_replayed_from_there_on(ctx):
    """A node at q < p is ablated at q and positions q.. recomputed against the cache before q, each row
    joining the forward at its node's layer: the same change as a full forward with that edit, for the
    target and the decision, whatever the order and mix of layers the nodes come in (a node at or above a
    target's layer does not change it)."""
    from pathflow.graphs import replay_nodes

    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["safe"]
    n = ids.shape[1]
    state = prompt_state(ctx.model, saes, ids)
    nodes = []
    for q in (0, n - 7, n - 2):
        for layer in (2, 0, 3, 1):  # not in order: rows are sorted by layer inside a replay and put back
            pos, feat, _ = state.acts[layer]
            nodes += [("f", layer, q, int(feat[j])) for j in range(len(pos)) if int(pos[j]) == q][:1 + (layer == 1)]
    assert {k[2] for k in nodes} == {0, n - 7, n - 2} and {k[1] for k in nodes} == {0, 1, 2, 3}
    targets = [Target("L3-5", 3, 5, n - 1), Target("L2-17", 2, 17, n - 4)]
    got = replay_nodes(ctx.model, saes, ids, state, nodes, targets, (BET, STOP), batch_size=2)
    with torch.no_grad():
        base = ctx.model(ids).logits[0, -1]
    acts = state.activations
    for k in nodes:
        def ablate(h, q=k[2], d=saes[k[1]].decoder_direction(k[3]) * acts[k]):
            h = h.clone()
            h[:, q] -= d
            return h

        for t in targets:
            want = _pre_at(ctx, ids, t.layer, t.feature, t.pos, {k[1]: ablate}) - _pre_at(ctx, ids, t.layer,
                                                                                           t.feature, t.pos)
            if k[1] >= t.layer:
                want = 0.0
            assert got[k]["target"][t.name] == pytest.approx(want, abs=1e-5), (k, t.name)
        with torch.no_grad(), resid_hooks(ctx.model, edits={k[1]: ablate}):
            moved = ctx.model(ids).logits[0, -1]
        assert got[k]["decision"] == pytest.approx(float((moved[BET] - moved[STOP]) - (base[BET] - base[STOP])),
                                                   abs=1e-4)


def test_graph_batches_halve_on_out_of_memory(ctx, monkeypatch, caplog):
    """A graph batch (targets, kept nodes, replays) that runs out of memory is split in halves: the
    same graphs come out, as from batches that fit."""
    from pathflow.batching import SIMULATE_ENV

    saes = ctx.saes_up_to(3)
    ids = ctx.prompt_ids["safe"]
    p = ids.shape[1] - 1
    targets = [Target("L3-5", 3, 5, p), Target("L2-17", 2, 17, p), Target("L3-101", 3, 101, p)]
    _, whole, dense = prompt_graphs(ctx.model, saes, ids, targets, BET, STOP, max_nodes=20, batch_size=8)
    monkeypatch.setenv(SIMULATE_ENV, "1")  # any batch above one row "runs out of memory"
    with caplog.at_level("WARNING", logger="pathflow.batching"):
        _, split, dense_split = prompt_graphs(ctx.model, saes, ids, targets, BET, STOP, max_nodes=20, batch_size=8)
    halvings = [r.getMessage() for r in caplog.records if "out of memory on a batch" in r.getMessage()]
    assert any("batch of 3" in m for m in halvings) and any("batch of 8" in m for m in halvings)  # targets, nodes
    assert_same_graphs(whole, split, dense, dense_split)


def test_blocks_by_position_hold_each_entry_once_at_its_position():
    """by_position's blocks: a position with many entries takes several blocks; each entry sits in a block of
    its own position with its own f·W_D/s, and the blocks of one rank run at increasing positions."""
    import types

    from pathflow.graphs import PromptState, _runs

    d, d_sae, n = 8, 64, 6
    gen = torch.Generator().manual_seed(0)
    sae = types.SimpleNamespace(d_model=d, W_dec=torch.randn(d, d_sae, generator=gen), scale=2.0)
    counts = [0, 30, 3, 0, 7, 5]  # mean 7.5 -> blocks of 8: position 1 takes 4, 0 and 3 none
    pos = torch.cat([torch.full((c,), q) for q, c in enumerate(counts)])
    feat = torch.cat([torch.randperm(d_sae, generator=gen)[:c] for c in counts])
    val = torch.rand(len(pos), generator=gen) + 0.5
    state = PromptState(ids=list(range(n)), emb=torch.zeros(n, d), acts={0: (pos, feat, val)}, err={})
    block_pos, dec, slot = state.by_position(0, sae)
    c = dec.shape[-1]
    assert c == 8 and block_pos.tolist() == [1, 2, 4, 5, 1, 1, 1]
    assert len(set(slot.tolist())) == len(pos)
    assert torch.equal(block_pos[slot // c], pos)
    flat = dec.transpose(1, 2).reshape(-1, d)  # [b * c, d]
    assert torch.allclose(flat[slot], (sae.W_dec[:, feat] * val / 2.0).T)
    assert flat.abs().sum() == pytest.approx(float(flat[slot].abs().sum()))  # nothing else in the blocks
    assert _runs(block_pos) == [(0, 4), (4, 5), (5, 6), (6, 7)]
