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


def test_gpu_deployments_and_pool_template(prefect_api):
    """The GPU side without a Docker engine: prefect.yaml's image, code and pool agree with the
    Dockerfile, the server accepts the docker pool's base job template, and a flow run's container
    settings rendered from it pass every GPU through in the form docker-py takes."""
    import asyncio
    import json

    import docker
    import yaml
    from prefect_docker.worker import DockerWorkerJobConfiguration

    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    (build,) = deps["pathways-gpu"]["build"]
    step = build["prefect_docker.deployments.steps.build_docker_image"]
    assert step["tag"] == version and step["buildargs"]["VERSION"] == version and step["dockerfile"] == "Dockerfile"
    dockerfile = (ROOT / "Dockerfile").read_text()
    baked = re.search(r"PATHFLOW_PROJECT_DIR=(\S+)", dockerfile).group(1)
    for name in ("pathways-gpu", "pathways-smoke", "pathways-sharded-gpu", "pathways-shard-gpu"):
        d = deps[name]
        (pull,) = d["pull"]  # the code baked into the image
        assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == baked, name
        assert d["build"] == deps["pathways-gpu"]["build"] and len(d["push"]) == 1
        assert d["work_pool"]["name"] == "pathflow-gpu"
        assert d["work_pool"]["job_variables"]["image"] == "{{ build-image.image }}"
        path, fn = d["entrypoint"].split(":")
        assert f"def {fn}(" in (ROOT / path).read_text()
    assert deps["pathways-sharded-gpu"]["parameters"]["shard_deployment"] == "pathflow-shard/pathways-shard-gpu"
    assert spec["build"] is None and spec["push"] is None and "PATHFLOW_PROJECT_DIR" in json.dumps(spec["pull"])
    for name in ("pathways-process", "pathways-sharded-process", "pathways-shard-process"):
        assert not {"build", "push", "pull"} & set(deps[name]), name  # the process defaults

    env = clean_env(PREFECT_API_URL=prefect_api)
    prefect(["work-pool", "create", "pathflow-gpu", "--type", "docker", "--base-job-template",
             str(ROOT / "deploy" / "gpu-pool.json"), "--overwrite"], env)
    pool = httpx.get(f"{prefect_api}/work_pools/pathflow-gpu").json()
    assert pool["type"] == "docker"
    template = pool["base_job_template"]
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}):  # else rendering starts a temporary server
        pool_only = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(
            template, {"image": f"registry.example/pathflow:{version}"}))
        job_vars = {**deps["pathways-gpu"]["work_pool"]["job_variables"],
                    "image": f"registry.example/pathflow:{version}"}
        deployed = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, job_vars))
    assert "/data/store" in " ".join(pool_only.volumes) and pool_only.env["HF_HUB_OFFLINE"] == "0"
    for cfg in (pool_only, deployed):  # the pool's defaults, and the deployment's own job variables
        assert cfg.image == f"registry.example/pathflow:{version}"
        kwargs = cfg.container_create_kwargs
        host = docker.types.HostConfig(version="1.45", device_requests=kwargs["device_requests"],
                                       shm_size=kwargs["shm_size"])
        (gpus,) = host["DeviceRequests"]
        assert gpus["Count"] == -1 and gpus["Capabilities"] == [["gpu"]] and gpus["Driver"] == "nvidia"
        assert host["ShmSize"] == 16 * 2**30
    assert deployed.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
