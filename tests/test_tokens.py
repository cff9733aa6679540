import torch

from pathflow.model import unembed
from pathflow.tokens import logit_lens, writes


def test_logit_lens_is_the_direct_matrix_product(ctx):
    sae = ctx.sae(2)
    norm_w, W_U = unembed(ctx.model)
    feat = 7
    # independent: decoder column / s, scaled by the final RMSNorm weight, through lm_head as a Linear
    d = sae.W_dec[:, feat] / sae.scale
    expected = ctx.model.lm_head(d * ctx.model.model.norm.weight)
    assert torch.allclose(logit_lens(sae, feat, norm_w, W_U), expected, atol=1e-6)
    # the norm's 1/rms factor is positive and shared, so the model's own norm ranks tokens the same way
    via_norm = ctx.model.lm_head(ctx.model.model.norm(d[None, None]))[0, 0]
    assert torch.equal(torch.argsort(via_norm, descending=True)[:5], torch.argsort(expected, descending=True)[:5])
    w = writes(sae, feat, norm_w, W_U, ctx.tokenizer, top=5)
    top = torch.topk(expected, 5)
    assert [t["token_id"] for t in w["promoted"]] == top.indices.tolist()
    assert [t["token"] for t in w["promoted"]] == [ctx.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert [t["token_id"] for t in w["suppressed"]] == torch.topk(-expected, 5).indices.tolist()
    assert all("Ġ" not in t["token"] for t in w["promoted"] + w["suppressed"])


def test_writes_of_many_features_are_each_features_own(ctx):
    """``writes_many`` (one pass over W_U per chunk of features) equals ``writes`` feature by feature,
    across a chunk boundary."""
    from pathflow.tokens import writes_many

    sae = ctx.sae(1)
    norm_w, W_U = unembed(ctx.model)
    feats = [3, 0, 511, 42, 7]
    many = writes_many(sae, feats, norm_w, W_U, ctx.tokenizer, top=4, chunk=2)
    assert len(many) == len(feats)
    for f, w in zip(feats, many):
        one = writes(sae, f, norm_w, W_U, ctx.tokenizer, top=4)
        assert [t["token_id"] for t in w["promoted"]] == [t["token_id"] for t in one["promoted"]]
        assert [t["token_id"] for t in w["suppressed"]] == [t["token_id"] for t in one["suppressed"]]
        expected = torch.topk(ctx.model.lm_head(sae.W_dec[:, f] / sae.scale * ctx.model.model.norm.weight), 4)
        assert torch.allclose(torch.tensor([t["value"] for t in w["promoted"]]), expected.values, atol=1e-5)
