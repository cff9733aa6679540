"""End to end through a real Prefect server: work pool, `prefect deploy` from prefect.yaml, a
worker, `prefect deployment run`, and the run's artifacts found through the Prefect API."""

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .conftest import clean_env

ROOT = Path(__file__).resolve().parents[1]


def prefect(args, env, timeout=180):
    r = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def test_deployment_runs_on_a_process_worker(prefect_api, demo_dir, tmp_path):
    store = tmp_path / "store"
    env = clean_env(PREFECT_API_URL=prefect_api, PATHFLOW_PROJECT_DIR=str(ROOT), PATHFLOW_STORE=str(store))
    prefect(["work-pool", "create", "pathflow-process", "--type", "process", "--overwrite"], env)
    prefect(["--no-prompt", "deploy", "-n", "pathways-process"], env)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "pathflow-process",
                               "--limit", "1"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        out = prefect(["deployment", "run", "pathflow-run/pathways-process", "--param",
                       f"config={demo_dir / 'config.yaml'}"], env)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        deadline, state = time.time() + 300, None
        while time.time() < deadline:
            fr = httpx.get(f"{prefect_api}/flow_runs/{flow_run_id}").json()
            state = fr["state_type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
        assert state == "COMPLETED", fr
    finally:
        worker.terminate()
        worker.wait(30)
    arts = httpx.post(f"{prefect_api}/artifacts/filter",
                      json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    by_key = {a["key"]: a for a in arts if a["key"]}
    assert {"pathflow-audit", "pathflow-progress", "pathflow-pathways", "pathflow-report",
            "pathflow-run-folder"} <= set(by_key)
    (run_dir,) = (store / "runs").iterdir()
    assert str(run_dir) in by_key["pathflow-run-folder"]["data"]
    assert (run_dir / "manifest.json").read_text().count('"status": "complete"') == 1
    tasks = httpx.post(f"{prefect_api}/task_runs/filter",
                       json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
    assert any(t["name"].startswith("pathways-L") and "gpu" in t["tags"] for t in tasks)
