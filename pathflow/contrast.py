"""The contrast of the study's two prompts: what in the game history makes a feature fire on one and not the other.

Three pieces, each a function of arrays (no Prefect):

1. ``align``: the two prompts' tokens aligned by a diff of their token ids. Every line of a prompt is
   a *span* (the first token alone when it is a special token); lines are paired by a diff of their
   texts, so a line that differs ("Round 2: Bet $10, Loss, Balance $120" vs "Round 2: Bet $100, Loss,
   Balance $30") is one span with its text on each side. Positions pair one to one in the equal runs of
   the diff and in replaced runs of the same length; the rest are named, unpaired.
2. ``target_contrast``: one target's node weights on the two prompts (a row of ``graphs.zarr``: a weight
   is −(the target's change when the node is ablated), so ≈ the node's contribution) turned into
   a − b differences: per upstream feature summed over positions, per span, per layer × span, for SAE
   features, errors and token embeddings; each with its share of the target's own a − b value.
3. ``cross_patch``: the study's experiment one level up. On prompt ``dst``, set upstream features to
   their values on ``src`` at the paired positions — each alone, and a target's top M together — and
   measure every target's pre-activation and the decision. The contrast predicts the change:
   Σ over the paired positions of (weight on src − weight on dst).

``StudyContrast`` sums the per-target contrasts over a whole study, one target at a time, into
arrays whose size does not grow with the number of targets.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .model import resid_hooks, run
from .sae import SAE

# -- 1. alignment -----------------------------------------------------------------------------


def token_lines(tokens: list[str], first_alone: bool = False) -> list[tuple[int, int]]:
    """[start, end) of each line of a tokenised text: a line ends after a token holding a newline; a blank
    line joins the line before it."""
    lines, start = [], 0
    if first_alone and tokens:
        lines.append((0, 1))
        start = 1
    for q in range(start, len(tokens)):
        if "\n" in tokens[q] or q == len(tokens) - 1:
            if lines and not "".join(tokens[start:q + 1]).strip() and lines[-1][0] >= int(first_alone):
                lines[-1] = (lines[-1][0], q + 1)
            else:
                lines.append((start, q + 1))
            start = q + 1
    return lines


def _span_name(text_a: str | None, text_b: str | None, width: int = 40) -> str:
    """A span's short name: the text the two lines share before a ':' ("Round 2"), else its text."""
    texts = [t.strip() for t in (text_a, text_b) if t is not None]
    common = os.path.commonprefix(texts) if len(texts) == 2 else texts[0]
    if len(texts) == 2 and texts[0] != texts[1] and ":" in common:
        return common[:common.rindex(":")].strip()
    name = texts[0] if texts[0] else "(blank)"
    return name if len(name) <= width else name[:width - 1] + "…"


@dataclass
class Alignment:
    """Two tokenised prompts aligned.

    prompts: (a, b) their names (a − b is the contrast's direction)
    spans:   [S] {"id", "name", "differs", a: {"start", "end", "text", "changed": [positions]} | None, b: …}
    pairs:   [P, 2] (position on a, position on b) of every paired position
    span_of: {prompt: [n] the span of each position}
    """

    prompts: tuple[str, str]
    tokens: dict[str, list[str]]
    spans: list[dict]
    pairs: np.ndarray
    span_of: dict[str, np.ndarray]

    def to_json(self) -> dict:
        a, b = self.prompts
        return {"prompts": [a, b], "tokens": self.tokens, "spans": self.spans,
                "pairs": self.pairs.tolist(), "span_of": {k: v.tolist() for k, v in self.span_of.items()},
                "n_paired": len(self.pairs),
                "unpaired": {p: sorted(set(range(len(self.tokens[p]))) - set(self.pairs[:, i].tolist()))
                             for i, p in enumerate(self.prompts)}}

    def partner(self, src: str) -> dict[int, int]:
        """{position on ``src``: the paired position on the other prompt}."""
        i = self.prompts.index(src)
        return {int(x): int(y) for x, y in zip(self.pairs[:, i], self.pairs[:, 1 - i])}


def align(names: tuple[str, str], tokens: tuple[list[str], list[str]], ids: tuple[list[int], list[int]],
          first_alone: bool = False) -> Alignment:
    """Align prompts a and b (``names``) from their token texts and ids (``first_alone``: the first token,
    e.g. <|begin_of_text|>, is a span of its own)."""
    (ta, tb), (ia, ib) = tokens, ids
    if len(ta) != len(ia) or len(tb) != len(ib):
        raise ValueError("each prompt needs one token text per token id")
    pairs, changed_a, changed_b = [], set(), set()
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=list(ia), b=list(ib), autojunk=False).get_opcodes():
        if op == "equal" or (op == "replace" and a1 - a0 == b1 - b0):
            pairs.extend(zip(range(a0, a1), range(b0, b1)))
        if op != "equal":
            changed_a.update(range(a0, a1))
            changed_b.update(range(b0, b1))
    la, lb = token_lines(ta, first_alone), token_lines(tb, first_alone)
    text = lambda toks, se: "".join(toks[se[0]:se[1]])  # noqa: E731
    xa, xb = [text(ta, s) for s in la], [text(tb, s) for s in lb]
    matched: list[tuple[int | None, int | None]] = []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=xa, b=xb, autojunk=False).get_opcodes():
        n = min(a1 - a0, b1 - b0) if op in ("equal", "replace") else 0
        matched += [(a0 + j, b0 + j) for j in range(n)]
        matched += [(j, None) for j in range(a0 + n, a1)] + [(None, j) for j in range(b0 + n, b1)]
    matched.sort(key=lambda m: (m[0] if m[0] is not None else la.index(la[-1]) + 1,
                                m[1] if m[1] is not None else -1))
    spans, span_a, span_b = [], np.zeros(len(ta), np.int64), np.zeros(len(tb), np.int64)

    def side(lines, texts, j, changed):
        if j is None:
            return None
        s, e = lines[j]
        return {"start": s, "end": e, "text": texts[j], "changed": sorted(q for q in changed if s <= q < e)}

    for sid, (ja, jb) in enumerate(matched):
        sa, sb = side(la, xa, ja, changed_a), side(lb, xb, jb, changed_b)
        differs = sa is None or sb is None or sa["text"] != sb["text"] or bool(sa["changed"] or sb["changed"])
        spans.append({"id": sid, "name": _span_name(sa and sa["text"], sb and sb["text"]), "differs": differs,
                      names[0]: sa, names[1]: sb})
        if sa:
            span_a[sa["start"]:sa["end"]] = sid
        if sb:
            span_b[sb["start"]:sb["end"]] = sid
    return Alignment(prompts=tuple(names), tokens={names[0]: list(ta), names[1]: list(tb)}, spans=spans,
                     pairs=np.array(pairs, dtype=np.int64).reshape(-1, 2),
                     span_of={names[0]: span_a, names[1]: span_b})


# -- 2. one target's contrast -------------------------------------------------------------------


@dataclass
class PromptRow:
    """One output's weights over every node of one prompt (a row of ``graphs.zarr``).

    node_layer, node_position, node_feature: [N] the active SAE entries;  weight: [N]
    error: [L', n] (layers ``error_layers``);  embedding: [n];  value: the output's own value."""

    node_layer: np.ndarray
    node_position: np.ndarray
    node_feature: np.ndarray
    weight: np.ndarray
    error: np.ndarray
    error_layers: np.ndarray
    embedding: np.ndarray
    value: float


def _share(x: float, total: float) -> float | None:
    return float(x / total) if abs(total) > 1e-12 else None


def target_contrast(al: Alignment, rows: dict[str, PromptRow], d_sae: int, n_layers: int, layer: int,
                    top: int = 20) -> dict:
    """The a − b contrast of one output of ``layer`` (``rows`` by prompt name; the decision's layer is the
    model's layer count).

    Features: each upstream feature's a − b weight summed over its positions (and per span). Spans: every
    layer below the output is a cut through which all of its inputs pass — the SAE features and error at
    every position of that layer, or the token embeddings — and the weights in one cut add up to (a first
    order of) the output. A span's weight is its share of each cut, averaged over the cuts: summed
    instead, what stays at one position for many layers (late, at the last token) would count once per
    layer. Returns a record (JSON) and, under "_arrays", what a study sums: "feature_key" [F]
    (layer·d_sae + id), "feature_diff" [F], "span_diff" [S], "layer_span" [1 + n_layers, S] (row 0: token
    embeddings; row 1 + l: layer l's features and error)."""
    a, b = al.prompts
    S = len(al.spans)
    keys = {p: rows[p].node_layer.astype(np.int64) * d_sae + rows[p].node_feature for p in (a, b)}
    allk, inv = np.unique(np.concatenate([keys[a], keys[b]]), return_inverse=True)
    ia, ib = inv[:len(keys[a])], inv[len(keys[a]):]
    tot = {a: np.bincount(ia, rows[a].weight, len(allk)), b: np.bincount(ib, rows[b].weight, len(allk))}
    diff = tot[a] - tot[b]
    delta = rows[a].value - rows[b].value
    cut_f, cut_e = np.zeros((1 + n_layers, S)), np.zeros((1 + n_layers, S))  # row 0: the embeddings
    errors_by_layer: dict[int, float] = {}
    for p, sign in ((a, 1.0), (b, -1.0)):
        r, so = rows[p], al.span_of[p]
        cell = (1 + r.node_layer.astype(np.int64)) * S + so[r.node_position]  # (layer row, span), flattened
        cut_f += sign * np.bincount(cell, r.weight, (1 + n_layers) * S).reshape(1 + n_layers, S)
        for j, l in enumerate(r.error_layers.tolist()):
            cut_e[1 + l] += sign * np.bincount(so, r.error[j], S)
            errors_by_layer[l] = errors_by_layer.get(l, 0.0) + sign * float(r.error[j].sum())
        cut_e[0] += sign * np.bincount(so, r.embedding, S)
    cuts = list(range(0, 1 + min(layer, n_layers)))  # the embeddings and every layer below the output
    span_f, span_e = cut_f[cuts].sum(0) / len(cuts), cut_e[cuts].sum(0) / len(cuts)
    span_total = span_f + span_e
    order = np.argsort(-np.abs(diff), kind="stable")[:top]
    feats = []
    for j in order.tolist():
        if diff[j] == 0:
            break
        l, i = divmod(int(allk[j]), d_sae)
        by_span: dict[int, float] = {}
        for p, sign, idx in ((a, 1.0, ia), (b, -1.0, ib)):
            sel = idx == j
            for s, w in zip(al.span_of[p][rows[p].node_position[sel]].tolist(), rows[p].weight[sel].tolist()):
                by_span[s] = by_span.get(s, 0.0) + sign * w
        feats.append({"feature": f"L{l}-{i}", "layer": l, "feature_id": i, a: float(tot[a][j]), b: float(tot[b][j]),
                      "difference": float(diff[j]), "share": _share(float(diff[j]), delta),
                      "spans": [{"span": s, "difference": w} for s, w in
                                sorted(by_span.items(), key=lambda kv: -abs(kv[1])) if w]})
    spans = [{"span": s, "name": al.spans[s]["name"], "differs": al.spans[s]["differs"],
              "difference": float(span_total[s]), "share": _share(float(span_total[s]), delta),
              "features": float(span_f[s]), "errors": float(span_e[s]) - float(cut_e[0, s]) / len(cuts),
              "embeddings": float(cut_e[0, s]) / len(cuts)}
             for s in np.argsort(-np.abs(span_total), kind="stable").tolist()]
    record = {
        "prompts": [a, b], "value": {a: float(rows[a].value), b: float(rows[b].value)}, "difference": float(delta),
        "explained": {"per_cut": float(span_total.sum()), "features": float(diff.sum()),
                      "errors": float(sum(errors_by_layer.values())), "embeddings": float(cut_e[0].sum())},
        "features": feats, "spans": spans,
        "errors_by_layer": {str(l): v for l, v in sorted(errors_by_layer.items())},
    }
    record["_arrays"] = {"feature_key": allk, "feature_diff": diff, "span_diff": span_total,
                         "layer_span": cut_f + cut_e}
    return record


@dataclass
class StudyContrast:
    """Running sums of ``target_contrast`` over a study, by target direction (risky, safe, …): every
    array is [d] or [d, …] in the directions seen, none grows with the number of targets.

    feature_diff, feature_abs: [L·d_sae] Σ a − b weight and Σ |a − b| of each upstream feature
    feature_targets: [L·d_sae] the targets whose ``top`` differing features it is among
    span_diff: [S];  layer_span: [1 + L, S]"""

    n_layers: int
    d_sae: int
    n_spans: int
    sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, direction: str, rec: dict) -> None:
        if direction not in self.sums:
            F = self.n_layers * self.d_sae
            self.sums[direction] = {"feature_diff": np.zeros(F), "feature_abs": np.zeros(F),
                                    "feature_targets": np.zeros(F, np.int64), "span_diff": np.zeros(self.n_spans),
                                    "layer_span": np.zeros((1 + self.n_layers, self.n_spans))}
            self.counts[direction] = 0
        s, x = self.sums[direction], rec["_arrays"]
        s["feature_diff"][x["feature_key"]] += x["feature_diff"]  # the keys are unique (np.unique)
        s["feature_abs"][x["feature_key"]] += np.abs(x["feature_diff"])
        top = [f["layer"] * self.d_sae + f["feature_id"] for f in rec["features"]]
        np.add.at(s["feature_targets"], np.array(top, dtype=np.int64), 1)
        s["span_diff"] += x["span_diff"]
        s["layer_span"] += x["layer_span"]
        self.counts[direction] += 1

    def _row(self, s: dict, k: int) -> dict:
        l, i = divmod(k, self.d_sae)
        return {"feature": f"L{l}-{i}", "layer": l, "feature_id": i, "n_targets": int(s["feature_targets"][k]),
                "difference": float(s["feature_diff"][k]), "abs_difference": float(s["feature_abs"][k])}

    def summary(self, al: Alignment, top: int = 25) -> dict:
        """Per direction: the upstream features feeding the most targets (then by Σ |a − b|), those with
        the most a − b weight either way, and the spans ranked by their a − b weight."""
        out = {}
        for d, s in self.sums.items():
            n = self.counts[d]
            feed = np.lexsort((-s["feature_abs"], -s["feature_targets"]))[:top]
            heavy = np.argsort(-np.abs(s["feature_diff"]), kind="stable")[:top]
            out[d] = {"n_targets": n,
                      "feeds_most": [self._row(s, int(k)) for k in feed if s["feature_targets"][k] > 0],
                      "most_weight": [self._row(s, int(k)) for k in heavy if s["feature_diff"][k] != 0],
                      "spans": [{"span": int(j), "name": al.spans[j]["name"], "differs": al.spans[j]["differs"],
                                 "difference": float(s["span_diff"][j]),
                                 "mean_difference": float(s["span_diff"][j] / max(n, 1))}
                                for j in np.argsort(-np.abs(s["span_diff"]), kind="stable")]}
        return out


# -- 3. cross-prompt patching -------------------------------------------------------------------


def _entries(acts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], layer: int,
             feature: int) -> dict[int, float]:
    """{position: value} of one SAE feature on one prompt (``PromptState.acts``)."""
    pos, feat, val = acts.get(layer, (torch.zeros(0, dtype=torch.long),) * 3)
    sel = feat == feature
    return dict(zip(pos[sel].tolist(), val[sel].tolist()))


def patch_edit(feature: tuple[int, int], dst_acts, src_acts,
               partner: dict[int, int]) -> list[tuple[int, int, int, float]]:
    """The edits that set ``feature`` (layer, id) on the destination prompt to its source values at every
    paired position (``partner``: {destination position: source position}): [(layer, position, id, change)]."""
    l, i = feature
    dst, src = _entries(dst_acts, l, i), _entries(src_acts, l, i)
    return [(l, qd, i, src.get(qs, 0.0) - dst.get(qd, 0.0)) for qd, qs in sorted(partner.items())
            if src.get(qs, 0.0) != dst.get(qd, 0.0)]


def predicted_patch(feature: tuple[int, int], weights: dict[str, dict[tuple[int, int, int], float]], dst: str,
                    src: str, partner: dict[int, int]) -> float:
    """The contrast's prediction of a patch's change: Σ over paired positions of (weight on src − weight
    on dst) of the feature's entries (``weights[prompt][(layer, position, id)]``)."""
    l, i = feature
    return sum(weights[src].get((l, qs, i), 0.0) - weights[dst].get((l, qd, i), 0.0) for qd, qs in partner.items())


@torch.no_grad()
def cross_patch(model, saes: dict[int, SAE], input_ids: torch.Tensor, rows: list[list[tuple[int, int, int, float]]],
                targets: list[tuple[int, int, int]], decision: tuple[int, int], batch: int = 32
                ) -> tuple[np.ndarray, np.ndarray]:
    """Run ``input_ids`` [1, n] once per row of edits — each [(layer, position, feature, change)] adds
    change × the feature's decoder direction to h_layer[position] — and measure every target (layer,
    feature, position)'s pre-activation and the decision logit difference at the last token.

    Returns (Δtarget [rows, targets], Δdecision [rows]) against the unedited prompt; ``batch`` edited rows
    a forward, plus the baseline as row 0 of each."""
    from .jacobian import target_pre
    from .model import decoder_layers, logit_difference

    top = len(decoder_layers(model)) - 1
    capture = {t[0] for t in targets} | {top}
    dt, dd = np.zeros((len(rows), len(targets))), np.zeros(len(rows))
    for c0 in range(0, len(rows), batch):
        chunk = rows[c0:c0 + batch]
        by_layer: dict[int, list[tuple[int, int, int, float]]] = {}
        for r, edits in enumerate(chunk, start=1):
            for l, q, i, v in edits:
                by_layer.setdefault(l, []).append((r, q, i, v))

        hooks = {}
        for l, entries in by_layer.items():
            r, q, i, v = map(list, zip(*entries))
            sae = saes[l]
            vec = sae.W_dec[:, i].T / sae.scale * torch.tensor(v, dtype=sae.W_dec.dtype,
                                                               device=sae.W_dec.device)[:, None]  # [e, d_model]
            idx = (torch.tensor(r, device=vec.device), torch.tensor(q, device=vec.device))
            hooks[l] = lambda h, idx=idx, vec=vec: h.index_put(idx, vec.to(h.dtype), accumulate=True)
        with resid_hooks(model, capture=capture, edits=hooks) as hs:
            run(model, input_ids.expand(1 + len(chunk), -1))
        dec = logit_difference(model, hs[top][:, -1], *decision).float()
        dd[c0:c0 + len(chunk)] = (dec[1:] - dec[0]).cpu().numpy()
        for j, (l, f, p) in enumerate(targets):
            sae = saes[l]
            pre = target_pre(sae, hs[l][:, p].to(sae.W_enc.dtype), [f] * (1 + len(chunk))).float()
            dt[c0:c0 + len(chunk), j] = (pre[1:] - pre[0]).cpu().numpy()
    return dt, dd


@torch.no_grad()
def swap_spans(model, saes: dict[int, SAE], al: Alignment, ids: dict[str, torch.Tensor], dst: str, src: str,
               targets: list[tuple[int, int, int]], decision: tuple[int, int], batch: int = 32) -> dict[int, dict]:
    """The differing spans as causes: prompt ``dst`` with one span's text replaced by ``src``'s (token
    ids), measured. ``targets``: (layer, feature, position counted from the end, < 0). Returns
    {span id: {"target": [Δ per target], "decision": Δ}} against the unedited ``dst``."""
    from .jacobian import target_pre
    from .model import decoder_layers, logit_difference

    top = len(decoder_layers(model)) - 1
    capture = {t[0] for t in targets} | {top}
    base, src_ids = ids[dst][0], ids[src][0]
    variants = {}
    for sp in al.spans:
        d, s = sp[dst], sp[src]
        if sp["differs"] and d is not None and s is not None:
            variants[sp["id"]] = torch.cat([base[:d["start"]], src_ids[s["start"]:s["end"]], base[d["end"]:]])
    out: dict[int, dict] = {}

    def measure(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # [rows, n] -> ([rows, T], [rows])
        with resid_hooks(model, capture=capture) as hs:
            run(model, x)
        dec = logit_difference(model, hs[top][:, -1], *decision).float().cpu().numpy()
        pre = [target_pre(saes[l], hs[l][:, q].to(saes[l].W_enc.dtype), [f] * len(x)).float().cpu().numpy()
               for l, f, q in targets]
        return np.stack(pre, 1) if pre else np.zeros((len(x), 0)), dec

    t0, d0 = measure(base[None])
    by_len: dict[int, list[int]] = {}
    for sid, x in variants.items():
        by_len.setdefault(len(x), []).append(sid)
    for sids in by_len.values():
        for c in range(0, len(sids), batch):
            part = sids[c:c + batch]
            t, d = measure(torch.stack([variants[i] for i in part]))
            for r, sid in enumerate(part):
                out[sid] = {"target": (t[r] - t0[0]).tolist(), "decision": float(d[r] - d0[0])}
    return out


# -- the whole contrast of one run --------------------------------------------------------------


def node_arrays(group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(node_layer, node_position, node_feature) [N] of one prompt's ``graphs.zarr`` group, shared by its rows."""
    return tuple(np.asarray(group[k][:]).astype(np.int64) for k in ("node_layer", "node_position", "node_feature"))


def prompt_row(group, j: int, nodes: tuple | None = None) -> PromptRow:
    """Row ``j`` (a target) of one prompt's ``graphs.zarr`` group (or a dict of the same arrays);
    ``nodes``: its ``node_arrays``, read once for every row."""
    layer, pos, feat = nodes if nodes is not None else node_arrays(group)
    err = np.asarray(group["error"][j], dtype=np.float64)
    return PromptRow(node_layer=layer, node_position=pos, node_feature=feat,
                     weight=np.asarray(group["weight"][j], dtype=np.float64), error=err,
                     error_layers=np.arange(err.shape[0]), embedding=np.asarray(group["embedding"][j], np.float64),
                     value=float(group["value"][j]))


def _entry_weights(row: PromptRow, wanted: set[tuple[int, int]]) -> dict[tuple[int, int, int], float]:
    """{(layer, position, id): weight} of the entries of the ``wanted`` (layer, id) features."""
    width = int(row.node_feature.max(initial=0)) + 1
    sel = np.isin(row.node_layer * width + row.node_feature, [l * width + i for l, i in wanted if i < width])
    return {(int(l), int(q), int(i)): float(w) for l, q, i, w in
            zip(row.node_layer[sel], row.node_position[sel], row.node_feature[sel], row.weight[sel])}


def contrast_run(model, saes: dict[int, SAE], al: Alignment, ids: dict[str, torch.Tensor], groups: dict,
                 names: dict[str, list[str]], targets: list[dict], positions: dict[str, int],
                 decision: tuple[int, int], rc, top: int = 20, patch_top: int = 5, batch: int = 32,
                 progress=lambda done, total: None) -> tuple[list[dict], StudyContrast]:
    """Every target's contrast and cross-prompt patches, and the study's sums.

    ``groups[p]``: prompt p's weights (``graphs.zarr`` group: rows by ``names[p]``, its targets);
    ``targets``: {"feature", "layer", "feature_id", "direction"} of the targets graphed on both prompts;
    ``positions[p]``: the targets' position on p. Rows are read one target at a time; a record keeps
    its ``top`` features, and its ``patch_top`` strongest are patched across (``cross_patch``), each
    alone and together, both ways."""
    from .graphs import prompt_state
    from .replay import judge

    a, b = al.prompts
    d_sae = max(s.d_sae for s in saes.values())
    n_layers = max(saes) + 1
    study = StudyContrast(n_layers, d_sae, len(al.spans))
    records, wants, dec_rows = [], [], {}
    nodes = {p: node_arrays(groups[p]) for p in (a, b)}
    for p in (a, b):  # the decision's weights: one row per prompt, shared by every target
        g = groups[p]
        dec_rows[p] = PromptRow(*nodes[p], np.asarray(g["decision_weight"][:], np.float64),
                                np.zeros((0, 0)), np.zeros(0, np.int64), np.zeros(0), 0.0)
    for n, t in enumerate(targets):
        rows = {p: prompt_row(groups[p], names[p].index(t["feature"]), nodes[p]) for p in (a, b)}
        rec = target_contrast(al, rows, d_sae, n_layers, t["layer"], top)
        study.add(t.get("direction") or "unclassified", rec)
        del rec["_arrays"]
        chosen = [(f["layer"], f["feature_id"]) for f in rec["features"][:patch_top]]
        wants.append((chosen, {p: _entry_weights(rows[p], set(chosen)) for p in (a, b)}))
        records.append({"feature": t["feature"], "layer": t["layer"], "feature_id": t["feature_id"],
                        "direction": t.get("direction"), **rec})
        progress(n + 1, len(targets))
    if records:  # the differing spans as causes, both ways
        for dst, src in ((b, a), (a, b)):
            n = ids[dst].shape[1]
            sw = swap_spans(model, saes, al, ids, dst, src, [(t["layer"], t["feature_id"], positions[dst] - n)
                                                             for t in targets], decision, batch)
            for j, rec in enumerate(records):
                sign = 1.0 if dst == b else -1.0  # a − b: b with a's span moves b toward a
                drivers = [{"span": sid, "name": al.spans[sid]["name"], "target": v["target"][j],
                            "share": _share(sign * v["target"][j], rec["difference"]), "decision": v["decision"]}
                           for sid, v in sw.items()]
                rec.setdefault("swaps", {})[f"{dst}_with_{src}"] = sorted(drivers, key=lambda x: -abs(x["target"]))
    if patch_top > 0 and records:
        states = {p: prompt_state(model, {l: saes[l] for l in sorted(saes)}, ids[p]) for p in (a, b)}
        every = sorted({f for chosen, _ in wants for f in chosen})
        dec_w = {p: _entry_weights(dec_rows[p], set(every)) for p in (a, b)}
        tspec = lambda p: [(t["layer"], t["feature_id"], positions[p]) for t in targets]  # noqa: E731
        for dst, src in ((b, a), (a, b)):
            partner = {qd: qs for qd, qs in al.partner(dst).items()}
            edits = {f: patch_edit(f, states[dst].acts, states[src].acts, partner) for f in every}
            joint = [sum((edits[f] for f in chosen), []) for chosen, _ in wants]
            dt, dd = cross_patch(model, saes, ids[dst], [edits[f] for f in every] + joint, tspec(dst), decision, batch)
            row_of = {f: r for r, f in enumerate(every)}
            for j, (rec, (chosen, w)) in enumerate(zip(records, wants)):
                base = rec["value"][dst]
                items = []
                for f in chosen:
                    pred = predicted_patch(f, w, dst, src, partner)
                    items.append({"feature": f"L{f[0]}-{f[1]}", "predicted": pred, "actual": float(dt[row_of[f], j]),
                                  "decision_predicted": predicted_patch(f, dec_w, dst, src, partner),
                                  "decision_actual": float(dd[row_of[f]]), "n_positions": len(edits[f]),
                                  **judge(pred, float(dt[row_of[f], j]), base, rc)})
                r = len(every) + j
                pj = sum(i["predicted"] for i in items)
                rec.setdefault("patching", {})[f"{dst}_with_{src}"] = {
                    "features": items,
                    "joint": {"features": [i["feature"] for i in items], "predicted": pj, "actual": float(dt[r, j]),
                              "decision_predicted": sum(i["decision_predicted"] for i in items),
                              "decision_actual": float(dd[r]), **judge(pj, float(dt[r, j]), base, rc)}}
    return records, study


CONTRAST_DIR = "integrated/contrast"


def summary_doc(al: Alignment, records: list[dict], study: StudyContrast | None, covers: dict, run_id: str,
                top: int = 25) -> dict:
    """``integrated/contrast/summary.json``: per target direction, the upstream features that feed the most
    targets and carry the most a − b weight, the spans by the weight they carry (mean over cuts), the
    differing spans by what swapping their text moves, the layer × span heat map, and how cross-prompt
    patching fared."""
    a, b = al.prompts
    doc = {"run_id": run_id, "prompts": [a, b], "covers": covers,
           "meaning": f"Weights are {a} minus {b}; a weight is −(the target's change when the node is ablated). "
                      "A span's weight is its share of each layer's cut, averaged over the cuts; a swap replaces "
                      f"one differing span's text on {b} with {a}'s and measures the target",
           "spans": [{"id": s["id"], "name": s["name"], "differs": s["differs"],
                      a: s[a]["text"] if s[a] else None, b: s[b]["text"] if s[b] else None} for s in al.spans],
           "directions": study.summary(al, top) if study else {}}
    n_layers = study.n_layers if study else 0
    for d, out in doc["directions"].items():
        mine = [r for r in records if (r.get("direction") or "unclassified") == d]
        drivers: dict[int, list[float]] = {}
        for r in mine:
            for x in r.get("swaps", {}).get(f"{b}_with_{a}", []):
                drivers.setdefault(x["span"], []).append(x["target"])
        out["drivers"] = sorted(({"span": s, "name": al.spans[s]["name"], "sum": float(sum(v)),
                                  "mean": float(np.mean(v)), "n_targets": len(v)} for s, v in drivers.items()),
                                key=lambda x: -abs(x["sum"]))
        heat = study.sums[d]["layer_span"]
        used = max([r["layer"] for r in mine] + [0])
        out["heatmap"] = {"layers": ["embeddings"] + [f"L{l}" for l in range(min(used, n_layers))],
                          "spans": [s["name"] for s in al.spans],
                          "values": heat[:1 + min(used, n_layers)].round(6).tolist()}
        pat = {}
        for key in (f"{b}_with_{a}", f"{a}_with_{b}"):
            joint = [r["patching"][key]["joint"] for r in mine if key in r.get("patching", {})]
            single = [x for r in mine for x in r.get("patching", {}).get(key, {}).get("features", [])]
            pat[key] = {"n_targets": len(joint), "joint_validated": sum(j["validated"] for j in joint),
                        "joint_sign_agrees": sum(j["sign_agrees"] for j in joint),
                        "n_features": len(single), "features_validated": sum(x["validated"] for x in single)}
        out["patching"] = pat
    return doc


def summary_columns(rec: dict | None) -> dict:
    """The contrast's columns of a feature's ``summary.csv`` rows (empty when it was not contrasted)."""
    keys = ("contrast_difference", "contrast_top_feature", "contrast_top_share", "contrast_top_span",
            "contrast_top_driver", "contrast_driver_share", "patch_predicted", "patch_actual", "patch_validated")
    if not rec:
        return dict.fromkeys(keys, "")
    a, b = rec["prompts"]
    f = rec["features"][0] if rec["features"] else None
    span = rec["spans"][0] if rec["spans"] else None
    driver = (rec.get("swaps", {}).get(f"{b}_with_{a}") or [None])[0]
    joint = rec.get("patching", {}).get(f"{b}_with_{a}", {}).get("joint")
    return dict(zip(keys, (rec["difference"], f["feature"] if f else "", f["share"] if f else "",
                           span["name"] if span else "", driver["name"] if driver else "",
                           driver["share"] if driver else "", joint["predicted"] if joint else "",
                           joint["actual"] if joint else "", joint["validated"] if joint else "")))
