"""Nothing lost, nothing silently wrong (issue 11): each case of the hostile sweep that gave a wrong
result, lost data or ended badly, as a test that failed before the fix.

The contract every case checks: exit 0 with correct output, or a one-line error that names the
problem with a non-zero exit — never a traceback, never a changed complete run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pathflow_cli as cli

from .runs import write_cfg


def call(args, capsys) -> tuple[int, str]:
    """``pathflow ARGS`` in this process, as the console script runs it: (exit code, stdout+stderr)."""
    old = sys.argv
    sys.argv = ["pathflow", *map(str, args)]
    cli.console.width = cli.err.width = 2000  # no wrapping: one message is one line
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out + out.err


def one_line_error(code: int, out: str, *needles: str) -> None:
    assert code != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for n in needles:
        assert n in out, (n, out)


def tree(path: Path) -> dict:
    """Every file under ``path`` with its bytes (what 'nothing changed' compares)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def complete_run(demo_cfg, tmp_path_factory, prefect_api):
    """A complete `pathflow run` of the demo study (targets of layers 1–2, at the second-to-last
    token) in its own store."""
    from .runs import pathflow

    tmp = tmp_path_factory.mktemp("complete")
    store = tmp / "store"
    cfg = demo_cfg.model_copy(deep=True)
    cfg.selection.layers = [1, 2]
    cfg.gradients.position = -2
    r = pathflow(["run", "-c", str(_cfg_file(cfg, tmp)), "--store", str(store)], PREFECT_API_URL=prefect_api)
    assert r.returncode == 0, r.stdout + r.stderr
    (run_dir,) = (store / "runs").iterdir()
    return store, run_dir, cfg


# -- silently wrong -------------------------------------------------------------------------------


def test_position_beyond_a_prompt_is_an_error_not_wrapped(demo_cfg, tmp_path, capsys):
    from pathflow.errors import PathflowError
    from pathflow.model import resolve_position
    from pathflow.preflight import prompt_positions

    assert resolve_position(-1, 10) == 9 and resolve_position(3, 10) == 3 and resolve_position(-10 + 1, 10) == 1
    for bad in (10, 9999, -11, 0, -10):
        with pytest.raises(PathflowError, match="gradients.position"):
            resolve_position(bad, 10)
    cfg = demo_cfg.model_copy(deep=True)
    cfg.gradients.position = 9999
    with pytest.raises(PathflowError, match="9999 is outside the '(safe|risky)' prompt"):
        prompt_positions(cfg)
    path = write_cfg(demo_cfg, tmp_path, position=9999)
    store = tmp_path / "store"
    code, out = call(["run", "-c", path, "--store", store], capsys)
    one_line_error(code, out, "gradients.position 9999 is outside")
    assert not store.exists()  # refused before any run folder was made


def test_every_output_names_the_position_it_used(complete_run, ctx):
    import zarr

    _, run_dir, cfg = complete_run
    n = {k: int(v.shape[1]) for k, v in ctx.prompt_ids.items()}
    expected = {k: n[k] - 2 for k in n}  # gradients.position = -2
    m = json.loads((run_dir / "manifest.json").read_text())
    assert {k: v["position"] for k, v in m["positions"].items()} == expected
    assert zarr.open_group(str(run_dir / "jacobians.zarr"), mode="r").attrs["positions"] == expected
    for name in ("candidates.json", "validated_pathways.json"):
        body = json.loads((run_dir / "pathways" / name).read_text())
        assert {k: v["position"] for k, v in body["positions"].items()} == expected
    val = json.loads((run_dir / "pathways/validated_pathways.json").read_text())["targets"]
    assert all(p["position"] == expected[prompt] for per in val.values() for prompt, p in per.items())
    feats = json.loads((run_dir / "integrated/features.json").read_text())["features"]
    assert all(r["positions"] == expected for r in feats)
    for g in (run_dir / "integrated/graphs").glob("*.json"):
        if g.name == "graph-metadata.json":
            continue
        graph = json.loads(g.read_text())
        prompt = graph["metadata"]["info"]["prompt_name"]
        assert graph["metadata"]["info"]["position"] == expected[prompt]  # the target's, not the last token
        target = graph["qParams"]["pinnedIds"][0]
        assert int(target.rsplit("_", 1)[1]) == expected[prompt]
        assert max(n["ctx_idx"] for n in graph["nodes"] if n["feature_type"] != "embedding"
                   and n["feature_type"] != "logit") <= expected[prompt]
    assert f"at token {expected['safe']}" in (run_dir / "integrated/report.md").read_text()


def _checkpoint(path: Path, cohen_d: float, classified_as: str, timestamp: str | None, mtime: float) -> None:
    body = {"results": [{"feature": "L2-7", "layer": 2, "feature_id": 7, "cohen_d": cohen_d, "is_causal": True,
                         "classified_as": classified_as}]}
    if timestamp:
        body["timestamp"] = timestamp
    path.write_text(json.dumps(body))
    os.utime(path, (mtime, mtime))


def test_checkpoint_precedence_is_one_comparable_time(tmp_path):
    from pathflow.readers import Findings, read_checkpoints

    t_old, t_new = time.mktime((2025, 1, 1, 0, 0, 0, 0, 0, 0)), time.mktime((2025, 10, 20, 0, 0, 0, 0, 0, 0))
    # an old undated file (old mtime) must lose to a newer dated one
    old = tmp_path / "checkpoint_old.json"
    new = tmp_path / "checkpoint_L1_2_7_20251015_120000.json"
    _checkpoint(old, 99.0, "risky", None, t_old)
    _checkpoint(new, 0.5, "safe", None, t_new)
    f = Findings()
    feats, _ = read_checkpoints([old, new], f)
    assert feats["L2-7"].direction == "safe" and feats["L2-7"].cohen_d == 0.5
    (w,) = [w for w in f.warnings if w.code == "duplicate_disagrees"]
    assert f"{new} wins as the newer" in w.message and "the timestamp in its name" in w.message
    assert "its modification time" in w.message
    # an undated file written after a dated one wins, and the warning says why
    _checkpoint(old, 99.0, "risky", None, t_new + 86400 * 60)
    f = Findings()
    feats, _ = read_checkpoints([new, old], f)
    assert feats["L2-7"].cohen_d == 99.0
    assert f"{old} wins as the newer" in f.warnings[0].message
    # the body's timestamp (ISO or the study's format) beats the name's
    _checkpoint(new, 0.5, "safe", "2026-01-01T00:00:00", t_new)
    f = Findings()
    feats, _ = read_checkpoints([new, old], f)
    assert feats["L2-7"].cohen_d == 0.5 and "its timestamp field" in f.warnings[0].message


@pytest.mark.parametrize("run_id", ["../../x", "..", "/abs/path", "a/b", ".hidden", "-x", "a..b", "", "x" * 200,
                                    "ok\nno"])
def test_run_ids_never_walk_out_of_the_store(run_id, tmp_path, capsys):
    from pathflow.locations import check_run_id
    from storage.store import Store, StoreError

    with pytest.raises(StoreError, match="invalid run id"):
        check_run_id(run_id)
    with pytest.raises(StoreError):
        Store(str(tmp_path / "store")).run(run_id)
    store = ["--store", tmp_path / "store"]
    for cmd, args in ((["run"], [f"--resume={run_id}", *store]), (["runs", "show"], [*store, "--", run_id]),
                      (["runs", "verify"], [*store, "--", run_id]), (["runs", "diff"], [*store, "--", run_id, "x"])):
        code, out = call([*cmd, *args], capsys)
        one_line_error(code, out, "invalid run id")
    assert not any(tmp_path.rglob("*"))  # nothing written anywhere


def test_flow_parameter_run_id_cannot_leave_the_store(demo_cfg, tmp_path):
    from flows.pipeline import start_or_resume
    from storage.store import StoreError

    cfg = demo_cfg.model_copy(deep=True)
    cfg.store.url = str(tmp_path / "s" / "store")
    with pytest.raises(StoreError, match="invalid run id"):
        start_or_resume(cfg, "../../x", False, "pipeline")
    assert not any(tmp_path.rglob("*"))


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
    else:
        from .conftest import s3_server

        with s3_server() as env:
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                yield "s3://pathflow/lease-test"
            finally:
                for k, v in old.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_one_writer_per_run(store_url, monkeypatch):
    from storage.store import LeaseHeld, Store

    run = Store(store_url).run("r1")
    lease = run.acquire(ttl=30)
    other = Store(store_url).run("r1")
    with pytest.raises(LeaseHeld, match="being written by another process"):
        other.acquire(ttl=30)
    assert other.writer()["owner"] == lease.owner
    lease.release()
    assert other.writer() is None
    again = other.acquire(ttl=30)  # free again
    # an expired lease is taken over
    again._stop.set()
    body = json.loads(run.fs.cat(run._abs("lease.json")))
    run.fs.pipe_file(run._abs("lease.json"), json.dumps({**body, "expires": time.time() - 1}).encode())
    third = Store(store_url).run("r1").acquire(ttl=30)
    assert json.loads(run.fs.cat(run._abs("lease.json")))["owner"] == third.owner
    # ... and the one that lost it notices at its next renewal
    lost = []
    again.on_lost = lambda: lost.append(True)
    again._stop.clear()
    again.ttl = 0.3
    again._renew()
    assert lost == [True]
    third.release()


def test_a_dead_local_holder_does_not_block_resume(tmp_path):
    from storage.store import Store

    run = Store(str(tmp_path)).run("r1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.fs.makedirs(run.path, exist_ok=True)
    run.fs.pipe_file(run._abs("lease.json"), json.dumps(
        {"owner": "x", "host": os.uname().nodename, "pid": dead.pid, "expires": time.time() + 3600}).encode())
    assert run.writer() is None  # its holder is gone: stale at once, no need to wait an hour
    run.acquire(ttl=30).release()


def test_a_complete_manifest_is_never_changed(complete_run):
    from storage.store import RunComplete, Store

    store, run_dir, _ = complete_run
    before = tree(run_dir)
    run = Store(str(store)).run(run_dir.name)
    run.fail("stopped later")  # what a second, stopped process did: now a no-op
    for change in (lambda: run.update(status="failed"), lambda: run.step("audit", "failed"),
                   lambda: run.write_text("integrated/report.md", "x")):
        with pytest.raises(RunComplete):
            change()
    assert tree(run_dir) == before


def test_concurrent_resume_is_refused_and_cannot_fail_a_complete_run(demo_cfg, tmp_path, prefect_api):
    from .runs import pathflow, run_cli

    path = write_cfg(demo_cfg, tmp_path, batch_size=1)
    store = tmp_path / "store"
    first = run_cli(["run", "-c", str(path), "--store", str(store)], PREFECT_API_URL=prefect_api,
                    PATHFLOW_BATCH_DELAY_S="4.0")  # still writing when the second command checks
    deadline = time.time() + 120
    while time.time() < deadline and not list(store.glob("runs/*/lease.json")):
        time.sleep(0.1)
    (run_dir,) = (store / "runs").iterdir()
    second = pathflow(["run", "--resume", run_dir.name, "--store", str(store)], PREFECT_API_URL=prefect_api)
    assert second.returncode == 2 and "being written by another process" in second.stderr, second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    assert first.wait(300) == 0, first.stdout.read()
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and not (run_dir / "lease.json").exists()
    late = pathflow(["run", "--resume", run_dir.name, "--store", str(store)], PREFECT_API_URL=prefect_api)
    assert late.returncode == 2 and "is complete" in late.stderr and "can be resumed" not in late.stderr
    assert json.loads((run_dir / "manifest.json").read_text()) == m


def test_complete_runs_are_never_written_into(complete_run, tmp_path, capsys):
    from storage.store import Store, StoreError

    store, run_dir, cfg = complete_run
    before = tree(run_dir)
    for inside in (run_dir, run_dir / "integrated", run_dir / "nested" / "store"):
        with pytest.raises(StoreError, match="inside the run folder"):
            Store(str(inside))
        code, out = call(["runs", "list", "--store", inside], capsys)
        one_line_error(code, out, "inside the run folder")
    target = run_dir / "features" / "causal_features.json"
    code, out = call(["select", "-c", _cfg_file(cfg, tmp_path), "--out", target], capsys)
    one_line_error(code, out, "inside the run folder")
    assert tree(run_dir) == before
    # a file injected after completion: verify fails and names it
    code, out = call(["runs", "verify", run_dir.name, "--store", store], capsys)
    assert code == 0 and "nothing else" in out
    (run_dir / "integrated" / "extra.html").write_text("<script>injected</script>")
    try:
        code, out = call(["runs", "verify", run_dir.name, "--store", store], capsys)
        one_line_error(code, out, "not in the manifest integrated/extra.html", "1 files it does not list")
    finally:
        (run_dir / "integrated" / "extra.html").unlink()


def _cfg_file(cfg, tmp_path) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(json.dumps(cfg.model_dump(mode="json")))
    return p


def test_demo_never_overwrites_a_folder(tmp_path, capsys):
    d = tmp_path / "mine"
    (d / "study").mkdir(parents=True)
    (d / "config.yaml").write_text("my: config\n")
    (d / "study" / "prompts.json").write_text('{"safe": "mine"}')
    before = tree(d)
    code, out = call(["demo", d], capsys)
    one_line_error(code, out, "exists and is not empty")
    assert tree(d) == before and [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary left


def test_demo_is_safe_to_repeat(demo_dir, tmp_path, capsys):
    """`pathflow demo DIR` on a folder that already holds the bundle of that seed writes nothing and exits
    0 (deploy/README runs it before every deployment run); another seed there is refused, nothing changed."""
    d = tmp_path / "pathflow-demo"
    shutil.copytree(demo_dir, d)
    before = tree(d)
    code, out = call(["demo", d], capsys)
    assert code == 0 and "already in" in out and "Traceback" not in out, out
    assert tree(d) == before
    code, out = call(["demo", d, "--seed", "1"], capsys)
    one_line_error(code, out, "exists and is not empty")
    assert tree(d) == before


@pytest.mark.parametrize("url,needle", [
    ("memory://runs", "does not persist"),
    ("http://example.org/store", "read-only"),
    ("ftp://host/x", "unsupported scheme"),
    ("s3://AKIAXXXX:sEcReT@bucket/x", "carries credentials"),
])
def test_stores_that_do_not_persist_or_carry_credentials_are_refused(url, needle, demo_dir, tmp_path, capsys):
    for args in (["run", "-c", demo_dir / "config.yaml", "--store", url], ["runs", "list", "--store", url],
                 ["local", "-c", demo_dir / "config.yaml", "--store", url]):
        code, out = call(args, capsys)
        one_line_error(code, out, needle)
        assert "sEcReT" not in out and "AKIAXXXX" not in out


def test_store_checks_before_any_work(tmp_path, demo_dir, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, out = call(["run", "-c", demo_dir / "config.yaml", "--store", a_file], capsys)
    one_line_error(code, out, "is a file, not a folder")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "s3fs" else real(name, *a))
    code, out = call(["runs", "list", "--store", "s3://bucket/x"], capsys)
    one_line_error(code, out, "needs the s3fs package", "pathflow[s3]")


# -- ended badly ----------------------------------------------------------------------------------


def test_user_text_is_never_read_as_markup(tmp_path, capsys):
    weird = tmp_path / "[/bold] and [red]x[/red]" / "cfg.yaml"
    code, out = call(["audit", "-c", weird], capsys)
    one_line_error(code, out, "[/bold] and [red]x[/red]")
    code, out = call(["runs", "show", "x[/]y", "--store", tmp_path], capsys)
    one_line_error(code, out, "x[/]y")


@pytest.mark.parametrize("section,key,value", [
    ("replay", "steer_value", ".nan"), ("tokens", "alpha0", ".inf"), ("sae", "threshold", "-.inf"),
    ("gradients", "sae_budget_gb", ".nan"), ("replay", "scale", ".nan")])
def test_non_finite_config_values_are_rejected_where_they_enter(section, key, value, demo_dir, tmp_path, capsys):
    import yaml

    data = yaml.safe_load((demo_dir / "config.yaml").read_text())
    data.setdefault(section, {})[key] = "PLACEHOLDER"
    text = yaml.safe_dump(data).replace("PLACEHOLDER", value)
    path = demo_dir.parent / f"nonfinite-{section}-{key}.yaml"  # beside the bundle: its relative paths resolve
    path.write_text(text.replace("./model", str(demo_dir / "model")).replace("./saes", str(demo_dir / "saes")))
    code, out = call(["run", "-c", path, "--store", tmp_path / "s"], capsys)
    one_line_error(code, out, f"{section}.{key}", "not a finite number")
    assert not (tmp_path / "s").exists()


def test_non_finite_study_values_are_findings_not_crashes(tmp_path):
    from pathflow.readers import Findings, read_checkpoints

    p = tmp_path / "ck.json"
    p.write_text('{"results": [{"feature": "L1-1", "layer": 1, "feature_id": 1, "cohen_d": 0.5, "is_causal": true,'
                 ' "classified_as": "safe", "safe_p_value": 1e999}, {"feature": "L1-2", "layer": 1, "feature_id": 2,'
                 ' "cohen_d": 0.4, "is_causal": true, "classified_as": "safe"}]}')
    f = Findings()
    feats, _ = read_checkpoints([p], f)
    assert list(feats) == ["L1-2"]
    (e,) = f.errors
    assert e.code == "not_finite" and "safe_p_value" in e.message and e.record == 0 and e.file == str(p)
    json.dumps([r.model_dump() for r in feats.values()], allow_nan=False)  # what integrate writes


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_deep_large_and_special_study_files_are_bounded(demo_cfg, tmp_path):
    from pathflow.study import audit

    study = tmp_path / "study"
    (study / "ck").mkdir(parents=True)
    (study / "logs").mkdir()
    deep = "[" * 100_000 + "]" * 100_000
    (study / "ck" / "deep.json").write_text('{"results": [' + deep + "]}")
    (study / "ck" / "deepfield.json").write_text(
        '{"results": [{"feature": "L1-1", "layer": 1, "feature_id": 1, "is_causal": true, "x": ' + deep + "}]}")
    (study / "logs" / "deep.json").write_text('[{"feature": "L1-1", "condition": "safe_baseline", "parsed": '
                                              + deep + "}]")
    (study / "logs" / "deep.jsonl").write_text('{"feature": ' + deep + "}\n")
    os.mkfifo(study / "logs" / "fifo.json")
    cfg = demo_cfg.model_copy(deep=True)
    cfg.study.checkpoints = [str(study / "ck")]
    cfg.study.response_logs = [str(study / "logs")]
    rss0 = _rss_mb()
    t0 = time.monotonic()
    report, _ = audit(cfg)
    assert time.monotonic() - t0 < 60 and _rss_mb() - rss0 < 500
    codes = {(Path(e["file"]).name, e["code"]) for e in report["errors"] if e["file"]}
    assert {("deep.json", "too_deep"), ("deepfield.json", "too_deep"), ("deep.jsonl", "too_deep"),
            ("fifo.json", "not_a_file")} <= codes, codes
    assert any(n == "deep.json" and c == "too_deep" for n, c in codes)


def test_a_huge_prompt_is_refused_before_any_work(demo_cfg, tmp_path):
    from pathflow.errors import PathflowError
    from pathflow.preflight import preflight

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"safe": "Balance $20. " * 3500, "risky": "ok"}))
    cfg = demo_cfg.model_copy(deep=True)
    cfg.study.prompts = str(prompts)
    with pytest.raises(PathflowError, match="more than study.max_prompt_tokens = 4096"):
        preflight(cfg)
    cfg.study.max_prompt_tokens = 100_000
    with pytest.raises(PathflowError, match="more than the model's context of 512"):
        preflight(cfg)


def test_contrast_prompts_not_in_the_study_are_refused_before_any_work(demo_cfg, tmp_path):
    from pathflow.errors import PathflowError
    from pathflow.preflight import preflight

    cfg = demo_cfg.model_copy(deep=True)
    cfg.contrast = cfg.contrast.model_validate({"prompts": ["risky", "winning"]})
    with pytest.raises(PathflowError, match="contrast.prompts names 'winning'.*its prompts: .*risky"):
        preflight(cfg)
    cfg.contrast = cfg.contrast.model_validate({"prompts": ["safe", "risky"]})  # both there: fine
    assert set(preflight(cfg)) == {"risky", "safe"}


def test_resume_does_not_depend_on_how_the_store_url_is_written(demo_cfg, tmp_path):
    a = demo_cfg.model_copy(deep=True)
    a.store.url = str(tmp_path / "store")
    b = demo_cfg.model_copy(deep=True)
    b.store.url = str(tmp_path / "store") + "/"
    c = demo_cfg.model_copy(deep=True)
    c.store.url = "s3://bucket/elsewhere"
    assert a.hash() == b.hash() == c.hash()
    c.gradients.batch_size += 1
    assert c.hash() != a.hash()


def test_no_resume_hint_for_complete_or_missing_runs(complete_run, capsys, tmp_path):
    store, run_dir, _ = complete_run
    code, out = call(["run", "--resume", run_dir.name, "--store", store], capsys)
    one_line_error(code, out, "is complete")
    assert "can be resumed" not in out
    code, out = call(["run", "--resume", "20990101-000000-abcdef", "--store", store], capsys)
    one_line_error(code, out, "no run 20990101-000000-abcdef")
    assert "can be resumed" not in out


@pytest.mark.parametrize("body", ['{"run_id": "x", "status": "comp', "[1, 2]", "{}", '{"run_id": "x"}', "",
                                  '{"run_id": "x", "status": "complete", "config": {}, "outputs": []}'])
def test_broken_manifests_are_one_line_errors(body, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(body)
    code, out = call(["runs", "list", "--store", tmp_path], capsys)
    assert code == 0 and "unreadable" in out and "Traceback" not in out
    for cmd in ("show", "verify"):
        code, out = call(["runs", cmd, "r1", "--store", tmp_path], capsys)
        one_line_error(code, out, "manifest.json")


def test_bad_settings_are_one_line_errors_before_work(demo_dir, tmp_path, capsys):
    import yaml

    base = yaml.safe_load((demo_dir / "config.yaml").read_text())

    def with_(section, key, value):
        data = json.loads(json.dumps(base))
        data[section][key] = value
        p = demo_dir.parent / f"bad-{section}-{key}-{abs(hash(value))}.yaml"
        p.write_text(yaml.safe_dump(data).replace("./model", str(demo_dir / "model"))
                     .replace("./saes", str(demo_dir / "saes")))
        return p

    import torch

    cases = [(with_("model", "device", "cdua"), "is not a device"),
             (with_("sae", "pattern", "L{lyer}R"), "the only placeholder is {layer}"),
             (with_("sae", "pattern", "Llama3_1-8B-Base-L{layer}R-16x"), "no SAE at")]
    if not torch.cuda.is_available():
        cases.append((with_("model", "device", "cuda"), "no CUDA device"))
    for path, needle in cases:
        code, out = call(["run", "-c", path, "--store", tmp_path / "s"], capsys)
        one_line_error(code, out, needle)
    assert not (tmp_path / "s").exists()
    code, out = call(["audit", "-c", demo_dir / "config.yaml", "--out", tmp_path / "a-file" / "x.json"], capsys)
    assert code == 0 or "Traceback" not in out  # the folder is created
    (tmp_path / "f").write_text("")
    code, out = call(["audit", "-c", demo_dir / "config.yaml", "--out", tmp_path / "f" / "x.json"], capsys)
    one_line_error(code, out, "is not a writable folder")
    code, out = call(["select", "-c", demo_dir / "config.yaml", "--out", tmp_path], capsys)
    one_line_error(code, out, "is a folder")


def test_unlistable_study_folder_is_a_finding(demo_cfg, tmp_path, monkeypatch):
    from pathflow.readers import Findings, expand

    d = tmp_path / "ck"
    d.mkdir()
    real = Path.iterdir

    def deny(self):
        if self == d:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", deny)
    f = Findings()
    assert expand([str(d)], f) == []
    assert f.errors[0].code == "unreadable" and "Permission denied" in f.errors[0].message


# -- interrupts, with real signals ----------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _uvicorn_servers() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "prefect.server.api.server:create_app"], capture_output=True, text=True)
    return {int(x) for x in out.stdout.split()}


def test_a_check_that_fails_after_the_server_launched_stops_it(demo_cfg, tmp_path, capsys, monkeypatch):
    """The temporary server boots while the command audits the study: an audit that stops the
    command stops that server at once (in a caller's process too, where no parent-death signal
    would), and nothing is written."""
    from flows import server

    launched = []
    real = server.launch_server
    monkeypatch.setattr(server, "early_server", lambda: launched.append(real()) or launched[-1])
    bad = tmp_path / "more-checkpoints"
    bad.mkdir()
    (bad / "checkpoint_broken.json").write_text('{"results": [{"feature": "L2-7", "layer": 2}]}')
    cfg = demo_cfg.model_copy(deep=True)
    cfg.study.checkpoints = [*cfg.study.checkpoints, str(bad)]
    store = tmp_path / "store"
    code, out = call(["run", "-c", _cfg_file(cfg, tmp_path), "--store", store], capsys)
    assert code == 1 and "the study audit found 1 errors" in out and "Traceback" not in out
    (proc, _url), = launched
    assert proc.poll() is not None, "the temporary Prefect server outlived the failed command"
    assert not store.exists()


def test_the_temporary_servers_own_output_goes_to_a_file_not_the_terminal(tmp_path, monkeypatch, capfd):
    """uvicorn prints a traceback when stopped mid-request (a run interrupted): none of its output
    reaches the terminal. A server that cannot start is one error with its last lines and the file
    that holds the rest; a server that wrote nothing leaves no file."""
    from flows import server
    from pathflow.errors import PathflowError

    home = tmp_path / "home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    proc, url = server.launch_server()
    server.wait_healthy(proc, url)
    server.stop(proc)
    assert list((home / "logs").iterdir()) == []

    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/no-such-dir/p.db")
    proc, url = server.launch_server()
    with pytest.raises(PathflowError) as e:
        server.wait_healthy(proc, url)
    msg = str(e.value)
    assert "exited with code" in msg and "unable to open database file" in msg and "Traceback" not in msg
    (kept,) = (home / "logs").iterdir()
    assert str(kept) in msg and "Traceback" in kept.read_text()  # the whole of it, for a look later
    assert proc.poll() is not None and proc not in server._PROCS
    seen = capfd.readouterr()
    assert "Traceback" not in seen.out + seen.err and "unable to open" not in seen.out + seen.err


@pytest.mark.parametrize("how", ["SIGINT-group", "SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupts_end_the_run_promptly_as_resumable(how, demo_dir, tmp_path):
    from .conftest import clean_env

    store = tmp_path / "store"
    before = _uvicorn_servers()
    proc = subprocess.Popen([sys.executable, "-m", "pathflow", "run", "-c", str(demo_dir / "config.yaml"), "--store",
                             str(store)], env=clean_env(PATHFLOW_BATCH_DELAY_S="60"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(store.glob("runs/*/pathways/plan.json")):
        time.sleep(0.2)
    assert list(store.glob("runs/*/pathways/plan.json")), "the run never reached its batches"
    server = set(_uvicorn_servers()) - before
    assert server, "no temporary server found"
    t0 = time.monotonic()
    if how == "SIGINT-group":
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
    else:
        os.kill(proc.pid, getattr(signal, how))
    out = proc.communicate(timeout=60)[0]
    took = time.monotonic() - t0
    (run_dir,) = (store / "runs").iterdir()
    time.sleep(1)  # the kernel's SIGTERM to an orphaned server is asynchronous
    assert not (_uvicorn_servers() & server), "the temporary Prefect server outlived the command"
    m = json.loads((run_dir / "manifest.json").read_text())
    if how == "SIGKILL":
        assert proc.returncode == -9 and m["status"] == "running"
    else:
        assert took < 15, f"took {took:.1f} s to stop"
        assert proc.returncode == (143 if how == "SIGTERM" else 130), out
        assert m["status"] == "failed" and "interrupted" in m["error"] and "resumable" in m["error"]
        assert f"pathflow run --resume {run_dir.name}" in out and "Traceback" not in out
        assert not (run_dir / "lease.json").exists()
    if how in ("SIGINT-group", "SIGKILL"):  # and it resumes to completion
        r = subprocess.run([sys.executable, "-m", "pathflow", "run", "--resume", run_dir.name, "--store", str(store)],
                           env=clean_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    shutil.rmtree(tmp_path, ignore_errors=True)


_LATE_SENDS = """
import sys, time
from prefect import flow, get_run_logger
import typer
from flows import server
from pathflow_cli import console_main
from pathflow_cli.common import app

server._drain = lambda timeout=5.0: None  # as when the drain's timeout passed on a loaded machine
held = {}

@flow
def probe():
    held["logger"] = get_run_logger()
    held["logger"].info("sent while the server answers")
    time.sleep(3)  # the log worker sends it: its client has now connected once, so it retries
    for i in range(3):
        held["logger"].info("still queued when the server stops %d", i)

@app.command("probe")
def probe_cmd():
    with server.prefect_api():
        probe()
    held["logger"].info("a record after the server stopped")  # no API URL left in this thread
    print("done", time.monotonic(), flush=True)
    raise typer.Exit(3)

sys.argv = ["pathflow", "probe"]
console_main()
"""


def test_prefect_sends_left_after_the_temporary_server_stopped_do_not_hold_the_exit(tmp_path):
    """CI once saw a Ctrl-C'd run print its resume line and then not exit for over a minute: Prefect's
    at-exit drain was retrying logs queued before the temporary server stopped (2 + 4 + ... + 32 s), and
    a record logged after it would have booted an ephemeral server of Prefect's own to send it. Measured
    without the fix: 67.8 s to exit; with it: the bound (2 s)."""
    from .conftest import clean_env

    script = tmp_path / "late_sends.py"
    script.write_text(_LATE_SENDS)
    r = subprocess.run([sys.executable, str(script)], env=clean_env(PYTHONPATH=str(Path(__file__).parents[1])),
                       capture_output=True, text=True, timeout=240)
    end = time.monotonic()
    done = [line for line in r.stdout.splitlines() if line.startswith("done ")]
    assert done, r.stdout + r.stderr
    took = end - float(done[0].split()[1])
    assert r.returncode == 3, r.stdout + r.stderr  # the command's own exit code, kept
    assert took < 20, f"the process took {took:.1f} s to exit after its command returned"
    assert "Starting temporary server" not in r.stdout + r.stderr  # no ephemeral server booted for a late record


def test_token_reads_are_bounded_whatever_the_texts(ctx):
    from pathflow.tokens import _budget_batches, activation_maxima

    assert _budget_batches([10, 10, 10, 10], 8, 30) == [(0, 3), (3, 4)]
    assert _budget_batches([5, 5000, 5, 5], 8, 4096) == [(0, 1), (1, 2), (2, 4)]  # a long text alone
    for spans in (_budget_batches([3, 900, 40, 40, 2, 700], 3, 1000),):
        assert spans[0][0] == 0 and spans[-1][1] == 6 and all(a < b for a, b in spans)
        assert all((b - a) * max([3, 900, 40, 40, 2, 700][a:b]) <= 1000 or b - a == 1 for a, b in spans)
    long_text = "Balance $20. You lost. " * 800  # thousands of tokens: once 18 GB in the tokens step
    feats = [(1, i) for i in range(16)]
    got = activation_maxima(ctx.model, ctx.saes, ctx.tokenizer, [long_text, "Bet $10"], feats, top=3, max_tokens=64)
    assert all(h["position"] < 64 for hits in got.values() for h in hits)
    ref = activation_maxima(ctx.model, ctx.saes, ctx.tokenizer, [long_text, "Bet $10"], feats, top=3, max_tokens=64,
                            batch_size=1)
    for f in feats:  # batching by budget changes nothing (up to float rounding under padding)
        # the same hits; two hits whose values tie up to rounding may come in either order
        assert sorted((h["text"], h["position"]) for h in got[f]) == sorted((h["text"], h["position"]) for h in ref[f])
        assert [h["value"] for h in got[f]] == pytest.approx([h["value"] for h in ref[f]], rel=1e-4, abs=1e-5)


def test_run_stops_on_audit_errors_unless_allowed(demo_cfg, tmp_path, prefect_api, capsys):
    from .runs import pathflow

    bad = tmp_path / "more-checkpoints"
    bad.mkdir()
    (bad / "checkpoint_broken.json").write_text('{"results": [{"feature": "L2-7", "layer": 2}]}')
    cfg = demo_cfg.model_copy(deep=True)
    cfg.study.checkpoints = [*cfg.study.checkpoints, str(bad)]
    path = _cfg_file(cfg, tmp_path)
    store = tmp_path / "store"
    code, out = call(["run", "-c", path, "--store", store], capsys)
    one_line_error(code, out, "the study audit found 1 errors", "checkpoint_broken.json", "--allow-audit-errors")
    assert code == 1 and not store.exists()  # stopped before any run folder or server
    r = pathflow(["run", "-c", str(path), "--store", str(store), "--allow-audit-errors"], PREFECT_API_URL=prefect_api)
    assert r.returncode == 0 and "going on despite 1 study audit errors" in r.stderr, r.stdout + r.stderr
    (run_dir,) = (store / "runs").iterdir()
    report = json.loads((run_dir / "audit/data_validation.json").read_text())
    assert [e["code"] for e in report["errors"]] == ["unknown_schema"]


def test_version(capsys):
    from pathflow import __version__

    code, out = call(["--version"], capsys)
    assert code == 0 and out.strip() == f"pathflow {__version__}"


def test_an_unreachable_store_is_one_line_naming_the_environment(tmp_path):
    from .runs import pathflow

    r = pathflow(["runs", "list", "--store", "s3://bucket/x"], AWS_ENDPOINT_URL="http://127.0.0.1:9",
                 AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_MAX_ATTEMPTS="1", COLUMNS="300")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "127.0.0.1:9" in line and "check the store URL" in line and "bug" not in line


def test_decision_answers_are_checked_against_the_tokenizer_before_any_work(demo_cfg, tmp_path, capsys):
    """An answer that is not one token of the model's tokenizer stops `pathflow run` before a server
    starts or a run folder is made, naming the key and what the tokenizer made of it."""
    cfg = demo_cfg.model_copy(deep=True)
    cfg.decision.bet = "Bet 1"
    store = tmp_path / "store"
    code, out = call(["run", "-c", _cfg_file(cfg, tmp_path), "--store", store], capsys)
    one_line_error(code, out, "decision.bet 'Bet 1' is 3 tokens")
    assert code == 2 and not store.exists()
