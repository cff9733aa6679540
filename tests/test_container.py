"""The worker image: the Dockerfile lints clean with hadolint, and it builds here with buildah on a
Debian base (the CUDA base cannot be pulled here) with CPU PyTorch; `pathflow local` then completes
inside the image, as the image's non-root user, with HF_HUB_OFFLINE=1."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/pathflow:test"
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    r = subprocess.run([str(hadolint), "--failure-threshold", "info", "Dockerfile"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:  # each ignore is justified by the comment line above it
            assert lines[i - 1].startswith("#") and len(lines[i - 1]) > 30, line


def test_image_builds_and_runs_pathflow_local(prefect_api):
    require("buildah", "debootstrap")
    if os.geteuid() != 0:
        pytest.skip("buildah with vfs storage and chroot isolation runs as root here")
    r = subprocess.run(["container/build-local.sh", TAG], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert re.search(r"run \S+ complete inside the image: \d+ outputs", log), log[-3000:]
    built = int(re.search(r"built in (\d+) s", log).group(1))
    print(f"image built in {built} s")

    info = json.loads(subprocess.run([*BUILDAH, "inspect", "--type", "image", TAG], capture_output=True, text=True,
                                     check=True).stdout)
    config = info["OCIv1"]["config"]
    assert config["User"] == "10001:10001"  # not root
    assert config["Cmd"][:4] == ["prefect", "worker", "start", "--pool"]
    assert set(config["Volumes"]) == {"/home/pathflow/.cache/huggingface", "/data/store"}
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert config["Labels"]["org.opencontainers.image.version"] == version
    env = dict(e.split("=", 1) for e in config["Env"])
    assert "HF_HUB_OFFLINE" not in env and env["PATHFLOW_STORE"] == "/data/store"

    # small: no pip caches or build-stage sources in the final image, the locked versions installed
    ctr = subprocess.run([*BUILDAH, "from", TAG], capture_output=True, text=True, check=True).stdout.strip()
    try:
        mnt = Path(subprocess.run([*BUILDAH, "mount", ctr], capture_output=True, text=True, check=True).stdout.strip())
        assert not list(mnt.glob("root/.cache/pip")) and not list(mnt.glob("home/pathflow/.cache/pip"))
        assert not (mnt / "src").exists()
        site = next(mnt.glob("opt/pathflow/lib/python3*/site-packages"))
        pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
        for pkg in ("prefect", "transformers", "zarr", "s3fs", "prefect-docker"):
            (dist,) = site.glob(f"{pkg.replace('-', '_')}-*.dist-info")
            assert dist.name == f"{pkg.replace('-', '_')}-{pins[pkg]}.dist-info", dist.name
        assert (mnt / "opt/pathflow/app/flows/pipeline.py").is_file()  # the code deployments run
    finally:
        subprocess.run([*BUILDAH, "umount", ctr], capture_output=True)
        subprocess.run([*BUILDAH, "rm", ctr], capture_output=True)
    default_command_starts_a_gpu_pool_worker(config["Cmd"], prefect_api)


def default_command_starts_a_gpu_pool_worker(cmd: list[str], api: str) -> None:
    """The image's own command, run as it is, registers a worker with the docker GPU pool."""
    import signal
    import time

    import httpx

    from .conftest import clean_env

    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "pathflow-gpu", "--type", "docker",
                    "--base-job-template", str(ROOT / "deploy" / "gpu-pool.json"), "--overwrite"],
                   env=clean_env(PREFECT_API_URL=api), check=True, capture_output=True, timeout=120)
    ctr = subprocess.run([*BUILDAH, "from", TAG], capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.Popen([*BUILDAH, "run", "--isolation", "chroot", "--env", f"PREFECT_API_URL={api}", ctr,
                             "--", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline, workers = time.time() + 180, []
        while time.time() < deadline and not workers and proc.poll() is None:
            time.sleep(2)
            workers = httpx.post(f"{api}/work_pools/pathflow-gpu/workers/filter", json={}).json()
        assert workers, proc.stdout.read() if proc.poll() is not None else "no worker registered in 180 s"
        assert workers[0]["name"].startswith("DockerWorker")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        subprocess.run([*BUILDAH, "rm", ctr], capture_output=True)
