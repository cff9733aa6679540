"""Step 5's pictures: the run's report pages.

The report is an index (``integrated/report.html``: one sortable, filterable table of every traced
feature, the features by layer and predicted vs actual change of every replayed candidate) and one
page per feature (``integrated/features/{feature}.html``), in the manner of a Neuronpedia feature
dashboard: its pathways, its top activations with every token coloured by activation, an activation
histogram, the tokens it promotes and suppresses, the tokens its patch changes, and the study's
numbers. Pages are rendered by jinja2 templates (``pathflow/templates``) and self-contained: inline
CSS, SVG and script, no external resources, so they open from a run folder or an object store alike.

Geometry (positions, ticks, colours) is computed here; the markup lives in the templates.
"""

from __future__ import annotations

import math
from functools import lru_cache

import jinja2

RAISES, LOWERS = "#2166ac", "#b2182b"  # an upstream feature raises / lowers the target (activation × gradient)
AGREE, DISAGREE = "#2166ac", "#f4a11d"  # replay's sign agrees / disagrees with the gradient's prediction
MAX_POINTS = 2000  # above this the run's scatter is drawn as a 2-D histogram (the index stays small)


def show_token(token: str) -> str:
    """A token as a person reads it: spaces kept but visible at its edges, control characters named."""
    if token == "":
        return "∅"
    t = token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    core = t.strip(" ")
    lead, trail = len(t) - len(t.lstrip(" ")), len(t) - len(t.rstrip(" "))
    return "·" * lead + core + "·" * trail if core else "·" * len(t)


def context_token(token: str) -> str:
    """A token inside running text: spaces as spaces, a newline shown and kept."""
    return token.replace("\n", "↵\n").replace("\t", "⇥")


def fmt(x, spec: str = "+.3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def effect(c: dict) -> float:
    """An upstream feature's linear effect on the target, activation × gradient (circuit-tracer's
    sign: > 0 raises the target). Our stored ``attribution`` is the ablation's predicted change, −effect."""
    return -c["attribution"]


def activation_colour(value: float, top: float) -> str:
    """Background of a token by the feature's activation there (Neuronpedia-like orange ramp)."""
    a = 0.0 if top <= 0 else max(0.0, min(1.0, value / top))
    return f"rgba(255,122,0,{0.08 + 0.82 * a:.2f})" if a > 0 else "transparent"


# -- geometry ------------------------------------------------------------------------------


def pathway_view(feature: str, layer: int, candidates: list[dict], width: int = 760, row: int = 20) -> dict:
    """The direct edges into one target: upstream layers left to right, one row per candidate, so
    an edge runs along its own row and never through another node; the target at the right."""
    cands = sorted(candidates, key=lambda c: (c["layer"], -abs(c["attribution"])))
    top_layer = max([layer] + [c["layer"] for c in cands])
    left, right = 54, width - 130
    x = lambda l: left + (right - left) * l / max(1, top_layer)  # noqa: E731
    height = 40 + row * max(1, len(cands))
    tx, ty = right + 70, 20 + row * max(1, len(cands)) / 2
    join = right + 26
    wmax = max((abs(c["attribution"]) for c in cands), default=1.0) or 1.0
    nodes, edges = [], []
    for i, c in enumerate(cands):
        sx, sy = x(c["layer"]), 20 + row * (i + 0.5)
        e = effect(c)
        edges.append({
            "d": f"M{sx:.1f},{sy:.1f} H{join:.1f} C{join + 26:.1f},{sy:.1f} {tx - 30:.1f},{ty:.1f} "
                 f"{tx - 9:.1f},{ty:.1f}",
            "colour": RAISES if e >= 0 else LOWERS, "width": round(0.8 + 5 * abs(e) / wmax, 2),
            "validated": bool(c.get("validated")),
            "title": f"{c['feature']} → {feature}: effect (activation × gradient) {e:+.3g}; "
                     f"ablation predicted {c['predicted_change']:+.3g}, replayed {fmt(c.get('actual_change'))}"
                     + (" (validated)" if c.get("validated") else " (not validated)")})
        nodes.append({"x": round(sx, 1), "y": round(sy, 1), "label": c["feature"]})
    axis = [{"x": round(x(l), 1), "label": f"L{l}"} for l in range(top_layer + 1)
            if top_layer <= 16 or l % max(1, top_layer // 16) == 0 or l == layer]
    return {"feature": feature, "width": width, "height": height, "nodes": nodes, "edges": edges, "axis": axis,
            "target": {"x": round(tx, 1), "y": round(ty, 1), "label": feature}, "axis_y": height - 4}


GRAPH_WIDTH = 1120  # the page's content width: the graph fits it, outputs in view, no sideways scroll
GRAPH_SHOWN = 80  # edges shown at load; the pruning control shows up to max_edges


def graph_view(doc: dict, max_edges: int = 400, width: int = GRAPH_WIDTH) -> dict:
    """A whole-prompt attribution graph (circuit-tracer's JSON, ``pathflow.graphs.graph_json``) as the
    report draws it: token positions across (only those with a node), layers up (embeddings at the
    bottom, the decision at the top), scaled to ``width``; edges coloured by weight (blue raises its
    target, red lowers it). The ``max_edges`` strongest edges are drawn, ranked, so the page's pruning
    control can show the strongest N; ``info`` carries every node's numbers for the click panel, and
    ``chains`` the strongest multi-hop pathways into the target."""
    md = doc["metadata"]
    tokens = md["prompt_tokens"]
    ids = {n["node_id"]: n for n in doc["nodes"]}
    links = sorted(doc["links"], key=lambda x: -abs(x["weight"]))[:max_edges]
    used = {x["source"] for x in links} | {x["target"] for x in links}
    shown = [n for n in doc["nodes"] if n["node_id"] in used or n["feature_type"] != "embedding"]
    cols = sorted({n["ctx_idx"] for n in shown})
    layers = sorted({int(n["layer"]) for n in shown if n["layer"] != "E"})
    rows = ["E"] + [str(l) for l in layers]  # bottom to top; the logit node's layer is the highest
    left, right, top = 64, 96, 16
    step = (width - left - right) / max(1, len(cols))
    row_h = max(14.0, min(46.0, 480 / max(1, len(rows))))
    height = round(top + row_h * len(rows) + 96)
    col = {c: left + step * (i + 0.5) for i, c in enumerate(cols)}
    row = {r: top + row_h * (len(rows) - 1 - i) + row_h / 2 for i, r in enumerate(rows)}
    # features sharing a (position, layer) cell sit side by side within it
    cell: dict[tuple, list] = {}
    for n in shown:
        cell.setdefault((n["ctx_idx"], n["layer"]), []).append(n)
    xy = {}
    for (c, layer), group in cell.items():
        spread = min(7.0, 0.8 * step / max(1, len(group) - 1))
        for i, n in enumerate(group):
            dx = (i - (len(group) - 1) / 2) * spread if len(group) > 1 else 0.0
            xy[n["node_id"]] = (round(col[c] + dx, 1), round(row[layer], 1))
    wmax = max((abs(x["weight"]) for x in links), default=1.0) or 1.0
    edges = []
    for rank, x in reversed(list(enumerate(links))):  # the strongest drawn last, on top
        (x1, y1), (x2, y2) = xy[x["source"]], xy[x["target"]]
        edges.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "colour": RAISES if x["weight"] >= 0 else LOWERS,
                      "width": round(0.4 + 4 * abs(x["weight"]) / wmax, 2), "rank": rank,
                      "source": x["source"], "target": x["target"],
                      "title": f"{_node_name(ids[x['source']])} → {_node_name(ids[x['target']])}: {x['weight']:+.3g}"})
    target_id, decision_id = doc["qParams"]["pinnedIds"][:2]
    nodes, info = [], {}
    for n in shown:
        kind = {"embedding": "embedding", "logit": "decision", "mlp reconstruction error": "error"}.get(
            n["feature_type"], "feature")
        if n["node_id"] == target_id:
            kind = "target"
        x, y = xy[n["node_id"]]
        at = "" if kind == "decision" else f" at “{show_token(tokens[n['ctx_idx']])}” (token {n['ctx_idx']})"
        nodes.append({"x": x, "y": y, "kind": kind, "id": n["node_id"], "validated": n.get("validated", True),
                      "label": _node_name(n) + at})
        info[n["node_id"]] = {k: v for k, v in {
            "name": _node_name(n), "at": at.strip(), "kind": kind, "activation": n.get("activation"),
            "influence": n.get("influence"), "predicted": n.get("predicted_change"),
            "replayed": n.get("replayed_change"), "decision": n.get("replayed_decision_change"),
            "checks": [n[c] for c in ("sign_agrees", "above_noise", "magnitude_agrees", "validated")]
            if "validated" in n else None}.items() if v is not None}
    every = max(1, math.ceil(11 / step))  # a token label every `every` columns: they never overlap
    axis = [{"x": round(col[c], 1), "y": height - 84, "label": show_token(tokens[c])[:14]}
            for i, c in enumerate(cols) if i % every == 0 or c == ids[target_id]["ctx_idx"]]
    ylabels = [{"y": round(row[r], 1), "label": "emb" if r == "E" else
                ("decision" if r == str(max(layers, default=0)) and any(n["feature_type"] == "logit" and
                                                                        n["layer"] == r for n in shown)
                 else f"L{r}")} for r in rows]
    outputs = [{"x": xy[i][0] + 10, "y": xy[i][1] + 4, "label": label} for i, label in
               ((target_id, _node_name(ids[target_id])), (decision_id, "decision")) if i in xy]
    return {"width": width, "height": height, "edges": edges, "nodes": nodes, "axis": axis, "ylabels": ylabels,
            "outputs": outputs, "info": info, "shown": min(GRAPH_SHOWN, len(links)),
            "slug": md["slug"], "n_edges": len(doc["links"]), "n_drawn": len(links),
            "chains": chains(doc), "replay": (md.get("info") or {}).get("replay") or {},
            "scores": score_view((md.get("info") or {}).get("scores"))}


def chains(doc: dict, top: int = 8, beam: int = 64) -> list[dict]:
    """The strongest multi-hop pathways into a graph's target: chains of SAE features s → m … → target
    of two or three links, each link in the graph.

    A chain's strength is its first-order share of the target's pre-activation: a link's weight w(u→v)
    is v's change when u is ablated, so through an intermediate m it scales by w(m→next)/a_m (the next
    node's change per unit of m's activation): strength = w(s→m1) · Π w(m_i→m_i+1)/a_m_i. Positive
    chains raise the target. Each feature on a chain carries replay's verdict on its own effect."""
    target = doc["qParams"]["pinnedIds"][0]
    feats = {n["node_id"]: n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"}
    into: dict[str, list[tuple[str, float]]] = {}
    for x in doc["links"]:
        if x["source"] in feats and x["target"] in feats and x["weight"]:
            into.setdefault(x["target"], []).append((x["source"], x["weight"]))

    def extend(paths):  # [(nodes from the first to the target, strength)] one link further upstream
        out = []
        for nodes, strength in paths:
            head = feats[nodes[0]]
            a = head.get("activation") or 0.0
            if not a:
                continue
            out += [([s] + nodes, w * strength / a) for s, w in into.get(nodes[0], []) if s not in nodes]
        return sorted(out, key=lambda p: -abs(p[1]))[:beam]

    one = [([s, target], w) for s, w in into.get(target, [])]
    found = extend(one)  # two links
    found += extend(found)  # three
    best = sorted(found, key=lambda p: -abs(p[1]))[:top]
    tokens = doc["metadata"]["prompt_tokens"]
    at, out = feats[target]["ctx_idx"], []
    for nodes, strength in best:
        steps = [{"name": _node_name(feats[i]), "token": show_token(tokens[feats[i]["ctx_idx"]])
                  if feats[i]["ctx_idx"] != at else None,
                  "validated": feats[i].get("validated") if i != target else None} for i in nodes]
        judged = [st["validated"] for st in steps[:-1] if st["validated"] is not None]
        out.append({"steps": steps, "strength": strength,
                    "verdict": None if not judged else all(judged)})
    return out


def score_view(s: dict | None) -> dict | None:
    """A graph's scores (``pathflow.scores``) as the feature page shows them: None where it has none."""
    if not s:
        return None
    c = s.get("completeness", {}).get("target", {})
    return {"completeness": c.get("overall"), "per_layer": c.get("per_layer", {}),
            "replacement": s.get("circuit_tracer", {}).get("replacement"),
            "ct_completeness": s.get("circuit_tracer", {}).get("completeness"),
            "faith_target": s.get("faithfulness", {}).get("target"),
            "faith_decision": s.get("faithfulness", {}).get("decision")}


def _node_name(n: dict) -> str:
    if n["feature_type"] == "embedding":
        return "embedding"
    if n["feature_type"] == "logit":
        return n.get("clerp", "decision").split(" (p=")[0]
    if "error" in n["feature_type"]:
        return f"L{n['layer']} SAE error"
    return n.get("pathflow_feature") or f"L{n['layer']} #{n['feature']}"


def scatter_view(points: list[dict], width: int = 380, height: int = 320) -> dict:
    """Predicted (x) vs replayed (y) change. points: [{predicted, actual, agrees, title}]. Above
    MAX_POINTS the points are binned (a 2-D histogram, darker = more)."""
    lim = max((max(abs(p["predicted"]), abs(p["actual"])) for p in points), default=1.0) or 1.0
    ticks = nice_ticks(-lim, lim, 4)
    lim = max(lim, max(abs(t) for t in ticks))
    x0, x1, y0, y1 = 52, width - 12, height - 42, 12
    sx = lambda v: x0 + (x1 - x0) * (v + lim) / (2 * lim)  # noqa: E731
    sy = lambda v: y0 + (y1 - y0) * (v + lim) / (2 * lim)  # noqa: E731
    view = {"width": width, "height": height, "box": {"x0": x0, "x1": x1, "y0": y0, "y1": y1},
            "zero": {"x": round(sx(0), 1), "y": round(sy(0), 1)}, "n": len(points),
            "xticks": [{"at": round(sx(t), 1), "label": fmt(t, ".3g")} for t in ticks],
            "yticks": [{"at": round(sy(t), 1), "label": fmt(t, ".3g")} for t in ticks],
            "diag": {"x1": round(sx(-lim), 1), "y1": round(sy(-lim), 1), "x2": round(sx(lim), 1),
                     "y2": round(sy(lim), 1)}, "points": [], "cells": []}
    if len(points) <= MAX_POINTS:
        view["points"] = [{"x": round(sx(p["predicted"]), 1), "y": round(sy(p["actual"]), 1),
                           "colour": AGREE if p["agrees"] else DISAGREE, "title": p["title"]} for p in points]
    else:
        bins, counts = 40, {}
        for p in points:
            key = (min(bins - 1, int((p["predicted"] + lim) / (2 * lim) * bins)),
                   min(bins - 1, int((p["actual"] + lim) / (2 * lim) * bins)))
            counts[key] = counts.get(key, 0) + 1
        top, cw, ch = max(counts.values()), (x1 - x0) / bins, (y0 - y1) / bins
        for (i, j), n in counts.items():
            view["cells"].append({"x": round(x0 + i * cw, 1), "y": round(y0 - (j + 1) * ch, 1), "w": round(cw, 2),
                                  "h": round(ch, 2), "opacity": round(0.15 + 0.85 * math.log1p(n) / math.log1p(top), 2),
                                  "title": f"{n} candidates"})
    return view


def histogram_view(hist: dict | None, width: int = 380, height: int = 170) -> dict | None:
    """Bars of a feature's activation histogram, with value ticks and per-bar hover."""
    if not hist or not hist.get("n_active"):
        return None
    counts, edges = hist["counts"], hist["edges"]
    x0, x1, y0, y1 = 52, width - 10, height - 34, 10
    top = max(counts) or 1
    bw = (x1 - x0) / len(counts)
    bars = [{"x": round(x0 + i * bw, 1), "w": round(max(bw - 1, 0.5), 1), "y": round(y0 - (y0 - y1) * n / top, 1),
             "h": round((y0 - y1) * n / top, 1), "title": f"{edges[i]:.3g}–{edges[i + 1]:.3g}: {n} tokens"}
            for i, n in enumerate(counts)]
    span = edges[-1] or 1.0
    xt = [{"at": round(x0 + (x1 - x0) * t / span, 1), "label": fmt(t, ".3g")} for t in nice_ticks(0, span, 4)
          if t <= span]
    yt = [{"at": round(y0 - (y0 - y1) * t / top, 1), "label": fmt(t, ".0f")} for t in nice_ticks(0, top, 3)
          if t <= top and float(t).is_integer()]
    return {"width": width, "height": height, "bars": bars, "xticks": xt, "yticks": yt,
            "box": {"x0": x0, "x1": x1, "y0": y0, "y1": y1}, "n_active": hist["n_active"],
            "n_tokens": hist["n_tokens"], "share": hist["n_active"] / max(1, hist["n_tokens"])}


def bars_view(counts: dict[int, int], width: int = 380, height: int = 170) -> dict:
    """Traced features per layer."""
    x0, x1, y0, y1 = 30, width - 8, height - 26, 16
    layers = sorted(counts)
    top = max(counts.values(), default=1) or 1
    bw = (x1 - x0) / max(1, len(layers))
    return {"width": width, "height": height, "bars": [
        {"x": round(x0 + i * bw, 1), "w": round(bw * 0.8, 1), "y": round(y0 - (y0 - y1) * counts[l] / top, 1),
         "h": round((y0 - y1) * counts[l] / top, 1), "label": f"L{l}", "n": counts[l],
         "mid": round(x0 + i * bw + bw * 0.4, 1), "show_label": len(layers) <= 16 or i % 2 == 0}
        for i, l in enumerate(layers)], "y0": y0}


# -- the contrast of the two prompts ---------------------------------------------------------


def diverging_colour(value: float, top: float) -> str:
    """A span's background by its a − b weight: ``LOWERS`` red where a (risky) carries more, ``RAISES``
    blue where b (safe) does; transparent at 0."""
    a = 0.0 if top <= 0 else max(-1.0, min(1.0, value / top))
    if a == 0:
        return "transparent"
    r, g, b = (178, 24, 43) if a > 0 else (33, 102, 172)
    return f"rgba({r},{g},{b},{0.08 + 0.72 * abs(a):.2f})"


def prompt_spans_view(alignment: dict, weight: dict[int, float]) -> dict:
    """Both prompts as their spans, each coloured by its a − b ``weight`` ({span id: w}); tokens the diff
    changed are marked. Returns {"prompts": [a, b], "top", "sides": {prompt: [{"id", "name", "tokens":
    [{"text", "changed"}], "colour", "title"}]}}."""
    a, b = alignment["prompts"]
    top = max((abs(v) for v in weight.values()), default=0.0)
    sides = {}
    for p in (a, b):
        toks = alignment["tokens"][p]
        out = []
        for s in alignment["spans"]:
            side = s.get(p)
            if not side:
                continue
            changed = set(side["changed"])
            w = weight.get(s["id"], 0.0)
            out.append({"id": s["id"], "name": s["name"], "colour": diverging_colour(w, top), "weight": w,
                        "title": f"{s['name']}: {w:+.3g}" + (" (differs)" if s["differs"] else ""),
                        "tokens": [{"text": toks[q], "changed": q in changed}
                                   for q in range(side["start"], side["end"])]})
        sides[p] = out
    return {"prompts": [a, b], "top": top, "sides": sides}


def heatmap_view(heat: dict, cell_w: int = 26, cell_h: int = 13, left: int = 84, head: int = 150) -> dict:
    """A layer × span heat map (rows: embeddings, then layers; columns: spans) as SVG geometry; the span
    names are the column heads, turned."""
    vals = heat["values"]
    top = max((abs(v) for row in vals for v in row), default=0.0)
    cells = [{"x": left + j * cell_w, "y": head + i * cell_h, "colour": diverging_colour(v, top) if v else "#fafafa",
              "title": f"{heat['layers'][i]} × {heat['spans'][j]}: {v:+.3g}"}
             for i, row in enumerate(vals) for j, v in enumerate(row)]
    return {"width": left + len(heat["spans"]) * cell_w + 10, "height": head + len(vals) * cell_h + 8,
            "cell_w": cell_w, "cell_h": cell_h, "cells": cells, "top": top,
            "rows": [{"y": head + i * cell_h + cell_h - 3, "label": l, "show": len(vals) <= 20 or i % 2 == 0}
                     for i, l in enumerate(heat["layers"])],
            "cols": [{"x": left + j * cell_w + cell_w / 2, "y": head - 6, "label": n if len(n) <= 24 else n[:23] + "…"}
                     for j, n in enumerate(heat["spans"])]}


def contrast_section(rec: dict | None, alignment: dict | None) -> dict | None:
    """A feature page's contrast: the prompts side by side, spans coloured by this target's a − b weight,
    its top features, the differing spans' swaps and cross-prompt patching."""
    if not rec or not alignment:
        return None
    a, b = rec["prompts"]
    return {"rec": rec, "a": a, "b": b, "view": prompt_spans_view(alignment, {s["span"]: s["difference"]
                                                                              for s in rec["spans"]}),
            "swaps": rec.get("swaps", {}).get(f"{b}_with_{a}", []),
            "patching": [(k, v) for k, v in (rec.get("patching") or {}).items()]}


def study_page(summary: dict, alignment: dict, run_id: str, traced: set[str]) -> str:
    """``integrated/study.html``: what drives the features, per target direction — ranked tables, the
    layer × span heat map and the prompts with their spans highlighted."""
    directions = []
    order = {d: i for i, d in enumerate(summary["prompts"])}  # the page's own prompt's direction first
    for d, out in sorted(summary.get("directions", {}).items(), key=lambda kv: (order.get(kv[0], 2), kv[0])):
        directions.append({"name": d, "out": out, "heat": heatmap_view(out["heatmap"]),
                           "view": prompt_spans_view(alignment, {s["span"]: s["difference"] for s in out["spans"]})})
    return _env().get_template("study.html.j2").render(run_id=run_id, s=summary, directions=directions,
                                                       traced=traced)


# -- pages ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("pathflow", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, tok=show_token, ctok=context_token)
    env.globals.update(RAISES=RAISES, LOWERS=LOWERS, AGREE=AGREE, DISAGREE=DISAGREE)
    return env


def _candidates(r: dict, prompt: str) -> list[dict]:
    return (r.get("candidates") or r["pathways"])[prompt]


def _points(r: dict) -> list[dict]:
    return [{"predicted": c["predicted_change"], "actual": c["actual_change"], "agrees": c["sign_agrees"],
             "title": f"{c['feature']} → {r['feature']} ({prompt}): predicted {c['predicted_change']:+.3g}, "
                      f"replayed {c['actual_change']:+.3g}"}
            for prompt in r["faithfulness"] for c in _candidates(r, prompt)]


def contrast_name(key: str) -> tuple[str, str]:
    """'a_vs_b' -> (a, b): the patched condition and the one it is compared against."""
    a, _, b = key.partition("_vs_")
    return a, b


def feature_url(template: str | None, r: dict) -> str | None:
    return template.format(layer=r["layer"], feature_id=r["feature_id"]) if template else None


def feature_page(r: dict, run_id: str, neuronpedia_url: str | None = None, traced: set[str] | None = None,
                 graphs: dict[str, dict] | None = None, validated_means: str = "",
                 alignment: dict | None = None) -> str:
    """One feature's self-contained page. r: an integrated record (``feature_record``); graphs: its
    whole-prompt graphs by prompt (circuit-tracer's JSON), drawn where given."""
    t = r.get("tokens") or {}
    reads = [dict(h, top=max([h["value"]] + [x["value"] for x in h.get("tokens", [])])) for h in t.get("reads", [])]
    top_read = max((h["value"] for h in reads), default=0.0)
    prompts = []
    for prompt, faith in r["faithfulness"].items():
        cands = _candidates(r, prompt)
        prompts.append({"name": prompt, "position": r.get("positions", {}).get(prompt), "faith": faith,
                        "n_validated": len(r["pathways"][prompt]), "pathway": pathway_view(r["feature"], r["layer"],
                                                                                         cands),
                        "candidates": sorted(cands, key=lambda c: -abs(c["attribution"])),
                        "decision": any("decision_change" in c for c in cands),
                        "graph": (r.get("graphs") or {}).get(prompt),
                        "graph_view": graph_view(graphs[prompt]) if graphs and prompt in graphs else None})
    changes = [{"patched": contrast_name(k)[0], "baseline": contrast_name(k)[1], **v}
               for k, v in (t.get("changes") or {}).items()]
    study = study_rows(r.get("study") or {})
    return _env().get_template("feature.html.j2").render(
        r=r, run_id=run_id, prompts=prompts, reads=reads, top_read=top_read, colour=activation_colour,
        histogram=histogram_view(t.get("histogram")), writes=t.get("writes"), changes=changes, study=study,
        scatter=scatter_view(_points(r)), effect=effect, traced=traced or set(),
        neuronpedia=feature_url(neuronpedia_url, r), validated_means=validated_means,
        contrast=contrast_section(r.get("contrast"), alignment), decision=decision_view(r))


def decision_view(r: dict) -> dict | None:
    """The decision section of a feature page: the answers, and per prompt the baseline, p(bet over
    stop) and the feature's own measured effect (None where the feature has no graphs)."""
    d = r.get("decision") or {}
    rows = [{"prompt": p, "value": x.get("value"), "change": x.get("change"),
             "p_bet": 0.5 * (1 + math.tanh(x["value"] / 2)) if x.get("value") is not None else None}
            for p, x in (d.get("prompts") or {}).items()]
    return {"bet": d.get("bet", "1"), "stop": d.get("stop", "2"), "rows": rows} if rows else None


def read_snippet(hit: dict, chars: int = 16) -> str:
    """A top activation in a few words: its token marked ⟦…⟧ with up to ``chars`` characters either side
    (a lone token is often a space or a newline, which says nothing in a table)."""
    ctx = hit.get("context") or f"⟦{hit['token']}⟧"
    a, b = ctx.find("⟦"), ctx.find("⟧")
    if a < 0 or b < a:
        return ctx[: 2 * chars]
    before, after = ctx[:a], ctx[b + 1:]
    return (("…" + before[-chars:]) if len(before) > chars else before) + ctx[a:b + 1] + (
        (after[:chars] + "…") if len(after) > chars else after)


# the study's own numbers (DESIGN §4), said in words; {p} is the prompt the number is about
STUDY_LABELS = {
    "cohen_d": ("Cohen's d of the patch's effect", "{:+.3g}"),
    "is_causal": ("causal in the study", "{}"),
    "classified_as": ("the study's class", "{}"),
    "stop_delta": ("stop rate under the patch − baseline, {p} prompt", "{:+.1%}"),
    "risky_stop_delta": ("risky-stop rate under the patch − baseline, {p} prompt", "{:+.1%}"),
    "bankruptcy_delta": ("bankruptcy rate under the patch − baseline, {p} prompt", "{:+.1%}"),
    "bet_delta": ("mean bet under the patch − baseline, {p} prompt ($)", "{:+.3g}"),
    "avg_bet_delta": ("mean bet under the patch − baseline, {p} prompt ($)", "{:+.3g}"),
    "p_value": ("p-value of the patch's effect, {p} prompt", "{:.3g}"),
    "effect_size": ("effect size of the patch, {p} prompt", "{:+.3g}"),
}


def study_rows(values: dict) -> list[tuple[str, str, str]]:
    """(what it is, the value, the study's own key) for each of the study's numbers of a feature: known
    keys in words with their unit (rates as percentage points), others as the study names them."""
    out = []
    for k, v in values.items():
        if isinstance(v, (dict, list)):
            continue
        prompt, _, rest = k.partition("_")
        label, spec = (STUDY_LABELS.get(rest) if prompt in ("safe", "risky") else None) or STUDY_LABELS.get(k) or (
            k, "{:.4g}" if isinstance(v, float) else "{}")
        try:
            shown = spec.format(v) if v is not None else "–"
        except (ValueError, TypeError):
            shown = str(v)
        out.append((label.format(p=prompt), shown, k))
    return out


def index_rows(records: list[dict]) -> tuple[list[str], list[dict]]:
    """The index table: the prompts (column groups) and one row per feature."""
    prompts = list(dict.fromkeys(p for r in records for p in r["faithfulness"]))
    rows = []
    for r in records:
        t = r.get("tokens") or {}
        validated = [c for p in r["faithfulness"] for c in r["pathways"][p]]
        top = max(validated, key=lambda c: abs(c["attribution"]), default=None)
        rows.append({
            "feature": r["feature"], "layer": r["layer"], "direction": r["direction"],
            "rank_key": r["selection"]["rank_key"], "rank_value": r["selection"]["rank_value"],
            "per_prompt": {p: {"n_validated": len(r["pathways"][p]), "n_candidates": f["n_candidates"],
                               **{k: f.get(k) for k in ("n_sign_agrees", "n_above_noise", "n_magnitude_agrees")},
                               "sign_agreement": f["sign_agreement"], "spearman": f["spearman"],
                               "validated": f["validated"],
                               "decision_change": ((r.get("decision") or {}).get("prompts", {}).get(p) or {}).get(
                                   "change")} for p, f in r["faithfulness"].items()},
            "validated": all(f["validated"] for f in r["faithfulness"].values()),
            "top_upstream": top["feature"] if top else "", "top_effect": effect(top) if top else None,
            "promotes": t["writes"]["promoted"][0]["token"] if t.get("writes") and t["writes"]["promoted"] else None,
            "reads": read_snippet(t["reads"][0]) if t.get("reads") else None,
        })
    return prompts, rows


def index_page(records: list[dict], run_id: str, validated_means: str = "", study: bool = False) -> str:
    """The run's index: summary pictures and a table of every traced feature, linking to its page."""
    points = [p for r in records for p in _points(r)]
    by_layer: dict[int, int] = {}
    for r in records:
        by_layer[r["layer"]] = by_layer.get(r["layer"], 0) + 1
    prompts, rows = index_rows(records)
    agree = sum(p["agrees"] for p in points) / len(points) if points else None
    return _env().get_template("index.html.j2").render(
        run_id=run_id, rows=rows, prompts=prompts, n_points=len(points), agree=agree,
        bars=bars_view(by_layer), scatter=scatter_view(points),
        rank_key=rows[0]["rank_key"] if rows else "rank", validated_means=validated_means, has_study=study,
        bet=next((r["decision"]["bet"] for r in records if (r.get("decision") or {}).get("bet")), "1"),
        stop=next((r["decision"]["stop"] for r in records if (r.get("decision") or {}).get("stop")), "2"))


def report_pages(records: list[dict], run_id: str, neuronpedia_url: str | None = None,
                 graph=lambda slug: None, validated_means: str | None = None,
                 contrast: dict | None = None) -> dict[str, str]:
    """Every page of a run's report, by path under ``integrated/``. ``graph(slug)``: a whole-prompt
    graph's JSON (read one at a time, so a study's graphs are never all in memory); ``validated_means``:
    the replay config's one sentence (``replay.validated_sentence``); ``contrast``: {"summary",
    "alignment"} of ``integrated/contrast/``, for the study page and the feature pages' contrast."""
    from .config import ReplayConfig
    from .replay import validated_sentence

    means = validated_means or validated_sentence(ReplayConfig())
    traced = {r["feature"] for r in records}
    alignment = (contrast or {}).get("alignment")
    has_study = bool(contrast and alignment and (contrast.get("summary") or {}).get("directions"))
    pages = {"report.html": index_page(records, run_id, means, has_study)}
    if has_study:
        pages["study.html"] = study_page(contrast["summary"], alignment, run_id, traced)
    for r in records:
        docs = {prompt: graph(slug) for prompt, slug in (r.get("graphs") or {}).items()}
        pages[f"features/{r['feature']}.html"] = feature_page(r, run_id, neuronpedia_url, traced,
                                                              {k: v for k, v in docs.items() if v}, means, alignment)
    return pages
