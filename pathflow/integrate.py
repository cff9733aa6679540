"""Step 5: one record per feature joining the study, selection, pathways and tokens."""

from __future__ import annotations

import csv
import io

from .contrast import summary_columns
from .report import show_token


def decision_of(info_by_slug: dict[str, dict], graphs: dict[str, str], bet: str, stop: str) -> dict:
    """A feature's decision numbers from its graphs' metadata: the answers, and per prompt the
    baseline logit(bet) − logit(stop) and its measured change when the feature is ablated at its token."""
    per = {prompt: {"value": info_by_slug[s].get("decision_value"), "change": info_by_slug[s].get(
        "target_decision_change")} for prompt, s in graphs.items() if s in info_by_slug}
    return {"bet": bet, "stop": stop, "prompts": per}


def feature_record(selected: dict, study_values: dict, pathways: dict, tokens: dict,
                   graphs: dict[str, str] | None = None, contrast: dict | None = None,
                   decision: dict | None = None) -> dict:
    """Join steps 1–4 for one feature.

    selected: the step-1 record; study_values: the study's own numbers for the feature;
    pathways: {prompt: {"faithfulness", "candidates": [replayed records]}};
    tokens: the step-4 views of the feature; graphs: {prompt: slug} of its attribution graphs;
    contrast: its record of ``integrated/contrast/targets.json`` (None when it was not contrasted);
    decision: ``decision_of`` its graphs (the decision's baseline and the feature's measured effect on it).
    """
    validated = {prompt: [c for c in p["candidates"] if c["validated"]] for prompt, p in pathways.items()}
    return {
        "feature": selected["feature"],
        "layer": selected["layer"],
        "feature_id": selected["feature_id"],
        "direction": selected["direction"],
        "study": study_values,
        "selection": {k: selected[k] for k in ("rank_key", "rank_value", "rank")},
        "positions": {prompt: p.get("position") for prompt, p in pathways.items()},
        "faithfulness": {prompt: p["faithfulness"] for prompt, p in pathways.items()},
        "pathways": validated,
        "candidates": {prompt: p["candidates"] for prompt, p in pathways.items()},
        "tokens": tokens,
        "graphs": graphs or {},
        "contrast": contrast,
        "decision": decision or {"prompts": {}},
    }


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        for prompt, faith in r["faithfulness"].items():
            top = r["pathways"][prompt][0] if r["pathways"][prompt] else None
            rows.append({
                "feature": r["feature"], "direction": r["direction"], "prompt": prompt,
                "n_candidates": faith["n_candidates"], "n_validated": len(r["pathways"][prompt]),
                **{k: faith.get(k) for k in ("n_sign_agrees", "n_above_noise", "n_magnitude_agrees")},
                "sign_agreement": faith["sign_agreement"], "pearson": faith["pearson"],
                "spearman": faith["spearman"], "validated": faith["validated"],
                "top_upstream": top["feature"] if top else "",
                "top_attribution": top["attribution"] if top else "",
                "top_promoted_token": r["tokens"]["writes"]["promoted"][0]["token"]
                if r["tokens"].get("writes") else "",
                **_decision_columns(r, prompt),
                **summary_columns(r.get("contrast")),
            })
    return rows


def _decision_columns(r: dict, prompt: str) -> dict:
    d = (r.get("decision") or {}).get("prompts", {}).get(prompt) or {}
    return {"decision_baseline": d.get("value", ""), "decision_change": "" if d.get("change") is None
            else d["change"]}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v):
    """A cell a spreadsheet shows as text: a string starting like a formula gets a leading ``'``
    (OWASP's advice against CSV injection); numbers stay numbers."""
    if isinstance(v, str) and v.startswith(FORMULA_START):
        return "'" + v
    return v


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[csv_cell(k) for k in rows[0]])
    w.writeheader()
    w.writerows({csv_cell(k): csv_cell(v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def _fmt(x) -> str:
    return "–" if x is None else (f"{x:+.4g}" if isinstance(x, float) else str(x))


def report_md(records: list[dict], run_id: str) -> str:
    lines = [f"# pathflow run {run_id}", ""]
    for r in records:
        lines += [f"## {r['feature']} ({r['direction']})", "",
                  f"Selected by |{r['selection']['rank_key']}| = {_fmt(r['selection']['rank_value'])} "
                  f"(rank {r['selection']['rank']} in layer {r['layer']}).", ""]
        for prompt, faith in r["faithfulness"].items():
            at = r.get("positions", {}).get(prompt)
            checks = ", ".join(f"{faith[f'n_{k}']} {label}" for k, label in (
                ("sign_agrees", "signs agree"), ("above_noise", "above the noise floor"),
                ("magnitude_agrees", "within the factor"), ("validated", "validated")) if f"n_{k}" in faith)
            lines += [f"### prompt `{prompt}` at token {at}: sign agreement {_fmt(faith['sign_agreement'])}, "
                      f"Pearson {_fmt(faith['pearson'])}, Spearman {_fmt(faith['spearman'])}", "",
                      *([f"Of {faith['n_candidates']} candidates replayed: {checks}.", ""] if checks else []),
                      "| upstream | attribution | predicted Δpre | actual Δpre |", "|---|---|---|---|"]
            for c in r["pathways"][prompt][:10]:
                lines.append(f"| {c['feature']} | {_fmt(c['attribution'])} | {_fmt(c['predicted_change'])} "
                             f"| {_fmt(c['actual_change'])} |")
            lines.append("")
        w = r["tokens"].get("writes")
        if w:
            lines += ["Promotes: " + ", ".join(f"`{show_token(t['token'])}`" for t in w["promoted"][:8]),
                      "", "Suppresses: " + ", ".join(f"`{show_token(t['token'])}`" for t in w["suppressed"][:8]), ""]
    return "\n".join(lines) + "\n"
