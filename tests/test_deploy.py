"""End to end through a real Prefect server: work pool, `prefect deploy` from prefect.yaml, a
worker, `prefect deployment run`, and the run's artifacts found through the Prefect API."""

import json
import os
import re
import shutil
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


def wait_for(prefect_api, flow_run_id, timeout=300):
    deadline, fr = time.time() + timeout, {}
    while time.time() < deadline:
        fr = httpx.get(f"{prefect_api}/flow_runs/{flow_run_id}").json()
        if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    return fr


def run_on_a_worker(prefect_api, env, cwd, deployment: str, config) -> dict:
    """Start a process worker in ``cwd``, run ``deployment`` with ``config`` through it; the flow run."""
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "pathflow-process",
                               "--limit", "1"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        out = prefect(["deployment", "run", deployment, "--param", f"config={config}"], env)
        return wait_for(prefect_api, re.search(r"UUID: ([0-9a-f-]{36})", out).group(1))
    finally:
        worker.terminate()
        worker.wait(30)


def git(args, cwd):
    r = subprocess.run(["git", "-c", "user.name=pathflow-test", "-c", "user.email=test@pathflow.invalid", *args],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout.strip()


def test_git_deployment_runs_the_deployed_commit_on_a_worker(prefect_api, demo_dir, tmp_path):
    """A git-based deployment (Prefect's git_clone pull step): the worker, in a folder of its own with
    no PATHFLOW_PROJECT_DIR, clones the repository at the commit deployed and runs the flow from it."""
    origin, work, home = tmp_path / "origin.git", tmp_path / "work", tmp_path / "worker"
    # a repository of this working tree as it is (committed or not), pushed to a bare "origin"
    for name in git(["ls-files", "-co", "--exclude-standard"], ROOT).splitlines():
        if (ROOT / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    git(["init", "-q", "-b", "main"], work)
    git(["add", "-A"], work)
    git(["commit", "-q", "-m", "the commit deployed"], work)
    git(["init", "-q", "--bare", str(origin)], tmp_path)
    git(["remote", "add", "origin", str(origin)], work)
    git(["push", "-q", "origin", "main"], work)
    deployed = git(["rev-parse", "HEAD"], work)
    assert deployed != git(["rev-parse", "HEAD"], ROOT)  # so the run's commit says which code ran
    home.mkdir()
    store = tmp_path / "store"
    env = clean_env(PREFECT_API_URL=prefect_api, PATHFLOW_STORE=str(store))
    prefect(["work-pool", "create", "pathflow-process", "--type", "process", "--overwrite"], env)
    r = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "-n", "pathways-git"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=180)  # origin: the bare repository
    assert r.returncode == 0, r.stdout + r.stderr
    (dep,) = httpx.post(f"{prefect_api}/deployments/filter",
                        json={"deployments": {"name": {"any_": ["pathways-git"]}}}).json()
    (step,) = dep["pull_steps"]
    assert step["prefect.deployments.steps.git_clone"] == {"repository": str(origin), "commit_sha": deployed}
    fr = run_on_a_worker(prefect_api, env, home, "pathflow-run/pathways-git", demo_dir / "config.yaml")
    assert fr["state_type"] == "COMPLETED", fr
    (run_dir,) = (store / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["git_commit"] == deployed  # the clone's code ran, not this checkout's


def test_deployment_runs_on_a_process_worker(prefect_api, demo_dir, tmp_path):
    store = tmp_path / "store"
    env = clean_env(PREFECT_API_URL=prefect_api, PATHFLOW_PROJECT_DIR=str(ROOT), PATHFLOW_STORE=str(store))
    prefect(["work-pool", "create", "pathflow-process", "--type", "process", "--overwrite"], env)
    prefect(["--no-prompt", "deploy", "-n", "pathways-process"], env)
    fr = run_on_a_worker(prefect_api, env, tmp_path, "pathflow-run/pathways-process", demo_dir / "config.yaml")
    assert fr["state_type"] == "COMPLETED", fr
    flow_run_id = fr["id"]
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


def test_version_has_one_source():
    """pyproject.toml's version is the only place it is written: the image tag and label, the
    deployments' image and the guides all read it (container/version)."""
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert subprocess.run(["sh", "container/version"], cwd=ROOT, capture_output=True, text=True).stdout.strip() \
        == version
    ref = subprocess.run(["sh", "container/image-ref"], cwd=ROOT, capture_output=True, text=True,
                         env=clean_env(PATHFLOW_IMAGE="registry.example/p")).stdout.strip()
    assert ref == f"registry.example/p:{version}"
    for name in ("Dockerfile", "prefect.yaml", "README.md", "deploy/README.md", "container/build-local.sh",
                 "container/build-push.sh", ".ci/run", "tests/system-deps.sh"):
        assert version not in (ROOT / name).read_text(), f"{name} repeats the version {version}"
    assert re.search(r"^ARG VERSION$", (ROOT / "Dockerfile").read_text(), re.M)  # no default to go stale


def test_gpu_deployments_and_pool_template(prefect_api):
    """The GPU side without a Docker engine: `prefect deploy --all` registers every deployment on a
    machine without Docker, the GPU ones naming the image by the project's version; the server accepts
    the docker pool's base job template, and a flow run's container settings rendered from it pass every
    GPU through in the form docker-py takes."""
    import asyncio

    import docker
    import yaml
    from prefect_docker.worker import DockerWorkerJobConfiguration

    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    baked = re.search(r"PATHFLOW_PROJECT_DIR=(\S+)", dockerfile).group(1)
    for d in deps.values():
        path, fn = d["entrypoint"].split(":")
        assert f"def {fn}(" in (ROOT / path).read_text()
    assert deps["pathways-sharded-gpu"]["parameters"]["shard_deployment"] == "pathflow-shard/pathways-shard-gpu"

    env = clean_env(PREFECT_API_URL=prefect_api, PATHFLOW_IMAGE="registry.example/pathflow",
                    PATHFLOW_PROJECT_DIR=str(ROOT), PATHFLOW_GIT_URL="https://git.example/pathflow.git",
                    DOCKER_HOST="unix:///nonexistent/docker.sock")  # no Docker engine, whatever this machine has
    for pool, kind in (("pathflow-process", "process"), ("pathflow-shards", "process")):
        prefect(["work-pool", "create", pool, "--type", kind, "--overwrite"], env)
    prefect(["work-pool", "create", "pathflow-gpu", "--type", "docker", "--base-job-template",
             str(ROOT / "deploy" / "gpu-pool.json"), "--overwrite"], env)
    prefect(["--no-prompt", "deploy", "--all"], env, timeout=600)
    registered = {d["name"]: d for d in httpx.post(f"{prefect_api}/deployments/filter", json={}).json()}
    assert set(deps) <= set(registered)
    for name in ("pathways-gpu", "pathways-smoke", "pathways-sharded-gpu", "pathways-shard-gpu"):
        d = registered[name]
        assert d["work_pool_name"] == "pathflow-gpu"
        assert d["job_variables"]["image"] == f"registry.example/pathflow:{version}", name
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": baked}}]
    for name in ("pathways-process", "pathways-sharded-process", "pathways-shard-process"):
        assert registered[name]["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name in ("pathways-git", "pathways-shard-git"):
        assert registered[name]["pull_steps"] == [{"prefect.deployments.steps.git_clone": {
            "repository": "https://git.example/pathflow.git", "commit_sha": commit}}]

    pool = httpx.get(f"{prefect_api}/work_pools/pathflow-gpu").json()
    assert pool["type"] == "docker"
    template = pool["base_job_template"]
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}):  # else rendering starts a temporary server
        pool_only = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(
            template, {"image": f"registry.example/pathflow:{version}"}))
        deployed = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(
            template, registered["pathways-gpu"]["job_variables"]))
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


def test_deploy_readme_works_verbatim_on_an_empty_server(tmp_path):
    """deploy/README.md's "everything at once" block, run as written from the project root against a
    fresh Prefect server, registers every deployment of prefect.yaml on the pools it creates — and a second
    time too (safe to repeat). Without the pools first, Prefect refuses, as the README says."""
    import yaml

    from .conftest import prefect_server

    readme = (ROOT / "deploy" / "README.md").read_text()
    block = re.search(r"<!-- deploy-all[^>]*-->\n```bash\n(.*?)```", readme, re.S).group(1)
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    with prefect_server(tmp_path / "prefect-home") as api:
        env = clean_env(PREFECT_API_URL=api, DOCKER_HOST="unix:///nonexistent/docker.sock")
        if subprocess.run(["git", "remote", "get-url", "origin"], cwd=ROOT, capture_output=True).returncode:
            env["PATHFLOW_GIT_URL"] = "https://git.example/pathflow.git"  # a checkout without origin (the README says)
        r = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "-n", "pathways-gpu"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "does not exist" in " ".join((r.stdout + r.stderr).split())
        bin_dir = str(Path(sys.executable).parent)  # `prefect` as a person's shell finds it
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        for attempt in (1, 2):
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=900)
            assert r.returncode == 0, (attempt, r.stdout[-3000:], r.stderr[-3000:])
            registered = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}).json()}
            assert set(registered) == {d["name"] for d in spec["deployments"]}, attempt
            assert {p["name"] for p in httpx.post(f"{api}/work_pools/filter", json={}).json()} >= pools
            for d in spec["deployments"]:
                assert registered[d["name"]]["work_pool_name"] == d["work_pool"]["name"]
