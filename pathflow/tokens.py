"""Step 4: the tokens each feature is tied to, three ways, with the model's own tokenizer.

writes:  logit lens of the decoder direction (what the feature promotes and suppresses);
reads:   where in the prompts and logged responses it activates most;
changes: tokens over- and under-represented in responses under a patch vs its baseline.

Writes: the tokens a feature writes towards, by logit lens.

The decoder direction d = W_D[i]/s [d_model] is passed through the final RMSNorm's weight
and the unembedding: logits = W_U @ (d ⊙ w_norm)  [vocab]. (The norm's scale by 1/rms is a
positive factor shared by every token, so it does not change the ranking.)
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .sae import SAE


def logit_lens(sae: SAE, feature: int | list[int], norm_weight: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """Logit-lens scores of features' decoder directions: one feature -> [vocab]; a list -> [vocab, F]."""
    ids = [feature] if isinstance(feature, int) else list(feature)
    d = (sae.W_dec[:, ids] / sae.scale).to(W_U.dtype)  # [d_model, F]
    scores = W_U @ (d * norm_weight.to(W_U.dtype)[:, None])
    return scores[:, 0] if isinstance(feature, int) else scores


def token_text(tokenizer, token_id: int) -> str:
    """A token as text, byte-level markers (Ġ, ▁) resolved."""
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


def writes(sae: SAE, feature: int, norm_weight, W_U, tokenizer, top: int = 10) -> dict:
    """Top promoted and suppressed tokens of a feature, with their logit-lens values."""
    return writes_many(sae, [feature], norm_weight, W_U, tokenizer, top)[0]


def writes_many(sae: SAE, features: list[int], norm_weight, W_U, tokenizer, top: int = 10,
                chunk: int = 64) -> list[dict]:
    """``writes`` of several features of one SAE: one pass over the unembedding per ``chunk`` features
    (a feature at a time would read all of W_U [vocab, d_model] for each)."""
    out = []
    for i in range(0, len(features), chunk):
        scores = logit_lens(sae, features[i:i + chunk], norm_weight, W_U).float()  # [vocab, F]
        k = min(top, scores.shape[0])
        hi, lo = torch.topk(scores, k, dim=0), torch.topk(-scores, k, dim=0)
        for col in range(scores.shape[1]):
            out.append({"promoted": _tokens(tokenizer, hi.indices[:, col], hi.values[:, col]),
                        "suppressed": _tokens(tokenizer, lo.indices[:, col], -lo.values[:, col])})
    return out


def _tokens(tokenizer, ids: torch.Tensor, values: torch.Tensor) -> list[dict]:
    return [{"token_id": int(i), "token": token_text(tokenizer, int(i)), "value": float(v)}
            for i, v in zip(ids.tolist(), values.tolist())]


# -- reads: where a feature activates most ---------------------------------------------------


def _budget_batches(lengths: list[int], batch_size: int, token_budget: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive batches of at most ``batch_size`` texts whose padded size
    (rows × longest) stays within ``token_budget`` (a single longer text is a batch of its own)."""
    out, start = [], 0
    while start < len(lengths):
        end, width = start + 1, lengths[start]
        while end < len(lengths) and end - start < batch_size and (end - start + 1) * max(width, lengths[end]) \
                <= token_budget:
            width = max(width, lengths[end])
            end += 1
        out.append((start, end))
        start = end
    return out


def reading_plan(shared: list[str], own: list[list[str]]) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """The distinct texts of a one-pass read: ``shared`` (read by every feature), then each feature's
    ``own`` texts, every distinct text once. Returns (texts, readers, views): ``readers[t]`` the features
    reading text t, ``views[j]`` feature j's texts as indices into ``texts``, shared ones first."""
    texts = list(shared)
    readers: list[list[int]] = [list(range(len(own))) for _ in shared]
    index = {t: i for i, t in enumerate(texts)}
    views = []
    for j, mine in enumerate(own):
        view = list(range(len(shared)))
        for t in mine:
            i = index.get(t)
            if i is None:
                i = index[t] = len(texts)
                texts.append(t)
                readers.append([])
            if i >= len(shared) and j not in readers[i]:
                readers[i].append(j)
                view.append(i)
        views.append(view)
    return texts, readers, views


@torch.no_grad()
def feature_reads(model, saes, tokenizer, texts: list[str], features: list[tuple[int, int]], top: int = 10,
                  window: int = 6, batch_size: int = 8, max_tokens: int | None = None, token_budget: int = 4096,
                  bins: int = 24, readers: list[list[int]] | None = None) -> dict[tuple[int, int], dict]:
    """Where each feature activates over ``texts``: its ``top`` maxima and a histogram of its activations.

    Every text goes through the model once, whichever features read it: ``readers[t]`` lists the
    indices (into ``features``) of the features that read text ``t`` (default: every feature reads
    every text), and each feature is read only from its texts. Texts are run in batches (right-padded,
    padding masked out) of at most ``token_budget`` padded tokens, each text cut to ``max_tokens``, so
    memory is bounded whatever the texts; only the layers the batch's readers live in are computed, and
    the features of one layer are read with one matmul.

    Returns {(layer, id): {"maxima": [{value, text, position, token, context, tokens}], "histogram":
    {edges [bins+1], counts [bins], n_tokens, n_active}}}: ``text`` indexes ``texts``; a maximum's
    ``tokens`` is its context window as [{token, value}] (the feature's activation at each token, for
    colouring); the histogram counts the feature's active (> 0) tokens over its texts in equal bins from
    0 to its maximum.
    """
    from .model import resid_hooks, run_masked
    from .streams import stream_map

    readers = readers if readers is not None else [list(range(len(features)))] * len(texts)
    best: list[list[tuple[float, int, int, list[float]]]] = [[] for _ in features]
    active: list[list[torch.Tensor]] = [[] for _ in features]
    n_tokens = [0] * len(features)
    enc = [tokenizer(t).input_ids[:max_tokens] for t in texts]
    for t, x in enumerate(enc):
        for j in readers[t]:
            n_tokens[j] += len(x)
    device = next(model.parameters()).device
    # texts in order of the deepest layer reading them, then length: a batch runs only as deep as its
    # readers need, and pads little
    order = sorted(range(len(texts)), key=lambda t: (max((features[j][0] for j in readers[t]), default=-1),
                                                     len(enc[t]), t))

    def read(batch: tuple[int, int]) -> list[tuple[int, torch.Tensor, list]]:
        """One batch of texts: (feature j, its active values, its top hits) for each feature reading it."""
        which = order[batch[0]:batch[1]]  # the batch's texts, as indices into ``texts``
        chunk = [enc[t] for t in which]
        involved = sorted({j for t in which for j in readers[t]})
        if not involved:
            return []
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        reads = torch.zeros(len(chunk), len(features), dtype=torch.bool)  # [b, n_features]: row read by feature
        for i, x in enumerate(chunk):
            ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), True
            reads[i, readers[which[i]]] = True
        layers = sorted({features[j][0] for j in involved})
        with resid_hooks(model, capture=set(layers), stop_after=max(layers)) as hs:
            run_masked(model, ids.to(device), mask.long().to(device))
        found = []
        for layer in layers:
            js = [j for j in involved if features[j][0] == layer]
            sae, fids = saes[layer], torch.tensor([features[j][1] for j in js], device=device)
            pre = (sae.scale * hs[layer].to(sae.W_enc.dtype)) @ sae.W_enc[fids].T + sae.b_enc[fids]  # [b, seq, F]
            act = sae.gate(pre).float().cpu()
            act = act.masked_fill(~(mask[:, :, None] & reads[:, None, js]), 0.0)
            for col, j in enumerate(js):
                a = act[..., col]  # [b, seq]
                on = a[a > 0]
                if not on.numel():
                    continue
                vals, flat = torch.topk(a.flatten(), min(top, on.numel()))
                hits = []
                for v, i in zip(vals.tolist(), flat.tolist()):
                    row, p = i // width, i % width
                    lo, hi = max(0, p - window), min(len(chunk[row]), p + window + 1)
                    hits.append((v, which[row], p, a[row, lo:hi].tolist()))
                found.append((j, on, hits))
        return found

    # the batches on the streams (``pathflow.streams``), merged in order
    for found in stream_map(read, _budget_batches([len(enc[t]) for t in order], batch_size, token_budget)):
        for j, on, hits in found:
            active[j].append(on)
            best[j].extend(hits)
    special = set(tokenizer.all_special_ids)
    out = {}
    for j, f in enumerate(features):
        hits = sorted(best[j], key=lambda h: (-h[0], h[1], h[2]))[:top]
        maxima = []
        for v, t, p, values in hits:
            lo = max(0, p - window)
            ids = enc[t][lo : lo + len(values)]
            maxima.append({
                "value": v, "text": t, "position": p, "token": token_text(tokenizer, enc[t][p]),
                "context": tokenizer.decode(enc[t][lo:p], skip_special_tokens=True) + "⟦"
                + token_text(tokenizer, enc[t][p]) + "⟧" + tokenizer.decode(enc[t][p + 1 : p + 1 + window],
                                                                          skip_special_tokens=True),
                "tokens": [{"token": token_text(tokenizer, i), "value": a} for i, a in zip(ids, values)
                           if i not in special],
            })
        on = torch.cat(active[j]) if active[j] else torch.zeros(0)
        top_value = float(on.max()) if on.numel() else 0.0
        counts = torch.histc(on, bins=bins, min=0.0, max=top_value).long().tolist() if on.numel() else [0] * bins
        out[f] = {"maxima": maxima, "histogram": {
            "edges": [top_value * i / bins for i in range(bins + 1)], "counts": counts,
            "n_tokens": n_tokens[j], "n_active": int(on.numel())}}
    return out


def activation_maxima(model, saes, tokenizer, texts: list[str], features: list[tuple[int, int]], top: int = 10,
                      window: int = 6, batch_size: int = 8, max_tokens: int | None = None,
                      token_budget: int = 4096) -> dict[tuple[int, int], list[dict]]:
    """The ``top`` (text, position) pairs where each feature's activation is largest (see
    ``feature_reads``): {(layer, id): [{value, text, position, token, context, tokens}]}."""
    reads = feature_reads(model, saes, tokenizer, texts, features, top, window, batch_size, max_tokens, token_budget)
    return {f: r["maxima"] for f, r in reads.items()}


# -- changes: tokens over- and under-represented under a patch (Monroe et al. 2008) ---------------


def token_counts(tokenizer, texts) -> Counter:
    """Token-id counts of ``texts`` (no special tokens)."""
    c: Counter = Counter()
    for t in texts:
        c.update(tokenizer(t, add_special_tokens=False).input_ids)
    return c


def log_odds(a: Counter, b: Counter, prior: Counter | None = None, alpha0: float = 100.0) -> dict[int, dict]:
    """Log-odds ratio of each token in ``a`` vs ``b`` with an informative Dirichlet prior.

    Monroe, Colaresi & Quinn (2008), "Fightin' Words", eq. 16–22: with prior counts
    α_w = alpha0 · p_w (p_w the token's share of ``prior``, by default a + b),
    δ_w = log((a_w+α_w)/(n_a+α_0−a_w−α_w)) − log((b_w+α_w)/(n_b+α_0−b_w−α_w)),
    σ²_w ≈ 1/(a_w+α_w) + 1/(b_w+α_w), z_w = δ_w/σ_w.
    """
    prior = prior if prior is not None else a + b
    total = sum(prior.values())
    n_a, n_b = sum(a.values()), sum(b.values())
    out = {}
    for w in set(a) | set(b):
        alpha = alpha0 * prior.get(w, 0) / total if total else 0.0
        if alpha <= 0:
            continue  # a token the prior never saw carries no evidence under it
        ya, yb = a.get(w, 0), b.get(w, 0)
        delta = (math.log((ya + alpha) / (n_a + alpha0 - ya - alpha))
                 - math.log((yb + alpha) / (n_b + alpha0 - yb - alpha)))
        var = 1.0 / (ya + alpha) + 1.0 / (yb + alpha)
        out[w] = {"log_odds": delta, "z": delta / math.sqrt(var), "count_a": ya, "count_b": yb}
    return out


def changes(tokenizer, texts_a: list[str], texts_b: list[str], top: int = 10, alpha0: float = 100.0) -> dict:
    """Tokens over-represented (``more``) and under-represented (``less``) in ``texts_a`` vs ``texts_b``."""
    lo = log_odds(token_counts(tokenizer, texts_a), token_counts(tokenizer, texts_b), alpha0=alpha0)
    ranked = sorted(lo.items(), key=lambda kv: kv[1]["z"], reverse=True)
    fmt = lambda items: [{"token_id": w, "token": token_text(tokenizer, w), **v} for w, v in items]  # noqa: E731
    return {"n_a": len(texts_a), "n_b": len(texts_b), "more": fmt(ranked[:top]),
            "less": fmt([kv for kv in ranked[::-1][:top] if kv[1]["z"] < 0])}
