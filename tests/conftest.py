import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-addiction"


def clean_env(**extra):
    """The environment of a CLI subprocess: no Prefect or pathflow settings of the caller."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PATHFLOW_"))}
    e.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(home: Path):
    """A real `prefect server start` on loopback (SQLite in ``home``), healthy; yields its API URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=clean_env(PREFECT_HOME=str(home), PREFECT_UI_API_URL=url),  # the UI's API is not derived from --port
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail("prefect server exited")
            time.sleep(1)
        else:
            pytest.fail("prefect server did not become healthy in 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` on loopback (SQLite), for runs that report to an API."""
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """One demo bundle for the whole test session (written by the real `write_demo`)."""
    from pathflow.demo import write_demo

    d = tmp_path_factory.mktemp("demo")
    write_demo(d, seed=0)
    return d


@pytest.fixture(scope="session")
def demo_cfg(demo_dir):
    from pathflow.config import load_config

    return load_config(demo_dir / "config.yaml")


@pytest.fixture(scope="session")
def ctx(demo_cfg):
    from pathflow.context import get_context

    return get_context(demo_cfg)


@pytest.fixture(autouse=True)
def _no_store_env(monkeypatch):
    monkeypatch.delenv("PATHFLOW_STORE", raising=False)


@contextmanager
def s3_server():
    """An S3-compatible server (moto) on loopback with a bucket ``pathflow``; yields the client
    environment (dummy credentials)."""
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

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="pathflow")
    try:
        yield env
    finally:
        server.stop()


@pytest.fixture
def s3():
    with s3_server() as env:
        yield env


def require(*paths: str) -> None:
    """Skip a test whose system tools (Chromium, buildah, node modules…) are missing on a developer's
    machine; under CI, where .ci/run installs them, a missing one is a failure."""
    import shutil

    missing = [p for p in paths if not (Path(p).exists() or shutil.which(p))]
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"missing {', '.join(missing)} (.ci/run installs it)")


@pytest.fixture(scope="module")
def tiny():
    """A random 3-layer, 32-wide LLaMA: the model tests' own (no demo bundle needed)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def assert_same_graphs(one, two, dense_one, dense_two) -> None:
    """Two runs of ``prompt_graphs`` gave the same graphs: nodes, edges, replays and the dense weights."""
    for a, b in zip(one, two, strict=True):
        assert a.nodes == b.nodes and a.edges.keys() == b.edges.keys()
        assert all(b.edges[e] == pytest.approx(w, rel=1e-4, abs=1e-6) for e, w in a.edges.items())
        assert a.replay.keys() == b.replay.keys()
        assert all(b.replay[k]["actual"] == pytest.approx(v["actual"], rel=1e-4, abs=1e-6) for k, v in a.replay.items())
    assert torch.allclose(torch.stack([r["weight"] for r in dense_one["targets"]]),
                          torch.stack([r["weight"] for r in dense_two["targets"]]), atol=1e-6)
