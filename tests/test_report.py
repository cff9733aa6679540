"""Step 5's report and graph export, on a real pipeline run of the demo bundle."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


CT_VENV = UI / ".circuit-tracer-venv"


@pytest.fixture(scope="session")
def circuit_tracer() -> Path:
    """The python of a venv holding circuit-tracer 0.5.0 itself — its own venv, as it pins an older
    transformers than pathflow's; only its frontend (pydantic models, local server, static page) is
    used, so it is installed without its model dependencies."""
    py = CT_VENV / "bin" / "python"
    check = [str(py), "-c", "import circuit_tracer.frontend.graph_models, circuit_tracer.frontend.local_server"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    steps = [[sys.executable, "-m", "venv", "--clear", str(CT_VENV)],
             [str(py), "-m", "pip", "install", "-q", "--no-deps", "circuit-tracer==0.5.0"],
             [str(py), "-m", "pip", "install", "-q", "pydantic>=2"], check]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode:
            (pytest.fail if os.environ.get("CI") else pytest.skip)(f"cannot install circuit-tracer: {r.stderr[-500:]}")
    return py


def _graph_files(run_dir) -> list[Path]:
    return sorted(p for p in (run_dir / "integrated/graphs").glob("*.json") if p.name != "graph-metadata.json")


def test_graphs_are_circuit_tracers_format(run_dir, circuit_tracer):
    """Every graph passes circuit-tracer's own pydantic Model and add_graph_metadata's layout; ids,
    pairing, signs, influence and the outputs are as its frontend reads them."""
    graphs = _graph_files(run_dir)
    assert graphs
    script = (
        "import json, sys\n"
        "from circuit_tracer.frontend.graph_models import Model, Node\n"
        "out = []\n"
        "for path in sys.argv[1:]:\n"
        "    m = Model.model_validate_json(open(path).read())\n"
        "    t = Node.feature_node(3, 7, 142)\n"  # (layer, position, feature id)
        "    out.append({'slug': m.metadata.slug, 'n': len(m.nodes), 'pair': t.feature, 'pair_id': t.node_id})\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([str(circuit_tracer), "-c", script, *map(str, graphs)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    checked = json.loads(r.stdout)
    assert [c["slug"] for c in checked] == [p.stem for p in graphs]
    from pathflow.graphs import cantor

    assert checked[0]["pair"] == cantor(3, 142) and checked[0]["pair_id"] == "3_142_7"  # pairs as circuit-tracer does
    meta = json.loads((run_dir / "integrated/graphs/graph-metadata.json").read_text())["graphs"]
    assert sorted(m["slug"] for m in meta) == [p.stem for p in graphs]
    feats = {r["feature"]: r for r in _records(run_dir)}
    for path in graphs:
        g = json.loads(path.read_text())
        md, nodes, links = g["metadata"], g["nodes"], g["links"]
        assert md in meta and md["node_threshold"] == 0.8 and not md["prompt"].startswith("<|begin_of_text|>")
        assert md["scan"] and md["prompt_tokens"][0] == "<|begin_of_text|>"
        ids = {n["node_id"] for n in nodes}
        assert len(ids) == len(nodes) and all(x["source"] in ids and x["target"] in ids for x in links)
        emb = [n for n in nodes if n["feature_type"] == "embedding"]
        assert [n["ctx_idx"] for n in emb] == list(range(len(md["prompt_tokens"])))  # the token axis
        (logit,) = [n for n in nodes if n["feature_type"] == "logit"]
        assert logit["is_target_logit"] and logit["ctx_idx"] == len(md["prompt_tokens"]) - 1
        assert "(p=" in logit["clerp"] and '"1" − "2"' in logit["clerp"]
        target = md["info"]["target"]
        rec = feats[target]
        (t,) = [n for n in nodes if n["node_id"] == f"{rec['layer']}_{rec['feature_id']}_{md['info']['position']}"]
        assert t["feature"] == cantor(rec["layer"], rec["feature_id"]) and t["node_id"] in g["qParams"]["pinnedIds"]
        assert rec["graphs"][md["info"]["prompt_name"]] == md["slug"]
        # the prompt opens with a special token and graphs.zero_bos is on: nothing but its embedding is a node there
        assert all(n["ctx_idx"] > 0 for n in nodes if n["feature_type"] in ("cross layer transcoder",
                                                                             "mlp reconstruction error"))
        for n in nodes:
            if n["feature_type"] == "cross layer transcoder":
                layer, fid, pos = map(int, n["node_id"].split("_"))
                assert n["feature"] == cantor(layer, fid) and n["ctx_idx"] == pos and n["layer"] == str(layer)
            elif n["feature_type"] == "mlp reconstruction error":
                assert n["node_id"].startswith("0_") and n["feature"] == -1
        # influence: the cumulative fraction, in (0, 1], kept ones at or under the threshold
        infl = [n["influence"] for n in nodes if n["feature_type"] in ("cross layer transcoder",
                                                                     "mlp reconstruction error") and n is not t]
        assert infl and all(0 < v <= 1 for v in infl)
        assert all(x["attribution"] == -x["weight"] for x in links)  # pathflow's ablation sign kept beside
        assert any(x["target"] not in (t["node_id"], logit["node_id"]) for x in links)  # not a star
        upstream = [n for n in nodes if n["feature_type"] == "cross layer transcoder" and n is not t]
        assert upstream and all("replayed_change" in n and "validated" in n for n in upstream)  # replay judged
        assert md["info"]["replay"]["n_replayed"] > 0


def test_feature_files_are_circuit_tracers_format(run_dir, circuit_tracer):
    """Every feature a graph shows has circuit-tracer's feature file (its own pydantic ``feature_models.Model``
    accepts each): the prompt's example puts the graph's activation at the node's token, a study feature's
    contexts and logits are step 4's, and the histogram counts what the examples show."""
    feats = {r["feature"]: r for r in _records(run_dir)}
    assoc = json.loads((run_dir / "tokens/token_associations.json").read_text())["features"]
    files, shown = set(), 0
    for path in _graph_files(run_dir):
        g = json.loads(path.read_text())
        prompt = g["metadata"]["info"]["prompt_name"]
        for n in g["nodes"]:
            if n["feature_type"] != "cross layer transcoder":
                continue
            f = run_dir / f"integrated/graphs/features/{n['feature']}.json"
            files.add(str(f))
            doc = json.loads(f.read_text())
            (ex,) = [q for q in doc["examples_quantiles"] if q["quantile_name"].endswith(f"“{prompt}”")]
            ex = ex["examples"][0]
            assert ex["tokens"] == g["metadata"]["prompt_tokens"]
            assert ex["tokens_acts_list"][n["ctx_idx"]] == pytest.approx(n["activation"], rel=1e-6)
            assert doc["index"] == n["feature"] and doc["act_max"] >= max(ex["tokens_acts_list"])
            assert doc["top_logits"] and doc["bottom_logits"] and len(doc["histogram"]) == 24
            name = n["pathflow_feature"]
            if name in assoc:
                shown += 1
                reads = doc["examples_quantiles"][0]["examples"]
                assert [[t["token"] for t in m["tokens"]] for m in assoc[name]["reads"]] == [e["tokens"] for e in reads]
                assert doc["top_logits"] == [t["token"] for t in assoc[name]["writes"]["promoted"]]
                assert doc["histogram"] == assoc[name]["histogram"]["counts"]
                assert name in feats
    assert shown and len(files) > shown  # study features and upstream ones
    script = ("import sys\nfrom circuit_tracer.frontend.feature_models import Model\n"
              "for p in sys.argv[1:]: Model.model_validate_json(open(p).read())\nprint('ok')")
    r = subprocess.run([str(circuit_tracer), "-c", script, *sorted(files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_viewer_ships_circuit_tracers_page_and_npm_builds(circuit_tracer):
    """The page `pathflow graphs` serves is circuit-tracer 0.5.0's, file for file, and the vendored
    scripts are npm's builds (tests/ui/vendor_viewer.mjs), each with its licence."""
    from pathflow.viewer import OUTSIDE, PAGE, VENDOR

    (assets,) = CT_VENV.glob("lib/python*/site-packages/circuit_tracer/frontend/assets")
    theirs = {p.relative_to(assets): p.read_bytes() for p in assets.rglob("*") if p.is_file()}
    ours = {p.relative_to(PAGE): p.read_bytes() for p in PAGE.rglob("*") if p.is_file()}
    assert ours == theirs
    require(str(UI / "node_modules" / "d3"))
    mods = UI / "node_modules"
    for name, npm in [("d3.min.js", "d3/dist/d3.min.js"), ("dagre.min.js", "dagre/dist/dagre.min.js"),
                      ("pako.min.js", "pako/dist/pako.min.js")]:
        assert (VENDOR / name).read_bytes() == (mods / npm).read_bytes(), name
    assert (mods / "d3-jetpack/build/d3-jetpack.cjs").read_text() in (VENDOR / "jetpack.js").read_text()
    assert set(OUTSIDE.values()) - {""} <= {p.name for p in VENDOR.iterdir()}
    versions = json.loads((VENDOR / "versions.json").read_text())
    assert {p.name for p in (VENDOR / "licenses").iterdir()} == {f"{k}-{v}.txt" for k, v in versions.items()}


def test_graphs_in_circuit_tracers_frontend(run_dir, circuit_tracer, tmp_path):
    """circuit-tracer's own page, served by its own local_server, shows a run's graph in Chromium:
    no page errors beyond the offline feature-example fetch, the prompt's tokens on the token
    axis, the clicked target labelled with its layer and id, and each input coloured by its sign."""
    require("/usr/bin/chromium", "node", str(UI / "node_modules" / "playwright-core"), str(UI / "node_modules" / "d3"))
    from .conftest import free_port

    (path,) = [p for p in _graph_files(run_dir) if p.stem.startswith("risky-")][:1] or [_graph_files(run_dir)[0]]
    g = json.loads(path.read_text())
    md = g["metadata"]
    target = g["qParams"]["pinnedIds"][0]
    port = free_port()
    server = subprocess.Popen([str(circuit_tracer), "-c", "import sys, time\n"
                               "from circuit_tracer.frontend.local_server import serve\n"
                               "serve(data_dir=sys.argv[1], port=int(sys.argv[2]))\ntime.sleep(600)",
                               str(run_dir / "integrated/graphs"), str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        import time
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://localhost:{port}/data/graph-metadata.json", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        shot = tmp_path / "graph.png"
        out = subprocess.run(["node", str(UI / "circuit_tracer_graph.mjs"), f"http://localhost:{port}", md["slug"],
                              target, str(shot)], capture_output=True, text=True, timeout=180)
    finally:
        server.terminate()
        server.wait(10)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    keep = ROOT / "test-output" / "graphs"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "circuit-tracer-frontend.png")
    assert "error" not in seen, seen
    # the only failures: the feature examples, fetched from the SAE's hub folder (offline here)
    assert all("/features/" in u for u in seen["refused"]), seen["refused"]
    assert all(e == "TypeError: Failed to fetch" for e in seen["page_errors"]), seen["page_errors"]
    assert all("Failed to fetch" in e or "Failed to load resource" in e for e in seen["console_errors"])
    shown = [t.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵").strip() for t in md["prompt_tokens"]]
    assert seen["tokens"] == shown
    layer, fid, _ = target.split("_")
    assert seen["feature_title"] and seen["feature_title"][0].startswith(f"Feature\xa0L{layer}/{fid} ")
    assert seen["selected"].startswith(md["title_prefix"])
    for r in seen["connections"]:
        r["weight"] = float(r["weight"].replace("−", "-"))  # d3.format writes a real minus sign
    rows = [r for r in seen["connections"] if abs(r["weight"]) >= 0.005]
    assert rows

    def rgb(css):
        return [int(x) for x in css[css.index("(") + 1:css.index(")")].split(",")[:3]]

    for r in rows:  # d3's PRGn: green raises, purple lowers
        red, green, _ = rgb(r["background"])
        assert (green > red) == (r["weight"] > 0), r
    inputs = {x["source"]: x["weight"] for x in g["links"] if x["target"] == target}
    assert {round(w, 3) for w in inputs.values() if abs(w) >= 0.005} >= {r["weight"] for r in rows
                                                                          if "Output" not in r["label"]}
    assert {r["weight"] > 0 for r in rows} == {True, False}  # both colours were looked at


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
    # the whole-prompt graphs, one per prompt with a graph: the prompt's tokens across, layers up to the decision
    assert sorted(g["slug"] for g in seen["graphs"]) == sorted(r["graphs"].values()) and seen["graphs"]
    for g in seen["graphs"]:
        doc = json.loads((run_dir / f"integrated/graphs/{g['slug']}.json").read_text())
        assert g["edges"] and {k for k in g["kinds"]} >= {"target", "decision", "embedding", "feature"}
        assert g["rows"][0] == "emb" and g["rows"][-1] == "decision" and "L0" in g["rows"]
        shown = [show_token(t)[:14] for t in doc["metadata"]["prompt_tokens"]]
        assert g["tokens"] and all(t in shown for t in g["tokens"])
        for colour, title in g["edges"]:
            weight = float(title.rsplit(": ", 1)[1])
            assert colour == (RAISES if weight >= 0 else LOWERS), title
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
             "n_candidates": 25, "n_sign_agrees": 20, "n_above_noise": 12, "n_magnitude_agrees": 5,
             "sign_agreement": 0.9990456001341972, "spearman": -0.123456, "top_upstream": "L0-5",
             "pearson": 0.5, "validated": True} for i in range(3072)]
    shown = table_rows(rows, TABLE_ROWS)
    assert len(shown) == 50 and all(list(r) == list(TABLE_COLUMNS.values()) for r in shown)
    assert shown[0]["sign agreement (share)"] == 0.999 and shown[0]["Spearman, predicted vs replayed"] == -0.123
    assert shown[0]["Δ logit(bet) − logit(stop) when the feature is ablated"] == ""  # not graphed: said, not 0
    run = Store(str(tmp_path / "store")).run("20261201-000000-abcdef")
    text = table_description(run, len(rows))
    assert "the first 50 of 3072 rows" in text and f"{run.url}/integrated/summary.csv" in text
    assert table_description(run, 40) == f"pathways of run {run.run_id}"


def test_pathflow_graphs_serves_a_run(run_dir, circuit_tracer, tmp_path):
    """`pathflow graphs RUN` serves the run's graphs in circuit-tracer's page, offline: a browser that may
    reach nothing but the server shows the graph and the clicked node's feature panel (its logits and
    the prompt's example, from pathflow's files); a run without graphs, or no page to serve them with, is
    a one-line error."""
    require("/usr/bin/chromium", "node", str(UI / "node_modules" / "playwright-core"))
    (assets,) = CT_VENV.glob("lib/python*/site-packages/circuit_tracer/frontend/assets")
    store, run_id = run_dir.parent.parent, run_dir.name
    proc = subprocess.Popen([sys.executable, "-m", "pathflow", "graphs", run_id, "--store", str(store), "--port", "0",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env())
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                break
        listed = json.loads("".join(lines))
        slugs = sorted(p.stem for p in _graph_files(run_dir))
        assert sorted(g["slug"] for g in listed["graphs"]) == slugs
        g = json.loads((run_dir / f"integrated/graphs/{slugs[0]}.json").read_text())
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError):  # nothing outside the graphs folder
            urllib.request.urlopen(f"{listed['url']}/data/..%2Fmanifest.json", timeout=5)
        out = subprocess.run(["node", str(UI / "circuit_tracer_graph.mjs"), listed["url"], slugs[0],
                              g["qParams"]["pinnedIds"][0], str(tmp_path / "served.png"), "offline"],
                             capture_output=True, text=True, timeout=180)
    finally:
        proc.terminate()
        proc.wait(10)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "error" not in seen and seen["tokens"] and seen["feature_title"], seen
    assert seen["refused"] == [] and seen["page_errors"] == [], seen  # nothing outside was asked for
    prompt = g["metadata"]["info"]["prompt_name"]
    assert any(q.startswith(f"Every token of the prompt “{prompt}”") for q in seen["quantiles"]), seen["quantiles"]
    assert seen["logits"] and seen["logits"][0].startswith("Top") and seen["examples"], seen
    # errors a person can act on
    empty = tmp_path / "empty-store"
    shutil.copytree(run_dir, empty / "runs" / run_id, ignore=shutil.ignore_patterns("graphs"))
    r = subprocess.run([sys.executable, "-m", "pathflow", "graphs", run_id, "--store", str(empty), "--frontend",
                        str(assets)], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 2 and "has no attribution graphs" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "pathflow", "graphs", run_id, "--store", str(store), "--frontend",
                        str(tmp_path)], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 2 and "has no index.html" in r.stderr


def test_graphs_zarr_is_sparse_and_its_last_position_is_jacobians_zarr(run_dir):
    """graphs.zarr keeps every position's weights over the active entries only, labelled; at the
    target's position they are jacobians.zarr's attributions (both stored at keepbits 7)."""
    import numpy as np
    import xarray as xr
    import zarr

    from storage.arrays import attribution, node_attribution, open_jacobians

    jac = open_jacobians(str(run_dir / "jacobians.zarr"), mode="r")
    root = zarr.open_group(str(run_dir / "graphs.zarr"), mode="r")
    targets = list(jac.attrs["targets"])
    checked = 0
    for prompt in jac.attrs["prompts"]:
        g = root[prompt]
        p = g.attrs["position"]
        assert p == jac.attrs["positions"][prompt]
        n, m = g.attrs["n_tokens"], g["node_layer"].shape[0]
        d_sae = jac["grad"].shape[-1]
        assert m < 0.2 * n * len(set(g["node_layer"][:])) * d_sae  # sparse: the active entries only
        ds = xr.open_zarr(str(run_dir / "graphs.zarr"), group=prompt, consolidated=False)
        assert ds["weight"].dims == ("target", "node") and list(ds["target"].values) == list(g.attrs["targets"])
        for name in g.attrs["targets"]:
            row = targets.index(name)
            layer = int(name.split("-")[0][1:])
            want = attribution(jac, [row])[0, list(jac.attrs["prompts"]).index(prompt)]
            for up in range(layer):
                got = node_attribution(g, name, up, p)
                for f, a in got.items():
                    assert a == pytest.approx(float(want[up, f]), rel=2e-2, abs=1e-6)
                    checked += 1
            # nothing at or above the target's layer, nothing after its position
            sel = g["node_layer"][:] >= layer
            assert np.all(g["weight"][list(g.attrs["targets"]).index(name)][sel] == 0)
    assert checked > 20


def test_whole_prompt_graph_in_headless_chromium(run_dir, tmp_path):
    """A feature page's whole-prompt graph at 1,400 px: it fits (no sideways scroll, the target and the
    decision in view, layer labels on screen); the pruning control shows exactly the N strongest links and
    only their nodes; hovering a node shows its label; clicking one shows its numbers and lights exactly its
    links, which can be followed; the background clears it. The pathways are listed in words and the
    decision section explains the numbers, with the feature's measured effect on each prompt."""
    require("/usr/bin/chromium", "node", str(UI / "node_modules" / "playwright-core"))
    rec = max((r for r in _records(run_dir) if r["graphs"]), key=lambda r: r["layer"])  # deep: multi-hop chains
    prompt, slug = next(iter(rec["graphs"].items()))
    g = json.loads((run_dir / f"integrated/graphs/{slug}.json").read_text())
    shots = tmp_path / "shots"
    shots.mkdir()
    page = run_dir / f"integrated/features/{rec['feature']}.html"
    out = subprocess.run(["node", str(UI / "graph_page.mjs"), str(page), str(shots)], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    keep = ROOT / "test-output" / "report"
    keep.mkdir(parents=True, exist_ok=True)
    for shot in shots.iterdir():
        shutil.copy(shot, keep / shot.name)
    assert "error" not in seen and seen["errors"] == [] and seen["requests"] == [], seen
    assert seen["page"]["scroll_width"] <= seen["page"]["inner"]  # no sideways scroll
    outputs = {o["label"]: o for o in seen["outputs"]}
    assert {rec["feature"], "decision"} <= set(outputs) and all(o["right"] <= 1400 for o in seen["outputs"])
    assert {"emb", "L0"} <= {x["label"] for x in seen["layers"]} and all(x["left"] >= 0 for x in seen["layers"])
    links = sorted(g["links"], key=lambda x: -abs(x["weight"]))[:400]
    assert seen["slider"]["max"] == len(links) == seen["shown_at_max"]
    assert seen["shown_at_load"] == seen["slider"]["value"] == min(80, len(links))
    assert seen["shown_at_min"] == seen["slider"]["min"] == int(seen["output_at_min"])
    ends = {e for x in links[: seen["slider"]["min"]] for e in (x["source"], x["target"])}
    assert set(seen["ends_at_min"]) == ends
    assert set(seen["nodes_at_min"]) == ends | set(g["qParams"]["pinnedIds"][:2])
    nodes = {n["node_id"]: n for n in g["nodes"]}
    hovered = nodes[seen["hover"]["id"]]
    assert not seen["hover"]["tip_hidden"] and seen["hover"]["tip"] == seen["hover"]["label"]
    assert seen["hover"]["label"].startswith(hovered["pathflow_feature"] + " at “")
    click = seen["click"]
    assert not click["panel_hidden"] and click["title"] == seen["hover"]["label"] and "activation" in click["numbers"]
    mine = {(x["source"], x["target"]) for x in links if click["id"] in (x["source"], x["target"])}
    assert {tuple(e) for e in click["lit"]} == mine and mine
    if click["links"]:
        assert seen["followed"].split(" at ")[0] in ("embedding", nodes[click["links"][0]].get("pathflow_feature"),
                                                     f"L{nodes[click['links'][0]]['layer']} SAE error")
    assert seen["cleared"]
    assert seen["chains"] and all("strength" in c and rec["feature"] in c for c in seen["chains"])
    rows = {r[0]: r for r in seen["decision"][1:]}
    assert set(rows) == set(rec["graphs"]) and 'logit("1") − logit("2")' in seen["decision_words"]
    want = g["metadata"]["info"]["target_decision_change"]
    assert float(rows[prompt][3]) == pytest.approx(want, rel=1e-2, abs=1e-3)
    assert rows[prompt][4] == ("pushes towards betting" if want < 0 else "pushes towards stopping")


def test_study_page_in_headless_chromium(run_dir, tmp_path):
    """The study page ("What drives the risky features") worked in Chromium: direction tabs, a span clicked
    in the prompt text and found in the table, the heat map's cells, a feature's contrast section through
    a link; self-contained (no network request) and nothing logged. Screenshots in test-output/report/."""
    require("/usr/bin/chromium", "node", str(UI / "node_modules" / "playwright-core"))
    summary = json.loads((run_dir / "integrated/contrast/summary.json").read_text())
    shots = tmp_path / "shots"
    shots.mkdir()
    out = subprocess.run(["node", str(UI / "study_page.mjs"), str(run_dir / "integrated" / "study.html"), str(shots)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    keep = ROOT / "test-output" / "report"
    keep.mkdir(parents=True, exist_ok=True)
    for png in shots.glob("*.png"):
        shutil.copy(png, keep / png.name)
    assert "error" not in seen, seen
    assert seen["errors"] == [] and seen["requests"] == []
    a, b = summary["prompts"]
    assert seen["h1"] == f"What drives the {a} features"
    dirs = summary["directions"]
    assert sorted(seen["tabs"]) == sorted(dirs) and seen["tabs"][0] == a  # the page's own direction first
    config = json.loads((run_dir / "manifest.json").read_text())["config"]
    texts = json.loads((Path(config["study"]["prompts"])).read_text())
    for d, s in seen["sections"].items():
        out_d = dirs[d]
        assert s["shown"] == [d] and s["pressed"] == "true"
        # each prompt's text, whole, as its spans
        assert {p: t.replace("↵", "").removeprefix("<|begin_of_text|>") for p, t in s["spans_text"]} == \
            {a: texts[a], b: texts[b]}
        assert s["coloured"] > 0
        heat = out_d["heatmap"]
        assert s["cells"] == len(heat["layers"]) * len(heat["spans"])
        assert s["span_rows"][0] == out_d["spans"][0]["name"]
        assert s["feeds"][0] == out_d["feeds_most"][0]["feature"]
        picked = {(tag, span) for tag, span in s["picked"]}
        assert ("TR", s["first_span"]) in picked and ("SPAN", s["first_span"]) in picked
    assert seen["contrast_h2"].startswith(f"{a} vs {b}")
    assert seen["feature_spans"] == [a, b] and seen["patch_tables"] == [f"{b}_with_{a}", f"{a}_with_{b}"]
