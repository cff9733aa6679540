"""Round two of the hostile sweep (``sweep_hostile.py --round 2``): resume that must check its inputs
and its own outputs, damaged model and SAE files, the environment, config strictness, files that
are not files, manifests of every shape, and security (terminal escapes, the graphs server).

``case(name, argv, must_fail, setup=, check=, **env)``: ``setup()`` runs first; ``check(code, out)``
may turn an ok/clean verdict into ``wrong`` (silent-wrong or data lost) by returning it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

NUM_ENVS = {
    "PATHFLOW_LEASE_TTL_S": ["0", "-5", "nan", "inf", "abc", "1", "1e400", " "],
    "PATHFLOW_INTERRUPT_GRACE_S": ["-1", "nan", "inf", "abc", "1e9"],
    "PATHFLOW_MAX_JSON_MB": ["0", "-1", "abc", "1.5", "nan", "99999999999"],
    "PATHFLOW_SIMULATE_OOM_ABOVE": ["-1", "abc", "nan", "1.5"],
    "PATHFLOW_BATCH_DELAY_S": ["-1", "nan", "inf", "abc", "1e12"],
}


def _copy_demo(demo: Path, to: Path) -> Path:
    shutil.copytree(demo, to)
    return to


def _safetensors(path: Path, tensors: dict) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    del torch


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _failed_run(pathflow, demo: Path, store: Path, work: Path, fail_batch: str) -> str:
    """A run of ``demo`` whose batch ``fail_batch`` failed (the others done): its run id."""
    code, out = pathflow(["run", "-c", demo / "config.yaml", "--store", store], work, timeout=600,
                         PATHFLOW_FAIL_BATCH=fail_batch)
    runs = list((store / "runs").iterdir())
    if code == 0 or len(runs) != 1:
        raise SystemExit(f"could not make a failed run to resume ({code}): {out[-400:]}")
    return runs[0].name


def _verify(pathflow, work, store, rid) -> tuple[int | None, str]:
    return pathflow(["runs", "verify", rid, "--store", store], work, timeout=120)


def round_two(demo: Path, work: Path, store: Path, complete: Path, cfg: Path, case, pathflow, config_with) -> None:
    """Register round two's cases with ``case``; ``pathflow`` and ``config_with`` are the sweep's."""
    _cfg = config_with
    w = work / "r2"
    w.mkdir()
    rid = complete.name

    # -- 1. environment: every PATHFLOW_* variable, bad values, on a cheap command ------------------------------
    for var, values in NUM_ENVS.items():
        for v in values:
            case(f"env {var}={v!r}", ["runs", "list", "--store", store], **{var: v})
    case("env TTL=0 then runs rm", ["runs", "rm", "--yes", rid, "--store", store], PATHFLOW_LEASE_TTL_S="0")
    case("env TTL=-5 run", ["run", "-c", cfg, "--store", w / "s-ttl"], PATHFLOW_LEASE_TTL_S="-5")
    case("env grace=nan run", ["run", "-c", cfg, "--store", w / "s-grace"], PATHFLOW_INTERRUPT_GRACE_S="nan")
    for url in ["not a url", "http://127.0.0.1:9/api", "ftp://127.0.0.1/api", "http://", "127.0.0.1:4200"]:
        case(f"PREFECT_API_URL={url!r}", ["run", "-c", cfg, "--store", w / "s-api"], PREFECT_API_URL=url)
    home_file = w / "prefect-home-file"
    home_file.write_text("x")
    case("PREFECT_HOME is a file", ["run", "-c", cfg, "--store", w / "s-home"], PREFECT_HOME=str(home_file))
    case("PREFECT_HOME under a file", ["run", "-c", cfg, "--store", w / "s-home2"],
         PREFECT_HOME=str(home_file / "sub"))

    # -- 2. config strictness ----------------------------------------------------------------------------------
    dup_edits = {
        "duplicate section": lambda t: t + "selection:\n  top_per_layer: 1\n",
        "duplicate key": lambda t: t.replace("  top_per_layer: 2\n", "  top_per_layer: 2\n  top_per_layer: 9\n"),
        "duplicate study key": lambda t: t.replace("study:\n", "study:\n  min_trials: 1\n  min_trials: 2\n", 1),
    }
    for name, edit in dup_edits.items():
        case(f"config {name}", ["audit", "-c", _cfg(demo, w, text_edit=edit)])
        case(f"config {name} (run)", ["run", "-c", _cfg(demo, w, text_edit=edit), "--store", w / "s-dup"])
    for bet, stop in [("1", "1"), ("2", "2"), (" 1", " 1")]:
        case(f"decision bet=stop={bet!r}", ["run", "-c", _cfg(demo, w, decision__bet=bet, decision__stop=stop),
                                             "--store", w / "s-dec"])
    for pair in [["safe_with_risky_pach", "safe_with_safe_patch"], ["risky_amplification", "risky_baseline"],
                 ["safe_baseline", "SAFE_BASELINE"]]:
        case(f"contrast {pair}", ["run", "-c", _cfg(demo, w, tokens__contrasts=[pair]), "--store", w / "s-con"])
    for inc in [["L1-9999"], ["L3-1"], ["L0-0", "L2-7"]]:
        case(f"include {inc} not in the study", ["run", "-c", _cfg(demo, w, selection__include=inc), "--store",
                                                 w / "s-inc"])
    for key, value in [("tokens__alpha0", 1e308), ("tokens__alpha0", 1e-320), ("tokens__alpha0", 0),
                       ("replay__steer_value", 1e300), ("replay__steer_value", -1e300),
                       ("gradients__sae_budget_gb", 1e300), ("topk__min_abs_gradient", 1e300),
                       ("replay__min_abs_change", 1e300), ("sae__threshold", 1e300), ("sae__threshold", -1e30),
                       ("tokens__window", -1), ("tokens__top", 0), ("graphs__max_nodes", 0),
                       ("graphs__node_threshold", 0), ("gradients__keepbits", 40), ("decision__bet", "")]:
        case(f"config {key}={value!r}", ["run", "-c", _cfg(demo, w, **{key: value}), "--store", w / "s-num"])
    # a relative store.url is relative to the config file: the run lands beside it, not in the cwd
    rel_dir = w / "rel-config"
    rel_cfg = _cfg(demo, rel_dir, store__url="rel-store")

    def rel_check(code, out):
        return None if (rel_dir / "rel-store" / "runs").is_dir() and not (work / "rel-store").exists() else "wrong"

    case("relative store.url lands beside the config", ["run", "-c", rel_cfg], must_fail=False, check=rel_check)
    # a glob over symlink loops: no hang
    loops = w / "loops"
    (loops / "a").mkdir(parents=True)
    os.symlink("..", loops / "a" / "up")
    os.symlink(".", loops / "a" / "self")
    shutil.copy(next((demo / "study" / "checkpoints").iterdir()), loops / "a" / "ck.json")
    loop_cfg = _cfg(demo, w, study__checkpoints=[f"{loops}/**/*.json"])
    case("checkpoint glob over symlink loops", ["audit", "-c", loop_cfg],
         must_fail=False)

    # -- 3. model and SAE files --------------------------------------------------------------------------------
    sae1 = Path("saes/Llama3_1-8B-Base-L1R-8x")
    weights = sae1 / "checkpoints/final.safetensors"

    def damaged(name: str, edit):
        d = _copy_demo(demo, w / f"demo-{len(list(w.glob('demo-*')))}")
        edit(d)
        case(f"damaged: {name}", ["run", "-c", d / "config.yaml", "--store", w / "s-dmg"])

    def truncate(rel: Path, keep: float = 0.5):
        def edit(d):
            p = d / rel
            p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])
        return edit

    def random_bytes(rel: Path):
        return lambda d: (d / rel).write_bytes(os.urandom((d / rel).stat().st_size))

    def header_lies(rel: Path):
        def edit(d):
            raw = (d / rel).read_bytes()
            (d / rel).write_bytes(struct.pack("<Q", 10 ** 12) + raw[8:])
        return edit

    def tensor_edit(rel: Path, fn):
        def edit(d):
            t = _load(d / rel)
            fn(t)
            _safetensors(d / rel, t)
        return edit

    def hp_edit(layer: int, fn):
        def edit(d):
            p = d / f"saes/Llama3_1-8B-Base-L{layer}R-8x/hyperparams.json"
            hp = json.loads(p.read_text())
            fn(hp)
            p.write_text(json.dumps(hp))
        return edit

    def nan_at(key):
        def fn(t):
            t[key].view(-1)[0] = float("nan")
        return fn

    def inf_at(key):
        def fn(t):
            t[key].view(-1)[3] = float("inf")
        return fn

    def model_cfg(fn):
        def edit(d):
            p = d / "model/config.json"
            c = json.loads(p.read_text())
            fn(c)
            p.write_text(json.dumps(c))
        return edit

    damaged("SAE weights truncated", truncate(weights))
    damaged("SAE weights 8 bytes", truncate(weights, 8 / (1 << 30)))
    damaged("SAE weights random bytes", random_bytes(weights))
    damaged("SAE header claims 1 TB", header_lies(weights))
    damaged("SAE weights empty", lambda d: (d / weights).write_bytes(b""))
    damaged("SAE NaN in decoder", tensor_edit(weights, nan_at("decoder.weight")))
    damaged("SAE inf in encoder", tensor_edit(weights, inf_at("encoder.weight")))
    damaged("SAE NaN in encoder bias", tensor_edit(weights, nan_at("encoder.bias")))
    damaged("SAE wrong width (encoder)", tensor_edit(weights, lambda t: t.update(
        {"encoder.weight": t["encoder.weight"][:, :-1].clone()})))
    damaged("SAE decoder missing", tensor_edit(weights, lambda t: t.pop("decoder.weight")))
    damaged("SAE d_model 999", hp_edit(1, lambda hp: hp.update(d_model=999)))
    damaged("SAE norm in = 0", hp_edit(2, lambda hp: hp["dataset_average_activation_norm"].update({"in": 0})))
    damaged("SAE norm in = -3", hp_edit(1, lambda hp: hp["dataset_average_activation_norm"].update({"in": -3})))
    damaged("SAE norm missing", hp_edit(0, lambda hp: hp.pop("dataset_average_activation_norm")))
    damaged("SAE threshold a string", hp_edit(1, lambda hp: hp.update(jump_relu_threshold="x")))
    damaged("SAE d_sae 0", hp_edit(3, lambda hp: hp.update(d_sae=0)))
    damaged("SAE hyperparams not JSON", lambda d: (d / sae1 / "hyperparams.json").write_text("{d_model: 1"))
    damaged("SAE folder of layer 2 missing", lambda d: shutil.rmtree(d / "saes/Llama3_1-8B-Base-L2R-8x"))
    damaged("SAE weights of layer 3 missing",
            lambda d: (d / "saes/Llama3_1-8B-Base-L3R-8x/checkpoints/final.safetensors").unlink())
    damaged("model weights truncated", truncate(Path("model/model.safetensors")))
    damaged("model weights random", random_bytes(Path("model/model.safetensors")))
    damaged("model NaN weight", tensor_edit(Path("model/model.safetensors"), nan_at("model.norm.weight")))
    damaged("model config.json missing", lambda d: (d / "model/config.json").unlink())
    damaged("model config hidden_size wrong", model_cfg(lambda c: c.update(hidden_size=c["hidden_size"] * 2)))
    damaged("model config num_hidden_layers wrong", model_cfg(lambda c: c.update(num_hidden_layers=6)))
    damaged("model config vocab_size wrong", model_cfg(lambda c: c.update(vocab_size=c["vocab_size"] + 7)))
    damaged("model config not JSON", lambda d: (d / "model/config.json").write_text("{"))
    damaged("model folder missing", lambda d: shutil.rmtree(d / "model"))

    # -- 4. resume: inputs checked, outputs checked, temporaries cleaned ---------------------------------------
    # one failed run (its L3 batch failed; L1 and L2 done) of one bundle; each case restores both first
    rbundle = _copy_demo(demo, w / "rbundle")
    rstore = w / "rstore"
    rrid = _failed_run(pathflow, rbundle, rstore, work, "L3-batch0")
    pristine = w / "rpristine"
    shutil.copytree(rbundle, pristine / "bundle")
    shutil.copytree(rstore, pristine / "store")

    counter = iter(range(10_000))

    def resume_case(name: str, damage, must_fail: bool, expect=None):
        s = w / f"rs-{next(counter)}"
        run_dir = s / "runs" / rrid

        def setup():
            shutil.rmtree(rbundle)
            shutil.copytree(pristine / "bundle", rbundle)
            shutil.copytree(pristine / "store", s)
            damage(rbundle, run_dir)

        def check(code, out):
            if must_fail:
                return None
            vcode, vout = _verify(pathflow, work, s, rrid)
            if vcode != 0:
                return "wrong"
            return expect(rbundle, run_dir) if expect else None
        case(f"resume: {name}", ["run", "--resume", rrid, "--store", s], must_fail=must_fail, setup=setup, check=check)

    def grad_rows_finite(d, run_dir):
        import numpy as np
        import zarr

        g = zarr.open_group(str(run_dir / "jacobians.zarr"), mode="r")
        grad = g["grad"][:]
        ok = all(np.isfinite(grad[i, :, : int(t.split("-")[0][1:])]).all() for i, t in enumerate(g.attrs["targets"]))
        return None if ok else "wrong"

    resume_case("prompts.json edited", lambda d, r: (d / "study/prompts.json").write_text(
        (d / "study/prompts.json").read_text().replace("Balance", "Balanse", 1)), True)
    resume_case("an SAE's weights changed",
                lambda d, r: tensor_edit(weights, lambda t: t["decoder.weight"].mul_(1.01))(d), True)
    resume_case("an SAE's hyperparams changed",
                lambda d, r: hp_edit(1, lambda hp: hp.update(jump_relu_threshold=0.5))(d), True)
    resume_case("a checkpoint file added", lambda d, r: shutil.copy(
        next((d / "study/checkpoints").iterdir()), d / "study/checkpoints/extra_checkpoint.json"), True)
    resume_case("a response log removed", lambda d, r: next((d / "study/response_logs").iterdir()).unlink(), True)
    resume_case("the tokenizer changed", lambda d, r: (d / "model/tokenizer_config.json").write_text(
        (d / "model/tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1)), True)
    resume_case("model weights changed", lambda d, r: tensor_edit(
        Path("model/model.safetensors"), lambda t: t["model.norm.weight"].mul_(1.5))(d), True)
    resume_case("a done batch's Zarr chunk deleted", lambda d, r: (r / "jacobians.zarr/grad/c/0/0/0/0").unlink(),
                False, grad_rows_finite)
    resume_case("a done batch's Zarr chunk zeroed", lambda d, r: (r / "jacobians.zarr/grad/c/1/0/0/0").write_bytes(
        b"\0" * 64), False, grad_rows_finite)
    resume_case("an L2 row's chunk truncated", lambda d, r: (r / "jacobians.zarr/grad/c/2/0/0/0").write_bytes(
        (r / "jacobians.zarr/grad/c/2/0/0/0").read_bytes()[:20]), False, grad_rows_finite)
    resume_case("a part file truncated", lambda d, r: (r / "pathways/parts/L1-batch0.validated.json").write_bytes(
        (r / "pathways/parts/L1-batch0.validated.json").read_bytes()[:100]), False)
    resume_case("a part file deleted", lambda d, r: (r / "pathways/parts/L2-batch0.candidates.json").unlink(), False)
    resume_case("a done marker truncated", lambda d, r: (r / "pathways/parts/L1-batch0.done.json").write_text("{"),
                False)
    resume_case("leftover temporaries", lambda d, r: [
        (r / "pathways/parts/L1-batch0.validated.json.tmp-dead0001").write_text("{half"),
        (r / "manifest.json.tmp-dead0002").write_text("{")], False)
    resume_case("resumes field not a number", lambda d, r: (r / "manifest.json").write_text(
        json.dumps({**json.loads((r / "manifest.json").read_text()), "resumes": "x"})), False)

    # -- 5. files in run folders, --out, the demo ----------------------------------------------------------------
    def run_copy(name: str, edit) -> tuple[Path, str]:
        s = w / f"fs-{len(list(w.glob('fs-*')))}"
        shutil.copytree(store, s)
        edit(s / "runs" / rid)
        return s, name

    for what, edit in [("a FIFO", lambda r: os.mkfifo(r / "integrated/x.json")),
                       ("a link to /dev/zero", lambda r: os.symlink("/dev/zero", r / "integrated/zero.json")),
                       ("an output replaced by a FIFO", lambda r: ((r / "integrated/summary.csv").unlink(),
                                                                   os.mkfifo(r / "integrated/summary.csv"))),
                       ("an output replaced by a link to /dev/zero",
                        lambda r: ((r / "integrated/summary.csv").unlink(),
                                   os.symlink("/dev/zero", r / "integrated/summary.csv"))),
                       ("a link to a file outside", lambda r: os.symlink("/etc/hostname", r / "integrated/h.txt")),
                       ("a leftover temporary", lambda r: (r / "integrated/summary.csv.tmp-0badf00d").write_text("x"))]:
        s, _ = run_copy(what, edit)
        case(f"verify with {what}", ["runs", "verify", rid, "--store", s])
        # diff compares results: a leftover temporary is none (verify names it), anything else is refused
        case(f"diff with {what}", ["runs", "diff", rid, rid, "--store", s], must_fail="temporary" not in what)
    for name, body_edit in [("without outputs", lambda m: m.pop("outputs")),
                            ("config a list", lambda m: m.update(config=[1, 2])),
                            ("NaN step time", None),
                            ("outputs a list", lambda m: m.update(outputs=["a"])),
                            ("steps a list", lambda m: m.update(steps=[1])),
                            ("status a number", lambda m: m.update(status=3)),
                            ("outputs' hash a number", lambda m: m.update(outputs={"x": 1}))]:
        def edit(r, body_edit=body_edit):
            m = json.loads((r / "manifest.json").read_text())
            if body_edit is None:
                text = json.dumps(m).replace('"seconds": ', '"seconds": NaN, "x": ', 1)
            else:
                body_edit(m)
                text = json.dumps(m)
            (r / "manifest.json").write_text(text)
        s, _ = run_copy(name, edit)
        case(f"manifest {name}: verify", ["runs", "verify", rid, "--store", s])
        case(f"manifest {name}: diff", ["runs", "diff", rid, rid, "--store", s])
        case(f"manifest {name}: show --json", ["runs", "show", rid, "--store", s, "--json"])
        case(f"manifest {name}: list", ["runs", "list", "--store", s], must_fail=False)
    fifo = w / "out.fifo"
    os.mkfifo(fifo)
    target = w / "real.json"
    target.write_text("{}")
    link = w / "link.json"
    os.symlink(target, link)
    for out in ["/dev/null", "/dev/stdout", "/dev/zero", str(fifo), str(link)]:
        for cmd in ("audit", "select"):
            def keep(code, out_, out=out):  # the system's /dev/null is never replaced by a file
                return None if Path("/dev/null").is_char_device() and Path("/dev/zero").is_char_device() else "wrong"
            case(f"{cmd} --out {out}", [cmd, "-c", cfg, "--out", out], check=keep)
    case("demo into a complete run", ["demo", complete / "demo-here"])
    case("demo into a run's subfolder", ["demo", complete / "integrated" / "demo-here"])
    dangling = w / "dangling-store"
    os.symlink(w / "nowhere", dangling)
    case("run into a dangling-symlink store", ["run", "-c", cfg, "--store", dangling])
    case("list a dangling-symlink store", ["runs", "list", "--store", dangling], must_fail=False)

    # -- 6. security -----------------------------------------------------------------------------------------
    esc = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"
    ck = w / f"study-{esc}"
    shutil.copytree(demo / "study" / "checkpoints", ck)
    (ck / f"bad{esc}.json").write_text("{not json")

    def no_escape(code, out):
        return "wrong" if "\x1b]0;" in out or "\x1b[2J" in out else None
    case("escape sequences in a study file name", ["audit", "-c", _cfg(demo, w, study__checkpoints=[str(ck)])],
         check=no_escape)
    case("escape sequences in a config path", ["audit", "-c", w / f"none{esc}.yaml"], check=no_escape)
    case("escape sequences in a run id", ["runs", "show", f"x{esc}", "--store", store], check=no_escape)
    case("escape sequences in a feature", ["select", "-c", cfg, "--feature", f"L1-{esc}"], check=no_escape)
    bad_meta = w / "gm-store"
    shutil.copytree(store, bad_meta)
    gm = bad_meta / "runs" / rid / "integrated" / "graphs" / "graph-metadata.json"
    if gm.exists():
        gm.write_text(gm.read_text()[:40])
        frontend = w / "frontend"
        frontend.mkdir()
        (frontend / "index.html").write_text("<html></html>")
        case("graphs with a truncated graph-metadata.json", ["graphs", rid, "--store", bad_meta, "--frontend",
                                                              frontend, "--port", "0"])
    # the graphs server: a DNS-rebinding Host, other methods, a dropped connection
    case_server(store, rid, w, case)


def case_server(store: Path, rid: str, w: Path, case) -> None:
    """``pathflow graphs`` started once; requests with a foreign Host, a POST and a dropped connection.
    Each is a case whose command is ``pathflow --help`` (exit 0) and whose check makes the request."""
    frontend = w / "frontend-ok"
    frontend.mkdir(exist_ok=True)
    (frontend / "index.html").write_text("<html>ok</html>")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    state: dict = {}

    def start():
        if "proc" in state:
            return
        state["proc"] = subprocess.Popen([sys.executable, "-m", "pathflow", "graphs", rid, "--store", str(store),
                                          "--frontend", str(frontend), "--port", str(port)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)

    def request(method, host, path="/index.html"):
        start()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.putrequest(method, path, skip_host=True)
        c.putheader("Host", host)
        c.endheaders()
        return c.getresponse().status

    def expect(method, host, status, path="/index.html"):
        def check(code, out):
            got = request(method, host, path)
            return None if got == status else "wrong"
        return check

    for host in ["evil.example", "evil.example:8032", "127.0.0.1.evil.example", "localhost.evil.example", ""]:
        case(f"graphs server Host {host!r} refused", ["--help"], must_fail=False, check=expect("GET", host, 403))
    case("graphs server Host 127.0.0.1 served", ["--help"], must_fail=False,
         check=expect("GET", f"127.0.0.1:{port}", 200))
    case("graphs server Host localhost served", ["--help"], must_fail=False,
         check=expect("GET", f"localhost:{port}", 200))
    for method in ["POST", "PUT", "DELETE"]:
        case(f"graphs server {method} refused", ["--help"], must_fail=False,
             check=expect(method, f"127.0.0.1:{port}", 405))
    case("graphs server path traversal", ["--help"], must_fail=False,
         check=expect("GET", f"127.0.0.1:{port}", 404, "/data/..%2f..%2fmanifest.json"))

    def dropped(code, out):
        start()
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            s.close()
        time.sleep(1)
        proc = state.pop("proc")
        proc.terminate()
        text = proc.communicate(timeout=20)[0]
        return "traceback" if "Traceback" in text else None
    case("graphs server: dropped connections are quiet", ["--help"], must_fail=False, check=dropped)
