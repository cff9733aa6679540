"""The Prefect UI, seen: a completed pathflow run's page in headless Chromium (driven by playwright-core)
shows the run and pathflow's artifacts. Screenshots are kept in
test-output/ui/."""

import json
import shutil
import subprocess
from pathlib import Path

import httpx

from .conftest import require
from .runs import run_cli, write_cfg

UI = Path(__file__).resolve().parent / "ui"
KEYS = ["pathflow-audit", "pathflow-pathways", "pathflow-report", "pathflow-run-folder"]


def test_completed_run_and_artifacts_in_the_prefect_ui(prefect_api, demo_cfg, tmp_path):
    require("/usr/bin/chromium", "node", str(UI / "node_modules" / "playwright-core"))
    store = tmp_path / "store"
    proc = run_cli(["run", "-c", str(write_cfg(demo_cfg, tmp_path)), "--store", str(store)],
                   PREFECT_API_URL=prefect_api)
    assert proc.wait(300) == 0, proc.stdout.read()
    (run_dir,) = (store / "runs").iterdir()
    (fr,) = httpx.post(f"{prefect_api}/flow_runs/filter",
                       json={"flow_runs": {"name": {"any_": [f"run-{run_dir.name}"]}}}).json()
    assert fr["state_type"] == "COMPLETED"

    shots = tmp_path / "screenshots"
    shots.mkdir()
    out = subprocess.run(["node", str(UI / "flow_run_page.mjs"), prefect_api.removesuffix("/api"), fr["id"],
                          str(shots), "pathflow-run", fr["name"], *KEYS], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    keep = Path(__file__).resolve().parents[1] / "test-output" / "ui"  # for a person to look at
    keep.mkdir(parents=True, exist_ok=True)
    for png in shots.glob("*.png"):
        shutil.copy(png, keep / png.name)
    assert "error" not in seen, seen
    assert fr["name"] in seen["run_page"] and "Completed" in seen["run_page"]
    assert "pathflow-run" in seen["run_page"]  # the flow's name
    for key in KEYS:
        assert key in seen["artifacts_tab"], key
    assert (shots / "flow-run.png").stat().st_size > 20_000 and (shots / "artifacts.png").stat().st_size > 20_000
