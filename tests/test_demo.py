"""The embedded demo bundle: real formats, real loaders, SAEs that behave like SAEs."""

import hashlib
import json

import torch

from pathflow.config import REAL_CONDITIONS
from pathflow.demo import SAE_PATTERN, write_demo
from pathflow.model import resid_post
from pathflow.sae import load_sae


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_in_seed(demo_dir, tmp_path):
    again = tmp_path / "again"
    write_demo(again, seed=0)
    assert tree_hashes(again) == tree_hashes(demo_dir)


def test_release_layout(demo_dir, ctx):
    n = ctx.n_layers
    for layer in range(n):
        folder = demo_dir / "saes" / SAE_PATTERN.format(layer=layer)
        hp = json.loads((folder / "hyperparams.json").read_text())
        for key in ("d_model", "d_sae", "act_fn", "jump_relu_threshold", "norm_activation",
                    "dataset_average_activation_norm", "hook_point_in", "hook_point_out", "top_k", "use_decoder_bias"):
            assert key in hp
        assert hp["hook_point_in"] == f"blocks.{layer}.hook_resid_post" and hp["d_sae"] == 8 * hp["d_model"]
        assert (folder / "checkpoints" / "final.safetensors").is_file()
    assert (demo_dir / "model" / "config.json").is_file() and (demo_dir / "model" / "tokenizer.json").is_file()


def test_saes_are_sparse_and_reconstruct_the_model(ctx, demo_cfg):
    """Measured through the real loader on the demo model's own resid_post at the study prompts."""
    ids = torch.cat([ctx.prompt_ids["safe"][:, 1:], ctx.prompt_ids["risky"][:, 1:]], dim=1)
    hs = resid_post(ctx.model, ids, list(range(ctx.n_layers)))
    for layer, h in hs.items():
        sae = load_sae(demo_cfg.sae.root, demo_cfg.sae.pattern, layer, "zero")
        x = h[0]
        f = sae.encode(x)
        fvu = float((sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((f > 0).float().sum(-1).mean())
        assert fvu < 0.15, (layer, fvu)
        assert 1 <= l0 < sae.d_sae / 10, (layer, l0)


def test_study_in_real_formats(demo_dir):
    cks = sorted((demo_dir / "study" / "checkpoints").glob("checkpoint_L*_*_*_*.json"))
    assert len(cks) >= 3
    bodies = [json.loads(p.read_text()) for p in cks]
    for b in bodies:
        assert {"timestamp", "gpu_id", "process_id", "layer_range", "features_tested",
                "n_trials_per_condition", "results"} <= set(b)
    schemas = {("causality" in r) for b in bodies for r in b["results"]}
    assert schemas == {True, False}  # both flat and nested results
    seen = [r["feature"] for b in bodies for r in b["results"]]
    assert len(seen) > len(set(seen))  # cumulative: features repeat across files
    logs = sorted((demo_dir / "study" / "response_logs").glob("responses_L*.json"))
    entries = [e for p in logs for e in json.loads(p.read_text())]
    assert {e["condition"] for e in entries} == set(REAL_CONDITIONS)
    assert {"feature", "condition", "trial", "response", "parsed"} <= set(entries[0])
    prompts = json.loads((demo_dir / "study" / "prompts.json").read_text())
    assert {"safe", "risky"} <= set(prompts)
