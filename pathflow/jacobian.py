"""Step 3A: the Jacobian of a target feature's pre-activation w.r.t. every upstream SAE feature.

No SAE is spliced into the model. Writing the residual stream at upstream layer l as
``h_l = (f_l @ W_D + b_D)/s_l + err_l`` (err_l held fixed), the chain rule gives::

    J_l = ∂pre_t/∂f_l = (W_D / s_l) @ g_l        g_l = ∂pre_t/∂h_l  (the model's own gradient)

so a single backward from ``pre_t`` yields g_l for every upstream layer l < t at once.
``attribution_l = -J_l ⊙ f_l`` is the first-order change of pre_t when each feature is ablated.
Everything is taken at one token position p (default the last prompt token): an upstream
feature at p can only reach the target at p through the layers in between.

Only the token at p is recomputed: positions before p cannot depend on anything at p (causal
mask), so their keys/values are computed once per prompt and held fixed (``PrefixCache``),
and the whole backward runs on one token. Targets of one layer differ only in their seed
``s_t·W_E[:, t]``: k targets are k rows of that one token, row i seeded with target i, so one
backward gives k vector–Jacobian products. Memory grows with k (the batch to halve on OOM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import PrefixCache, prefix_cache, resid_hooks, run_last
from .sae import SAE


@dataclass
class TargetJacobians:
    """Gradients of k targets of one layer on one prompt.

    grad:        [k, n_up, d_sae]   J_l for upstream layers ``layers`` (l < target layer)
    activation:  [n_up, d_sae]      f_l at the position (shared by the k targets)
    attribution: [k, n_up, d_sae]   -J ⊙ f
    pre:         [k]                the targets' pre-activations at the position
    """

    layer: int
    features: list[int]
    layers: list[int]
    position: int
    grad: torch.Tensor
    activation: torch.Tensor
    pre: torch.Tensor

    @property
    def attribution(self) -> torch.Tensor:
        """−J ⊙ f [k, n_up, d_sae], made when asked for (a batch of 32 layer-31 targets' is 130 MB)."""
        return -self.grad * self.activation


def target_pre(sae: SAE, h: torch.Tensor, features: list[int] | torch.Tensor) -> torch.Tensor:
    """Pre-activation of row i's own target: h [k, d_model] -> [k]."""
    idx = torch.as_tensor(features, device=h.device)
    return (sae.scale * h * sae.W_enc[idx]).sum(-1) + sae.b_enc[idx]


def jacobians(
    model,
    saes: dict[int, SAE],
    input_ids: torch.Tensor | None,
    layer: int,
    features: list[int],
    position: int = -1,
    prefix: PrefixCache | None = None,
) -> TargetJacobians:
    """Jacobians of targets ``features`` of SAE ``layer`` on one prompt ``input_ids`` [1, seq].

    ``saes`` maps the target layer and every upstream layer 0..layer-1 to its SAE; ``prefix``
    (the prompt's cached keys/values up to ``position``) is computed from ``input_ids`` if not given.
    """
    k = len(features)
    up = list(range(layer))
    prefix = prefix or prefix_cache(model, input_ids, position)
    with torch.enable_grad(), resid_hooks(
        model, capture=set(up) | {layer}, stop_after=layer, grad_from_embeddings=True
    ) as hs:
        run_last(model, prefix, k)  # hs[l]: [k, 1, d_model]
        pre = target_pre(saes[layer], hs[layer][:, -1], features)  # [k]
        # rows are independent copies, so d(sum pre)/d h_l[i] is target i's gradient
        gs = torch.autograd.grad(pre.sum(), [hs[l] for l in up]) if up else []
    dtype, d_sae = saes[layer].W_enc.dtype, saes[layer].d_sae
    # J_l = g_l @ W_dec / s_l : [k, d_model] @ [d_model, d_sae]
    grad = torch.zeros(k, 0, d_sae, dtype=dtype, device=prefix.token.device)
    act = torch.zeros(0, d_sae, dtype=dtype, device=prefix.token.device)
    if up:  # written in place, layer by layer: no stacked copy of [k, n_up, d_sae]
        grad = torch.empty(k, len(up), d_sae, dtype=dtype, device=prefix.token.device)
        for i, (l, g) in enumerate(zip(up, gs)):
            torch.matmul(g[:, -1].detach().to(dtype), saes[l].W_dec, out=grad[:, i])
            grad[:, i] /= saes[l].scale
        with torch.no_grad():
            for l in up:
                if l not in prefix.activations:
                    prefix.activations[l] = saes[l].encode(hs[l][0, -1].detach().to(dtype))
            act = torch.stack([prefix.activations[l] for l in up])
    return TargetJacobians(
        layer=layer,
        features=list(features),
        layers=up,
        position=prefix.position,
        grad=grad.float(),
        activation=act.float(),
        pre=pre.detach().float(),
    )
