"""Step 5 as a Prefect task: integrated records, summary table and reports."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from pathflow.config import Config
from pathflow.graphs import GRAPHS_DIR, graph_path
from pathflow.integrate import decision_of, feature_record, report_md, summary_rows, to_csv
from pathflow.replay import validated_sentence
from pathflow.report import report_pages

from .common import browse_url, open_run, step

TABLE_ROWS = 50  # the UI's table stays readable; integrated/summary.csv has every row
REPORT_FEATURES = 20  # features in the markdown artifact; integrated/report.md and the report pages have all
# summary.csv's columns the table shows, each under a header that says what it is
TABLE_COLUMNS = {"feature": "feature", "direction": "direction", "prompt": "prompt",
                 "n_candidates": "candidates replayed", "n_validated": "validated",
                 "n_sign_agrees": "signs agree", "n_above_noise": "above the noise floor",
                 "n_magnitude_agrees": "within the factor", "sign_agreement": "sign agreement (share)",
                 "spearman": "Spearman, predicted vs replayed", "top_upstream": "strongest validated upstream",
                 "decision_change": "Δ logit(bet) − logit(stop) when the feature is ablated"}


def contrast_files(run) -> dict | None:
    """The contrast step's summary and alignment, for the study page (None where it did not run)."""
    from pathflow.contrast import CONTRAST_DIR

    if not run.exists(f"{CONTRAST_DIR}/alignment.json"):
        return None
    return {"summary": run.read_json(f"{CONTRAST_DIR}/summary.json"),
            "alignment": run.read_json(f"{CONTRAST_DIR}/alignment.json")}


def table_rows(rows: list[dict], limit: int) -> list[dict]:
    """Summary rows for a Prefect table artifact: the columns that fit a screen, numbers to 3 digits."""
    return [{label: round(r.get(k, ""), 3) if isinstance(r.get(k), float) else r.get(k, "")
             for k, label in TABLE_COLUMNS.items()} for r in rows[:limit]]


def table_description(run, n_rows: int) -> str:
    """The table artifact's caption: when rows were left out, where all of them are (a link where the
    store has a web page)."""
    if n_rows <= TABLE_ROWS:
        return f"pathways of run {run.run_id}"
    page = browse_url(run)
    rest = (f"[integrated/summary.csv]({page.rstrip('/')}/integrated/)" if page
            else f"`{run.url}/integrated/summary.csv`")
    return f"pathways of run {run.run_id}: the first {TABLE_ROWS} of {n_rows} rows; all of them in {rest}"


@task(name="integrate", task_run_name="integrate", cache_policy=NONE)
def integrate_features(cfg: Config, store_url: str, run_id: str, targets: list[dict], study: dict,
                       pathways: dict, tokens: dict, graphs: dict | None = None,
                       contrast: dict | None = None) -> list[dict]:
    run = open_run(store_url, run_id)
    graphs, contrast = graphs or {}, contrast or {}
    with step(run, "integrate"):
        listed = f"{GRAPHS_DIR}/graph-metadata.json"
        infos = {m["slug"]: m.get("info") or {} for m in run.read_json(listed)["graphs"]} if run.exists(listed) else {}
        records = [feature_record(t, study[t["feature"]]["values"], pathways[t["feature"]], tokens[t["feature"]],
                                  graphs.get(t["feature"], {}), contrast.get(t["feature"]),
                                  decision_of(infos, graphs.get(t["feature"], {}), cfg.decision.bet, cfg.decision.stop))
                   for t in targets]
        rows = summary_rows(records)
        run.write_json("integrated/features.json", {"run_id": run_id, "features": records})
        run.write_text("integrated/summary.csv", to_csv(rows))
        md = report_md(records, run_id)
        run.write_text("integrated/report.md", md)
        for path, page in report_pages(records, run_id, cfg.report.neuronpedia_url,
                                       lambda slug: run.read_json(graph_path(slug)),
                                       validated_sentence(cfg.replay), contrast_files(run)).items():
            run.write_text(f"integrated/{path}", page)
    create_table_artifact(key="pathflow-pathways", table=table_rows(rows, TABLE_ROWS),
                          description=table_description(run, len(rows)) + ". " + validated_sentence(cfg.replay))
    shown = md if len(records) <= REPORT_FEATURES else (
        report_md(records[:REPORT_FEATURES], run_id) + f"\n… and {len(records) - REPORT_FEATURES} more features: "
        f"`{run.url}/integrated/report.md`, and the report at `{run.url}/integrated/report.html`.\n")
    create_markdown_artifact(key="pathflow-report", markdown=shown, description=f"report of run {run_id}")
    return records
