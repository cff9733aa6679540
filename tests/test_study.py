"""Steps 0–1 (basic): cumulative checkpoints, both schemas, selection; the real CSV."""

import json
from pathlib import Path

import pytest

from pathflow.config import load_config
from pathflow.readers import Findings, read_checkpoints, read_summary_csv
from pathflow.study import audit, select

from .conftest import SHARED_DATA


def ck(path, ts, results):
    path.write_text(json.dumps({"timestamp": ts, "gpu_id": 0, "process_id": "p", "layer_range": "L1-L2",
                                "features_tested": len(results), "n_trials_per_condition": 30, "results": results}))
    return path


FLAT = {"feature": "L1-5", "layer": 1, "feature_id": 5, "cohen_d": 1.2, "is_causal": True, "classified_as": "safe",
        "safe_stop_delta": 0.2, "risky_stop_delta": 0.1, "safe_bet_delta": -1, "risky_bet_delta": -2,
        "safe_p_value": 0.01, "risky_p_value": 0.02}
NESTED = {"feature": "L2-9", "layer": 2, "feature_id": 9, "cohen_d": -0.9,
          "causality": {"is_causal_safe": False, "is_causal_risky": True, "safe_effect_size": 0.0,
                        "risky_effect_size": -0.3, "safe_p_value": 0.5, "risky_p_value": 0.01,
                        "interpretation": "risky_context_causal"}}


def test_newest_file_wins_and_disagreement_names_both_files(tmp_path):
    old = ck(tmp_path / "checkpoint_L1_2_p_20251001_100000.json", "20251001_100000", [FLAT])
    newer = ck(tmp_path / "checkpoint_L1_2_p_20251001_110000.json", "20251001_110000",
               [{**FLAT, "cohen_d": 1.5}, NESTED])
    f = Findings()
    feats, counts = read_checkpoints([newer, old], f)  # order given must not matter
    assert counts["records"] == 3 and set(feats) == {"L1-5", "L2-9"}
    assert feats["L1-5"].cohen_d == 1.5 and feats["L1-5"].source_file == str(newer)
    (w,) = [w for w in f.warnings if w.code == "duplicate_disagrees"]
    assert str(old) in w.message and str(newer) in w.message
    n = feats["L2-9"]
    assert n.is_causal and n.direction == "risky" and n.effect_size == pytest.approx(0.3)


def test_plan_file_name_and_globs(tmp_path):
    """The plan's own file name, comprehensive_patching_checkpoint_*.json, is read like the others."""
    ck(tmp_path / "comprehensive_patching_checkpoint_20251003_090000.json", "20251003_090000", [NESTED])
    ck(tmp_path / "checkpoint_L1_2_p_20251001_100000.json", "20251001_100000", [FLAT])
    cfg = load_config(None).model_copy(deep=True)
    cfg.study.checkpoints = [str(tmp_path / "comprehensive_*.json"), str(tmp_path / "checkpoint_L1_*.json")]
    report, feats = audit(cfg)
    assert set(feats) == {"L1-5", "L2-9"} and report["counts"]["by_schema"] == {"flat": 1, "nested": 1}


def test_selection_top_n_per_layer(tmp_path):
    results = [{**FLAT, "feature": f"L1-{i}", "feature_id": i, "cohen_d": d}
               for i, d in [(1, 0.5), (2, -2.0), (3, 1.0)]] + [NESTED]
    ck(tmp_path / "checkpoint_L1_2_p_20251001_100000.json", "20251001_100000", results)
    cfg = load_config(None).model_copy(deep=True)
    cfg.study.checkpoints = [str(tmp_path)]
    cfg.selection.top_per_layer = 2
    _report, feats = audit(cfg)
    sel = select(feats, cfg)
    assert [(s["feature"], s["rank"]) for s in sel] == [("L1-2", 1), ("L1-3", 2), ("L2-9", 1)]
    assert sel[0]["rank_key"] == "cohen_d" and sel[0]["rank_value"] == 2.0
    cfg.selection.direction = "risky"
    assert [s["feature"] for s in select(feats, cfg)] == ["L2-9"]
    cfg.selection.direction = None
    cfg.selection.top_per_layer = 1
    forced = select(feats, cfg, include=["L1-1"])  # asked for by name: kept whatever its rank
    assert [(s["feature"], s["rank"], s["reason"]) for s in forced if s["layer"] == 1] == [
        ("L1-2", 1, "top 1 in layer"), ("L1-1", 3, "requested")]


def test_bad_files_are_findings_not_crashes(tmp_path):
    ck(tmp_path / "checkpoint_good_20251001_100000.json", "20251001_100000", [FLAT, {"feature": "junk"}])
    (tmp_path / "checkpoint_trunc_20251001_100001.json").write_text('{"results": [')
    (tmp_path / "checkpoint_nan_20251001_100002.json").write_text('{"results": [{"feature": "L1-6", "cohen_d": NaN}]}')
    cfg = load_config(None).model_copy(deep=True)
    cfg.study.checkpoints = [str(tmp_path)]
    report, feats = audit(cfg)
    assert not report["validated"] and set(feats) == {"L1-5"}
    codes = {(e["code"], e["file"].rsplit("/", 1)[-1]) for e in report["errors"]}
    assert ("bad_json", "checkpoint_trunc_20251001_100001.json") in codes
    assert ("bad_json", "checkpoint_nan_20251001_100002.json") in codes
    assert any(e["code"] == "missing_field" and e["record"] == 1 for e in report["errors"])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real study data not present at {SHARED_DATA}")
def test_real_summary_csv_counts():
    import csv

    path = SHARED_DATA / "exp2_feature_group_summary.csv"
    feats = read_summary_csv(path, f := Findings())
    with open(path, newline="") as fh:  # independent count
        rows = list(csv.DictReader(fh))
    expected = {c: sum(r["classified_as"] == c for r in rows) for c in ("safe", "risky", "neutral")}
    assert expected == {"safe": 361, "risky": 80, "neutral": 925}
    got = {c: sum(r.direction == c for r in feats.values()) for c in ("safe", "risky", "neutral")}
    assert got == expected and not f.errors
    assert {r.layer for r in feats.values()} == set(range(25, 32))


def test_a_remembered_audit_is_taken_once_and_only_for_unchanged_files(demo_cfg, tmp_path, monkeypatch):
    """`pathflow run` audits before its server starts and its flow's audit step takes that result:
    once, and never when a study file changed in between."""
    import shutil

    from pathflow import study

    calls = []
    real = study._audit
    monkeypatch.setattr(study, "_audit", lambda cfg, progress: calls.append(1) or real(cfg, progress))
    src = Path(demo_cfg.study.checkpoints[0])
    ck = tmp_path / "checkpoints"
    shutil.copytree(src, ck)
    cfg = demo_cfg.model_copy(update={"study": demo_cfg.study.model_copy(update={"checkpoints": [str(ck)]})})
    first = study.audit(cfg, remember=True)
    assert study.audit(cfg) == first and len(calls) == 1  # taken again, not read again
    assert study.audit(cfg) == first and len(calls) == 2  # once only
    study.audit(cfg, remember=True)
    f = sorted(ck.glob("*.json"))[-1]
    f.write_text(f.read_text().replace('"cohen_d": ', '"cohen_d":  '))  # changed (and one byte longer)
    changed = study.audit(cfg)
    assert len(calls) == 4 and changed[0]["counts"] == first[0]["counts"]
