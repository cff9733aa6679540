"""Step 4 (first view): the tokens a feature writes towards, by logit lens.

The decoder direction d = W_D[i]/s [d_model] is passed through the final RMSNorm's weight
and the unembedding: logits = W_U @ (d ⊙ w_norm)  [vocab]. (The norm's scale by 1/rms is a
positive factor shared by every token, so it does not change the ranking.)
"""

from __future__ import annotations

import torch

from .sae import SAE


def logit_lens(sae: SAE, feature: int, norm_weight: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """Logit-lens scores of a feature's decoder direction: -> [vocab]."""
    d = sae.decoder_direction(feature).to(W_U.dtype)
    return W_U @ (d * norm_weight.to(W_U.dtype))


def token_text(tokenizer, token_id: int) -> str:
    """A token as text, byte-level markers (Ġ, ▁) resolved."""
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


def writes(sae: SAE, feature: int, norm_weight, W_U, tokenizer, top: int = 10) -> dict:
    """Top promoted and suppressed tokens of a feature, with their logit-lens values."""
    scores = logit_lens(sae, feature, norm_weight, W_U).float()
    top = min(top, scores.numel())
    hi, lo = torch.topk(scores, top), torch.topk(-scores, top)
    fmt = lambda ids, vals: [  # noqa: E731
        {"token_id": int(i), "token": token_text(tokenizer, int(i)), "value": float(v)} for i, v in zip(ids, vals)
    ]
    return {"promoted": fmt(hi.indices.tolist(), hi.values.tolist()),
            "suppressed": fmt(lo.indices.tolist(), (-lo.values).tolist())}
