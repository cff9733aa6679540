from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-addiction"


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
