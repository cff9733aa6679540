"""Step 3C: replay each candidate as a real intervention and compare with the gradient.

Ablating upstream feature i of layer l at position p removes ``scale·f_i·W_D[i]/s_l`` from
``h_l[p]`` (the SAE error term stays fixed, exactly as in the Jacobian's linearisation).
The gradient predicts ``Δpre_t ≈ scale · attribution``; the replay measures the real Δpre_t.
All candidates of a target run as rows of one batch, row 0 being the unedited baseline, and
only the token at p is recomputed, against the prompt's cached keys/values (``PrefixCache``).
Below its candidate's layer a row is the baseline, so each row joins the forward at that layer
(``joining_rows``): the cost per candidate is one token through the layers from its own up to the
target's — or, to see the study's decision move (the target at the last token), up to the last layer,
and from the target's layer on a second time with the target held at its baseline (the held rows join there).
"""

from __future__ import annotations

import numpy as np
import torch

from .jacobian import target_pre
from .model import PrefixCache, decoder_layers, joining_rows, logit_difference, prefix_cache, resid_hooks, run_last


def pearson(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's rho needs)."""
    order = a.argsort(kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a), dtype=float)
    for v in np.unique(a):
        m = a == v
        r[m] = r[m].mean()
    return r


def spearman(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 2 else None


def intervene(c: dict, intervention: str, scale: float, steer_value: float) -> tuple[str, float]:
    """(kind, new activation) of a candidate: ``ablate`` removes ``scale`` of an active feature;
    an off feature (nothing to ablate), or every feature under ``steer``, is set to ``steer_value``."""
    if intervention == "ablate" and c["activation"] != 0:
        return "ablate", (1.0 - scale) * c["activation"]
    return "steer", steer_value


def edit_deltas(saes, candidates: list[dict], new_values: list[float]) -> dict[int, torch.Tensor]:
    """Per upstream layer l, the change to h_l[p] of each candidate edited there, in the candidates' order:
    {l: [m_l, d_model]} (``joining_rows``' input)."""
    deltas: dict[int, list[torch.Tensor]] = {}
    for c, v in zip(candidates, new_values):
        sae = saes[c["layer"]]
        deltas.setdefault(c["layer"], []).append((v - c["activation"]) * sae.decoder_direction(c["feature_id"]))
    return {l: torch.stack(d) for l, d in deltas.items()}


@torch.no_grad()
def replay(
    model,
    saes,
    input_ids: torch.Tensor | None,
    layer: int,
    feature: int,
    candidates: list[dict],
    position: int = -1,
    scale: float = 1.0,
    prefix: PrefixCache | None = None,
    intervention: str = "ablate",
    steer_value: float = 1.0,
    decision: tuple[int, int] | None = None,
) -> tuple[float, list[dict]]:
    """Intervene on each candidate (one batch row each) and measure the target's change.

    Returns (baseline pre-activation, one record per candidate with the intervention, predicted
    change ``gradient × Δf`` and actual change of the target's pre-activation and activation).

    With ``decision`` = (bet, stop) token ids and the target at the prompt's last token, the rows
    run on to the model's end and each record also gets ``decision_change`` (Δ logit(bet) −
    logit(stop)), ``decision_change_held`` (the same with the target held at its baseline
    activation: a second set of rows) and ``decision_share_through_target`` (1 − held/free).
    """
    prefix = prefix or prefix_cache(model, input_ids, position)
    base, recs = replay_rows(model, saes, layer, [feature], [(0, c) for c in candidates], prefix, scale,
                             intervention, steer_value, decision)
    return base[0], recs


@torch.no_grad()
def replay_rows(model, saes, layer: int, features: list[int], rows: list[tuple[int, dict]], prefix: PrefixCache,
                scale: float = 1.0, intervention: str = "ablate", steer_value: float = 1.0,
                decision: tuple[int, int] | None = None) -> tuple[list[float], list[dict]]:
    """``replay`` of the candidates of several targets of one SAE ``layer`` in one forward: ``rows`` are
    (index into ``features``, candidate) pairs, one batch row each, after a baseline row 0 that every
    target shares. Many small replays are one large matmul per weight instead of many small ones.

    Returns (each target's baseline pre-activation [len(features)], one record per row, as ``replay``)."""
    n = len(rows)
    # rows join the forward at their candidate's layer (``joining_rows``): in order of it, put back at the end
    order = sorted(range(n), key=lambda r: rows[r][1]["layer"])
    rows = [rows[r] for r in order]
    cands = [c for _, c in rows]
    owner = [0] + [t for t, _ in rows]  # the target each batch row measures (row 0: any; it is the baseline)
    row_feature = [features[t] for t in owner]
    kinds = [intervene(c, intervention, scale, steer_value) for c in cands]
    deltas = edit_deltas(saes, cands, [v for _, v in kinds])
    last = decision is not None and prefix.position == prefix.n_tokens - 1
    sae = saes[layer]

    edits = joining_rows(deltas)  # h: [rows so far, 1, d_model], the token at p
    top = len(decoder_layers(model)) - 1
    if last:
        directions = (sae.W_dec[:, row_feature] / sae.scale).T  # each row's target's decoder direction [1+n, d_model]

        def hold(h):
            """The held rows join at the target's layer (below it they equal the free rows): each free
            row again, with its target's activation set back to that target's free baseline. [1+n] -> [2(1+n)]."""
            x = h[:, -1].to(sae.W_enc.dtype)
            f = sae.gate(target_pre(sae, x, row_feature))
            f0 = sae.gate(target_pre(sae, x[:1].expand_as(x), row_feature))  # row 0, each row's target
            held = h + ((f0 - f)[:, None] * directions).to(h.dtype)[:, None, :]
            return torch.cat([h, held])

        edits[layer] = hold  # upstream candidates only: nothing else edits the target's layer
    with resid_hooks(model, capture={layer} | ({top} if last else set()), edits=edits,
                     stop_after=None if last else layer) as hs:
        run_last(model, prefix, 1)  # row 0; the others join at their layers
    x = hs[layer][: 1 + n, -1].to(sae.W_enc.dtype)
    pre = target_pre(sae, x, row_feature).float()
    act = sae.gate(pre)
    base_pre = target_pre(sae, x[:1].expand(len(features), -1), features).float()  # [k]
    base_act = sae.gate(base_pre)
    dec = logit_difference(model, hs[top][:, -1], *decision).float() if last else None
    out = []
    for row, (c, (kind, value)) in enumerate(zip(cands, kinds), start=1):
        t = owner[row]
        predicted = c["gradient"] * (value - c["activation"])  # first order: J · Δf
        actual = float(pre[row]) - float(base_pre[t])
        rec = {**c, "intervention": kind, "new_activation": value, "predicted_change": predicted,
               "actual_change": actual, "actual_activation_change": float(act[row]) - float(base_act[t]),
               "sign_agrees": bool(np.sign(predicted) == np.sign(actual))}
        if dec is not None:
            free, held = float(dec[row] - dec[0]), float(dec[1 + n + row] - dec[1 + n])
            rec.update(decision_change=free, decision_change_held=held,
                       decision_share_through_target=(1.0 - held / free) if abs(free) > 1e-9 else None)
        out.append(rec)
    back = sorted(range(n), key=order.__getitem__)  # the inverse permutation: the caller's order
    return base_pre.tolist(), [out[i] for i in back]


VALIDATED = ("validated: the replayed change agrees in sign with the prediction, is at least {noise:.0%} of the "
             "target's own value, and is within a factor {factor:g} of the prediction")


def judge(predicted: float, actual: float, baseline: float, rc) -> dict:
    """Replay's three checks of one prediction, and ``validated`` when all hold.

    sign_agrees: predicted and actual change have the same sign;
    above_noise: |actual| ≥ rc.noise_floor · |the target's baseline value| (and ≥ rc.min_abs_change);
    magnitude_agrees: |predicted| and |actual| within a factor rc.max_ratio of each other."""
    sign = bool(np.sign(predicted) == np.sign(actual) and actual != 0)
    noise = bool(abs(actual) >= max(rc.noise_floor * abs(baseline), rc.min_abs_change) and actual != 0)
    lo, hi = sorted((abs(predicted), abs(actual)))
    factor = bool(lo > 0 and hi <= rc.max_ratio * lo)
    return {"sign_agrees": sign, "above_noise": noise, "magnitude_agrees": factor,
            "validated": sign and noise and factor}


def validated_sentence(rc) -> str:
    """What 'validated' means under the replay config ``rc``, in one sentence."""
    return VALIDATED.format(noise=rc.noise_floor, factor=rc.max_ratio) + "."


def faithfulness(records: list[dict], min_sign_agreement: float) -> dict:
    """Per-target agreement of predicted vs actual change over its candidates, and how many pass each of
    replay's checks (``judge``)."""
    pred = [r["predicted_change"] for r in records]
    act = [r["actual_change"] for r in records]
    agree = float(np.mean([r["sign_agrees"] for r in records])) if records else None
    return {
        "n_candidates": len(records),
        **{f"n_{k}": sum(bool(r.get(k)) for r in records)
           for k in ("sign_agrees", "above_noise", "magnitude_agrees", "validated")},
        "pearson": pearson(pred, act),
        "spearman": spearman(pred, act),
        "sign_agreement": agree,
        "validated": bool(agree is not None and agree >= min_sign_agreement),
    }
