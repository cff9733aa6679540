"""Step 0 on messy input: a corpus of malformed files, each a finding naming file and record,
none a crash, and the rest of the study still audited. Real study files where present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pathflow import readers
from pathflow.config import REAL_CONDITIONS, Config
from pathflow.study import audit

from .conftest import SHARED_DATA

GOOD = {
    "feature": "L1-5",
    "layer": 1,
    "feature_id": 5,
    "cohen_d": 1.2,
    "is_causal": True,
    "classified_as": "safe",
    "safe_stop_delta": 0.2,
    "risky_stop_delta": 0.1,
    "safe_bet_delta": -1.0,
    "risky_bet_delta": -2.0,
    "safe_p_value": 0.01,
    "risky_p_value": 0.02,
}


def ck(results, ts="20251001_100000"):
    return json.dumps(
        {
            "timestamp": ts,
            "gpu_id": 0,
            "process_id": "p",
            "layer_range": "L1-L3",
            "features_tested": len(results),
            "n_trials_per_condition": 30,
            "results": results,
        }
    )


def entries(feature="L1-5", n=30, conds=REAL_CONDITIONS, **over):
    return [
        {
            "feature": feature,
            "condition": c,
            "trial": i,
            "response": "2\n",
            "parsed": {"action": "stop", "bet": 0, "valid": True},
            **over,
        }
        for c in conds
        for i in range(n)
    ]


def nested(**c):
    return {
        "feature": "L2-9",
        "layer": 2,
        "feature_id": 9,
        "cohen_d": -0.9,
        "causality": {
            "is_causal_safe": False,
            "is_causal_risky": True,
            "safe_effect_size": 0.0,
            "risky_effect_size": 0.3,
            "safe_p_value": 0.5,
            "risky_p_value": 0.01,
            "interpretation": "risky_context_causal",
            **c,
        },
    }


# (name, kind "ck"|"log", file name, content bytes or callable(path), expected code, expected record or None)
CORPUS = [
    ("truncated checkpoint", "ck", "checkpoint_t.json", ck([GOOD])[:-20], "bad_json", None),
    ("checkpoint is a list", "ck", "checkpoint_l.json", "[1, 2]", "bad_checkpoint", None),
    (
        "checkpoint without results",
        "ck",
        "checkpoint_n.json",
        '{"timestamp": "20251001_100000"}',
        "bad_checkpoint",
        None,
    ),
    ("results not a list", "ck", "checkpoint_r.json", '{"results": {"a": 1}}', "bad_checkpoint", None),
    ("result is a string", "ck", "checkpoint_s.json", ck(["L1-5"]), "bad_record", 0),
    (
        "result missing feature",
        "ck",
        "checkpoint_m.json",
        ck([{"cohen_d": 1.0, "is_causal": True}]),
        "missing_field",
        0,
    ),
    ("layer of wrong type", "ck", "checkpoint_w.json", ck([{**GOOD, "feature": None, "layer": "one"}]), "bad_type", 0),
    ("layer a boolean", "ck", "checkpoint_b.json", ck([{**GOOD, "feature": None, "layer": True}]), "bad_type", 0),
    (
        "cohen_d NaN",
        "ck",
        "checkpoint_nan.json",
        ck([GOOD]).replace('"cohen_d": 1.2', '"cohen_d": NaN'),
        "bad_json",
        None,
    ),
    ("cohen_d Infinity", "ck", "checkpoint_inf.json", ck([GOOD]).replace("1.2", "Infinity"), "bad_json", None),
    (
        "cohen_d a string",
        "ck",
        "checkpoint_cs.json",
        ck([GOOD, {**GOOD, "feature": "L1-6", "feature_id": 6, "cohen_d": "big"}]),
        "bad_type",
        1,
    ),
    ("is_causal a string", "ck", "checkpoint_ic.json", ck([{**GOOD, "is_causal": "yes"}]), "bad_type", 0),
    ("unknown classified_as", "ck", "checkpoint_ca.json", ck([{**GOOD, "classified_as": "maybe"}]), "bad_value", 0),
    (
        "nested without interpretation",
        "ck",
        "checkpoint_ni.json",
        ck([{**nested(), "causality": {}}]),
        "missing_field",
        0,
    ),
    ("name disagrees with ids", "ck", "checkpoint_d.json", ck([{**GOOD, "feature": "L1-6"}]), "inconsistent", 0),
    (
        "negative feature id",
        "ck",
        "checkpoint_neg.json",
        ck([{**GOOD, "feature": None, "feature_id": -3}]),
        "out_of_range",
        0,
    ),
    ("neither schema", "ck", "checkpoint_u.json", ck([{"feature": "L1-7", "cohen_d": 0.1}]), "unknown_schema", 0),
    ("empty file", "ck", "checkpoint_e.json", "", "empty_file", None),
    ("non-UTF-8 bytes", "ck", "checkpoint_8.json", b'{"results": ["\xff\xfe"]}', "not_utf8", None),
    ("directory where a file is expected", "ck", "checkpoint_dir.json", lambda p: p.mkdir(), "not_a_file", None),
    (
        "dangling symlink",
        "ck",
        "checkpoint_link.json",
        lambda p: p.symlink_to(p.parent / "gone.json"),
        "missing_file",
        None,
    ),
    (
        "layer beyond the model",
        "ck",
        "checkpoint_lr.json",
        ck([{**GOOD, "feature": "L99-5", "layer": 99}]),
        "layer_out_of_range",
        "L99-5",
    ),
    (
        "feature id ≥ d_sae",
        "ck",
        "checkpoint_id.json",
        ck([{**GOOD, "feature": "L1-99999", "feature_id": 99999}]),
        "feature_out_of_range",
        "L1-99999",
    ),
    (
        "duplicate that disagrees",
        "ck",
        "checkpoint_dup_20251002_100000.json",
        ck([{**GOOD, "cohen_d": 3.3}], ts="20251002_100000"),
        "duplicate_disagrees",
        0,
    ),
    ("log truncated mid-list", "log", "responses_t.json", json.dumps(entries())[:-300], "bad_json", None),
    ("log is an object", "log", "responses_o.json", '{"feature": "L1-5"}', "bad_log", None),
    (
        "log entry without condition",
        "log",
        "responses_c.json",
        json.dumps(entries()[:3] + [{"feature": "L1-5", "response": "1"}]),
        "missing_field",
        3,
    ),
    ("log entry not an object", "log", "responses_n.json", json.dumps([7]), "bad_record", 0),
    (
        "log with unknown condition",
        "log",
        "responses_u.json",
        json.dumps(entries(conds=["safe_amplification"])),
        "unknown_condition",
        0,
    ),
    ("empty responses", "log", "responses_e.json", json.dumps(entries(response="")), "empty_response", 0),
    (
        "missing response payload",
        "log",
        "responses_m.json",
        json.dumps([{k: v for k, v in e.items() if k != "response"} for e in entries()]),
        "empty_response",
        0,
    ),
    (
        "JSONL with a bad line",
        "log",
        "responses_j.jsonl",
        "\n".join(json.dumps(e) for e in entries()[:5]) + "\n{oops\n",
        "bad_json",
        5,
    ),
    ("too few trials", "log", "responses_f.json", json.dumps(entries(feature="L2-77", n=12)), "few_trials", "L2-77"),
    (
        "log with NaN",
        "log",
        "responses_nan.json",
        json.dumps(entries()[:2])[:-1] + ', {"feature": NaN}]',
        "bad_json",
        2,
    ),
]


def base_study(tmp_path: Path, demo_dir: Path) -> Config:
    ckd, logd = tmp_path / "ck", tmp_path / "logs"
    ckd.mkdir()
    logd.mkdir()
    (ckd / "checkpoint_good_20251001_100000.json").write_text(ck([GOOD, nested()]))
    (logd / "responses_good.json").write_text(json.dumps(entries() + entries("L2-9")))
    cfg = Config()
    cfg.study.checkpoints, cfg.study.response_logs = [str(ckd)], [str(logd)]
    cfg.model.name_or_path = str(demo_dir / "model")  # metadata for the range checks: 4 layers, d_sae 512
    cfg.sae.root, cfg.sae.pattern = str(demo_dir / "saes"), "Llama3_1-8B-Base-L{layer}R-8x"
    return cfg


@pytest.mark.parametrize("name,kind,fname,content,code,record", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_input_is_a_finding(tmp_path, demo_dir, name, kind, fname, content, code, record):
    cfg = base_study(tmp_path, demo_dir)
    path = tmp_path / ("ck" if kind == "ck" else "logs") / fname
    if callable(content):
        content(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    report, features = audit(cfg)  # never raises
    findings = report["errors"] + report["warnings"]
    hits = [x for x in findings if x["code"] == code]
    assert hits, (name, findings)
    hit = hits[0]
    if code not in ("few_trials",):
        assert hit["file"] and Path(hit["file"]).name == fname, hit
    if record is not None:
        assert hit["record"] == record, hit
    assert hit["message"]
    # the good files were still audited
    assert {"L1-5", "L2-9"} <= set(features) or code == "duplicate_disagrees"
    assert report["counts"]["response_log_files"]["entries"] >= 360
    assert report["validated"] == (not report["errors"])


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 25


def test_unreadable_file(tmp_path, demo_dir, monkeypatch):
    """Root can read anything, so the permission error is injected at the one place files are opened."""
    cfg = base_study(tmp_path, demo_dir)
    bad = tmp_path / "ck" / "checkpoint_locked.json"
    bad.write_text(ck([GOOD]))
    real = readers._open

    def fake_open(path):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(readers, "_open", fake_open)
    report, features = audit(cfg)
    (hit,) = [e for e in report["errors"] if e["code"] == "unreadable"]
    assert hit["file"] == str(bad) and "L1-5" in features


def test_huge_single_line_log_is_streamed(tmp_path, demo_dir):
    cfg = base_study(tmp_path, demo_dir)
    many = entries(n=2000)  # ~1.7 MB on one line
    (tmp_path / "logs" / "responses_big.json").write_text(json.dumps(many))
    report, _ = audit(cfg)
    assert report["validated"], report["errors"]
    assert report["trials"]["L1-5"]["safe_baseline"] == 30 + 2000


def test_missing_configured_path_is_a_usage_error(tmp_path, demo_dir):
    cfg = base_study(tmp_path, demo_dir)
    cfg.study.response_logs = [str(tmp_path / "nope")]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps({"study": cfg.study.model_dump(exclude_none=True)}))
    r = subprocess.run(
        [sys.executable, "-m", "pathflow", "audit", "-c", str(cfg_file)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_cli_exit_codes_and_report(tmp_path, demo_dir):
    cfg = base_study(tmp_path, demo_dir)
    data = cfg.model_dump(exclude_none=True)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps(data))  # JSON is YAML
    out = tmp_path / "report" / "audit.json"
    r = subprocess.run(
        [sys.executable, "-m", "pathflow", "audit", "-c", str(cfg_file), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    assert rep["validated"] and rep["counts"]["causal_total"] == 2
    assert rep["counts"]["causal_by_direction"] == {"risky": 1, "safe": 1}
    assert rep["counts"]["join"] == {"joined": 2, "causal_without_logs": 0, "logs_without_result": 0}
    (tmp_path / "ck" / "checkpoint_bad.json").write_text("{")
    r = subprocess.run(
        [sys.executable, "-m", "pathflow", "audit", "-c", str(cfg_file), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "bad_json" in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert not json.loads(out.read_text())["validated"]
    sel = tmp_path / "sel.json"
    r = subprocess.run(
        [sys.executable, "-m", "pathflow", "select", "-c", str(cfg_file), "-o", str(sel), "--direction", "risky"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(sel.read_text())["features"]
    assert {k: rec[k] for k in ("feature", "layer", "feature_id", "direction", "rank_key", "rank")} == {
        "feature": "L2-9",
        "layer": 2,
        "feature_id": 9,
        "direction": "risky",
        "rank_key": "cohen_d",
        "rank": 1,
    }


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real study data not present at {SHARED_DATA}")
def test_real_revalidation_jsonl():
    path = SHARED_DATA / "exp2_revalidation_trials.jsonl"
    with open(path) as fh:  # independent count
        rows = [json.loads(line) for line in fh if line.strip()]
    f = readers.Findings()
    got = list(readers.read_revalidation([path], f))
    assert not f.errors and len(got) == len(rows) == 13782
    assert len({t.feature for t in got}) == len({(r["layer"], r["feature_id"]) for r in rows}) == 30
    assert {t.prompt_type for t in got} == {"safe", "risky"} and len({t.scale for t in got}) == 7
    cfg = Config()
    cfg.study.summary_csv = str(SHARED_DATA / "exp2_feature_group_summary.csv")
    cfg.study.revalidation = [str(path)]
    report, features = audit(cfg)
    assert report["counts"]["features_total"] == 1366
    assert report["counts"]["causal_by_direction"] == {"risky": 80, "safe": 361}
    assert report["counts"]["revalidation"] == {"records": 13782, "features": 30}


def test_audit_memory_is_flat(tmp_path):
    """200 files, ~100 MB of logs: peak memory of the audit does not grow with the log volume."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_audit.py"
    peaks = {}
    for mb in (10, 100):
        r = subprocess.run(
            [sys.executable, str(script), "--files", "200", "--log-mb", str(mb), "--dir", str(tmp_path / f"s{mb}")],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout[r.stdout.index("{") :])
        assert res["validated"] and res["files"] == 200
        peaks[mb] = res["audit_peak_rss_bytes"] - res["baseline_rss_bytes"]
    assert peaks[100] < peaks[10] + 64 * 2**20, peaks  # 10x the logs, not 10x the memory
