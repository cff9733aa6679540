"""Several GPUs, several machines, as Prefect sees them: a parent run on a process pool fans its pathway
batches out to shard runs that two workers of another pool pick up, all writing one run folder on a
loopback S3 server; the integrated results equal a single-machine run. A shard that keeps failing is
retried, then reported, and the other shard's results survive for a resume."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import clean_env, s3_server
from .runs import batch_markers, run_cli, same_science, science, write_cfg

ROOT = Path(__file__).resolve().parents[1]
STORE = "s3://pathflow/sharded"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def prefect(args, env, timeout=180) -> str:
    r = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def wait_for(api: str, flow_run_id: str, timeout: float = 420) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()
        if fr["state_type"] in FINAL:
            return fr
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")


def children(api: str, parent_id: str) -> list[dict]:
    runs = httpx.post(f"{api}/flow_runs/filter",
                      json={"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}}).json()
    return sorted(runs, key=lambda r: r["created"])


@pytest.fixture(scope="module")
def pools(prefect_api, tmp_path_factory):
    """The two deployments from prefect.yaml; one worker for parents, two (one run each) for shards."""
    with s3_server() as s3:
        yield from _pools(prefect_api, tmp_path_factory, s3)


def _pools(prefect_api, tmp_path_factory, s3):
    logs = tmp_path_factory.mktemp("workers")
    env = clean_env(PREFECT_API_URL=prefect_api, PATHFLOW_PROJECT_DIR=str(ROOT), PATHFLOW_STORE=STORE,
                    PREFECT_WORKER_QUERY_SECONDS="2", **s3)
    prefect(["work-pool", "create", "pathflow-process", "--type", "process", "--overwrite"], env)
    prefect(["work-pool", "create", "pathflow-shards", "--type", "process", "--overwrite"], env)
    prefect(["--no-prompt", "deploy", "-n", "pathways-sharded-process", "-n", "pathways-shard-process"], env)
    procs = []
    for pool, name, limit in [("pathflow-process", "parent-worker", "2"), ("pathflow-shards", "shard-worker-a", "1"),
                              ("pathflow-shards", "shard-worker-b", "1")]:
        out = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                       "--name", name, "--limit", limit], cwd=logs, env=env, stdout=out,
                                      stderr=subprocess.STDOUT))
    yield {"env": env, "s3": s3, "logs": logs}
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def start_parent(env, params: dict) -> str:
    out = prefect(["deployment", "run", "pathflow-sharded/pathways-sharded-process", "--params", json.dumps(params)],
                  env)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def s3fs_of(s3):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3["AWS_ENDPOINT_URL"])


def fetch_run(s3, run_id: str, dest: Path) -> Path:
    fs = s3fs_of(s3)
    fs.invalidate_cache()
    fs.get(f"pathflow/sharded/runs/{run_id}/", str(dest), recursive=True)
    return dest


def test_two_shards_on_two_workers_equal_a_single_machine_run(prefect_api, pools, demo_cfg, tmp_path):
    cfg_path = write_cfg(demo_cfg, tmp_path, batch_size=1)
    single = run_cli(["run", "-c", str(cfg_path), "--store", str(tmp_path / "single")], PREFECT_API_URL=prefect_api)
    assert single.wait(300) == 0, single.stdout.read()
    (single_dir,) = (tmp_path / "single" / "runs").iterdir()

    parent_id = start_parent(pools["env"], {"config": str(cfg_path), "shards": 2, "run_id": "sharded-ok",
                                            "poll_seconds": 1})
    parent = wait_for(prefect_api, parent_id)
    assert parent["state_type"] == "COMPLETED", parent["state"]
    kids = children(prefect_api, parent_id)
    assert sorted(k["name"] for k in kids) == ["shard0-sharded-ok", "shard1-sharded-ok"]
    assert all(k["state_type"] == "COMPLETED" for k in kids)
    # each shard run was taken by its own worker (each serves one run at a time)
    logs = {p.stem: p.read_text() for p in pools["logs"].glob("shard-worker-*.log")}
    takers = {name for k in kids for name, text in logs.items() if k["id"] in text}
    assert takers == {"shard-worker-a", "shard-worker-b"}, logs

    run_dir = fetch_run(pools["s3"], "sharded-ok", tmp_path / "sharded")
    plan = json.loads((run_dir / "pathways" / "plan.json").read_text())
    assert len(plan["shards"]) == 2 and all(plan["shards"])
    assert sorted(sum(plan["shards"], [])) == sorted(plan["batches"]) and len(plan["batches"]) == 6
    markers = batch_markers(run_dir)
    pid_of_shard = [{markers[f"{b}.done.json"]["pid"] for b in names} for names in plan["shards"]]
    assert all(len(p) == 1 for p in pid_of_shard) and pid_of_shard[0] != pid_of_shard[1]  # one process per shard

    same_science(science(run_dir), science(single_dir))
    for rel in ("tokens/token_associations.json", "integrated/summary.csv"):
        assert (run_dir / rel).read_text() == (single_dir / rel).read_text(), rel
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and m["kind"] == "sharded" and set(m["shard_runs"]) == {"0", "1"}
    assert "testing" not in json.dumps(m)  # no credentials in the manifest

    arts = httpx.post(f"{prefect_api}/artifacts/filter",
                      json={"artifacts": {"flow_run_id": {"any_": [parent_id]}}}).json()
    assert {"pathflow-progress", "pathflow-report", "pathflow-run-folder"} <= {a["key"] for a in arts}


def test_a_failing_shard_is_retried_reported_and_resumed(prefect_api, pools, demo_cfg, tmp_path):
    from pathflow.pathways import plan_batches, shard_batches
    from pathflow.study import audit, select

    cfg_path = write_cfg(demo_cfg, tmp_path, batch_size=1)
    _, features = audit(demo_cfg)
    targets = [{**s, "index": i} for i, s in enumerate(s for s in select(features, demo_cfg) if s["layer"] > 0)]
    groups = shard_batches(plan_batches(targets, 1), 2)
    broken = groups[1][-1].name  # shard 1 finishes its other batches, then fails on this one

    parent_id = start_parent(pools["env"], {
        "config": str(cfg_path), "shards": 2, "run_id": "sharded-fail", "poll_seconds": 1, "shard_retries": 1,
        "shard_job_variables": {"env": {"PATHFLOW_FAIL_BATCH": broken}}})
    parent = wait_for(prefect_api, parent_id)
    assert parent["state_type"] == "FAILED"
    msg = parent["state"]["message"]
    assert "1 of 2 shards failed: shard 1" in msg and "after 2 attempts" in msg and "resume=true" in msg, msg
    kids = children(prefect_api, parent_id)
    assert sorted((k["name"], k["state_type"]) for k in kids) == [
        ("shard0-sharded-fail", "COMPLETED"), ("shard1-sharded-fail", "FAILED"), ("shard1-sharded-fail", "FAILED")]

    fs = s3fs_of(pools["s3"])
    before = {p.rsplit("/", 1)[1]: json.loads(fs.cat(p)) for p in
              fs.glob("pathflow/sharded/runs/sharded-fail/pathways/parts/*.done.json")}
    assert set(before) == {f"{b.name}.done.json" for g in groups for b in g if b.name != broken}
    assert json.loads(fs.cat("pathflow/sharded/runs/sharded-fail/manifest.json"))["status"] == "failed"

    resumed_id = start_parent(pools["env"], {"config": str(cfg_path), "shards": 2, "run_id": "sharded-fail",
                                             "resume": True, "poll_seconds": 1})
    resumed = wait_for(prefect_api, resumed_id)
    assert resumed["state_type"] == "COMPLETED", resumed["state"]
    run_dir = fetch_run(pools["s3"], "sharded-fail", tmp_path / "resumed")
    after = batch_markers(run_dir)
    assert {k: after[k] for k in before} == before  # finished batches were kept, not recomputed
    assert set(after) - set(before) == {f"{broken}.done.json"}
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and m["resumes"] == 1
