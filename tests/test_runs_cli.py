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
    said = []
    for env in ({}, {}, {"PATHFLOW_FAIL_BATCH": "L2-batch0"}):
        r = pathflow(["run", "-c", str(cfg), "--store", str(store)], PREFECT_API_URL=prefect_api, COLUMNS="80", **env)
        assert r.returncode == (1 if env else 0), r.stderr
        said.append(r)
    runs = {json.loads((d / "manifest.json").read_text())["status"]: [] for d in (store / "runs").iterdir()}
    for d in sorted((store / "runs").iterdir()):
        runs[json.loads((d / "manifest.json").read_text())["status"]].append(d.name)
    store_said[:] = said
    return store, runs


store_said: list = []  # the three runs' outputs, in order


def test_a_run_says_where_its_results_are_and_when_it_repeats_one(store, prefect_api):
    """At 80 columns: the summary's headers whole, the report's path and the flow run's page (a server the
    user runs) at the end; a second run of the same config in the same store is pointed at the first."""
    import httpx

    s, runs = store
    first, second = store_said[0], store_said[1]
    a, b = runs["complete"]
    out = " ".join(first.stdout.split())
    assert f"report: {s}/runs/{a}/integrated/report.html" in out
    assert (s / "runs" / a / "integrated/report.html").is_file()
    url = next(w for w in out.split() if "/runs/flow-run/" in w)
    fr = httpx.get(f"{prefect_api}/flow_runs/{url.rsplit('/', 1)[1]}").json()
    assert url.startswith(prefect_api.removesuffix("/api")) and fr["name"].endswith(a)
    header = next(line for line in first.stdout.splitlines() if "feature" in line and "prompt" in line)
    assert "…" not in header and all(w in header for w in ("validated", "Spearman", "top upstream"))
    table = first.stdout.split(f"\nrun {a} ")[0]
    assert max(len(line) for line in table.splitlines()) <= 80  # paths after it are whole, however long
    note = " ".join(second.stderr.split())
    assert f"run {a} in this store is complete with the same config" in note and f"runs diff {a} {b}" in note
    assert "same config" not in first.stderr
    listed = pathflow(["runs", "list", "--store", str(s)], COLUMNS="80").stdout
    rows = [line for line in listed.splitlines() if a in line or b in line]
    assert len(rows) == 2 and all(line.count(":") == 1 for line in rows)  # a whole date per line, to the minute


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


def test_selection_flags_are_shared_and_checked_before_any_server(demo_dir, tmp_path, prefect_api):
    cfg = str(demo_dir / "config.yaml")
    store = tmp_path / "store"
    cases = ((["--feature", "L2-15l"], "is not a feature name"), (["--feature", "L9-1"], "beyond the model"),
             (["--feature", "L2-4"], "not in the study's results"), (["--direction", "bold"], "--direction"),
             (["--top", "0"], "--top"), (["--layer", "0"], "nothing to trace"))
    for args, needle in cases:
        for cmd in ("run", "local", "select"):
            if cmd == "local" and args[0] == "--feature" and args[1] == "L2-15l":
                needle_here = "L{layer}-{id}"
            else:
                needle_here = needle
            if cmd == "select" and needle == "nothing to trace":
                continue  # select shows an empty selection; only the commands that trace refuse it
            r = pathflow([cmd, "-c", cfg, "--store", str(store), *args] if cmd != "select" else
                         [cmd, "-c", cfg, *args], PREFECT_API_URL="http://127.0.0.1:9/api")  # no server needed
            assert r.returncode == 2 and needle_here in r.stderr, (cmd, args, r.stderr)
            assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1
    assert not store.exists()
    sel = js(["select", "-c", cfg, "--feature", "L2-151", "--feature", "L3-56"])
    assert [f["feature"] for f in sel["features"]] == ["L2-151", "L3-56"]
    r = pathflow(["run", "-c", cfg, "--store", str(store), "--feature", "L2-151", "--feature", "L3-56"],
                 PREFECT_API_URL=prefect_api)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (store / "runs").iterdir()
    traced = json.loads((run_dir / "features/causal_features.json").read_text())["features"]
    assert [f["feature"] for f in traced] == ["L2-151", "L3-56"]
    r = pathflow(["run", "--resume", run_dir.name, "--store", str(store), "--layer", "1"])
    assert r.returncode == 2 and "own selection" in r.stderr


def test_run_folder_artifact_links_only_where_a_page_exists(monkeypatch, tmp_path):
    from storage.store import Store
    from tasks.common import browse_url

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert browse_url(Store(str(tmp_path)).run("r1")) is None  # a local path: no page in the UI can open it
    assert browse_url(Store("s3://bucket/study").run("r1")) == \
        "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix=study/runs/r1/"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert browse_url(Store("s3://bucket/study").run("r1")) is None  # a private S3-compatible server


def test_help_and_diff_read_as_they_mean():
    """Flags show no value in --help (typer 0.29 prints "<bool>" after them); a Zarr array's differing
    chunks are one row of `runs diff`, files each their own."""
    from pathflow_cli.runs import _grouped

    r = pathflow(["runs", "diff", "--help"], COLUMNS="100")
    assert r.returncode == 0 and "--json" in r.stdout and "<bool>" not in r.stdout and "<str>" in r.stdout
    assert "<int>" not in pathflow(["--help"], COLUMNS="100").stdout  # -v counts: it takes no value either
    rows = _grouped([{"file": f"jacobians.zarr/grad/c/0/{i}/0", "where": f"chunk {i}"} for i in range(63)]
                    + [{"file": "integrated/features.json", "where": "features[0].x"}])
    assert rows == [("jacobians.zarr/grad", "chunk 0", 63), ("integrated/features.json", "features[0].x", 1)]
