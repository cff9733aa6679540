"""Step 0 at study scale: audit a synthetic study of N files and report time and peak memory.

    python benchmarks/bench_audit.py --files 200 --log-mb 100

Half the files are cumulative checkpoints (flat and nested schema, as the study's producer
writes them), half are response logs totalling about --log-mb MB. The study is generated in a
child process, so the peak memory reported is the audit's own. Prints JSON last.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONDITIONS = ["safe_baseline", "safe_with_safe_patch", "safe_with_risky_patch", "risky_baseline",
              "risky_with_safe_patch", "risky_with_risky_patch"]


def generate(out: Path, files: int, log_mb: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    ck_dir, log_dir = out / "checkpoints", out / "logs"
    ck_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    n_ck, n_log = files // 2, files - files // 2
    procs = 4
    per_proc = n_ck // procs
    feats_per_ck = 10
    fid = 0
    all_features = []
    for p in range(procs):
        layers = list(range(25 + p * 2, 27 + p * 2))
        results = []
        for c in range(per_proc):
            for _ in range(feats_per_ck):
                layer = rng.choice(layers)
                fid += 1
                name, d = f"L{layer}-{fid}", rng.gauss(0, 1)
                causal = abs(d) > 0.8
                all_features.append(name)
                if p % 2 == 0:
                    results.append({"feature": name, "layer": layer, "feature_id": fid, "cohen_d": d,
                                    "is_causal": causal, "classified_as": ("safe" if d > 0 else "risky") if causal
                                    else "neutral", "safe_stop_delta": 0.1, "risky_stop_delta": 0.05,
                                    "safe_bet_delta": -1.0, "risky_bet_delta": -2.0, "safe_p_value": 0.01,
                                    "risky_p_value": 0.02})
                else:
                    results.append({"feature": name, "layer": layer, "feature_id": fid, "cohen_d": d, "causality": {
                        "is_causal_safe": causal, "is_causal_risky": False, "safe_effect_size": 0.2,
                        "risky_effect_size": 0.0, "safe_p_value": 0.01, "risky_p_value": 0.5,
                        "interpretation": "safe_context_causal" if causal else "no_causal_effect"}})
            ts = f"20251015_{10 + c // 60:02d}{c % 60:02d}00"
            body = {"timestamp": ts, "gpu_id": p, "process_id": f"p{p}", "layer_range": f"L{layers[0]}-L{layers[-1]}",
                    "features_tested": len(results), "n_trials_per_condition": 30, "results": results}
            (ck_dir / f"checkpoint_L{layers[0]}_{layers[-1]}_p{p}_{ts}.json").write_text(json.dumps(body, indent=2))
    target = log_mb * 2**20 / n_log
    for i in range(n_log):
        entries, size = [], 0
        feats = all_features[i * len(all_features) // n_log:(i + 1) * len(all_features) // n_log] or all_features[:1]
        while size < target:
            for name in feats:
                for cond in CONDITIONS:
                    resp = "1\nBet $10. " + "The machine spins and I keep my target in mind. " * rng.randint(1, 4)
                    e = {"feature": name, "condition": cond, "trial": len(entries), "response": resp,
                         "parsed": {"action": "bet", "bet": 10, "valid": True}}
                    entries.append(e)
                    size += len(resp) + 160
            if len(entries) > 10**6:
                break
        (log_dir / f"responses_L25_32_p{i % procs}_20251015_{i:06d}.json").write_text(json.dumps(entries, indent=2))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--log-mb", type=float, default=100)
    ap.add_argument("--dir", type=Path, default=Path("bench-audit-study"))
    ap.add_argument("--generate-only", action="store_true")
    args = ap.parse_args(argv)
    if args.generate_only:
        generate(args.dir, args.files, args.log_mb)
        return {}
    subprocess.run([sys.executable, __file__, "--generate-only", "--files", str(args.files), "--log-mb",
                    str(args.log_mb), "--dir", str(args.dir)], check=True)
    import pathflow.sae  # noqa: F401  (imports torch: part of the baseline, not of the audit)
    from pathflow.config import Config
    from pathflow.study import audit

    cfg = Config()
    cfg.study.checkpoints = [str(args.dir / "checkpoints")]
    cfg.study.response_logs = [str(args.dir / "logs")]
    cfg.model.name_or_path = str(args.dir / "no-model")  # metadata unreachable: range checks skipped
    cfg.study.min_trials = 0
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    report, _ = audit(cfg)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    files = sorted((args.dir / "logs").iterdir()) + sorted((args.dir / "checkpoints").iterdir())
    size = sum(p.stat().st_size for p in files)
    result = {
        "files": len(files), "bytes": size, "log_bytes": sum(p.stat().st_size for p in (args.dir / "logs").iterdir()),
        "seconds": seconds, "mb_per_second": size / 2**20 / seconds,
        "baseline_rss_bytes": baseline, "audit_peak_rss_bytes": peak,
        "validated": report["validated"], "errors": len(report["errors"]),
        "features_total": report["counts"]["features_total"], "causal_total": report["counts"]["causal_total"],
        "log_entries": report["counts"]["response_log_files"]["entries"],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
