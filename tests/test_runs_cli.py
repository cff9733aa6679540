"""`--json` outputs that parse, `runs diff` comparing results rather than bookkeeping, and `runs rm`
for failed runs only."""

import json

import pytest

from .runs import pathflow, write_cfg


@pytest.fixture(scope="module")
def store(demo_cfg, tmp_path_factory, prefect_api):
    """Two complete runs of the same study and config, and one failed run, in one store."""
    tmp = tmp_path_factory.mktemp("runs-cli")
    cfg = write_cfg(demo_cfg, tmp)
    store = tmp / "store"
    for env in ({}, {}, {"PATHFLOW_FAIL_BATCH": "L2-batch0"}):
        r = pathflow(["run", "-c", str(cfg), "--store", str(store)], PREFECT_API_URL=prefect_api, **env)
        assert r.returncode == (1 if env else 0), r.stderr
    runs = {json.loads((d / "manifest.json").read_text())["status"]: [] for d in (store / "runs").iterdir()}
    for d in sorted((store / "runs").iterdir()):
        runs[json.loads((d / "manifest.json").read_text())["status"]].append(d.name)
    return store, runs


def js(args, code=0):
    r = pathflow([*args, "--json"])
    assert r.returncode == code, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_json_outputs_parse(store, demo_dir):
    s, runs = store
    listed = js(["runs", "list", "--store", str(s)])
    assert {r["run_id"]: r["status"] for r in listed["runs"]} == {
        **{rid: "complete" for rid in runs["complete"]}, **{rid: "failed" for rid in runs["failed"]}}
    shown = js(["runs", "show", runs["complete"][0], "--store", str(s)])
    assert shown["status"] == "complete" and shown["outputs"]
    audit = js(["audit", "-c", str(demo_dir / "config.yaml")])
    assert audit["validated"] and audit["counts"]["causal_total"] == 9
    sel = js(["select", "-c", str(demo_dir / "config.yaml"), "--top", "1"])
    assert sel["n_selected"] == len(sel["features"]) and all(f["rank"] == 1 for f in sel["features"])


def test_diff_compares_results_not_bookkeeping(store, tmp_path):
    s, runs = store
    a, b = runs["complete"]
    same = js(["runs", "diff", a, b, "--store", str(s)])
    assert same["same_results"] and same["config"] == {} and same["results"]["compared"] > 20
    # a changed result is found and located, in a copy of the store (complete runs are never changed)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(s, copy)
    feats = copy / "runs" / b / "integrated/features.json"
    body = json.loads(feats.read_text())
    body["features"][0]["candidates"]["safe"][0]["actual_change"] += 1.0
    feats.write_text(json.dumps(body))
    diff = js(["runs", "diff", a, b, "--store", str(copy)], code=1)
    assert not diff["same_results"]
    (d,) = diff["results"]["differ"]
    assert d["file"] == "integrated/features.json" and d["where"].endswith("actual_change")


def test_rm_deletes_failed_runs_only(store):
    s, runs = store
    (failed,) = runs["failed"]
    complete = runs["complete"][0]
    before = sorted(p.name for p in (s / "runs").iterdir())
    r = pathflow(["runs", "rm", complete, "--yes", "--store", str(s)])
    assert r.returncode == 2 and "never deleted" in r.stderr
    r = pathflow(["runs", "rm", failed, "--store", str(s)])  # no terminal to ask: needs --yes
    assert r.returncode == 2 and "--yes" in r.stderr
    assert sorted(p.name for p in (s / "runs").iterdir()) == before
    r = pathflow(["runs", "rm", failed, "--yes", "--store", str(s)])
    assert r.returncode == 0 and f"removed {failed}" in r.stdout, r.stderr
    assert sorted(p.name for p in (s / "runs").iterdir()) == sorted(runs["complete"])
