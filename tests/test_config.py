import pytest

from pathflow.config import Config, ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_public_keys(tmp_path):
    cfg = load_config(write(tmp_path, """
study: {checkpoints: [a/*.json], response_logs: logs, summary_csv: s.csv, conditions: [x], prompts: p.json}
model: {name_or_path: org/model, revision: abc, dtype: bfloat16, device: cuda}
sae: {root: org/saes, pattern: "L{layer}", threshold: jumprelu}
selection: {top_per_layer: 7, rank_by: effect_size}
gradients: {batch_size: 16, position: -2}
topk: {k: 5, score: gradient, min_abs_gradient: 0.01}
replay: {intervention: ablate}
store: {url: s3://bucket/pf}
"""))
    assert cfg.model.name_or_path == "org/model" and cfg.model.dtype == "bfloat16"
    assert cfg.study.response_logs == [str((tmp_path / "logs").resolve())]  # relative to the file
    assert cfg.study.checkpoints == [str((tmp_path / "a/*.json").resolve())]
    assert cfg.sae.root == "org/saes"  # a hub id stays a hub id
    assert cfg.sae.threshold == "jumprelu" and cfg.topk.score == "gradient" and cfg.gradients.position == -2
    assert cfg.store.url == "s3://bucket/pf"
    assert Config().selection.top_per_layer == 50 and Config().topk.k == 25


@pytest.mark.parametrize("text,key", [
    ("sae: {rooot: x}\n", "sae.rooot"),
    ("bogus: 1\n", "bogus"),
    ("topk: {k: 3, scor: gradient}\n", "topk.scor"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(write(tmp_path, text))


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="topk.k"):
        load_config(write(tmp_path, "topk: {k: 0}\n"))
    with pytest.raises(ConfigError, match="sae.threshold"):
        load_config(write(tmp_path, "sae: {threshold: maybe}\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n"))
    assert load_config(write(tmp_path, "sae: {threshold: 0.25}\n")).sae.threshold == 0.25


def test_store_override_order(tmp_path, monkeypatch):
    p = write(tmp_path, "store: {url: /from/file}\n")
    assert load_config(p).store.url == "/from/file"
    monkeypatch.setenv("PATHFLOW_STORE", "s3://from-env")
    assert load_config(p).store.url == "s3://from-env"
    assert load_config(p, store="gs://from-cli").store.url == "gs://from-cli"
    assert load_config(None).store.url == "s3://from-env"


def test_hash_changes_with_config(tmp_path):
    a = load_config(write(tmp_path, "topk: {k: 3}\n"))
    b = load_config(write(tmp_path, "topk: {k: 4}\n"))
    assert a.hash() != b.hash() and a.hash() == load_config(write(tmp_path, "topk: {k: 3}\n")).hash()
