"""A hostile sweep of the command line: bad configs, study files, run ids, store URLs, tampering,
credentials and signals, each run as a user would (``python -m pathflow …`` in a fresh process).

    python benchmarks/sweep_hostile.py [--out sweep.json]

Each case is classified: ``ok`` (exit 0), ``clean`` (non-zero exit with one ``error:`` line and no
traceback), ``traceback``, ``hang`` (killed at the timeout), ``wrong`` (exit 0 where the case must
fail, or a complete run changed). Prints a JSON summary last; exits 1 if any case is not ok/clean.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
SECRET = "sEcReTkEy123"


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PATHFLOW_"))}
    e.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})
    return e


def pathflow(args, cwd, timeout=180, **extra) -> tuple[int | None, str]:
    try:
        r = subprocess.run([sys.executable, "-m", "pathflow", *map(str, args)], cwd=cwd, env=env(**extra),
                           capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        return None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)


def classify(code, out, must_fail: bool) -> str:
    """One verdict per case (see the module docstring). ``pathflow audit`` answers a study with
    errors by its report and exit 1 ("not validated"), not by an ``error:`` line."""
    if code is None:
        return "hang"
    if "Traceback" in out:
        return "traceback"
    if SECRET in out:
        return "wrong"
    if code == 0:
        return "wrong" if must_fail else "ok"
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    if code == 1 and not errors and "not validated" in out:
        return "clean"
    return "clean" if len(errors) == 1 else "unclear"


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def config_with(demo: Path, where: Path, text_edit=None, **changes) -> Path:
    """A config for ``demo`` (its paths made absolute) with ``section__key`` changes, and ``text_edit``
    applied to its YAML text (for what a mapping cannot hold: a key written twice)."""
    data = yaml.safe_load((demo / "config.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    text = yaml.safe_dump(data).replace("./model", str(demo / "model")).replace("./saes", str(demo / "saes"))
    text = text.replace("study/", str(demo / "study") + "/")
    if text_edit:
        text = text_edit(text)
    where.mkdir(parents=True, exist_ok=True)
    p = where / f"cfg-{len(list(where.glob('cfg-*')))}.yaml"
    p.write_text(text)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--round", choices=("1", "2", "all"), default="all",
                    help="1: the first sweep's cases and signals; 2: round two (resume, model/SAE files, environment, "
                    "config strictness, files, security); all: both")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pathflow-sweep-"))
    demo = work / "demo"
    code, out = pathflow(["demo", demo], work, timeout=600)
    if code != 0:
        print(out)
        return 1
    cfg = demo / "config.yaml"
    store = work / "store"
    code, out = pathflow(["run", "-c", cfg, "--store", store], work, timeout=600)
    assert code == 0, out
    (complete,) = (store / "runs").iterdir()
    sealed = tree(complete)
    cases: list[tuple] = []  # (name, args, must_fail, env, setup, check)

    def case(name, argv, must_fail=True, setup=None, check=None, **e):
        cases.append((name, argv, must_fail, e, setup, check))

    if args.round in ("1", "all"):
        round_one(demo, work, store, complete, cfg, case)
    if args.round in ("2", "all"):
        from hostile_round2 import round_two

        round_two(demo, work, store, complete, cfg, case, pathflow, config_with)
    results = []
    for name, argv, must_fail, e, setup, check in cases:
        t0 = time.monotonic()
        if setup:
            setup()
        code, out = pathflow(argv, work, timeout=120, **e)
        verdict = classify(code, out, must_fail)
        if check and verdict in ("ok", "clean"):
            verdict = check(code, out) or verdict
        results.append({"case": name, "exit": code, "verdict": verdict, "seconds": round(time.monotonic() - t0, 1),
                        "error": next((line for line in out.splitlines() if line.startswith("error:")), "")[:160]})
        print(f"{verdict:10s} {code!s:>4} {name}", flush=True)
    if args.round in ("1", "all"):
        results += signals(work, cfg)
    changed = tree(complete) != sealed
    counts: dict[str, int] = {}
    for r in results:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    summary = {"cases": len(results), "counts": counts, "complete_run_changed": changed,
               "bad": [r for r in results if r["verdict"] not in ("ok", "clean")]}
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "results": results}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    return 0 if not summary["bad"] and not changed else 1


def round_one(demo: Path, work: Path, store: Path, complete: Path, cfg: Path, case) -> None:
    """The first sweep's 77 cases: configs, run ids, stores, --out, study files, manifests, tampering."""

    # configs
    for key, value in [("gradients__position", 9999), ("gradients__position", -9999), ("gradients__position", 0),
                       ("replay__steer_value", float("nan")), ("tokens__alpha0", float("inf")),
                       ("sae__threshold", float("-inf")), ("replay__scale", float("nan")),
                       ("gradients__sae_budget_gb", float("nan")), ("model__device", "cdua"),
                       ("model__device", "cuda:7"), ("sae__pattern", "L{lyer}R"), ("sae__pattern", "L{layer}R-16x"),
                       ("sae__pattern", "L{0}"), ("model__dtype", "float8"), ("selection__top_per_layer", 0),
                       ("study__prompts", "/nonexistent/prompts.json"), ("study__checkpoints", ["/nonexistent"]),
                       ("store__url", "memory://x"), ("store__url", f"s3://AKIA:{SECRET}@bucket/x"),
                       ("unknown__key", 1), ("model__name_or_path", "/nonexistent/model")]:
        store_flag = [] if key == "store__url" else ["--store", work / "s-cfg"]  # the flag would win over the key
        case(f"config {key}={value!r}", ["run", "-c", config_with(demo, work, **{key: value}), *store_flag])
    bad_yaml = work / "bad.yaml"
    bad_yaml.write_text("study: [unclosed\n")
    case("config not YAML", ["audit", "-c", bad_yaml])
    deep_yaml = work / "deep.yaml"
    deep_yaml.write_text("a: " + "[" * 50000 + "]" * 50000 + "\n")
    case("config nested 50k deep", ["audit", "-c", deep_yaml])
    case("config is a folder", ["audit", "-c", work])
    # run ids
    for rid in ["../../x", "..", "/etc", "a/b", "", ".x", "x" * 300, "[/bold]"]:
        case(f"resume {rid[:20]!r}", ["run", f"--resume={rid}", "--store", store])
        case(f"show {rid[:20]!r}", ["runs", "show", "--store", store, "--", rid])
    case("resume never created", ["run", "--resume", "20990101-000000-aaaaaa", "--store", store])
    case("resume complete", ["run", "--resume", complete.name, "--store", store])
    # stores
    a_file = work / "a-file"
    a_file.write_text("x")
    for url in ["memory://x", "http://example.org/x", "ftp://h/x", f"s3://k:{SECRET}@b/x", str(a_file),
                str(complete), str(complete / "integrated")]:
        case(f"store {url[-30:]}", ["runs", "list", "--store", url])
        case(f"run into store {url[-30:]}", ["run", "-c", cfg, "--store", url])
    # --out
    case("select --out into a complete run", ["select", "-c", cfg, "--out", complete / "features/causal_features.json"])
    case("audit --out under a file", ["audit", "-c", cfg, "--out", a_file / "x.json"])
    case("select --out a folder", ["select", "-c", cfg, "--out", work])
    # study files
    study = work / "study-bad"
    (study / "ck").mkdir(parents=True)
    (study / "logs").mkdir()
    deep = "[" * 100_000 + "]" * 100_000
    (study / "ck" / "deep.json").write_text('{"results": [' + deep + "]}")
    (study / "ck" / "inf.json").write_text('{"results": [{"feature": "L1-1", "layer": 1, "feature_id": 1, '
                                           '"cohen_d": 1, "is_causal": true, "safe_p_value": 1e999}]}')
    (study / "logs" / "deep.json").write_text('[{"feature": "L1-1", "condition": "x", "parsed": ' + deep + "}]")
    os.mkfifo(study / "logs" / "fifo.json")
    study_cfg = config_with(demo, work, study__checkpoints=[str(study / "ck")],
                            study__response_logs=[str(study / "logs")])
    case("audit hostile study", ["audit", "-c", study_cfg])
    long_prompt = work / "long-prompts.json"
    long_prompt.write_text(json.dumps({"safe": "Balance $20. " * 3500, "risky": "Bet?"}))
    case("42 KB prompt", ["run", "-c", config_with(demo, work, study__prompts=str(long_prompt)), "--store",
                          work / "s-long"])
    # demo over a user's folder
    mine = work / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("mine: true\n")
    case("demo over a user's folder", ["demo", mine])
    # manifests
    broken = work / "broken-store"
    for i, body in enumerate(['{"run_id": "x", "sta', "[1]", "{}", ""]):
        d = broken / "runs" / f"b{i}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(body)
        case(f"show broken manifest {i}", ["runs", "show", f"b{i}", "--store", broken])
        case(f"verify broken manifest {i}", ["runs", "verify", f"b{i}", "--store", broken])
    case("list broken manifests", ["runs", "list", "--store", broken], must_fail=False)
    # tampering
    tampered = work / "tampered"
    shutil.copytree(store, tampered)
    (t_run,) = (tampered / "runs").iterdir()
    (t_run / "integrated" / "injected.html").write_text("x")
    case("verify an injected file", ["runs", "verify", t_run.name, "--store", tampered])
    case("verify complete", ["runs", "verify", complete.name, "--store", store], must_fail=False)



def signals(work: Path, cfg: Path) -> list[dict]:
    """Ctrl-C to the group, SIGINT, SIGTERM, SIGKILL during the batches; each run then resumed."""
    results = []
    for how in ("SIGINT-group", "SIGINT", "SIGTERM", "SIGKILL"):
        s = work / f"s-{how}"
        before = set(subprocess.run(["pgrep", "-f", "prefect.server.api.server:create_app"], capture_output=True,
                                    text=True).stdout.split())
        proc = subprocess.Popen([sys.executable, "-m", "pathflow", "run", "-c", str(cfg), "--store", str(s)],
                                env=env(PATHFLOW_BATCH_DELAY_S="60"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not list(s.glob("runs/*/pathways/plan.json")):
            time.sleep(0.2)
        t0 = time.monotonic()
        if how == "SIGINT-group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, getattr(signal, how))
        try:
            out = proc.communicate(timeout=60)[0]
            took = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            proc.kill()
            out, took = "", None
        time.sleep(1)
        left = set(subprocess.run(["pgrep", "-f", "prefect.server.api.server:create_app"], capture_output=True,
                                  text=True).stdout.split()) - before
        (run_dir,) = (s / "runs").iterdir()
        status = json.loads((run_dir / "manifest.json").read_text())["status"]
        code, rout = pathflow(["run", "--resume", run_dir.name, "--store", s], work, timeout=300)
        ok = took is not None and not left and code == 0 and (how == "SIGKILL" or (
            status == "failed" and "--resume" in out and took < 15))
        results.append({"case": f"signal {how}", "verdict": "ok" if ok else ("hang" if took is None else "wrong"),
                        "seconds_to_stop": took and round(took, 1), "orphan_servers": len(left), "status": status,
                        "resumed": code == 0})
        print(f"{results[-1]['verdict']:10s} signal {how}: stopped in {took and round(took, 1)} s, status {status}, "
              f"orphans {len(left)}, resumed {code == 0}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
