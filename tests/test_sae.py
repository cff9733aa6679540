"""LlamaScope loading and math (DESIGN §3) on SAEs written here in the release's exact layout."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pathflow.sae import SAELoadError, load_sae, read_hyperparams

D_MODEL, D_SAE = 16, 64


def write_sae(folder, layer=5, avg_norm=7.5, thr=0.4, seed=0, **hp_extra):
    g = torch.Generator().manual_seed(seed)
    t = {"encoder.weight": torch.randn(D_SAE, D_MODEL, generator=g), "encoder.bias": torch.randn(D_SAE, generator=g),
         "decoder.weight": torch.randn(D_MODEL, D_SAE, generator=g), "decoder.bias": torch.randn(D_MODEL, generator=g)}
    (folder / "checkpoints").mkdir(parents=True)
    save_file(t, str(folder / "checkpoints" / "final.safetensors"))
    hp = {"d_model": D_MODEL, "d_sae": D_SAE, "act_fn": "jumprelu", "jump_relu_threshold": thr,
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
          "hook_point_in": f"blocks.{layer}.hook_resid_post", "hook_point_out": f"blocks.{layer}.hook_resid_post",
          "top_k": 50, "use_decoder_bias": True, "an_unknown_future_key": [1, 2], **hp_extra}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return t


@pytest.fixture
def release(tmp_path):
    t = write_sae(tmp_path / "Llama3_1-8B-Base-L5R-8x")
    return tmp_path, t


def test_normalisation_and_encode_by_hand(release):
    root, t = release
    sae = load_sae(str(root), "Llama3_1-8B-Base-L{layer}R-8x", 5, "zero")
    s = math.sqrt(D_MODEL) / 7.5
    assert sae.scale == pytest.approx(s)
    x = torch.randn(3, D_MODEL)
    pre = torch.einsum("bm,fm->bf", s * x, t["encoder.weight"]) + t["encoder.bias"]  # hand-written, not via SAE
    assert torch.allclose(sae.pre(x), pre, atol=1e-5)
    assert torch.allclose(sae.encode(x), torch.where(pre > 0, pre, torch.zeros_like(pre)), atol=1e-5)
    f = sae.encode(x)
    xhat = (torch.einsum("bf,mf->bm", f, t["decoder.weight"]) + t["decoder.bias"]) / s
    assert torch.allclose(sae.decode(f), xhat, atol=1e-5)


def test_threshold_conventions(release):
    root, _ = release
    pat = "Llama3_1-8B-Base-L{layer}R-8x"
    s = math.sqrt(D_MODEL) / 7.5
    assert load_sae(str(root), pat, 5, "jumprelu").theta == pytest.approx(0.4 * s)  # SAELens: thr · s
    assert load_sae(str(root), pat, 5, "zero").theta == 0.0
    assert load_sae(str(root), pat, 5, 1.25).theta == 1.25
    sae = load_sae(str(root), pat, 5, "jumprelu")
    pre = torch.tensor([0.1 * s, 0.39 * s, 0.41 * s, 2.0])
    assert torch.equal(sae.gate(pre) != 0, pre > 0.4 * s)
    with pytest.raises(SAELoadError):
        load_sae(str(root), pat, 5, "bogus")


def test_errors_name_the_path(tmp_path):
    with pytest.raises(SAELoadError, match="L7R"):
        load_sae(str(tmp_path), "L{layer}R", 7)
    t = write_sae(tmp_path / "L1R")
    save_file({k: v[:1] if k == "encoder.weight" else v for k, v in t.items()},
              str(tmp_path / "L1R" / "checkpoints" / "final.safetensors"))
    with pytest.raises(SAELoadError, match="do not match"):
        load_sae(str(tmp_path), "L{layer}R", 1)
    (tmp_path / "L1R" / "hyperparams.json").write_text("{not json")
    with pytest.raises(SAELoadError, match="not valid JSON"):
        read_hyperparams(str(tmp_path), "L{layer}R", 1)


def test_hub_repo_through_huggingface_hub_cache(tmp_path):
    """A hub repo id goes through huggingface_hub.snapshot_download (offline, from a cache laid out
    exactly as the hub client lays it out): one folder per layer inside the release repo."""
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--fnlp--Llama3_1-8B-Base-LXR-8x"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    t = write_sae(repo / "snapshots" / commit / "Llama3_1-8B-Base-L5R-8x")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("from pathflow.sae import load_sae; s = load_sae('fnlp/Llama3_1-8B-Base-LXR-8x', "
            "'Llama3_1-8B-Base-L{layer}R-8x', 5); print(s.W_enc.sum().item(), s.source)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    total, source = out.stdout.split()
    assert float(total) == pytest.approx(float(t["encoder.weight"].sum()), rel=1e-5)
    assert commit in source
    # a missing repo is a clear error naming it, not a traceback
    code = "from pathflow.sae import load_sae; load_sae('fnlp/nope', 'L{layer}R', 5)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "fnlp/nope" in out.stderr
