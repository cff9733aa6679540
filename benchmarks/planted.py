"""A planted root cause that the gradient cannot see (issue 18).

A random-init LLaMA with one SAE per layer, and at an earlier token q a *massive activation*: the
token's embedding is mostly one direction u, which SAE feature 0 of layer 0 reads and writes. The
feature dominates its position's residual norm, so the gradient through the RMSNorms at q cancels
along it, while ablating it changes every normed vector at q — and attention copies that change to
the last token. The target is a feature of the last layer whose encoder reads exactly the change the
ablation causes there, so the planted node is among the target's strongest causes by construction.

    model, saes, ids, target, node = planted_case()
"""

from __future__ import annotations

import torch

from pathflow.graphs import Target
from pathflow.sae import SAE


def _sae(layer: int, d_model: int, d_sae: int, gen: torch.Generator, avoid: torch.Tensor | None) -> SAE:
    """Random unit directions (decoder = encoder ᵀ), orthogonal to ``avoid``, ~10% active on unit-scale inputs."""
    W = torch.randn(d_sae, d_model, generator=gen)
    if avoid is not None:
        W -= (W @ avoid)[:, None] * avoid
    W /= W.norm(dim=1, keepdim=True)
    return SAE(layer=layer, W_enc=W.clone(), b_enc=torch.full((d_sae,), -0.05), W_dec=W.T.contiguous(),
               b_dec=torch.zeros(d_model), scale=1.0, theta=0.0)


@torch.no_grad()
def planted_case(seed: int = 0, layers: int = 3, d_model: int = 64, d_sae: int = 256, n: int = 24, q: int = 5,
                 big: float = 40.0):
    """(model, saes {0..layers-1}, input_ids [1, n], the target, the planted node's key ("f", 0, q, 0))."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * n,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager",
                      initializer_range=1.0 / d_model**0.5)  # unit-scale weights: attention carries what it reads
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    emb = model.get_input_embeddings().weight
    emb.normal_(0.0, 1.0 / d_model**0.5, generator=gen)  # unit-scale residual stream
    u = torch.randn(d_model, generator=gen)
    u /= u.norm()
    planted_token = 7
    emb[planted_token] = big * u + emb[planted_token] - (emb[planted_token] @ u) * u
    ids = torch.randint(8, 64, (1, n), generator=gen)
    ids[0, q] = planted_token
    saes = {l: _sae(l, d_model, d_sae, gen, u if l == 0 else None) for l in range(layers)}
    s0 = saes[0]  # feature 0 of layer 0 is u, active only where u is massive
    s0.W_enc[0], s0.W_dec[:, 0], s0.b_enc[0] = u, u, -1.0
    # the target reads what ablating the planted feature changes at the last token
    top = layers - 1
    node = ("f", 0, q, 0)
    from pathflow.model import resid_hooks, run

    def last(edit=None):
        with resid_hooks(model, capture={top}, edits={0: edit} if edit else {}) as hs:
            run(model, ids)
        return hs[top][0, -1]

    f0 = float(s0.encode(_layer0(model, ids)[q])[0])

    def ablate(h):
        h = h.clone()
        h[:, q] -= f0 * u
        return h

    change = last() - last(ablate)
    saes[top].W_enc[0] = change / change.norm()
    return model, saes, ids, Target(name=f"L{top}-0", layer=top, feature=0, pos=n - 1), node


def _layer0(model, ids) -> torch.Tensor:
    from pathflow.model import resid_hooks, run

    with resid_hooks(model, capture={0}, stop_after=0) as hs:
        run(model, ids)
    return hs[0][0]
