"""How much a whole-prompt graph explains (issue 18): completeness, circuit-tracer's scores, faithfulness.

- **completeness** — of each output's attribution (|weight| summed over the nodes of a layer), the share
  carried by SAE features rather than SAE errors, per layer and overall (the unpruned weights).
- **circuit-tracer's replacement and completeness scores** (``circuit_tracer.graph.compute_graph_scores``)
  of the pruned graph: with A the adjacency (row = target node, |weights| normalised to sum 1) and the
  outputs weighted 0.5 each, a node's influence is w·(A + A² + …). *replacement*: the share of the
  tokens' and errors' influence that is the tokens'; *completeness*: the influence-weighted share of each
  node's input that does not come from errors.
- **faithfulness** of the pruned graph (Marks et al. 2024): the SAEs spliced into the forward below the
  target with their errors held at the clean run's, every active feature that is not in the graph
  ablated (zero) at every layer below the target and every position, the graph's features recomputed
  from the edited stream: (m(graph) − m(none)) / (m(full) − m(none)), m the target's pre-activation and
  the decision; none ablates every feature, full none.
"""

from __future__ import annotations

import torch

from .jacobian import target_pre
from .model import decoder_layers, logit_difference, resid_hooks, run
from .sae import SAE


def completeness(row: dict[str, torch.Tensor], layer_of: torch.Tensor, layers: list[int]) -> dict:
    """Features' share of |attribution| against errors for one output's row (``graphs._flat_rows``):
    row["weight"] [m] over active entries of layer ``layer_of`` [m], row["error"] [layers, n]."""
    per_layer, f_sum, e_sum = {}, 0.0, 0.0
    for j, l in enumerate(layers):
        f = float(row["weight"][layer_of == l].abs().sum())
        e = float(row["error"][j].abs().sum())
        if f + e > 0:
            per_layer[str(l)] = f / (f + e)
        f_sum, e_sum = f_sum + f, e_sum + e
    return {"overall": f_sum / (f_sum + e_sum) if f_sum + e_sum > 0 else None, "per_layer": per_layer}


def graph_matrix(nodes: set, edges: dict, n_layers: int, n_tokens: int) -> tuple[torch.Tensor, dict]:
    """The pruned graph in circuit-tracer's layout: features, then one error node per (layer, position)
    — layer-major, all of them, absent ones empty — then one token per position, then the outputs (the
    target and the decision, its "logits"). adjacency [N, N]: row = the edge's target, column = its
    source, the weight. Returns (adjacency, {"n_features", "n_tokens", "n_layers", "n_logits", "index"})."""
    feats = sorted(k for k in nodes if k[0] == "f")
    index = {k: i for i, k in enumerate(feats)}
    start = len(feats)
    for l in range(n_layers):
        for q in range(n_tokens):
            index[("e", l, q)] = start + l * n_tokens + q
    start += n_layers * n_tokens
    for q in range(n_tokens):
        index[("E", q)] = start + q
    index[("t",)], index[("D",)] = start + n_tokens, start + n_tokens + 1
    adj = torch.zeros(start + n_tokens + 2, start + n_tokens + 2, dtype=torch.float64)
    for (s, d), w in edges.items():
        adj[index[d], index[s]] = w
    return adj, {"n_features": len(feats), "n_tokens": n_tokens, "n_layers": n_layers, "n_logits": 2, "index": index}


def circuit_tracer_scores(adj: torch.Tensor, layout: dict, logit_weights=(0.5, 0.5)) -> dict:
    """(replacement, completeness) as circuit-tracer defines them, its influence series summed in
    closed form: w·((I − A)⁻¹ − I).

    Solved on the nodes that are the source of an edge, and the outputs, only: any other node's x_j = w_j
    = 0 and enters no other equation, so the result is exact, and a graph of 200 nodes costs a 200-node
    solve rather than one over every (layer, position)'s error node (32 × 120 at the real shapes)."""
    n_logits = layout["n_logits"]
    live = (adj != 0).any(0)  # a source of some edge; a column of zeros feeds nothing
    live[-n_logits:] = True
    idx = torch.nonzero(live).flatten()  # ascending: the outputs stay last
    e0 = layout["n_features"]
    e1 = e0 + layout["n_tokens"] * layout["n_layers"]
    t1 = e1 + layout["n_tokens"]
    return _influence_scores(adj[idx][:, idx], (idx >= e0) & (idx < e1), (idx >= e1) & (idx < t1), logit_weights)


def graph_scores(edges: dict, logit_weights=(0.5, 0.5)) -> dict:
    """``circuit_tracer_scores`` of a pruned graph's ``edges`` {(source, target): weight}, with the outputs
    ("t",) and ("D",): the live submatrix built from the edges directly, never the [N, N] matrix of
    ``graph_matrix`` (≈ 4,000² at the real shapes, for a 200-node graph)."""
    outputs = [("t",), ("D",)]
    live = sorted({s for s, _ in edges} - set(outputs)) + outputs
    at = {k: i for i, k in enumerate(live)}
    A = torch.zeros(len(live), len(live), dtype=torch.float64)
    for (s, d), w in edges.items():
        if d in at:  # a node that feeds nothing is not live: its row is not in the system
            A[at[d], at[s]] = w
    return _influence_scores(A, torch.tensor([k[0] == "e" for k in live]), torch.tensor([k[0] == "E" for k in live]),
                             logit_weights)


def _influence_scores(A: torch.Tensor, is_err: torch.Tensor, is_tok: torch.Tensor, logit_weights) -> dict:
    """The scores of the live submatrix A [L, L] (row = target, the outputs last) whose nodes are errors
    where ``is_err``, tokens where ``is_tok`` [L]."""
    n_logits = len(logit_weights)
    A = A.abs()  # the columns left out are zero, so the row sums are the whole rows'
    A = A / A.sum(1, keepdim=True).clamp(min=1e-10)
    w = torch.zeros(len(A), dtype=torch.float64)
    w[-n_logits:] = torch.tensor(logit_weights, dtype=torch.float64)
    # x = w + x A  <=>  x (I − A) = w ; influence = x − w
    x = torch.linalg.solve((torch.eye(len(A), dtype=torch.float64) - A).T, w)
    influence = x - w
    tok, err = float(influence[is_tok].sum()), float(influence[is_err].sum())
    non_error = 1 - A[:, is_err].sum(1)
    return {"replacement": tok / (tok + err) if tok + err > 0 else None,
            "completeness": float((non_error * x).sum() / x.sum())}


@torch.no_grad()
def faithfulness(model, saes: dict[int, SAE], input_ids: torch.Tensor, err: dict[int, torch.Tensor],
                 graphs: list, decision: tuple[int, int], first: int = 0) -> list[dict]:
    """Each graph's faithfulness for its target and the decision, in one batched forward of ``input_ids``
    [1, n]: row 0 the clean run (full), a row per graph, a row per distinct target layer with every
    feature below it ablated (none). ``err``: {l: [n, d_model]} the clean SAE errors. Positions before
    ``first`` are not nodes (zero_bos): they keep their clean stream in every row. Returns
    [{"target", "decision"}] (None where m(full) = m(none))."""
    k = len(graphs)
    tops = sorted({g.target.layer for g in graphs})
    R = 1 + k + len(tops)
    below = torch.tensor([-1] + [g.target.layer for g in graphs] + tops)  # row r splices layers < below[r]
    entries: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # l -> (row, pos, feature)
    for l in range(max(tops)):
        r, q, i = [], [], []
        for j, g in enumerate(graphs, start=1):
            for key in g.nodes:
                if key[0] == "f" and key[1] == l and l < g.target.layer:
                    r.append(j), q.append(key[2]), i.append(key[3])
        entries[l] = tuple(torch.tensor(v, dtype=torch.long) for v in (r, q, i))

    def splice(l):
        sae = saes[l]

        def edit(h):
            base = (sae.b_dec / sae.scale + err[l]).to(h.dtype)  # every feature ablated, the error kept
            new = base.expand_as(h).clone()
            r, q, i = (t.to(h.device) for t in entries[l])
            if len(r):  # the graph's features, recomputed from the edited stream
                f = sae.gate(sae.scale * (h[r, q].to(sae.W_enc.dtype) * sae.W_enc[i]).sum(-1) + sae.b_enc[i])
                new.index_put_((r, q), ((f[:, None] * sae.W_dec[:, i].T) / sae.scale).to(h.dtype), accumulate=True)
            on = (below.to(h.device) > l)[:, None, None] & (torch.arange(h.shape[1], device=h.device) >= first)[
                None, :, None]
            return torch.where(on, new, h)

        return edit

    top = len(decoder_layers(model)) - 1
    with resid_hooks(model, capture=set(tops) | {top}, edits={l: splice(l) for l in range(max(tops))}) as hs:
        run(model, input_ids.expand(R, -1))
    # a target reads its own layer's output as computed, before any splice of that layer (none here)
    dec = logit_difference(model, hs[top][:, -1], *decision).float()
    out = []
    for j, g in enumerate(graphs, start=1):
        t = g.target
        sae = saes[t.layer]
        pre = target_pre(sae, hs[t.layer][:, t.pos].to(sae.W_enc.dtype), [t.feature] * R).float()
        none = 1 + k + tops.index(t.layer)
        out.append({"target": _ratio(pre[j], pre[0], pre[none]), "decision": _ratio(dec[j], dec[0], dec[none])})
    return out


def _ratio(graph: torch.Tensor, full: torch.Tensor, none: torch.Tensor) -> float | None:
    span = float(full - none)
    return float(graph - none) / span if abs(span) > 1e-9 else None
