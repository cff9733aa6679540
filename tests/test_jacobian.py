"""The Jacobian (DESIGN §3) against independent computations: an SAE spliced into the model
and differentiated by autograd, and finite differences of a real intervention."""

import pytest
import torch

from pathflow.jacobian import jacobians, target_pre
from pathflow.model import resid_hooks, run
from pathflow.replay import replay
from pathflow.topk import top_candidates


def spliced_grad(ctx, prompt, layer, feature, up_layer, position=-1):
    """∂pre_t/∂f_up by splicing SAE `up_layer` in at `position` (f a leaf, error term fixed)."""
    model, ids = ctx.model, ctx.prompt_ids[prompt]
    sae_u, sae_t = ctx.sae(up_layer), ctx.sae(layer)
    holder = {}

    def splice(h):
        x = h[:, position]
        f = sae_u.encode(x).detach().requires_grad_(True)
        err = (x - sae_u.decode(f)).detach()
        holder["f"] = f
        h = h.clone()
        h[:, position] = sae_u.decode(f) + err
        return h

    with torch.enable_grad(), resid_hooks(model, capture={layer}, edits={up_layer: splice}, stop_after=layer) as hs:
        run(model, ids)
        pre = target_pre(sae_t, hs[layer][:, position], [feature])
        (g,) = torch.autograd.grad(pre.sum(), [holder["f"]])
    return g[0], holder["f"][0].detach(), float(pre.detach())


def test_jacobian_matches_spliced_autograd(ctx):
    layer, features = 3, [5, 17, 101]
    for prompt in ("safe", "risky"):
        tj = jacobians(ctx.model, ctx.saes_up_to(layer), ctx.prompt_ids[prompt], layer, features)
        assert tj.grad.shape == (3, layer, ctx.sae(0).d_sae)
        for i, feat in enumerate(features):
            for up in range(layer):
                ref, f_ref, pre_ref = spliced_grad(ctx, prompt, layer, feat, up)
                rel = (tj.grad[i, up] - ref).norm() / ref.norm()
                assert rel < 1e-5, (prompt, feat, up, float(rel))
                assert torch.allclose(tj.activation[up], f_ref, atol=1e-6)
                assert abs(float(tj.pre[i]) - pre_ref) < 1e-5 * max(1, abs(pre_ref))
        # attribution is -J ⊙ f
        assert torch.allclose(tj.attribution, -tj.grad * tj.activation, atol=0)


def test_batched_rows_equal_single_target(ctx):
    ids = ctx.prompt_ids["risky"]
    batch = jacobians(ctx.model, ctx.saes_up_to(2), ids, 2, [3, 9, 40, 77])
    for i, feat in enumerate([3, 9, 40, 77]):
        one = jacobians(ctx.model, ctx.saes_up_to(2), ids, 2, [feat])
        assert torch.allclose(batch.grad[i], one.grad[0], rtol=1e-5, atol=1e-7)


def test_tiny_ablation_matches_gradient_prediction(ctx):
    layer, feat = 3, 12
    ids = ctx.prompt_ids["safe"]
    saes = ctx.saes_up_to(layer)
    tj = jacobians(ctx.model, saes, ids, layer, [feat])
    cands = top_candidates(tj.grad[0], tj.activation, tj.layers, k=8)
    assert len(cands) == 8
    eps = 1e-3
    _base, recs = replay(ctx.model, saes, ids, layer, feat, cands, scale=eps)
    for r in recs:
        # first order: the change of a tiny partial ablation is the gradient's prediction
        assert abs(r["actual_change"] - r["predicted_change"]) <= 1e-2 * abs(r["predicted_change"]) + 1e-6, r
        assert r["sign_agrees"]


def test_full_ablation_replay_equals_full_forward(ctx):
    """Batched replay rows equal one plain forward with that single edit."""
    layer, feat = 2, 30
    ids = ctx.prompt_ids["risky"]
    saes = ctx.saes_up_to(layer)
    tj = jacobians(ctx.model, saes, ids, layer, [feat])
    cands = top_candidates(tj.grad[0], tj.activation, tj.layers, k=4)
    base, recs = replay(ctx.model, saes, ids, layer, feat, cands)
    for c, r in zip(cands, recs):
        sae_u = saes[c["layer"]]

        def edit(h, c=c, sae_u=sae_u):
            h = h.clone()
            h[:, -1] -= c["activation"] * sae_u.W_dec[:, c["feature_id"]] / sae_u.scale
            return h

        with torch.no_grad(), resid_hooks(ctx.model, capture={layer}, edits={c["layer"]: edit}, stop_after=layer) as hs:
            run(ctx.model, ids)
        pre = float(target_pre(saes[layer], hs[layer][:, -1], [feat]))
        assert abs((pre - base) - r["actual_change"]) < 1e-5


def test_replay_rows_join_at_their_layer_in_any_order(ctx):
    """Candidates of several layers, given out of layer order, each replayed as a row that joins the
    forward at its own layer: every record is its own candidate's (the target's and the decision's change
    equal one plain forward with that edit alone), in the order given."""
    layer, feat = 3, 56
    ids = ctx.prompt_ids["safe"]
    saes = ctx.saes_up_to(layer)
    tj = jacobians(ctx.model, saes, ids, layer, [feat])
    cands = top_candidates(tj.grad[0], tj.activation, tj.layers, k=9)
    cands = sorted(cands, key=lambda c: (-c["layer"], c["rank"]))  # highest layer first
    assert len({c["layer"] for c in cands}) >= 2
    bet, stop = 18, 19
    base, recs = replay(ctx.model, saes, ids, layer, feat, cands, decision=(bet, stop))
    with torch.no_grad():
        logits = ctx.model(ids).logits[0, -1]
    for c, r in zip(cands, recs):
        assert r["feature"] == c["feature"]
        sae_u = saes[c["layer"]]

        def edit(h, c=c, sae_u=sae_u):
            h = h.clone()
            h[:, -1] -= c["activation"] * sae_u.W_dec[:, c["feature_id"]] / sae_u.scale
            return h

        with torch.no_grad(), resid_hooks(ctx.model, capture={layer}, edits={c["layer"]: edit}) as hs:
            moved = ctx.model(ids).logits[0, -1]
        pre = float(target_pre(saes[layer], hs[layer][:, -1], [feat]))
        assert abs((pre - base) - r["actual_change"]) < 1e-5
        assert r["decision_change"] == pytest.approx(float(moved[bet] - moved[stop] - logits[bet] + logits[stop]),
                                                     abs=1e-4)
