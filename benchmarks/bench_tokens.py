"""Step 4's reads: today's pass per feature against one pass over every distinct text.

    python benchmarks/bench_tokens.py --features 128

N causal features of the demo model, each with --responses sampled responses: the study's real
revalidation responses where ../shared holds them (many short, many repeated: "1\\n", "2\\n"), else
the demo's. The per-feature path runs the two prompts and the feature's responses for every feature
(8 texts a batch); the one-pass path runs every distinct text once (64 texts a batch, 4,096 padded
tokens at most) and reads each feature from its own texts. Each time is the minimum of interleaved
repeats (this machine stalls now and then). Prints JSON last.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL = ROOT.parent / "shared" / "data" / "llm-addiction" / "exp2_revalidation_trials.jsonl"


def response_pool(demo: Path) -> tuple[list[str], str]:
    if REAL.is_file():
        return [json.loads(line)["response"] for line in REAL.open() if line.strip()], str(REAL)
    logs = [r["response"] for f in sorted((demo / "study" / "response_logs").glob("*.json"))
            for r in json.loads(f.read_text())]
    return logs, "demo response logs"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--responses", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo", help="a demo bundle (default: build one in a temporary folder)")
    args = ap.parse_args(argv)

    from pathflow.config import load_config
    from pathflow.context import get_context
    from pathflow.demo import write_demo
    from pathflow.tokens import feature_reads, reading_plan

    tmp = None
    if args.demo:
        demo = Path(args.demo)
    else:
        tmp = tempfile.TemporaryDirectory()
        demo = write_demo(Path(tmp.name) / "demo")
    cfg = load_config(demo / "config.yaml")
    ctx = get_context(cfg)
    n_layers, d_sae = len(ctx.model.model.layers), ctx.sae(1).W_enc.shape[0]
    rng = random.Random(0)
    keys = sorted({(rng.randrange(1, n_layers), rng.randrange(d_sae)) for _ in range(args.features * 2)})
    keys = rng.sample(keys, min(args.features, len(keys)))
    pool, source = response_pool(demo)
    prompts = list(ctx.prompts.values())
    own = [list(dict.fromkeys(rng.sample(pool, min(args.responses, len(pool))))) for _ in keys]
    texts, readers, _views = reading_plan(prompts, own)
    top, window = cfg.tokens.top, cfg.tokens.window

    def per_feature():
        for key, mine in zip(keys, own):
            feature_reads(ctx.model, ctx.saes, ctx.tokenizer, prompts + mine, [key], top, window, batch_size=8)

    def one_pass():
        feature_reads(ctx.model, ctx.saes, ctx.tokenizer, texts, keys, top, window, batch_size=64, readers=readers)

    times = {"per_feature": [], "one_pass": []}
    for _ in range(args.repeats):  # interleaved, so a stall hits one sample, not one method
        for name, fn in (("per_feature", per_feature), ("one_pass", one_pass)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    n_tok = lambda ts: sum(len(ctx.tokenizer(t).input_ids) for t in ts)  # noqa: E731
    result = {
        "features": len(keys), "responses_per_feature": args.responses, "responses_from": source,
        "texts_through_the_model": {"per_feature": sum(len(prompts) + len(m) for m in own), "one_pass": len(texts)},
        "tokens_through_the_model": {"per_feature": sum(n_tok(prompts) + n_tok(m) for m in own),
                                     "one_pass": n_tok(texts)},
        "seconds_min": best, "seconds_all": times,
        "one_pass_speedup": best["per_feature"] / best["one_pass"],
    }
    print(json.dumps(result, indent=2))
    if tmp:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
