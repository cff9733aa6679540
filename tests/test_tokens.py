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
