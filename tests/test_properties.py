"""Property-based checks of the contract (issue 11), over generated config values and study records:
exit 0 with correct output, or a one-line error naming the problem — never a traceback, never a
changed complete run."""

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_reliability import call, tree

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["auto", "cuda", "cpu", "zero", "jumprelu", "memory://x", "s3://k:s@b/x", "../..",
                                     "{layer}", "L{lyer}", "[/bold]", "safe", "risky", "-1", "1e999"]))
nested = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), c, max_size=3)),
                      max_leaves=6)
values = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]), scalars, nested)

SECTIONS = {
    "study": ["min_trials", "max_prompt_tokens", "conditions"],
    "model": ["dtype", "device", "revision"],
    "sae": ["threshold", "pattern"],
    "selection": ["top_per_layer", "rank_by", "layers", "direction", "include"],
    "gradients": ["batch_size", "position", "sae_budget_gb"],
    "topk": ["k", "score", "min_abs_gradient"],
    "replay": ["intervention", "scale", "steer_value", "min_sign_agreement", "min_abs_change", "noise_floor",
               "max_ratio"],
    "attribution": ["method", "replay_top"],
    "tokens": ["top", "window", "responses", "alpha0", "contrasts"],
    "store": ["url"],
}
keys = st.sampled_from([(s, k) for s, ks in SECTIONS.items() for k in ks] + [("model", "nonsense"), ("x", "y")])
overrides = st.lists(st.tuples(keys, values), min_size=1, max_size=3)


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    return True


def _config_with(demo_dir: Path, changes) -> Path:
    data = yaml.safe_load((demo_dir / "config.yaml").read_text())
    for (section, key), value in changes:
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section][key] = value
    text = yaml.safe_dump(data, allow_unicode=True).replace("./model", str(demo_dir / "model"))
    path = demo_dir.parent / "property-config.yaml"
    path.write_text(text.replace("./saes", str(demo_dir / "saes")), encoding="utf-8")
    return path


@SETTINGS
@given(changes=overrides)
def test_any_config_loads_valid_or_fails_with_one_clear_error(changes, demo_dir):
    from pathflow.config import ConfigError, load_config

    path = _config_with(demo_dir, changes)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert str(e).startswith(("invalid config", "config")), e
        assert "s3://k:s@" not in str(e)  # credentials never echoed
        return
    dumped = cfg.model_dump(mode="json")
    assert _finite(dumped)  # nothing non-finite gets in
    json.dumps(dumped, allow_nan=False)
    assert "@" not in cfg.store.url.split("/", 3)[2] if "://" in cfg.store.url else True
    assert len(cfg.hash()) == 64


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(changes=overrides)
def test_the_cli_exits_cleanly_on_any_config(changes, demo_dir, tmp_path_factory, capsys):
    path = _config_with(demo_dir, changes)
    out_dir = tmp_path_factory.mktemp("sel")
    code, out = call(["select", "-c", path, "--out", out_dir / "sel.json"], capsys)
    assert "Traceback" not in out and "unexpected" not in out, out
    if code == 0:
        body = json.loads((out_dir / "sel.json").read_text())
        assert body["n_selected"] == len(body["features"])
    else:
        assert code in (1, 2) and sum(line.startswith("error:") for line in out.splitlines()) == 1, out


finite = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-5, 40))
hostile = st.one_of(st.sampled_from(["1e999", "-1e999", "1e999", "NaN", "Infinity"]), st.text(max_size=4), st.none(),
                    st.booleans())
numbers = st.one_of(finite, finite, finite, hostile)  # mostly numbers, so that records reach the features
copied = st.one_of(finite, st.sampled_from(["1e999", "-1e999"]))  # fields the audit copies without a range check


@st.composite
def record(draw):
    """A checkpoint result: mostly well-formed (so the values reach the features), with any field
    replaced by something hostile now and then."""
    layer, fid = draw(st.integers(1, 3)), draw(st.integers(0, 511))
    r = {"feature": f"L{layer}-{fid}", "layer": layer, "feature_id": fid, "cohen_d": draw(numbers)}
    if draw(st.booleans()):
        r.update(is_causal=draw(st.booleans()), classified_as=draw(st.sampled_from(["safe", "risky", "neutral"])),
                 safe_stop_delta=draw(numbers), safe_p_value=draw(copied))
    else:
        r["causality"] = {"interpretation": draw(st.sampled_from(["no_causal_effect", "safe_context_causal"])),
                          "safe_effect_size": draw(numbers), "risky_p_value": draw(copied)}
    for key in draw(st.lists(st.sampled_from(["feature", "layer", "feature_id", "is_causal", "classified_as",
                                              "causality", "extra"]), max_size=2)):
        r[key] = draw(st.one_of(values, st.integers(-1, 40), st.sampled_from(["L99-1", "L1-600", "bad"])))
    r["deep"] = draw(st.sampled_from([0, 0, 0, 5, 40, 5000]))
    return r


def _render(r) -> str:
    """JSON text of a record, with number tokens JSON cannot hold (1e999, NaN) written raw and, for
    ``deep``, a value nested that many levels."""
    deep = r.pop("deep", 0)
    text = json.dumps(r, allow_nan=True)
    for raw in ("1e999", "-1e999", "NaN", "Infinity"):
        text = text.replace(f'"{raw}"', raw)
    if deep:
        text = text[:-1] + ', "nested": ' + "[" * deep + "]" * deep + "}"
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(records=st.lists(record(), max_size=6))
def test_any_study_audits_to_findings_never_a_crash(records, demo_cfg, tmp_path_factory):
    from pathflow.study import audit

    d = tmp_path_factory.mktemp("study")
    (d / "ck").mkdir()
    for i, r in enumerate(records):  # one file each: a file that is not JSON at all loses only its record
        (d / "ck" / f"checkpoint_L1_3_p_20251015_12000{i}.json").write_text('{"results": [' + _render(dict(r)) + "]}")
    cfg = demo_cfg.model_copy(deep=True)
    cfg.study.checkpoints = [str(d / "ck")]
    cfg.study.response_logs = []
    report, features = audit(cfg)
    json.dumps(report, allow_nan=False)  # the audit file is always valid JSON
    for e in report["errors"]:
        assert e["code"] and e["message"] and (e["file"] or e["code"] in ("no_features", "no_inputs"))
    for name, f in features.items():
        assert _finite(f.model_dump()) and 0 < f.layer < 4 and 0 <= f.feature_id < 512, name
        json.dumps(f.model_dump(), allow_nan=False)


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory):
    from storage.store import Store

    store = tmp_path_factory.mktemp("sealed")
    run = Store(str(store)).run("r-complete")
    run.start({"config": {}, "config_hash": "x"})
    run.write_json("integrated/features.json", {"features": []})
    run.complete()
    return store, run.path


ops = st.lists(st.sampled_from(["update", "step", "fail", "write", "start", "acquire", "lease-start"]),
               min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops)
def test_a_complete_run_never_changes(sequence, sealed_run):
    from pathflow.errors import PathflowError
    from storage.store import Store

    store, path = sealed_run
    before = tree(Path(path))
    for op in sequence:
        run = Store(str(store)).run("r-complete")  # a fresh process's view of the run
        try:
            if op == "update":
                run.update(status="failed")
            elif op == "step":
                run.step("audit", "running")
            elif op == "fail":
                run.fail("late failure")
            elif op == "write":
                run.update(outputs={})
                run.write_text("x.txt", "x")
            elif op == "start":
                run.start({"config": {}})
            elif op in ("acquire", "lease-start"):
                lease = run.acquire(ttl=5)
                try:
                    if op == "lease-start":
                        run.update(status="running")
                finally:
                    lease.release()
        except PathflowError:
            pass
    assert tree(Path(path)) == before


# -- round two (issue 22): the readers of environment variables, configs, safetensors headers, manifests,
# and what is printed or written from input ------------------------------------------------------------------

FAST = settings(max_examples=80, deadline=None)


@FAST
@given(raw=st.one_of(st.text(max_size=20), st.sampled_from(["nan", "-inf", "1e400", "0", "5", "86400", " 7 ", "0x1"])))
def test_environment_numbers_are_in_range_or_one_error(raw):
    from pathflow.envvars import NUMBERS
    from pathflow.errors import PathflowError

    for var in NUMBERS:
        if "\x00" in raw or any(0xD800 <= ord(c) <= 0xDFFF for c in raw):
            continue  # an environment cannot hold these
        with pytest.MonkeyPatch.context() as m:
            m.setenv(var.name, raw)
            try:
                v = var.read()
            except PathflowError as e:
                assert var.name in str(e)
            else:  # unset or empty: the default (SIMULATE_OOM_ABOVE's, -1, means off); else a value in range
                assert v == var.default if raw == "" else (math.isfinite(v) and var.lo <= v <= var.hi)


@FAST
@given(text=st.one_of(st.text(max_size=200), st.builds(
    lambda a, b: f"{a}:\n  k: 1\n{b}:\n  k: 2\n", st.sampled_from(["study", "model", "x"]),
    st.sampled_from(["study", "model", "x"]))))
def test_any_config_text_loads_or_is_one_config_error(text, tmp_path_factory):
    from pathflow.config import Config, ConfigError, load_config

    p = tmp_path_factory.mktemp("c") / "c.yaml"
    p.write_text(text)
    try:
        assert isinstance(load_config(p), Config)
    except ConfigError as e:
        assert str(p) in str(e) or "invalid config" in str(e)


@FAST
@given(head=st.binary(max_size=64), body=st.binary(max_size=256))
def test_any_bytes_as_safetensors_are_a_header_or_one_error(head, body, tmp_path_factory):
    from pathflow.errors import PathflowError
    from pathflow.weights import read_header

    p = tmp_path_factory.mktemp("st") / "w.safetensors"
    p.write_bytes(head + body)
    try:
        header = read_header(p)
    except PathflowError as e:
        assert str(p) in str(e)
    else:
        assert all(t["data_offsets"][1] <= p.stat().st_size for t in header.values())


@FAST
@given(m=nested)
def test_any_manifest_is_usable_or_one_store_error(m, tmp_path_factory):
    from storage.store import Store, StoreError

    root = tmp_path_factory.mktemp("m")
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "runs" / "r1" / "manifest.json").write_text(json.dumps(m, allow_nan=True))
    try:
        got = Store(str(root)).run("r1").manifest()
    except StoreError as e:
        assert "manifest.json" in str(e)
    else:
        assert isinstance(got["config"], dict) and isinstance(got.get("outputs", {}), dict)
        assert all(isinstance(v, str) for v in got.get("outputs", {}).values())


@FAST
@given(text=st.text(max_size=80))
def test_printed_input_never_carries_a_control_character(text):
    from pathflow.integrate import FORMULA_START, csv_cell
    from pathflow.safe_text import escape_controls

    shown = escape_controls(text)
    assert not any((ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0 for c in shown)
    if text.isprintable():
        assert shown == text
    assert not str(csv_cell(text)).startswith(FORMULA_START)
