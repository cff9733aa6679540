"""What `pathflow run` prints in a terminal: by default the run id, the progress bar, the table and the
run folder — no Prefect state lines, no tracebacks; -v adds pathflow's own logs, -vv the libraries'."""

import pytest

from .runs import pathflow, write_cfg


@pytest.fixture(scope="module")
def cfg_path(demo_cfg, tmp_path_factory):
    return write_cfg(demo_cfg, tmp_path_factory.mktemp("terminal"))


def run(cfg_path, tmp_path, prefect_api, *flags, **env):
    return pathflow([*flags, "run", "-c", str(cfg_path), "--store", str(tmp_path / "store")],
                    PREFECT_API_URL=prefect_api, COLUMNS="300", **env)  # no wrapping


def test_normal_output_is_quiet(cfg_path, tmp_path, prefect_api):
    r = run(cfg_path, tmp_path, prefect_api)
    assert r.returncode == 0, r.stderr
    both = r.stdout + r.stderr
    for noise in ("Finished in state", "Traceback", "INFO", "DEBUG", " | ", "Beginning flow run", "httpx"):
        assert noise not in both, (noise, both)
    assert "features traced" in r.stdout and "complete" in r.stdout


def test_verbose_shows_pathflows_logs_and_very_verbose_the_libraries(cfg_path, tmp_path, prefect_api):
    v = run(cfg_path, tmp_path / "v", prefect_api, "-v")
    assert v.returncode == 0, v.stderr
    assert "audit: 30 features" in v.stderr and "2 targets" in v.stderr  # a task's message; pathflow.pathways
    assert "Finished in state" not in v.stderr and "HTTP Request" not in v.stderr
    vv = run(cfg_path, tmp_path / "vv", prefect_api, "-vv")
    assert vv.returncode == 0, vv.stderr
    assert "HTTP Request" in vv.stderr or "httpx" in vv.stderr  # the libraries' debug logs too


def test_a_failed_batch_is_one_error_line(cfg_path, tmp_path, prefect_api):
    r = run(cfg_path, tmp_path, prefect_api, PATHFLOW_FAIL_BATCH="L2-batch0")
    assert r.returncode == 1
    both = r.stdout + r.stderr
    assert "Traceback" not in both and "ERROR" not in both
    assert sum(line.startswith("error:") for line in both.splitlines()) == 1
    assert "L2-batch0: failing as PATHFLOW_FAIL_BATCH asks" in both.replace("\n", " ")
