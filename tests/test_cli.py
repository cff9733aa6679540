"""`pathflow local` end to end through the console script, as a user runs it."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import zarr

from storage.arrays import attribution

PATHFLOW = [sys.executable, "-m", "pathflow"]
DESIGN_FILES = [
    "audit/data_validation.json",
    "features/causal_features.json",
    "prototype/single_feature_test.json",
    "pathways/candidates.json",
    "pathways/validated_pathways.json",
    "tokens/token_associations.json",
    "integrated/features.json",
    "integrated/summary.csv",
    "integrated/report.md",
]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PATHFLOW_"))}
    e.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})
    return e


def cli(args, cwd, timeout=300, **extra):
    return subprocess.run(PATHFLOW + args, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout)


def check_run(run_dir: Path) -> dict:
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete"
    for f in DESIGN_FILES:
        assert (run_dir / f).is_file(), f
        assert m["outputs"][f] == hashlib.sha256((run_dir / f).read_bytes()).hexdigest()
    steps = {name.split("/")[0] for name in m["steps"]}
    assert steps >= {"audit", "select", "pathways", "tokens", "graphs", "contrast", "integrate", "prototype"}
    assert all(s["status"] == "done" for s in m["steps"].values())
    assert m["config_hash"] and m["inputs"] and m["model"]["sha256"]
    proto = json.loads((run_dir / "prototype/single_feature_test.json").read_text())
    target = proto["target"]
    g = zarr.open_group(str(run_dir / "jacobians.zarr"), mode="r")
    assert g.attrs["targets"] == [target["feature"]] and g.attrs["prompts"] == ["safe", "risky"]
    n_layers = len(g.attrs["layers"])
    v = g["grad"][:]
    assert v.dtype == np.float32 and v.shape[:3] == (1, 2, n_layers)
    assert np.isfinite(v[:, :, : target["layer"]]).all()  # upstream layers computed
    assert np.isnan(v[:, :, target["layer"] :]).all()  # the target's own layer and above: not computed
    act = g["activation"][:]  # stored once for every target
    assert act.shape == (2, n_layers, v.shape[3]) and np.isfinite(act[:, : target["layer"]]).all()
    # the candidates of the run are the top |attribution| entries of the stored arrays (kept to
    # gradients.keepbits mantissa bits: equal up to that rounding)
    cands = json.loads((run_dir / "pathways/candidates.json").read_text())["targets"][target["feature"]]["safe"]
    attr = attribution(g, 0)[0]
    tol = 2.0 ** -(g.attrs["keepbits"] - 1)
    top = cands[0]
    assert attr[top["layer"], top["feature_id"]] == pytest.approx(top["attribution"], rel=tol)
    assert np.nanmax(np.abs(attr)) <= abs(top["attribution"]) * (1 + tol)
    return proto


def test_local_with_no_arguments_in_a_fresh_folder(tmp_path):
    """The README's first command: creates the demo bundle, runs on an ephemeral Prefect API."""
    r = cli(["local"], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "pathflow-demo" / "config.yaml").is_file()
    (run_dir,) = (tmp_path / "pathflow-store" / "runs").iterdir()
    proto = check_run(run_dir)
    assert proto["target"]["feature"] in r.stdout and run_dir.name in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    # it says what it does: the demo bundle written (with progress) and where, the config and store, the report
    said = " ".join(r.stderr.split())
    assert f"using the demo bundle, written now to {tmp_path / 'pathflow-demo'}" in said
    assert "fitting the SAE of layer" in said or "6/6" in said
    demo, store = tmp_path / "pathflow-demo", tmp_path / "pathflow-store"
    assert f"config {demo / 'config.yaml'} (the demo bundle) store {store}" in said
    assert f"report: {run_dir}/integrated/report.html" in " ".join(r.stdout.split())


def test_local_feature_store_and_prefect_api(tmp_path, demo_dir, prefect_api):
    cfg = str(demo_dir / "config.yaml")
    causal = json.loads((demo_dir / "demo_metrics.json").read_text())["causal"]
    feature = [c for c in causal if c.startswith("L3-")][0]
    r = cli(
        ["local", "--config", cfg, "--feature", feature, "--store", str(tmp_path / "cli-store")],
        cwd=tmp_path,
        PREFECT_API_URL=prefect_api,
        PATHFLOW_STORE=str(tmp_path / "env-store"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "env-store").exists()  # --store wins over $PATHFLOW_STORE
    (run_dir,) = (tmp_path / "cli-store" / "runs").iterdir()
    assert check_run(run_dir)["target"]["feature"] == feature
    # the flow run is recorded by the Prefect API, Completed, under the run id
    runs = httpx.post(
        f"{prefect_api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [f"local-{run_dir.name}"]}}}
    )
    (fr,) = runs.json()
    assert fr["state_type"] == "COMPLETED"
    arts = httpx.post(f"{prefect_api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})
    assert {"pathflow-pathways", "pathflow-report", "pathflow-run-folder"} <= {a["key"] for a in arts.json()}
    assert f"flow run: {prefect_api.removesuffix('/api')}/runs/flow-run/{fr['id']}" in " ".join(r.stdout.split())

    r = cli(
        ["local", "--config", cfg, "--feature", feature],
        cwd=tmp_path,
        PREFECT_API_URL=prefect_api,
        PATHFLOW_STORE=str(tmp_path / "env-store"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((tmp_path / "env-store" / "runs").iterdir())) == 1  # $PATHFLOW_STORE over store.url


@pytest.mark.parametrize(
    "feature,message",
    [
        ("L99-3", "layer 99 is beyond the model"),
        ("L3-999999", "≥ d_sae"),
        ("L1-1", "not in the study's results"),
    ],
)
def test_wrong_feature_is_a_clear_error(tmp_path, demo_dir, prefect_api, feature, message):
    r = cli(
        ["local", "--config", str(demo_dir / "config.yaml"), "--feature", feature, "--store", str(tmp_path)],
        cwd=tmp_path,
        PREFECT_API_URL=prefect_api,
    )
    # caught before any server starts or run folder is made, said once
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stdout + r.stderr
    assert r.stderr.count(message) == 1 and not (tmp_path / "runs").exists()


def test_usage_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae:\n  rooot: x\n")
    for args, message in [
        (["local", "--config", str(bad)], "unknown key 'sae.rooot'"),
        (["local", "--config", str(tmp_path / "missing.yaml")], "not found"),
        (["local", "--feature", "bogus"], "L{layer}-{id}"),
    ]:
        r = cli(args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr
