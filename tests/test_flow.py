"""The pipeline flow under Prefect: mapping, OOM-only retries with halving, artifacts, resume after
SIGKILL, and the store on an S3-compatible server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pathflow.batching import SIMULATE_ENV

from .conftest import clean_env, free_port


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def config(demo_cfg, store, **gradients):
    cfg = demo_cfg.model_copy(deep=True)
    cfg.store.url = str(store)
    for k, v in gradients.items():
        setattr(cfg.gradients, k, v)
    return cfg


def task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        return c.read_task_runs(flow_run_filter=flt), c.read_artifacts(flow_run_filter=flt)


def batch_markers(run_dir: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "pathways" / "parts").glob("*.done.json"))}


def science(run_dir: Path) -> dict:
    """The results of a run that must not depend on how it was executed."""
    g = zarr.open_group(str(run_dir / "jacobians.zarr"), mode="r")
    val = json.loads((run_dir / "pathways" / "validated_pathways.json").read_text())["targets"]
    feats = json.loads((run_dir / "integrated" / "features.json").read_text())["features"]
    return {
        "grad": g["grad"][:],
        "attribution": g["attribution"][:],
        "targets": g.attrs["targets"],
        "ranking": {f: {p: [c["feature"] for c in r["candidates"]] for p, r in pp.items()} for f, pp in val.items()},
        "actual": {
            f: {p: [c["actual_change"] for c in r["candidates"]] for p, r in pp.items()} for f, pp in val.items()
        },
        "pathways": [(r["feature"], {p: [c["feature"] for c in cs] for p, cs in r["pathways"].items()}) for r in feats],
    }


def same_science(a: dict, b: dict) -> None:
    assert a["targets"] == b["targets"] and a["ranking"] == b["ranking"] and a["pathways"] == b["pathways"]
    for k in ("grad", "attribution"):
        assert np.array_equal(np.isnan(a[k]), np.isnan(b[k]))
        x, y = np.nan_to_num(a[k]), np.nan_to_num(b[k])
        assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(y)
    for f in a["actual"]:
        for p in a["actual"][f]:
            np.testing.assert_allclose(a["actual"][f][p], b["actual"][f][p], rtol=1e-4, atol=1e-6)


def test_batches_are_mapped_with_artifacts(harness, demo_cfg, tmp_path):
    from flows.pipeline import pipeline_flow

    cfg = config(demo_cfg, tmp_path, batch_size=1)
    state = pipeline_flow(config=cfg, run_id="mapped", return_state=True)
    assert state.is_completed(), state.message
    trs, arts = task_runs(state.state_details.flow_run_id)
    batches = {tr.name: tr for tr in trs if tr.name.startswith("pathways-")}
    targets = json.loads((tmp_path / "runs/mapped/features/causal_features.json").read_text())["features"]
    expected = {
        f"pathways-L{t['layer']}-batch{i}"
        for layer in {t["layer"] for t in targets}
        for i, t in enumerate(t for t in targets if t["layer"] == layer)
    }
    assert set(batches) == expected and len(expected) == len(targets) == 6
    assert all(tr.state_type.value == "COMPLETED" and "gpu" in tr.tags for tr in batches.values())
    keys = {a.key for a in arts}
    assert {
        "pathflow-audit",
        "pathflow-progress",
        "pathflow-pathways",
        "pathflow-report",
        "pathflow-run-folder",
    } <= keys
    (progress,) = [a for a in arts if a.key == "pathflow-progress"]
    assert progress.data == 100.0
    (link,) = [a for a in arts if a.key == "pathflow-run-folder"]
    assert str(tmp_path / "runs" / "mapped") in link.data
    m = json.loads((tmp_path / "runs/mapped/manifest.json").read_text())
    assert m["status"] == "complete" and len(batch_markers(tmp_path / "runs/mapped")) == 6


def test_oom_retries_halve_the_batch(harness, demo_cfg, tmp_path, monkeypatch):
    from flows.pipeline import pipeline_flow

    ref = pipeline_flow(config=config(demo_cfg, tmp_path, batch_size=4), run_id="ref", return_state=True)
    assert ref.is_completed()
    monkeypatch.setenv(SIMULATE_ENV, "1")  # any batch (targets or replay candidates) above 1 is out of memory
    state = pipeline_flow(config=config(demo_cfg, tmp_path, batch_size=4), run_id="oom", return_state=True)
    assert state.is_completed(), state.message
    trs, _ = task_runs(state.state_details.flow_run_id)
    batches = [tr for tr in trs if tr.name.startswith("pathways-")]
    # batch_size 4 -> attempt 1: sub-batches of 4 (OOM), 2: of 2 (OOM), 3: of 1 (fits)
    assert batches and all(tr.run_count == 3 for tr in batches), [(tr.name, tr.run_count) for tr in batches]
    markers = batch_markers(tmp_path / "runs/oom")
    assert {m["attempt"] for m in markers.values()} == {3} and {m["sub_batch_size"] for m in markers.values()} == {1}
    same_science(science(tmp_path / "runs/oom"), science(tmp_path / "runs/ref"))


def test_other_errors_fail_at_once(harness, demo_cfg, tmp_path, monkeypatch):
    from flows.pipeline import pipeline_flow
    from tasks import pathways

    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise ValueError("a bug, not a memory problem")

    monkeypatch.setattr(pathways, "phase_a", broken)
    state = pipeline_flow(config=config(demo_cfg, tmp_path, batch_size=8), run_id="bug", return_state=True)
    assert state.is_failed()
    trs, _ = task_runs(state.state_details.flow_run_id)
    failed = [tr for tr in trs if tr.name.startswith("pathways-")]
    assert failed and all(tr.run_count == 1 and tr.state_type.value == "FAILED" for tr in failed)
    assert len(calls) == len(failed)  # no retries
    m = json.loads((tmp_path / "runs/bug/manifest.json").read_text())
    assert m["status"] == "failed" and "a bug, not a memory problem" in m["error"]


def pathflow(args, **env) -> subprocess.CompletedProcess:
    """`pathflow ARGS` to completion, in a clean environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "pathflow", *args], env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def run_cli(args, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "pathflow", *args],
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def write_cfg(demo_cfg, tmp_path, **gradients) -> Path:
    cfg = config(demo_cfg, "unused", **gradients)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json", exclude={"store"})))
    return path


def test_resume_after_sigkill_recomputes_only_missing_batches(demo_cfg, tmp_path, prefect_api):
    cfg_path = write_cfg(demo_cfg, tmp_path, batch_size=1)
    store = tmp_path / "store"
    # an uninterrupted run, for reference
    ref = run_cli(["run", "-c", str(cfg_path), "--store", str(store)], PREFECT_API_URL=prefect_api)
    assert ref.wait(300) == 0, ref.stdout.read()
    (ref_dir,) = (store / "runs").iterdir()
    # the same run, killed midway through the pathway batches
    proc = run_cli(
        ["run", "-c", str(cfg_path), "--store", str(store)], PREFECT_API_URL=prefect_api, PATHFLOW_BATCH_DELAY_S="1.0"
    )
    deadline = time.time() + 240
    run_dir = None
    while time.time() < deadline:
        dirs = [d for d in (store / "runs").iterdir() if d != ref_dir]
        if dirs and len(batch_markers(dirs[0]) if (dirs[0] / "pathways/parts").is_dir() else {}) >= 2:
            run_dir = dirs[0]
            break
        time.sleep(0.05)
    assert run_dir is not None, "the run never finished two batches"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    before = batch_markers(run_dir)
    assert 2 <= len(before) < 6
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    r = run_cli(["run", "--resume", run_dir.name, "--store", str(store)], PREFECT_API_URL=prefect_api)
    out = r.communicate(timeout=300)[0]
    assert r.returncode == 0, out
    after = batch_markers(run_dir)
    assert len(after) == 6
    for name, marker in before.items():
        assert after[name] == marker  # finished batches were not recomputed
    resumed_pids = {m["pid"] for n, m in after.items() if n not in before}
    assert resumed_pids and resumed_pids.isdisjoint({m["pid"] for m in before.values()})
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and m["resumes"] == 1
    same_science(science(run_dir), science(ref_dir))
    v = pathflow(["runs", "verify", run_dir.name, "--store", str(store)])
    assert v.returncode == 0, v.stdout + v.stderr


@pytest.fixture
def s3(tmp_path):
    """An S3-compatible server (moto) on loopback, with a bucket; credentials are dummies."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    import boto3

    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="pathflow")
    yield env
    server.stop()


def test_store_on_s3_with_resume_and_verify(demo_cfg, tmp_path, prefect_api, s3):
    cfg_path = write_cfg(demo_cfg, tmp_path, batch_size=2)
    url = "s3://pathflow/study-a"
    proc = run_cli(
        ["run", "-c", str(cfg_path), "--store", url], PREFECT_API_URL=prefect_api, **s3, PATHFLOW_BATCH_DELAY_S="1.5"
    )
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3["AWS_ENDPOINT_URL"])
    deadline, run_id = time.time() + 240, None
    while time.time() < deadline and run_id is None:
        fs.invalidate_cache()
        for p in fs.glob("pathflow/study-a/runs/*/pathways/parts/*.done.json"):
            run_id = p.split("/")[3]
        time.sleep(0.1)
    assert run_id, "no batch finished on the S3 store"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    r = run_cli(["run", "--resume", run_id, "--store", url], PREFECT_API_URL=prefect_api, **s3)
    out = r.communicate(timeout=300)[0]
    assert r.returncode == 0, out
    fs.invalidate_cache()
    m = json.loads(fs.cat(f"pathflow/study-a/runs/{run_id}/manifest.json"))
    assert m["status"] == "complete" and m["resumes"] == 1
    assert any(k.startswith("jacobians.zarr/grad/c/") for k in m["outputs"])
    ok = pathflow(["runs", "verify", run_id, "--store", url], **s3)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    fs.pipe(f"pathflow/study-a/runs/{run_id}/integrated/report.md", b"tampered")
    bad = pathflow(["runs", "verify", run_id, "--store", url], **s3)
    assert bad.returncode == 1 and "integrated/report.md" in bad.stdout
    listed = pathflow(["runs", "list", "--store", url], **s3)
    assert run_id[:10] in listed.stdout
    assert "testing" not in json.dumps(m)  # no credentials in the manifest
