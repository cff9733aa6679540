"""Step 5's report and graph export, on a real pipeline run of the demo bundle."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from .conftest import clean_env, require

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "tests" / "ui"


@pytest.fixture(scope="module")
def run_dir(demo_dir, prefect_api, tmp_path_factory):
    store = tmp_path_factory.mktemp("report-store")
    r = subprocess.run([sys.executable, "-m", "pathflow", "run", "-c", str(demo_dir / "config.yaml"), "--store",
                        str(store)], env=clean_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (d,) = (store / "runs").iterdir()
    return d


# The attribution-graphs frontend's JSON, restated from circuit-tracer's pydantic models.
class Metadata(BaseModel):
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = 1


class QParams(BaseModel):
    pinnedIds: list[str]
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


class Node(BaseModel):
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    jsNodeId: str
    activation: float | None = None


class Link(BaseModel):
    source: str
    target: str
    weight: float


def test_graph_export_matches_the_viewer_format(run_dir):
    feats = json.loads((run_dir / "integrated/features.json").read_text())["features"]
    for r in feats:
        for prompt, cands in r["candidates"].items():
            g = json.loads((run_dir / f"integrated/graphs/{r['feature']}_{prompt}.json").read_text())
            Metadata(**g["metadata"])
            QParams(**g["qParams"])
            nodes = [Node(**n) for n in g["nodes"]]
            links = [Link(**link) for link in g["links"]]
            ids = {n.node_id for n in nodes}
            assert len(ids) == len(nodes) and all(link.source in ids and link.target in ids for link in links)
            target = f"{r['layer']}_{r['feature_id']}_{len(g['metadata']['prompt_tokens']) - 1}"
            assert {link.target for link in links} == {target}
            assert [link.weight for link in links] == [c["attribution"] for c in cands]


def _records(run_dir):
    return json.loads((run_dir / "integrated/features.json").read_text())["features"]


def test_report_pages_in_headless_chromium(run_dir, tmp_path):
    """The index and a feature's page, driven as a person would (sort, filter, follow a link, hover
    titles, the validated-only switch). Screenshots are kept in test-output/report/."""
    require("/usr/bin/chromium", "node", str(UI / "node_modules" / "playwright-core"))
    from pathflow.report import LOWERS, RAISES, show_token

    records = _records(run_dir)
    shots = tmp_path / "shots"
    shots.mkdir()
    out = subprocess.run(["node", str(UI / "report_pages.mjs"), str(run_dir / "integrated" / "report.html"),
                          str(shots)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    keep = ROOT / "test-output" / "report"  # for a person to look at
    keep.mkdir(parents=True, exist_ok=True)
    for png in shots.glob("*.png"):
        shutil.copy(png, keep / png.name)
    assert "error" not in seen, seen
    assert seen["errors"] == [] and seen["requests"] == []  # self-contained, and nothing logged
    # the index: every feature, sortable, filterable
    assert sorted(seen["features"]) == sorted(r["feature"] for r in records)
    assert seen["layers_desc"] == sorted(seen["layers_desc"], reverse=True) != sorted(seen["layers_desc"])
    assert seen["layers_asc"] == sorted(seen["layers_asc"])
    first = seen["features"][0]
    assert seen["filtered"] == [first] and seen["shown"] == f"1 of {len(records)} shown"
    assert seen["risky"] == ["risky"] * sum(r["direction"] == "risky" for r in records)
    assert len(seen["scatter_ticks"]) >= 4 and all(float(t) == float(t) for t in seen["scatter_ticks"])
    n_points = sum(len(c) for r in records for c in r["candidates"].values())
    assert len(seen["scatter_titles"]) == n_points and all("predicted" in t for t in seen["scatter_titles"])
    # the feature's page
    (r,) = [r for r in records if r["feature"] == first]
    assert seen["feature_url"].endswith(f"/integrated/features/{first}.html") and first in seen["feature_h1"]
    assert seen["pathways"] == [first] * len(r["candidates"])
    legend = " ".join(seen["legend"])
    for words in ("raises the target", "lowers the target", "validated by replay", "not validated", "sign agrees"):
        assert words in legend, words
    want = {(c["feature"], RAISES if -c["attribution"] >= 0 else LOWERS) for cs in r["candidates"].values()
            for c in cs}
    assert {(title.split(" → ")[0], colour) for colour, title in seen["edge_colours"]} == want
    unvalidated = sum(not c["validated"] for cs in r["candidates"].values() for c in cs)
    assert seen["hidden_after_switch"] == unvalidated
    # top activations: every token coloured by its activation, the strongest the darkest
    spans = seen["token_backgrounds"]
    assert spans, "no coloured contexts"

    def alpha(css):
        return 0.0 if css in ("transparent", "rgba(0, 0, 0, 0)") else float(css.rsplit(",", 1)[1].rstrip(")"))

    values = [float(t) for _, _, t in spans]
    assert all((alpha(bg) > 0) == (v > 0) for (_, bg, _), v in zip(spans, values))
    assert alpha(spans[values.index(max(values))][1]) == max(alpha(bg) for _, bg, _ in spans)
    hist = r["tokens"]["histogram"]
    assert len(seen["histogram_bars"]) == len(hist["counts"])
    assert sum(int(t.rsplit(": ", 1)[1].split()[0]) for t in seen["histogram_bars"]) == hist["n_active"]
    assert seen["histogram_ticks"]
    # tokens as text, not Python reprs
    for t in r["tokens"]["writes"]["promoted"] + r["tokens"]["writes"]["suppressed"]:
        assert show_token(t["token"]) in seen["chips"]
    assert not [c for c in seen["chips"] if len(c) > 1 and c[0] == c[-1] and c[0] in "'\""]
    for key in r["tokens"]["changes"]:
        a, _, b = key.partition("_vs_")
        assert f"{a} vs {b}" in seen["contrast_headers"]
        assert f"more under {a} than {b}" in seen["contrast_headers"]
    assert "z: the log-odds z-score" in seen["body"] and "p < 0.05" in seen["body"]
    assert seen["neuronpedia"] == []  # off for the demo
    assert seen["back_to"].endswith("/integrated/report.html")


def test_pathway_edges_are_direct_and_coloured_by_effect():
    from pathflow.report import LOWERS, RAISES, pathway_view

    def cand(name, layer, attribution):
        return {"feature": name, "layer": layer, "attribution": attribution, "predicted_change": attribution,
                "actual_change": attribution, "validated": True}

    cands = [cand("L0-1", 0, -0.5), cand("L1-2", 1, 0.25), cand("L0-3", 0, 0.1), cand("L2-4", 2, -0.05)]
    v = pathway_view("L3-9", 3, cands)
    ys = [n["y"] for n in v["nodes"]]
    assert len(set(ys)) == len(ys)  # one row per upstream feature
    for e, n in zip(v["edges"], v["nodes"]):
        move, rest = e["d"][1:].split(" H")
        assert move == f"{n['x']},{n['y']}"  # starts at its own node and runs along its own row...
        join = float(rest.split(" C")[0])
        assert join > max(m["x"] for m in v["nodes"])  # ...past every node before it turns to the target
        assert e["colour"] == {"L0-1": RAISES, "L1-2": LOWERS, "L0-3": LOWERS, "L2-4": RAISES}[n["label"]]
    # widths follow |effect|
    width = {n["label"]: e["width"] for e, n in zip(v["edges"], v["nodes"])}
    assert width["L0-1"] > width["L1-2"] > width["L0-3"] > width["L2-4"]


def test_neuronpedia_link_template(tmp_path):
    from pathflow.config import ConfigError, load_config
    from pathflow.report import feature_url

    cfg = load_config(None)
    assert feature_url(cfg.report.neuronpedia_url, {"layer": 15, "feature_id": 1234}) == \
        "https://www.neuronpedia.org/llama3.1-8b/15-llamascope-res-32k/1234"
    for bad, why in (("ftp://x/{layer}", "http(s)"), ("https://x/{layer}/{feature}", "placeholder {feature}"),
                     ("https://x/{layer", "not a valid URL template")):
        p = tmp_path / "c.yaml"
        p.write_text(f"report: {{neuronpedia_url: '{bad}'}}\n")
        with pytest.raises(ConfigError, match=re.escape(why)):
            load_config(p)
    p.write_text("report: {neuronpedia_url: null}\n")
    assert load_config(p).report.neuronpedia_url is None
    # the link is on the page where a template is set
    from pathflow.report import feature_page

    rec = {"feature": "L2-7", "layer": 2, "feature_id": 7, "direction": "risky", "selection":
           {"rank_key": "cohen_d", "rank_value": 1.5, "rank": 1}, "faithfulness": {}, "pathways": {},
           "candidates": {}, "tokens": {}, "study": {}}
    page = feature_page(rec, "r1", "https://np.example/{layer}/{feature_id}")
    assert 'href="https://np.example/2/7"' in page
    assert "np.example" not in feature_page(rec, "r1", None)


def test_index_at_study_size_in_headless_chromium(run_dir, tmp_path):
    """1,536 features (the demo run's records repeated under new names): the index stays under 2 MB,
    loads whole in Chromium and sorts; the load time is printed (timings are benchmarks' business)."""
    require("/usr/bin/chromium", "node", str(UI / "node_modules" / "playwright-core"))
    import copy
    import random

    from pathflow.report import index_page

    base, rng, records = _records(run_dir), random.Random(0), []
    for i in range(1536):
        r = copy.deepcopy(base[i % len(base)])
        r["layer"], r["feature_id"] = 1 + i // 512, i % 512
        r["feature"] = f"L{r['layer']}-{r['feature_id']}"
        r["direction"] = rng.choice(["safe", "risky"])
        for cands in r["candidates"].values():
            for c in cands:
                c["predicted_change"] *= rng.uniform(0.5, 1.5)
        records.append(r)
    html = index_page(records, "20261201-000000-abcdef")
    page = tmp_path / "report.html"
    page.write_text(html)
    assert len(html.encode()) <= 2 * 2**20, len(html.encode())
    out = subprocess.run(["node", str(UI / "report_pages.mjs"), str(page), str(tmp_path), "index-only"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "error" not in seen and seen["errors"] == [], seen
    assert len(seen["features"]) == 1536
    assert seen["layers_desc"] == sorted(seen["layers_desc"], reverse=True)
    assert seen["shown"] == f"{sum(r['direction'] == 'risky' for r in records)} of 1536 shown"
    print(f"index of 1,536 features: {len(html.encode()) / 2**20:.2f} MiB, loaded in {seen['index_load_ms']} ms, "
          f"sorted in {seen['sort_ms']} ms")


def test_prefect_table_at_study_size_is_readable(tmp_path):
    """3,072 summary rows: the table artifact shows the first 50, numbers to 3 digits, and says where
    every row is (a link where the store has a web page)."""
    from storage.store import Store
    from tasks.integrate import TABLE_COLUMNS, TABLE_ROWS, table_description, table_rows

    rows = [{"feature": f"L{1 + i // 1024}-{i % 1024}", "direction": "risky", "prompt": "safe", "n_validated": 3,
             "n_candidates": 25, "sign_agreement": 0.9990456001341972, "spearman": -0.123456, "top_upstream": "L0-5",
             "pearson": 0.5, "validated": True} for i in range(3072)]
    shown = table_rows(rows, TABLE_ROWS)
    assert len(shown) == 50 and all(list(r) == list(TABLE_COLUMNS) for r in shown)
    assert shown[0]["sign_agreement"] == 0.999 and shown[0]["spearman"] == -0.123
    run = Store(str(tmp_path / "store")).run("20261201-000000-abcdef")
    text = table_description(run, len(rows))
    assert "the first 50 of 3072 rows" in text and f"{run.url}/integrated/summary.csv" in text
    assert table_description(run, 40) == f"pathways of run {run.run_id}"
