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
) -> list[dict]:
    """Rank upstream features of one target.

    grad, activation: [n_up, d_sae] for upstream ``layers``.
    score "attribution": |gradient × activation| (what ablating the feature would change);
    score "gradient": |gradient| (the plan's rule), features with |gradient| ≤ min_abs_gradient dropped.
    Returns up to k records, best first: rank, feature, layer, feature_id, gradient,
    activation, attribution, score.
    """
    if grad.numel() == 0:
        return []
    attribution = -grad * activation
    s = (attribution if score == "attribution" else grad).abs()
    s = torch.where(grad.abs() > min_abs_gradient, s, torch.full_like(s, -1.0))
    if score == "attribution":
        s = torch.where(activation != 0, s, torch.full_like(s, -1.0))  # an off feature cannot be ablated
    flat = s.flatten()
    vals, idx = torch.topk(flat, min(k, flat.numel()))
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
                "attribution": float(attribution[li, fid]),
                "score": float(v),
            }
        )
    return out
