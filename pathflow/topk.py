"""Step 3B: the top-k upstream candidates of a target on one prompt."""

from __future__ import annotations

import torch


def top_candidates(
    grad: torch.Tensor,
    activation: torch.Tensor,
    layers: list[int],
    k: int = 25,
    score: str = "attribution",
    min_abs_gradient: float = 0.0,
    active: torch.Tensor | None = None,
) -> list[dict]:
    """Rank upstream features of one target.

    grad, activation: [n_up, d_sae] for upstream ``layers``; ``active`` [m]: the flat indices of the
    nonzero activations, when the caller has them (the same for every target of a prompt).
    score "attribution": |gradient × activation| (what ablating the feature would change);
    score "gradient": |gradient| (the plan's rule), features with |gradient| ≤ min_abs_gradient dropped.
    Returns up to k records, best first: rank, feature, layer, feature_id, gradient,
    activation, attribution, score.
    """
    if grad.numel() == 0:
        return []
    if score == "attribution":  # an off feature cannot be ablated: only the active ones (~100 of 32K) compete
        act = activation.flatten()
        on = torch.nonzero(act).flatten() if active is None else active
        g = grad.flatten()[on]
        s = torch.where(g.abs() > min_abs_gradient, (g * act[on]).abs(), torch.full_like(g, -1.0))
        vals, at = torch.topk(s, min(k, s.numel()))
        idx = on[at]
    else:
        s = torch.where(grad.abs() > min_abs_gradient, grad.abs(), torch.full_like(grad, -1.0)).flatten()
        vals, idx = torch.topk(s, min(k, s.numel()))
    d_sae = grad.shape[1]
    out = []
    for rank, (v, i) in enumerate(zip(vals.tolist(), idx.tolist()), start=1):
        if v < 0:
            break
        li, fid = divmod(i, d_sae)
        layer = layers[li]
        out.append(
            {
                "rank": rank,
                "feature": f"L{layer}-{fid}",
                "layer": layer,
                "feature_id": fid,
                "gradient": float(grad[li, fid]),
                "activation": float(activation[li, fid]),
                "attribution": float(-grad[li, fid] * activation[li, fid]),
                "score": float(v),
            }
        )
    return out
