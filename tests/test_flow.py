"""The pipeline flow under Prefect: mapping, OOM-only retries with halving, artifacts, resume after
SIGKILL, and the store on an S3-compatible server."""

import json
import os
import signal
import time

import pytest

from pathflow.batching import SIMULATE_ENV

from .runs import batch_markers, config, pathflow, run_cli, same_science, science, write_cfg


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        return c.read_task_runs(flow_run_filter=flt), c.read_artifacts(flow_run_filter=flt)


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
        "pathflow-graphs",
        "pathflow-contrast",
        "pathflow-run-folder",
    } <= keys
    (contrast,) = [a for a in arts if a.key == "pathflow-contrast"]
    assert "Covers 6 of 6 traced targets" in contrast.data and "| upstream feature | targets fed |" in contrast.data
    summary = json.loads((tmp_path / "runs/mapped/integrated/contrast/summary.json").read_text())
    assert sum(d["n_targets"] for d in summary["directions"].values()) == 6
    (graphs,) = [a for a in arts if a.key == "pathflow-graphs"]
    assert "pathflow graphs mapped" in graphs.data and "| graph | target |" in graphs.data
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
    assert f"resuming run {run_dir.name}: {len(before)} of 6 pathway batches are finished and kept" in " ".join(
        out.split()), out  # says what it reuses
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


def test_a_deployment_run_stops_on_audit_errors(harness, demo_cfg, tmp_path):
    """The flow itself refuses a study with audit errors (a deployment has no CLI to check first)."""
    from flows.pipeline import pipeline_flow

    bad = tmp_path / "more"
    bad.mkdir()
    (bad / "checkpoint_x.json").write_text('{"results": ["not a result"]}')
    cfg = config(demo_cfg, tmp_path / "store")
    cfg.study.checkpoints = [*cfg.study.checkpoints, str(bad)]
    state = pipeline_flow(config=cfg, run_id="audited", return_state=True)
    assert state.is_failed() and "study audit found 1 errors" in state.message
    m = json.loads((tmp_path / "store/runs/audited/manifest.json").read_text())
    assert m["status"] == "failed" and "allow_audit_errors" in m["error"]
    assert not (tmp_path / "store/runs/audited/pathways").exists()  # nothing computed
