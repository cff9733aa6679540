"""Step 3 speed, measured side by side in one run on a LLaMA-shaped model with random weights.

    python benchmarks/bench_pathways.py --preset cpu-small      # runs here in about a minute
    python benchmarks/bench_pathways.py --preset llama31-8b     # real 8B shapes, bf16, on a GPU

Every time is the minimum over interleaved rounds (each measure once per round, in turn).
Compares, per target, pathflow's Jacobian (one token against the cached prompt, k targets per
backward) with a plain batch-1 forward+backward of the prompt and with the naive reference (the
SAE spliced into a full forward at every upstream layer, one backward per target); and, per
candidate, the cached replay with one full forward of the prompt and with the naive replay (one
full forward per candidate); and the graphs step's gradients at every position of the prompt (k
targets as k rows of one batched backward over the whole prompt) with the Jacobian at the last
position only. Ratios are the result; the JSON is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathflow.graphs import Output, output_gradients  # noqa: E402
from pathflow.jacobian import jacobians, target_pre  # noqa: E402
from pathflow.model import prefix_cache, resid_hooks, run  # noqa: E402
from pathflow.replay import replay  # noqa: E402
from pathflow.sae import SAE  # noqa: E402
from pathflow.topk import top_candidates  # noqa: E402

PRESETS = {
    # a size that runs on a laptop CPU in about a minute
    "cpu-small": dict(model=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=4096),
                      expansion=8, seq=160, dtype="float32", targets=16, batch=8, candidates=25, naive_targets=4),
    # LLaMA-3.1-8B shapes, LlamaScope 8x SAEs (d_sae 32768), bf16
    "llama31-8b": dict(model=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
                       expansion=8, seq=160, dtype="bfloat16", targets=64, batch=32, candidates=25, naive_targets=4),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, rounds: int = 3) -> dict[str, float]:
    """The minimum wall time of each of ``fns`` over ``rounds`` rounds that run every one in turn,
    after one warm-up each: a stall of the machine (this one stalls for a second at times) hits one
    sample of one measure, and the minimum drops it; a median of two or three would not."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def make_model(cfg: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights made in their final dtype, directly on the device
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False))
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def make_sae(layer: int, d_model: int, d_sae: int, dtype, device) -> SAE:
    W_dec = torch.randn(d_model, d_sae, device=device, dtype=dtype) / math.sqrt(d_model)
    return SAE(layer=layer, W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(d_sae, device=device, dtype=dtype) - 0.02,
               W_dec=W_dec, b_dec=torch.zeros(d_model, device=device, dtype=dtype), scale=1.0, theta=0.0)


def naive_jacobian(model, saes, ids, layer, feature):
    """Reference: every upstream SAE spliced in at the last position of a full forward; one backward."""
    leaves = {}

    def splice(l):
        def edit(h):
            x = h[:, -1]
            f = saes[l].encode(x).detach().requires_grad_(True)
            leaves[l] = f
            h = h.clone()
            h[:, -1] = saes[l].decode(f) + (x - saes[l].decode(f)).detach()
            return h

        return edit

    with torch.enable_grad(), resid_hooks(model, capture={layer}, edits={l: splice(l) for l in range(layer)},
                                          stop_after=layer, grad_from_embeddings=True) as hs:
        run(model, ids)
        pre = target_pre(saes[layer], hs[layer][:, -1], [feature])
        return torch.autograd.grad(pre.sum(), [leaves[l] for l in range(layer)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--targets", type=int, help="targets timed (default: the preset's)")
    ap.add_argument("--batch", type=int, help="targets per backward (default: the preset's)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the preset's dtype")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each time is the minimum")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    p = {**p, "dtype": args.dtype or p["dtype"]}
    device, dtype = torch.device(args.device), getattr(torch, p["dtype"])
    n_targets, batch = args.targets or p["targets"], args.batch or p["batch"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = make_model(p["model"], dtype, device)
    d_model, n_layers = p["model"]["hidden_size"], p["model"]["num_hidden_layers"]
    d_sae = p["expansion"] * d_model
    # One random SAE shared by every layer: the same compute as per-layer SAEs in a fraction of the
    # memory (streaming per-layer weights under a budget is separate work).
    shared = make_sae(0, d_model, d_sae, dtype, device)
    saes = {l: shared for l in range(n_layers)}
    ids = torch.randint(0, p["model"]["vocab_size"], (1, p["seq"]), device=device)
    layer = n_layers - 1  # the deepest target: the most upstream layers, the worst case
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def plain():  # one forward+backward of the whole prompt at batch 1
        with torch.enable_grad(), resid_hooks(model, grad_from_embeddings=True, capture={n_layers - 1}) as hs:
            run(model, ids)
            hs[n_layers - 1].float().sum().backward()

    def forward():
        with torch.no_grad():
            run(model, ids)

    prefix = prefix_cache(model, ids)
    feats = torch.randint(0, d_sae, (n_targets,)).tolist()

    def jac_all():
        out = None
        for i in range(0, n_targets, batch):
            out = jacobians(model, saes, ids, layer, feats[i : i + batch], prefix=prefix)
        return out

    tj = jacobians(model, saes, ids, layer, feats[:1], prefix=prefix)
    cands = top_candidates(tj.grad[0], tj.activation, tj.layers, k=p["candidates"])
    sizes = sorted({1, 4, batch, 2 * batch} - {0})
    t = interleaved({
        "plain": plain, "forward": forward, "jac_all": jac_all,
        "prefix": lambda: prefix_cache(model, ids),
        "naive": lambda: [naive_jacobian(model, saes, ids, layer, f) for f in feats[: p["naive_targets"]]],
        "replay": lambda: replay(model, saes, ids, layer, feats[0], cands, prefix=prefix),
        # the graphs step: the same targets' gradients at every position (a batched backward over the prompt)
        "whole": lambda: output_gradients(model, saes, ids, [Output(layer=layer, feature=f, pos=p["seq"] - 1)
                                                              for f in feats[:batch]]),
        **{f"batch{b}": (lambda b=b: jacobians(model, saes, ids, layer, feats[:b], prefix=prefix))
           for b in sizes if b <= n_targets},
    }, device, args.rounds)
    t_plain, t_forward, t_jac_total, t_prefix = t["plain"], t["forward"], t["jac_all"], t["prefix"]
    t_naive, t_replay = t["naive"] / p["naive_targets"], t["replay"]
    by_batch = {b: t[f"batch{b}"] / b for b in sizes if b <= n_targets}  # per-target cost against the batch
    per_cand = t_replay / max(1, len(cands))
    jac_per_target = t_jac_total / n_targets
    whole_per_target = t["whole"] / min(batch, n_targets)
    peak = peak_memory(device)
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": {"d_model": d_model, "n_layers": n_layers, "d_sae": d_sae, "seq": p["seq"], "dtype": p["dtype"],
                   "target_layer": layer, "targets": n_targets, "batch": batch, "candidates": len(cands)},
        "seconds": {"setup": setup_s, "plain_forward_backward": t_plain, "plain_forward": t_forward,
                    "prefix_cache": t_prefix, "jacobian_per_target": jac_per_target,
                    "naive_jacobian_per_target": t_naive, "replay_per_candidate": per_cand,
                    "whole_prompt_gradients_per_target": whole_per_target},
        "jacobian_per_target_seconds_by_batch": by_batch,
        "jacobian_per_target_over_plain": jac_per_target / t_plain,
        "jacobian_speedup_vs_naive": t_naive / jac_per_target,
        # every position (graphs step) against the last position only (step 3) and a plain forward+backward
        "whole_prompt_over_last_position": whole_per_target / jac_per_target,
        "whole_prompt_per_target_over_plain": whole_per_target / t_plain,
        "replay_per_candidate_over_forward": per_cand / t_forward,
        "replay_speedup_vs_naive": t_forward / per_cand,
        "peak_memory_bytes": peak,
        # the study's full job: ~1,550 targets × 2 prompts, 25 candidates each (worst-case layer)
        "projected_full_run_seconds": 3100 * (jac_per_target + p["candidates"] * per_cand) + 2 * t_prefix,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
