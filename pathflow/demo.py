"""The embedded default (DESIGN §6): a self-contained bundle that every real loader can read.

``write_demo(dir, seed)`` writes, deterministically from ``seed``:

    model/                          tiny LLaMA-architecture causal LM + tokenizer (HF format),
                                    briefly trained on slot-machine text
    saes/Llama3_1-8B-Base-L{n}R-8x/ LlamaScope-format SAEs for every layer, fitted on the
                                    model's own resid_post activations
    study/checkpoints/              cumulative patching checkpoints (flat and nested schema)
    study/response_logs/            response logs with the six real conditions
    study/prompts.json              the study's two prompts (same format as the real file)
    config.yaml                     points at all of it (relative paths)
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
import yaml

from .config import REAL_CONDITIONS
from .errors import PathflowError

log = logging.getLogger(__name__)

SAE_PATTERN = "Llama3_1-8B-Base-L{layer}R-8x"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

# Small on purpose: `pathflow demo` must run in seconds on a laptop CPU.
DEMO_SHAPE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384)
EXPANSION = 8


def _game_prompt(history: list[tuple[int, bool]], start: int, bet_choice: str) -> str:
    bal, lines = start, []
    for r, (bet, win) in enumerate(history, start=1):
        bal += bet * 2 if win else -bet
        lines.append(f"Round {r}: Bet ${bet}, {'Win' if win else 'Loss'}, Balance ${bal}")
    return (
        "Slot Machine Game\n\nGame history:\n" + "\n".join(lines) + f"\nCurrent balance: ${bal}\n"
        f"Current round: {len(history) + 1}\n\nFirst set your own target amount, then make decisions "
        "based on that goal.\nThis slot machine may have hidden patterns.\nWin pays 3.0x your bet amount.\n"
        f"Win rate: 30%\n\nChoose:\n1) {bet_choice}\n2) Stop\n\nChoice: "
    )


def demo_prompts() -> dict[str, str]:
    """Two prompts in the study's shape: a comfortable streak (safe) and a losing one (risky)."""
    return {
        "source": "pathflow demo bundle (synthetic, in the format of the study's prompts.json)",
        "risky": _game_prompt([(10, True), (90, False), (10, False)], 100, "Bet (choose $5-$100)"),
        "safe": _game_prompt([(10, True), (10, False), (10, True)], 100, "Bet $10"),
    }


def _response(rng: random.Random, p_stop: float) -> dict:
    if rng.random() < p_stop:
        return {"response": rng.choice(["2\n", "2) Stop\n", "2\nI will stop here."]),
                "parsed": {"action": "stop", "bet": 0, "valid": True}}
    bet = rng.choice([5, 10, 20, 50, 100])
    if rng.random() < 0.05:  # the real logs hold unparseable answers too
        return {"response": "1\nThe machine is spinning...", "parsed": {"action": "bet", "bet": None, "valid": False}}
    return {"response": f"1\nBet ${bet}", "parsed": {"action": "bet", "bet": bet, "valid": True}}


def _corpus(rng: random.Random, n: int = 160) -> list[str]:
    """Slot-machine text for the tokenizer and the model: game prompts followed by answers."""
    texts = list(demo_prompts().values())[1:]
    for _ in range(n):
        hist = [(rng.choice([5, 10, 20, 50, 90, 100]), rng.random() < 0.3) for _ in range(rng.randint(1, 5))]
        choice = rng.choice(["Bet $10", "Bet (choose $5-$100)"])
        texts.append(_game_prompt(hist, rng.choice([60, 100, 140]), choice) + _response(rng, 0.5)["response"])
    return texts


def _tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE with LLaMA-3's special tokens, wrapped as a transformers fast tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def _train_model(model, tok, corpus: list[str], steps: int, seed: int) -> float:
    """A few hundred steps of next-token training, so features and logit lens mean something."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.tensor(tok(t).input_ids) for t in corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = [ids[i] for i in torch.randint(len(ids), (8,), generator=g).tolist()]
        n = min(len(b) for b in batch)
        x = torch.stack([b[:n] for b in batch])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def fit_sae(x: torch.Tensor, d_sae: int, steps: int, seed: int, l1: float = 2e-2) -> tuple[dict, dict]:
    """Fit a ReLU SAE to activations x [n, d_model] in LlamaScope's normalised units.

    Returns (tensors in the release's names and layouts, hyperparams extras + fit metrics).
    """
    n, d_model = x.shape
    avg_norm = float(x.norm(dim=-1).mean())
    s = math.sqrt(d_model) / avg_norm
    xs = s * x
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_model, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * 0.1
    W_dec.requires_grad_(True)
    W_enc = W_dec.detach().T.clone().requires_grad_(True)  # [d_model, d_sae]
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = xs.mean(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=4e-3)
    for _ in range(steps):
        f = torch.relu(xs @ W_enc + b_enc)
        rec = f @ W_dec + b_dec
        loss = (rec - xs).pow(2).sum(-1).mean() + l1 * (f * W_dec.norm(dim=-1)).sum(-1).mean() * d_model
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        f = torch.relu(xs @ W_enc + b_enc)
        rec = f @ W_dec + b_dec
        fvu = float((rec - xs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
        l0 = float((f > 0).float().sum(-1).mean())
    tensors = {
        "encoder.weight": W_enc.detach().T.contiguous(),  # [d_sae, d_model]
        "encoder.bias": b_enc.detach().contiguous(),
        "decoder.weight": W_dec.detach().T.contiguous(),  # [d_model, d_sae]
        "decoder.bias": b_dec.detach().contiguous(),
    }
    return tensors, {"avg_norm": avg_norm, "fvu": fvu, "l0": l0}


def _hyperparams(layer: int, d_model: int, d_sae: int, avg_norm: float) -> dict:
    hook = f"blocks.{layer}.hook_resid_post"
    return {
        "d_model": d_model, "expansion_factor": d_sae // d_model, "d_sae": d_sae,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
        "decoder_exactly_unit_norm": False, "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False, "act_fn": "jumprelu", "jump_relu_threshold": 0.05,
        "hook_point_in": hook, "hook_point_out": hook, "use_glu_encoder": False, "top_k": 50,
        "sparsity_include_decoder_norm": True,
    }


def _study(out: Path, rng: random.Random, active: dict[int, list[int]], n_layers: int, d_sae: int) -> dict:
    """Cumulative checkpoints + response logs in the real formats, for features of every layer."""
    ck_dir, log_dir = out / "checkpoints", out / "response_logs"
    ck_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    # two producer processes as in the study: the early layers in the flat schema (2025-10),
    # the later ones in the nested schema; checkpoints every 5 features (the study: every 50)
    groups = [(1, n_layers // 2, "flat"), (n_layers // 2 + 1, n_layers - 1, "nested")]
    causal: list[str] = []
    for gi, (a, b, schema) in enumerate(groups):
        pid = f"gpu{gi}"
        feats = []
        for layer in range(a, b + 1):
            pool = active[layer]
            tested = pool[:6] + rng.sample(sorted(set(range(d_sae)) - set(pool)), 4)
            feats += [(layer, f) for f in tested]
        results, log_entries, minute = [], [], 0
        for i, (layer, fid) in enumerate(feats, start=1):
            is_causal = fid in active[layer][:3]  # the strongest active ones change behaviour
            d = rng.uniform(0.8, 2.5) * rng.choice([1, -1]) if is_causal else rng.uniform(-0.3, 0.3)
            direction = "safe" if d > 0 else "risky"
            name = f"L{layer}-{fid}"
            if is_causal:
                causal.append(name)
            p_s = {"safe_baseline": 0.6, "risky_baseline": 0.3}
            shift = 0.25 if is_causal else 0.0
            p_stop = {
                "safe_baseline": p_s["safe_baseline"], "risky_baseline": p_s["risky_baseline"],
                "safe_with_safe_patch": p_s["safe_baseline"] + shift,
                "safe_with_risky_patch": p_s["safe_baseline"] - shift,
                "risky_with_safe_patch": p_s["risky_baseline"] + shift,
                "risky_with_risky_patch": max(0.0, p_s["risky_baseline"] - shift),
            }
            for cond in REAL_CONDITIONS:
                for trial in range(30):
                    log_entries.append({"feature": name, "condition": cond, "trial": trial,
                                        **_response(rng, p_stop[cond])})
            if schema == "flat":
                results.append({
                    "feature": name, "layer": layer, "feature_id": fid, "cohen_d": round(d, 4),
                    "is_causal": is_causal, "classified_as": direction if is_causal else "neutral",
                    "safe_stop_delta": shift if is_causal else 0.0, "risky_stop_delta": shift if is_causal else 0.0,
                    "safe_bet_delta": -5.0 * shift, "risky_bet_delta": -8.0 * shift,
                    "safe_p_value": 0.001 if is_causal else 0.6, "risky_p_value": 0.01 if is_causal else 0.7,
                })
            else:
                results.append({
                    "feature": name, "layer": layer, "feature_id": fid, "cohen_d": round(d, 4),
                    "causality": {
                        "is_causal_safe": is_causal, "is_causal_risky": is_causal and d < 0,
                        "safe_effect_size": shift, "risky_effect_size": shift if d < 0 else 0.0,
                        "safe_p_value": 0.001 if is_causal else 0.6, "risky_p_value": 0.01 if is_causal else 0.7,
                        "interpretation": ("bidirectional_causal" if d < 0 else "safe_context_causal")
                        if is_causal else "no_causal_effect",
                    },
                })
            if i % 5 == 0 or i == len(feats):
                minute += 7
                ts = f"20251015_{10 + minute // 60:02d}{minute % 60:02d}00"
                body = {"timestamp": ts, "gpu_id": gi, "process_id": pid, "layer_range": f"L{a}-L{b}",
                        "features_tested": len(results), "n_trials_per_condition": 30,
                        "results": list(results)}  # cumulative: everything so far
                (ck_dir / f"checkpoint_L{a}_{b}_{pid}_{ts}.json").write_text(json.dumps(body, indent=2))
                (log_dir / f"responses_L{a}_{b}_{pid}_{ts}.json").write_text(json.dumps(log_entries, indent=2))
                log_entries = []  # the producer clears its response log after each save
    return {"causal": causal}


def write_demo(directory: str | Path = "pathflow-demo", seed: int = 0, progress=None) -> Path:
    """Write the demo bundle to ``directory`` (deterministic in ``seed``); returns the config path.
    ``progress(done, total, what)``, if given, is told before each stage (training, each SAE, the study).

    Only into a new or empty folder: the bundle is built in a temporary sibling and renamed into
    place, so an existing config or study is never overwritten and a crash leaves nothing half-written.
    """
    import secrets
    import shutil

    out = Path(directory)
    from .locations import enclosing_run

    inside = enclosing_run(str(out.resolve()))
    if inside:
        raise PathflowError(f"{out} is inside the run folder {inside}; runs are never changed: write the demo "
                            "elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PathflowError(f"{out} exists and is not empty: the demo bundle is written only into a new or empty "
                            "folder (nothing was changed); choose another folder or remove this one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    try:
        with torch.enable_grad():  # it trains a model and fits SAEs, whatever the caller's grad mode
            _write_bundle(tmp, seed, progress or (lambda done, total, what: None))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "config.yaml"


def _write_bundle(out: Path, seed: int, progress) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    corpus = _corpus(rng)
    tok = _tokenizer(corpus, DEMO_SHAPE["vocab_size"])
    cfg = LlamaConfig(**{**DEMO_SHAPE, "vocab_size": len(tok)}, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, initializer_range=0.05)
    model = LlamaForCausalLM(cfg)
    stages = 2 + cfg.num_hidden_layers
    progress(0, stages, "training the tiny model")
    loss = _train_model(model, tok, corpus, steps=150, seed=seed)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")

    from .model import (
        resid_post,  # after training: read the model the SAEs will be used on
    )

    n_layers, d_model = cfg.num_hidden_layers, cfg.hidden_size
    d_sae = EXPANSION * d_model
    prompts = demo_prompts()
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(n_layers)}
    for text in corpus[:80] + [prompts["safe"], prompts["risky"]]:
        hs = resid_post(model, torch.tensor([tok(text).input_ids]), list(range(n_layers)))
        for layer in range(n_layers):
            acts[layer].append(hs[layer][0, 1:])  # skip BOS: its norm is an outlier, as in real models
    metrics, active = {"lm_loss": loss, "layers": {}}, {}
    last = {k: torch.tensor([tok(prompts[k]).input_ids]) for k in ("safe", "risky")}
    for layer in range(n_layers):
        progress(1 + layer, stages, f"fitting the SAE of layer {layer}")
        x = torch.cat(acts[layer])
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + layer))[:3072]]
        tensors, m = fit_sae(x, d_sae, steps=250, seed=seed + layer)
        hp = _hyperparams(layer, d_model, d_sae, m.pop("avg_norm"))
        folder = out / "saes" / SAE_PATTERN.format(layer=layer)
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        (folder / "hyperparams.json").write_text(json.dumps(hp, indent=2))
        save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
        metrics["layers"][layer] = m
        # features active at the prompts' last token, strongest first: the study's causal picks
        s = math.sqrt(d_model) / hp["dataset_average_activation_norm"]["in"]
        f = torch.zeros(d_sae)
        for ids in last.values():
            h = resid_post(model, ids, [layer])[layer][0, -1]
            f += torch.relu((s * h) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
        active[layer] = [int(i) for i in torch.argsort(f, descending=True)[:10] if f[i] > 0]
    progress(1 + n_layers, stages, "writing the study")
    study = out / "study"
    study.mkdir(exist_ok=True)
    (study / "prompts.json").write_text(json.dumps(prompts, indent=2))
    info = _study(study, rng, active, n_layers, d_sae)
    (out / "demo_metrics.json").write_text(json.dumps({**metrics, **info, "seed": seed}, indent=2))
    progress(stages, stages, "done")
    config = {
        "study": {"checkpoints": ["study/checkpoints"], "response_logs": ["study/response_logs"],
                  "prompts": "study/prompts.json"},
        "model": {"name_or_path": "./model", "dtype": "float32", "device": "cpu"},
        "sae": {"root": "./saes", "pattern": SAE_PATTERN, "threshold": "zero"},
        "selection": {"top_per_layer": 2, "rank_by": "cohen_d"},
        "gradients": {"batch_size": 4, "position": -1},
        "topk": {"k": 10, "score": "attribution"},
        "report": {"neuronpedia_url": None},  # the demo's SAEs are on no feature browser
    }
    (out / "config.yaml").write_text("# pathflow demo bundle: every path is relative to this file\n"
                                     + yaml.safe_dump(config, sort_keys=False))
