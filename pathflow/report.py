"""Step 5's pictures: a self-contained ``report.html`` and graphs for the attribution-graph viewer.

The HTML has no external resources: inline CSS and SVG, so it opens from a run folder, an
e-mail attachment or an object store alike. Per feature: its pathway graph (upstream layers
left to right, edge width = |attribution|, solid = validated by replay, dashed = not), its
tokens and the study's effects; per run: traced features by layer and predicted vs actual
change of every replayed candidate.
"""

from __future__ import annotations

import html
import math

POS, NEG = "#2166ac", "#b2182b"  # edge colours: raises / lowers the target's pre-activation


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, fmt="{:+.3g}") -> str:
    return "–" if x is None else fmt.format(x)


def pathway_svg(feature: str, layer: int, candidates: list[dict], width: int = 760, height: int = 300) -> str:
    """The pathways into one target as SVG: upstream layers left to right, the target at the right."""
    layers = list(range(layer + 1))
    x = {l: 60 + (width - 150) * l / max(1, layer) for l in layers}
    by_layer: dict[int, list[dict]] = {}
    for c in candidates:
        by_layer.setdefault(c["layer"], []).append(c)
    pos = {}
    for l, cs in by_layer.items():
        for i, c in enumerate(cs):
            pos[c["feature"]] = (x[l], 30 + (height - 60) * (i + 0.5) / len(cs))
    tx, ty = x[layer] + 40, height / 2
    wmax = max((abs(c["attribution"]) for c in candidates), default=1.0) or 1.0
    parts = [f'<svg class="pathway" data-feature="{_e(feature)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="pathways into {_e(feature)}">']
    for l in layers:
        parts.append(f'<line x1="{x[l]:.1f}" y1="14" x2="{x[l]:.1f}" y2="{height - 14}" stroke="#eee"/>'
                     f'<text x="{x[l]:.1f}" y="{height - 2}" class="axis">L{l}</text>')
    for c in candidates:
        sx, sy = pos[c["feature"]]
        w = 0.8 + 7 * abs(c["attribution"]) / wmax
        colour = POS if c["attribution"] >= 0 else NEG
        dash = ' class="validated"' if c.get("validated") else ' class="unvalidated" stroke-dasharray="5,4"'
        parts.append(f'<path d="M{sx:.1f},{sy:.1f} C{(sx + tx) / 2:.1f},{sy:.1f} {(sx + tx) / 2:.1f},{ty:.1f} '
                     f'{tx:.1f},{ty:.1f}" fill="none" stroke="{colour}" stroke-width="{w:.2f}" opacity="0.75"{dash}>'
                     f'<title>{_e(c["feature"])} → {_e(feature)}: attribution {c["attribution"]:+.3g}, '
                     f'replayed {_num(c.get("actual_change"))}</title></path>')
    for c in candidates:
        sx, sy = pos[c["feature"]]
        parts.append(f'<circle cx="{sx:.1f}" cy="{sy:.1f}" r="5" fill="#555"/><text x="{sx - 8:.1f}" '
                     f'y="{sy - 8:.1f}" class="node">{_e(c["feature"])}</text>')
    parts.append(f'<circle cx="{tx:.1f}" cy="{ty:.1f}" r="9" fill="#f4a11d"/><text x="{tx - 30:.1f}" '
                 f'y="{ty - 14:.1f}" class="target">{_e(feature)}</text></svg>')
    return "".join(parts)


def scatter_svg(points: list[tuple[float, float, bool]], width: int = 360, height: int = 300) -> str:
    """Predicted (x) vs actual (y) change of every replayed candidate; orange = sign disagrees."""
    if not points:
        return "<p>no replayed candidates</p>"
    lim = max(max(abs(p), abs(a)) for p, a, _ in points) or 1.0
    sx = lambda v: 40 + (width - 60) * (v + lim) / (2 * lim)  # noqa: E731
    sy = lambda v: height - 30 - (height - 50) * (v + lim) / (2 * lim)  # noqa: E731
    parts = [f'<svg class="scatter" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="predicted vs actual change">',
             f'<line x1="{sx(-lim):.1f}" y1="{sy(-lim):.1f}" x2="{sx(lim):.1f}" y2="{sy(lim):.1f}" stroke="#bbb" '
             f'stroke-dasharray="4,3"/>',
             f'<line x1="{sx(0):.1f}" y1="{sy(-lim):.1f}" x2="{sx(0):.1f}" y2="{sy(lim):.1f}" stroke="#ddd"/>',
             f'<line x1="{sx(-lim):.1f}" y1="{sy(0):.1f}" x2="{sx(lim):.1f}" y2="{sy(0):.1f}" stroke="#ddd"/>']
    for p, a, agree in points:
        parts.append(f'<circle cx="{sx(p):.1f}" cy="{sy(a):.1f}" r="3" fill="{POS if agree else "#f4a11d"}" '
                     f'opacity="0.7"/>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height - 6}" class="axis">predicted Δpre (gradient)</text>'
                 f'<text x="12" y="{height / 2:.0f}" class="axis" transform="rotate(-90 12 {height / 2:.0f})">'
                 f'actual Δpre (replay)</text></svg>')
    return "".join(parts)


def bars_svg(counts: dict[str, int], width: int = 360, height: int = 200) -> str:
    if not counts:
        return ""
    top = max(counts.values()) or 1
    bw = (width - 40) / len(counts)
    parts = [f'<svg class="bars" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="features by layer">']
    for i, (k, v) in enumerate(counts.items()):
        h = (height - 40) * v / top
        x = 30 + i * bw
        parts.append(f'<rect x="{x:.1f}" y="{height - 20 - h:.1f}" width="{bw * 0.8:.1f}" height="{h:.1f}" '
                     f'fill="{POS}"/><text x="{x + bw * 0.4:.1f}" y="{height - 6}" class="axis">L{_e(k)}</text>'
                     f'<text x="{x + bw * 0.4:.1f}" y="{height - 24 - h:.1f}" class="axis">{v}</text>')
    return "".join(parts) + "</svg>"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1100px;padding:16px 28px;
color:#222}
h1{font-size:22px}h2{font-size:18px;border-top:1px solid #ddd;padding-top:14px;margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #e3e3e3;padding:3px 7px;text-align:left;
vertical-align:top}th{background:#f6f6f6}code{background:#f3f3f3;padding:0 3px}
.axis{font-size:10px;fill:#666;text-anchor:middle}.node{font-size:10px;fill:#333;text-anchor:end}
.target{font-size:12px;font-weight:600;fill:#222}.row{display:flex;gap:24px;flex-wrap:wrap}.muted{color:#777}
.tok{font-family:ui-monospace,monospace;white-space:pre}
"""


SCRIPT = """
document.getElementById('only-validated').addEventListener('change', function (e) {
  document.querySelectorAll('svg.pathway path.unvalidated').forEach(function (p) {
    p.style.display = e.target.checked ? 'none' : '';
  });
});
"""


def _tokens_table(title: str, rows: list[dict], value_key: str) -> str:
    body = "".join(f'<tr><td class="tok">{_e(repr(r["token"]))}</td><td>{r[value_key]:+.3g}</td></tr>' for r in rows)
    return f"<table><tr><th>{_e(title)}</th><th>{_e(value_key)}</th></tr>{body}</table>"


def feature_section(r: dict) -> str:
    out = [f'<section class="feature" id="{_e(r["feature"])}"><h2>{_e(r["feature"])} '
           f'<span class="muted">({_e(r["direction"])}, layer {r["layer"]})</span></h2>',
           f'<p>Selected by |{_e(r["selection"]["rank_key"])}| = {_num(r["selection"]["rank_value"], "{:.3g}")} '
           f'(rank {r["selection"]["rank"]} in its layer).</p>']
    for prompt, faith in r["faithfulness"].items():
        cands = r.get("candidates", {}).get(prompt) or r["pathways"][prompt]
        at = r.get("positions", {}).get(prompt)
        out.append(f"<h3>prompt <code>{_e(prompt)}</code> at token {_e('?' if at is None else at)}: sign agreement"
                   f" {_num(faith['sign_agreement'], '{:.2f}')}, "
                   f"Pearson {_num(faith['pearson'], '{:.2f}')}, Spearman {_num(faith['spearman'], '{:.2f}')}, "
                   f"{len(r['pathways'][prompt])} of {faith['n_candidates']} validated</h3>")
        out.append(pathway_svg(r["feature"], r["layer"], cands))
        rows = "".join(f"<tr><td>{_e(c['feature'])}</td><td>{c['activation']:.3g}</td><td>{c['gradient']:+.3g}</td>"
                       f"<td>{c['predicted_change']:+.3g}</td><td>{c['actual_change']:+.3g}</td>"
                       f"<td>{'✓' if c.get('validated') else '✗'}</td></tr>" for c in cands[:12])
        out.append("<table><tr><th>upstream</th><th>activation</th><th>gradient</th><th>predicted Δpre</th>"
                   f"<th>actual Δpre</th><th>validated</th></tr>{rows}</table>")
    t = r.get("tokens") or {}
    row = []
    if t.get("writes"):
        row += [_tokens_table("promotes", t["writes"]["promoted"], "value"),
                _tokens_table("suppresses", t["writes"]["suppressed"], "value")]
    for name, ch in (t.get("changes") or {}).items():
        row.append(_tokens_table(f"more under {name.split('_vs_')[0]}", ch["more"][:8], "z"))
        row.append(_tokens_table(f"less under {name.split('_vs_')[0]}", ch["less"][:8], "z"))
    out.append(f'<div class="row">{"".join(row)}</div>')
    if t.get("reads"):
        rows = "".join(f'<tr><td>{h["value"]:.3g}</td><td>{_e(h.get("source", ""))}</td>'
                       f'<td class="tok">{_e(h["context"])}</td></tr>' for h in t["reads"][:8])
        out.append(f"<table><tr><th>activation</th><th>in</th><th>context</th></tr>{rows}</table>")
    if r.get("study"):
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in r["study"].items()
                       if not isinstance(v, (dict, list)))
        out.append(f"<details><summary>study effects</summary><table>{rows}</table></details>")
    out.append("</section>")
    return "".join(out)


def report_html(records: list[dict], run_id: str) -> str:
    by_layer: dict[str, int] = {}
    points = []
    for r in sorted(records, key=lambda r: r["layer"]):
        by_layer[str(r["layer"])] = by_layer.get(str(r["layer"]), 0) + 1
        for cands in (r.get("candidates") or r["pathways"]).values():
            points += [(c["predicted_change"], c["actual_change"], c["sign_agrees"]) for c in cands]
    agree = sum(p[2] for p in points) / len(points) if points else math.nan
    toc = " · ".join(f'<a href="#{_e(r["feature"])}">{_e(r["feature"])}</a>' for r in records)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pathflow run {_e(run_id)}</title>'
            f"<style>{CSS}</style></head><body><h1>pathflow run {_e(run_id)}</h1>"
            f"<p>{len(records)} features traced; {len(points)} candidates replayed, sign agreement "
            f"{agree:.2f}.</p><div class=\"row\"><div><h3>traced features by layer</h3>{bars_svg(by_layer)}</div>"
            f"<div><h3>faithfulness: predicted vs actual change</h3>{scatter_svg(points)}</div></div>"
            f'<p>{toc}</p><p><label><input type="checkbox" id="only-validated"> show validated edges only'
            f"</label></p>{''.join(feature_section(r) for r in records)}<script>{SCRIPT}</script></body></html>\n")


def attribution_graph(record: dict, prompt: str, prompt_tokens: list[str], scan: str, run_id: str) -> dict:
    """One feature's pathways on one prompt in the JSON of the attribution-graphs frontend that
    circuit-tracer writes (``metadata``, ``qParams``, ``nodes``, ``links`` with source/target/weight)."""
    pos = record.get("positions", {}).get(prompt)
    pos = len(prompt_tokens) - 1 if pos is None else pos  # the token the target and its upstream features are at

    def node(layer: int, fid: int, activation=None, clerp="", influence=None) -> dict:
        nid = f"{layer}_{fid}_{pos}"
        return {"node_id": nid, "feature": fid, "layer": str(layer), "ctx_idx": pos,
                "feature_type": "cross layer transcoder", "token_prob": 0.0, "is_target_logit": False,
                "run_idx": 0, "reverse_ctx_idx": len(prompt_tokens) - 1 - pos, "jsNodeId": f"{layer}_{fid}-0",
                "clerp": clerp,
                "influence": influence, "activation": activation}

    cands = (record.get("candidates") or record["pathways"])[prompt]
    target = node(record["layer"], record["feature_id"], clerp=f"target {record['feature']} ({record['direction']})")
    nodes = [target] + [node(c["layer"], c["feature_id"], c["activation"],
                             f"{c['feature']}: replayed Δ{c['actual_change']:+.3g}"
                             + (" (validated)" if c.get("validated") else ""), abs(c["attribution"]))
                        for c in cands]
    links = [{"source": n["node_id"], "target": target["node_id"], "weight": c["attribution"]}
             for n, c in zip(nodes[1:], cands)]
    return {
        "metadata": {"slug": f"pathflow-{run_id}-{record['feature']}-{prompt}".lower(), "scan": scan,
                     "transcoder_list": [], "prompt_tokens": prompt_tokens, "prompt": "".join(prompt_tokens),
                     "node_threshold": None, "schema_version": 1,
                     "info": {"generator": "pathflow", "run_id": run_id, "target": record["feature"],
                              "position": pos, "position_token": prompt_tokens[pos]}},
        "qParams": {"pinnedIds": [target["node_id"]], "supernodes": [], "linkType": "both",
                    "clickedId": target["node_id"], "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
