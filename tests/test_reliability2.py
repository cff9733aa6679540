"""Nothing lost, nothing silently wrong, round two (issue 22): a resume that checks its inputs and its
own outputs, manifests written only under the lease, files checked before work, every PATHFLOW_*
variable validated, a strict config, files that are not files, and security. Each test failed
before its fix."""

import http.client
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from .runs import pathflow
from .test_reliability import call, one_line_error, tree

# -- the environment ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("var,value", [
    ("PATHFLOW_LEASE_TTL_S", "0"), ("PATHFLOW_LEASE_TTL_S", "-5"), ("PATHFLOW_LEASE_TTL_S", "nan"),
    ("PATHFLOW_LEASE_TTL_S", "inf"), ("PATHFLOW_LEASE_TTL_S", "abc"), ("PATHFLOW_INTERRUPT_GRACE_S", "-1"),
    ("PATHFLOW_MAX_JSON_MB", "0"), ("PATHFLOW_MAX_JSON_MB", "1.5"), ("PATHFLOW_SIMULATE_OOM_ABOVE", "x"),
    ("PATHFLOW_BATCH_DELAY_S", "nan")])
def test_bad_environment_variables_are_one_line_before_work(var, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(var, value)
    code, out = call(["runs", "list", "--store", tmp_path], capsys)
    one_line_error(code, out, var)
    assert code == 2


def test_a_lease_ttl_of_zero_cannot_delete_a_run_being_written(tmp_path, capsys, monkeypatch):
    from storage.store import Store

    run = Store(str(tmp_path)).run("r1")
    run.start({"config": {}})
    run.update(status="failed")
    lease = run.acquire(ttl=60)  # another process is writing it
    try:
        monkeypatch.setenv("PATHFLOW_LEASE_TTL_S", "0")
        code, out = call(["runs", "rm", "--yes", "r1", "--store", tmp_path], capsys)
        one_line_error(code, out, "PATHFLOW_LEASE_TTL_S")
        assert (tmp_path / "runs" / "r1" / "manifest.json").is_file()
    finally:
        lease.release()


def test_prefect_settings_are_checked_before_work(demo_dir, tmp_path, monkeypatch):
    from flows.server import check_prefect_env
    from pathflow.errors import PathflowError

    home = tmp_path / "home-file"
    home.write_text("x")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PREFECT_HOME", str(home))
        with pytest.raises(PathflowError, match="PREFECT_HOME .* is a file"):
            check_prefect_env()
    for url, needle in [("not a url", "not an http"), ("http://127.0.0.1:9/api", "does not answer")]:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("PREFECT_API_URL", url)
            with pytest.raises(PathflowError, match=needle):
                check_prefect_env(reach=True)
    with pytest.MonkeyPatch.context() as m:  # without reach, nothing is contacted: only the URL's form is checked
        m.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
        check_prefect_env()


# -- the config ---------------------------------------------------------------------------------------------


def _cfg_text(demo_dir, tmp_path, edit) -> Path:
    text = (demo_dir / "config.yaml").read_text()
    p = tmp_path / "sub" / "config.yaml"
    p.parent.mkdir(exist_ok=True)
    for name in ("model", "saes", "study"):
        if not (p.parent / name).exists():
            os.symlink(demo_dir / name, p.parent / name)
    p.write_text(edit(text))
    return p


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t + "selection:\n  top_per_layer: 1\n", "'selection' is written twice"),
    (lambda t: t.replace("  top_per_layer: 2\n", "  top_per_layer: 2\n  top_per_layer: 9\n"), "written twice"),
    (lambda t: t + "decision: {bet: '1', stop: '1'}\n", "bet and stop are both"),
    (lambda t: t + "tokens: {contrasts: [[safe_with_risky_pach, safe_baseline]]}\n",
     "did you mean 'safe_with_risky_patch'"),
    (lambda t: t + "tokens: {alpha0: 1.0e+308}\n", "tokens.alpha0"),
    (lambda t: t + "replay: {steer_value: 1.0e+300}\n", "replay.steer_value"),
    (lambda t: t + "selection2: {}\n", "unknown key 'selection2' (did you mean 'selection'?)"),
    (lambda t: t.replace("top_per_layer", "top_per_layr"), "did you mean 'top_per_layer'"),
])
def test_config_strictness(edit, needle, demo_dir, tmp_path, capsys):
    code, out = call(["audit", "-c", _cfg_text(demo_dir, tmp_path, edit)], capsys)
    one_line_error(code, out.replace("\n  ", " "), needle)
    assert code == 2


def test_every_relative_path_is_relative_to_the_config_file(demo_dir, tmp_path, monkeypatch):
    from pathflow.config import load_config

    p = _cfg_text(demo_dir, tmp_path, lambda t: t + "store: {url: rel-store}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(p)
    assert cfg.store.url == str(p.parent / "rel-store")
    assert cfg.model.name_or_path == str((p.parent / "model").resolve())  # the link beside the file, followed


def test_include_must_name_a_feature_of_the_study(demo_dir, tmp_path, capsys):
    p = _cfg_text(demo_dir, tmp_path, lambda t: t.replace("  rank_by: cohen_d\n", "  rank_by: cohen_d\n  include: "
                                                           "[L1-9999]\n"))
    code, out = call(["run", "-c", p, "--store", tmp_path / "s"], capsys)
    one_line_error(code, out, "selection.include", "L1-9999")
    assert not (tmp_path / "s" / "runs").exists()


def test_globs_do_not_follow_symlink_loops(tmp_path):
    from pathflow.readers import Findings, expand

    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink("..", tmp_path / "a" / "b" / "up")
    os.symlink(".", tmp_path / "a" / "self")
    (tmp_path / "a" / "b" / "x.json").write_text("{}")
    t0 = time.monotonic()
    found = expand([f"{tmp_path}/**/*.json"], Findings())
    assert found == [tmp_path / "a" / "b" / "x.json"]
    assert time.monotonic() - t0 < 5


# -- the model's and the SAEs' files -------------------------------------------------------------------------


def _bundle(demo_dir, tmp_path) -> Path:
    d = tmp_path / "bundle"
    shutil.copytree(demo_dir, d)
    return d


def _edit_tensors(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    fn(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))


SAE1 = "saes/Llama3_1-8B-Base-L1R-8x"


def _nan(t):
    t["decoder.weight"].view(-1)[5] = float("nan")


def _hp(key, value):
    def edit(d):
        p = d / SAE1 / "hyperparams.json"
        hp = json.loads(p.read_text())
        if key == "norm_in":
            hp["dataset_average_activation_norm"]["in"] = value
        else:
            hp[key] = value
        p.write_text(json.dumps(hp))
    return edit


def _model_cfg(key, value):
    def edit(d):
        c = json.loads((d / "model/config.json").read_text())
        c[key] = value
        (d / "model/config.json").write_text(json.dumps(c))
    return edit


def _truncate(rel):
    def edit(d):
        p = d / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return edit


@pytest.mark.parametrize("damage,needle", [
    (_truncate(f"{SAE1}/checkpoints/final.safetensors"), "truncated"),
    (lambda d: (d / SAE1 / "checkpoints/final.safetensors").write_bytes(os.urandom(4096)), "not a safetensors"),
    (lambda d: _edit_tensors(d / SAE1 / "checkpoints/final.safetensors", _nan), "NaN or infinite"),
    (lambda d: _edit_tensors(d / SAE1 / "checkpoints/final.safetensors",
                             lambda t: t.update({"encoder.weight": t["encoder.weight"][:-2].clone()})), "implies"),
    (_hp("d_model", 999), "another model"),
    (_hp("norm_in", 0), "dataset_average_activation_norm.in"),
    (lambda d: shutil.rmtree(d / "saes/Llama3_1-8B-Base-L2R-8x"), "no SAE for layer 2"),
    (_truncate("model/model.safetensors"), "truncated"),
    (lambda d: (d / "model/config.json").unlink(), "config"),
    (_model_cfg("num_hidden_layers", 6), "num_hidden_layers 6"),
    (_model_cfg("vocab_size", 7), "vocab_size 7"),
    (lambda d: _edit_tensors(d / "model/model.safetensors",
                             lambda t: t["model.norm.weight"].__setitem__(0, float("inf"))), "NaN or infinite"),
])
def test_damaged_model_and_sae_files_stop_before_any_work(damage, needle, demo_dir, tmp_path, capsys):
    d = _bundle(demo_dir, tmp_path)
    damage(d)
    code, out = call(["run", "-c", d / "config.yaml", "--store", tmp_path / "s"], capsys)
    one_line_error(code, out, needle)
    assert code == 2
    assert not (tmp_path / "s" / "runs").exists()  # no run was started


def test_the_preflight_reads_the_weights_once_per_process(demo_dir, demo_cfg, monkeypatch):
    import safetensors

    from pathflow import weights

    calls = []
    weights._FINITE.clear()

    opened = safetensors.safe_open

    def counting(path, *a, **k):
        calls.append(path)
        return opened(path, *a, **k)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    weights.check_files(demo_cfg, [0, 1, 2, 3])
    first = len(calls)
    weights.check_files(demo_cfg, [0, 1, 2, 3])
    assert first == 5 and len(calls) == first  # the model and 4 SAEs, then nothing again


# -- resume ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_run(demo_dir, tmp_path_factory, prefect_api):
    """A run of a copy of the demo whose L3 batch failed (L1 and L2 done): (bundle, store, run folder)."""
    tmp = tmp_path_factory.mktemp("failed")
    d = tmp / "bundle"
    shutil.copytree(demo_dir, d)
    store = tmp / "store"
    r = pathflow(["run", "-c", str(d / "config.yaml"), "--store", str(store)], PREFECT_API_URL=prefect_api,
                 PATHFLOW_FAIL_BATCH="L3-batch0")
    assert r.returncode == 1, r.stdout + r.stderr
    (run_dir,) = (store / "runs").iterdir()
    return d, store, run_dir


def _copy_failed(failed_run, tmp_path):
    """The failed run and its bundle, copied (the run's config names the bundle by absolute paths, so
    the copy of the bundle goes where the original was after the original is set aside)."""
    d, store, run_dir = failed_run
    s = tmp_path / "store"
    shutil.copytree(store, s)
    return d, s, s / "runs" / run_dir.name


@pytest.mark.parametrize("change,needle", [
    (lambda d: (d / "study/prompts.json").write_text((d / "study/prompts.json").read_text().replace("Balance",
                                                                                                   "Balanse", 1)),
     "prompts.json changed"),
    (lambda d: _edit_tensors(d / SAE1 / "checkpoints/final.safetensors", lambda t: t["decoder.weight"].mul_(1.01)),
     "layer-1 SAE's weights"),
    (lambda d: (d / "model/tokenizer_config.json").write_text(
        (d / "model/tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1)), "tokenizer_config.json"),
    (lambda d: shutil.copy(next((d / "study/checkpoints").iterdir()), d / "study/checkpoints/extra.json"),
     "extra.json is new"),
])
def test_resume_refuses_changed_inputs(change, needle, failed_run, tmp_path, capsys):
    d, s, run_dir = _copy_failed(failed_run, tmp_path)
    backup = tmp_path / "orig"
    shutil.copytree(d, backup)
    try:
        change(d)
        before = tree(run_dir)
        code, out = call(["run", "--resume", run_dir.name, "--store", s], capsys)
        one_line_error(code, out, "cannot be resumed", needle)
        assert tree(run_dir) == before  # nothing written
    finally:
        shutil.rmtree(d)
        shutil.copytree(backup, d)


def _grad_rows_complete(run_dir: Path) -> bool:
    g = zarr.open_group(str(run_dir / "jacobians.zarr"), mode="r")
    grad = g["grad"][:]
    return all(np.isfinite(grad[i, :, : int(t.split("-")[0][1:])]).all() for i, t in enumerate(g.attrs["targets"]))


@pytest.mark.parametrize("damage", [
    lambda r: (r / "jacobians.zarr/grad/c/0/0/0/0").unlink(),
    lambda r: (r / "jacobians.zarr/grad/c/2/0/0/0").write_bytes(b"\0" * 32),
    lambda r: (r / "pathways/parts/L1-batch0.validated.json").write_bytes(
        (r / "pathways/parts/L1-batch0.validated.json").read_bytes()[:50]),
    lambda r: (r / "pathways/parts/L2-batch0.done.json").write_text("{"),
])
def test_resume_recomputes_a_batch_whose_outputs_are_damaged(damage, failed_run, tmp_path, prefect_api):
    _, s, run_dir = _copy_failed(failed_run, tmp_path)
    damage(run_dir)
    (run_dir / "integrated").mkdir(exist_ok=True)
    (run_dir / "integrated" / "summary.csv.tmp-dead0001").write_text("half")  # a SIGKILLed write
    r = pathflow(["run", "--resume", run_dir.name, "--store", str(s)], PREFECT_API_URL=prefect_api)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _grad_rows_complete(run_dir)
    v = pathflow(["runs", "verify", run_dir.name, "--store", str(s)])
    assert v.returncode == 0, v.stdout + v.stderr  # the orphan temporary was removed by the resume


def test_batch_markers_carry_the_hashes_of_their_outputs(failed_run):
    from storage.store import Store

    _, store, run_dir = failed_run
    run = Store(str(store)).run(run_dir.name)
    marker = json.loads((run_dir / "pathways/parts/L1-batch0.done.json").read_text())
    assert any(k.startswith("jacobians.zarr/grad/") for k in marker["outputs"])
    for rel, digest in marker["outputs"].items():
        assert run.sha256(rel) == digest


# -- writes: temporaries, the lease, compare-and-swap ---------------------------------------------------------


def test_a_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    from storage.store import Store

    run = Store(str(tmp_path)).run("r1")
    run.start({"config": {}})

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        run.write_text("integrated/x.txt", "data")
    monkeypatch.undo()
    assert run.temporaries() == []


def test_verify_names_a_leftover_temporary_and_never_opens_special_files(tmp_path, capsys):
    from storage.store import Store

    run = Store(str(tmp_path)).run("r1")
    run.start({"config": {}})
    run.write_text("a.txt", "a")
    run.complete()
    d = tmp_path / "runs" / "r1"
    (d / "a.txt.tmp-0badf00d").write_text("x")
    os.mkfifo(d / "fifo.json")
    os.symlink("/dev/zero", d / "zero.bin")
    code, out = call(["runs", "verify", "r1", "--store", tmp_path], capsys)
    one_line_error(code, out, "leftover temporary", "a FIFO", "a symbolic link")
    code, out = call(["runs", "diff", "r1", "r1", "--store", tmp_path], capsys)
    one_line_error(code, out, "not a regular file")


def test_a_writer_that_lost_its_lease_writes_nothing_more(tmp_path):
    from storage.store import LeaseLost, Store

    run = Store(str(tmp_path)).run("r1")
    run.start({"config": {}})
    lease = run.acquire(ttl=60)
    try:
        # another process takes the run over (our lease stalled past its expiry)
        body = json.loads((tmp_path / "runs/r1/lease.json").read_text())
        (tmp_path / "runs/r1/lease.json").write_text(json.dumps({**body, "owner": "other:1:x"}))
        other = Store(str(tmp_path)).run("r1")
        before = (tmp_path / "runs/r1/manifest.json").read_bytes()
        with pytest.raises(LeaseLost):
            run.update(status="failed", error="pathways failed")
        assert (tmp_path / "runs/r1/manifest.json").read_bytes() == before
        with pytest.raises(LeaseLost):  # nor any other file, once the loss is known
            other.write_text("integrated/x.txt", "late")
        run.fail("late")  # what a stalled writer does at the end: a no-op now
        assert (tmp_path / "runs/r1/manifest.json").read_bytes() == before
    finally:
        lease._stop.set()
        from storage.store import _ACTIVE

        _ACTIVE.discard(lease)


def test_manifest_writes_are_compare_and_swap_on_s3(s3, monkeypatch):
    import s3fs

    from storage.store import Store

    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance of an earlier test would talk to its (stopped) server
    run = Store("s3://pathflow/cas").run("r1")
    run.start({"config": {}})
    stale = run._etag()
    run.update(status="failed")  # another writer changes it after we read
    assert run._write_manifest({**run.manifest(), "status": "complete"}, stale) is False
    assert run.manifest()["status"] == "failed"
    assert run._write_manifest({**run.manifest(), "status": "running"}, run._etag()) is True


def test_manifest_writes_of_two_processes_are_serialised(tmp_path):
    """Two threads standing in for two processes (separate flocks on the run folder): every update
    lands, none is lost to a read-modify-write race."""
    from storage.store import Store

    Store(str(tmp_path)).run("r1").start({"config": {}, "n": 0})

    def bump():
        run = Store(str(tmp_path)).run("r1")
        for _ in range(15):
            run._change(lambda m: m.update(n=m["n"] + 1))

    import storage.store as st

    lock = st._MANIFEST_LOCK
    st._MANIFEST_LOCK = threading.RLock()  # the flock alone must serialise them
    try:
        threads = [threading.Thread(target=bump) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        st._MANIFEST_LOCK = lock
    assert Store(str(tmp_path)).run("r1").manifest()["n"] == 45


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.pop("outputs"), "without 'outputs'"),
    (lambda m: m.update(config=[1]), "'config' must be an object"),
    (lambda m: m.update(steps={"a": {"seconds": float("nan")}}), "not valid JSON"),
    (lambda m: m.update(outputs=["a"]), "'outputs' must map"),
])
def test_manifests_of_any_shape_are_one_line_errors(edit, needle, tmp_path, capsys):
    d = tmp_path / "runs" / "r1"
    d.mkdir(parents=True)
    m = {"run_id": "r1", "status": "complete", "config": {}, "outputs": {}, "steps": {}}
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    for cmd in (["runs", "verify", "r1"], ["runs", "diff", "r1", "r1"], ["runs", "show", "r1", "--json"]):
        code, out = call([*cmd, "--store", tmp_path], capsys)
        one_line_error(code, out, needle)


# -- files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["/dev/null", "fifo", "link"])
def test_out_is_only_a_regular_file_or_a_new_path(out, demo_dir, tmp_path, capsys):
    if out == "fifo":
        out = tmp_path / "f.json"
        os.mkfifo(out)
    elif out == "link":
        (tmp_path / "real.json").write_text("{}")
        out = tmp_path / "l.json"
        os.symlink(tmp_path / "real.json", out)
    code, text = call(["audit", "-c", demo_dir / "config.yaml", "--out", out], capsys)
    one_line_error(code, text, "--out")
    assert Path("/dev/null").is_char_device()


def test_the_demo_is_never_written_inside_a_run(tmp_path, capsys):
    from storage.store import Store

    run = Store(str(tmp_path)).run("r1")
    run.start({"config": {}})
    run.complete()
    code, out = call(["demo", tmp_path / "runs" / "r1" / "demo"], capsys)
    one_line_error(code, out, "inside the run folder")
    assert not (tmp_path / "runs" / "r1" / "demo").exists()


def test_a_dangling_symlink_store_is_refused(tmp_path, capsys):
    os.symlink(tmp_path / "nowhere", tmp_path / "store")
    code, out = call(["runs", "list", "--store", tmp_path / "store"], capsys)
    one_line_error(code, out, "symbolic link", "does not exist")


# -- security -------------------------------------------------------------------------------------------------


def test_terminal_escapes_from_input_are_shown_not_sent(tmp_path, capsys):
    esc = "\x1b]0;pwned\x07\x1b[2J"
    code, out = call(["audit", "-c", tmp_path / f"x{esc}.yaml"], capsys)
    one_line_error(code, out, "\\x1b]0;pwned")
    assert "\x1b" not in out


def test_csv_cells_that_look_like_formulas_are_neutralised():
    from pathflow.integrate import to_csv

    text = to_csv([{"feature": "L1-1", "top_token": "=HYPERLINK(\"x\")", "value": -0.5, "other": "+1", "at": "@x"}])
    row = text.splitlines()[1]
    assert "'=HYPERLINK" in row and ",-0.5," in row and "'+1" in row and "'@x" in row


def test_the_graphs_server_answers_only_local_names_and_gets(tmp_path):
    from pathflow.viewer import make_server
    from storage.store import Store

    run = Store(str(tmp_path)).run("r1")
    run.start({"config": {}})
    (tmp_path / "fe").mkdir()
    (tmp_path / "fe" / "index.html").write_text("ok")
    server = make_server(run, tmp_path / "fe", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def status(method, host):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.putrequest(method, "/index.html", skip_host=True)
        c.putheader("Host", host)
        c.endheaders()
        return c.getresponse().status

    try:
        assert status("GET", f"127.0.0.1:{port}") == 200
        assert status("GET", f"localhost:{port}") == 200
        assert status("GET", "attacker.example") == 403  # DNS rebinding sends the attacker's name
        assert status("GET", f"127.0.0.1.attacker.example:{port}") == 403
        assert status("POST", f"127.0.0.1:{port}") == 405
    finally:
        server.shutdown()
        server.server_close()


def test_runs_diff_compares_zarr_at_the_stored_precision(tmp_path):
    from storage.arrays import create_jacobians, write_rows
    from storage.diff import zarr_difference
    from storage.store import Store

    store = Store(str(tmp_path))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 3, 16)).astype(np.float32)
    runs = []
    for name, values in (("a", x), ("b", x * (1 + 3e-7)), ("c", x * 1.05)):
        run = store.run(name)
        run.start({"config": {}})
        g = create_jacobians(run.zarr_store("jacobians.zarr"), ["L1-1", "L1-2"], ["safe", "risky"], 3, 16, keepbits=7)
        write_rows(g, [0, 1], values)
        runs.append(run)
    a, b, c = runs
    assert zarr_difference(a, b, "jacobians.zarr") is None  # a float32 rounding apart: the same results
    assert zarr_difference(a, c, "jacobians.zarr") == "grad"  # 5 % apart: different
