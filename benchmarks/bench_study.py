"""The whole flow on a study of N causal features: seconds per step, the wall time outside the steps,
peak memory, bytes per output kind, and those bytes projected to the real study's shapes.

    python benchmarks/bench_study.py --features 1536

The study is made for the demo model in the real formats (DESIGN §4): cumulative checkpoints from two
producer processes (flat and nested schema, one every 50 features), response logs with 10 trials of
each of the 6 conditions per feature, the demo's prompts. Its N causal features are the demo SAEs'
features of layers 1 and up, in order (the demo has 3 × 512 = 1,536). `pathflow run` runs it as a user
would (its own temporary Prefect server); the step times come from the run's manifest. Prints JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))

CONDITIONS = ["safe_baseline", "safe_with_safe_patch", "safe_with_risky_patch", "risky_baseline",
              "risky_with_safe_patch", "risky_with_risky_patch"]
STEPS = ("audit", "select", "pathways", "tokens", "graphs", "contrast", "integrate")
# The real study (LLaMA-3.1-8B + LlamaScope 32K): targets, prompts, layers, SAE width; targets spread
# over layers 1–31, so a target has on average 16 upstream layers.
REAL = {"targets": 1550, "prompts": 2, "mean_upstream_layers": 16.0, "d_sae": 32768,
        "tokens": 120, "layers": 32, "active_per_token": 50}  # LlamaScope's L0 is about 50


def _response(rng: random.Random, p_stop: float) -> dict:
    if rng.random() < p_stop:
        return {"response": rng.choice(["2\n", "2) Stop\n", "2\nI will stop here."]),
                "parsed": {"action": "stop", "bet": 0, "valid": True}}
    bet = rng.choice([5, 10, 20, 50, 100])
    return {"response": f"1\nBet ${bet}", "parsed": {"action": "bet", "bet": bet, "valid": True}}


def make_study(demo: Path, out: Path, n: int, trials: int = 10, seed: int = 0,
               feats: list[tuple[int, int]] | None = None, responses: list[dict] | None = None
               ) -> tuple[Path, list[str]]:
    """A study of ``n`` causal features of the bundle ``demo``'s model in the real formats (``feats``: which,
    by default the first ``n`` above layer 0; ``responses``: logged responses drawn from these, by default
    made up); returns its config."""
    rng = random.Random(seed)
    demo_cfg = yaml.safe_load((demo / "config.yaml").read_text())
    hp = json.loads(next((demo / "saes").glob("*/hyperparams.json")).read_text())
    n_layers = json.loads((demo / "model" / "config.json").read_text())["num_hidden_layers"]
    d_sae = hp["d_sae"]
    if feats is None:
        feats = [(layer, fid) for layer in range(1, n_layers) for fid in range(d_sae)][:n]
        if len(feats) < n:
            raise SystemExit(f"the demo model has only {len(feats)} features above layer 0")
    by_action = {a: [r for r in responses or [] if r["parsed"]["action"] == a] for a in ("bet", "stop")}

    def respond(p_stop: float) -> dict:
        if not responses:
            return _response(rng, p_stop)
        return rng.choice(by_action["stop" if rng.random() < p_stop else "bet"] or responses)
    ck, logs = out / "study" / "checkpoints", out / "study" / "response_logs"
    ck.mkdir(parents=True)
    logs.mkdir(parents=True)
    (out / "study" / "prompts.json").write_text((demo / "study" / "prompts.json").read_text())
    half = (len(feats) + 1) // 2
    names = []
    for gi, part in enumerate((feats[:half], feats[half:])):
        schema, pid = ("flat", "nested")[gi], f"gpu{gi}"
        a, b = (part[0][0], part[-1][0]) if part else (0, 0)
        results, entries = [], []
        for i, (layer, fid) in enumerate(part, start=1):
            d = rng.uniform(0.8, 2.5) * rng.choice([1, -1])
            name = f"L{layer}-{fid}"
            names.append(name)
            shift = 0.25
            p_stop = {"safe_baseline": 0.6, "risky_baseline": 0.3, "safe_with_safe_patch": 0.85,
                      "safe_with_risky_patch": 0.35, "risky_with_safe_patch": 0.55, "risky_with_risky_patch": 0.05}
            entries += [{"feature": name, "condition": c, "trial": t, **respond(p_stop[c])}
                        for c in CONDITIONS for t in range(trials)]
            if schema == "flat":
                results.append({"feature": name, "layer": layer, "feature_id": fid, "cohen_d": round(d, 4),
                                "is_causal": True, "classified_as": "safe" if d > 0 else "risky",
                                "safe_stop_delta": shift, "risky_stop_delta": shift, "safe_bet_delta": -1.25,
                                "risky_bet_delta": -2.0, "safe_p_value": 0.001, "risky_p_value": 0.01})
            else:
                results.append({"feature": name, "layer": layer, "feature_id": fid, "cohen_d": round(d, 4),
                                "causality": {"is_causal_safe": True, "is_causal_risky": d < 0,
                                              "safe_effect_size": shift, "risky_effect_size": shift if d < 0 else 0.0,
                                              "safe_p_value": 0.001, "risky_p_value": 0.01,
                                              "interpretation": "bidirectional_causal" if d < 0
                                              else "safe_context_causal"}})
            if i % 50 == 0 or i == len(part):  # a cumulative checkpoint and the log since the last one
                ts = f"20251015_{10 + i // 3000:02d}{(i // 50) % 60:02d}{i % 50:02d}"
                body = {"timestamp": ts, "gpu_id": gi, "process_id": pid, "layer_range": f"L{a}-L{b}",
                        "features_tested": len(results), "n_trials_per_condition": trials,
                        "results": list(results)}
                (ck / f"checkpoint_L{a}_{b}_{pid}_{ts}.json").write_text(json.dumps(body))
                (logs / f"responses_L{a}_{b}_{pid}_{ts}.json").write_text(json.dumps(entries))
                entries = []
    cfg = {**demo_cfg,
           "study": {"checkpoints": [str(ck)], "response_logs": [str(logs)],
                     "prompts": str(out / "study" / "prompts.json"), "min_trials": trials},
           "model": {**demo_cfg["model"], "name_or_path": str((demo / "model").resolve())},
           "sae": {**demo_cfg["sae"], "root": str((demo / "saes").resolve())},
           "selection": {"top_per_layer": d_sae, "rank_by": "cohen_d"}}
    cfg.pop("store", None)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, names


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def output_bytes(run_dir: Path) -> dict[str, int]:
    kinds = {"jacobians.zarr/grad": run_dir / "jacobians.zarr" / "grad",
             "jacobians.zarr/activation": run_dir / "jacobians.zarr" / "activation",
             "pathways": run_dir / "pathways", "tokens": run_dir / "tokens",
             "integrated/features.json": run_dir / "integrated" / "features.json",
             "integrated/report.html (index)": run_dir / "integrated" / "report.html",
             "integrated/features (pages)": run_dir / "integrated" / "features",
             "integrated/graphs": run_dir / "integrated" / "graphs", "graphs.zarr": run_dir / "graphs.zarr"}
    out = {k: folder_bytes(p) if p.is_dir() else (p.stat().st_size if p.exists() else 0) for k, p in kinds.items()}
    out["total"] = folder_bytes(run_dir)
    return out


def projection(run_dir: Path, sizes: dict[str, int]) -> dict:
    """Bytes at the real shapes: the store scaled by computed gradient values, per-feature outputs by
    the number of features."""
    import numpy as np
    import zarr

    g = zarr.open_group(str(run_dir / "jacobians.zarr"), mode="r")
    computed = int(np.isfinite(g["grad"][:]).sum())
    per_value = sizes["jacobians.zarr/grad"] / max(1, computed)
    real_values = REAL["targets"] * REAL["prompts"] * REAL["mean_upstream_layers"] * REAL["d_sae"]
    n = len(g.attrs["targets"])
    per_feature = {k: sizes[k] / max(1, n) * REAL["targets"] for k in
                   ("pathways", "tokens", "integrated/features.json", "integrated/report.html (index)",
                    "integrated/features (pages)")}
    store = per_value * real_values + sizes["jacobians.zarr/activation"] / g["activation"].shape[2] \
        * REAL["d_sae"] * 32 / g["activation"].shape[1]
    # the graphs: as many as graphs.max_targets allows, each at most graphs.max_nodes nodes, so their JSON
    # stays what it is here; graphs.zarr grows with the active entries (positions × layers × L0)
    gz = zarr.open_group(str(run_dir / "graphs.zarr"), mode="r") if (run_dir / "graphs.zarr").exists() else None
    graphs = {"integrated/graphs": sizes["integrated/graphs"], "graphs.zarr": 0.0}
    if gz is not None and len(gz):
        values = sum(gz[p]["weight"].size for p in gz.group_keys())
        per_weight = sizes["graphs.zarr"] / max(1, values)
        graphed = gz[next(iter(gz.group_keys()))]["weight"].shape[0]
        graphs["graphs.zarr"] = per_weight * graphed * REAL["prompts"] * REAL["tokens"] * REAL["layers"] \
            * REAL["active_per_token"]
        graphs["graphs_zarr_bytes_per_weight"] = per_weight
    return {"keepbits": g.attrs.get("keepbits"), "grad_bytes_per_value": per_value,
            "jacobians_zarr_bytes": store, "per_feature_outputs_bytes": per_feature, "graphs": graphs,
            "run_folder_bytes": store + sum(per_feature.values()) + graphs["integrated/graphs"]
            + graphs["graphs.zarr"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=int, default=96)
    ap.add_argument("--demo", help="a demo bundle (default: build one in a temporary folder)")
    ap.add_argument("--keep", help="keep the study and its store in this folder")
    ap.add_argument("--repeats", type=int, default=1, help="runs of the flow; each time reported is the minimum")
    ap.add_argument("--shape", choices=("demo", "study"), default="demo",
                    help="demo: the demo bundle's model (4 layers, 512-wide SAEs); study: the real study's shapes "
                    "but the width (benchmarks/study_shapes.py: 32 layers, 32K-wide SAEs, ~100 active per token, "
                    "the LLaMA-3 tokenizer and the real prompts, --per-layer features in each of layers 1..)")
    ap.add_argument("--layers", type=int, default=32, help="--shape study: the model's layers")
    ap.add_argument("--width", type=int, default=256, help="--shape study: the model's width")
    ap.add_argument("--d-sae", type=int, default=32768, help="--shape study: the SAEs' width")
    ap.add_argument("--per-layer", type=int, default=50, help="--shape study: causal features per layer")
    ap.add_argument("--vs", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="also run a variant of the config with these keys set (YAML values; repeatable), each "
                         "repeat running the default and the variant in turn; prints the variant's steps and the "
                         "ratios, e.g. --vs attribution.method=gradient --vs attribution.replay_top=0")
    ap.add_argument("--vs-env", action="append", default=[], metavar="NAME=VALUE",
                    help="the variant runs with this environment variable set (repeatable; with or without --vs), "
                         "e.g. --vs-env PATHFLOW_COMPUTE_THREAD=0")
    args = ap.parse_args(argv)
    from pathflow.demo import write_demo

    tmp = tempfile.TemporaryDirectory()
    work = Path(args.keep) if args.keep else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    feats = responses = None
    t0 = time.perf_counter()
    if args.shape == "study":
        from study_shapes import real_responses, study_features, write_bundle

        demo = write_bundle(work / f"bundle-{args.layers}x{args.width}-{args.d_sae}", args.width, args.layers,
                            args.d_sae).parent
        feats = study_features(args.layers, args.d_sae, args.per_layer)
        responses = real_responses()
        args.features = len(feats)
    else:
        demo = Path(args.demo) if args.demo else write_demo(work / "demo").parent
    bundle_s = time.perf_counter() - t0
    for old in (work / f"study-{args.features}", work / f"store-{args.features}"):  # this benchmark's own
        shutil.rmtree(old, ignore_errors=True)
    t0 = time.perf_counter()
    cfg, names = make_study(demo, work / f"study-{args.features}", args.features, feats=feats, responses=responses)
    make_s = time.perf_counter() - t0
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    walls, steps_seen, outside = [], {s: [] for s in STEPS}, []
    variant = None
    venv = {**env, **dict(item.partition("=")[::2] for item in args.vs_env)}
    if args.vs or args.vs_env:
        data = yaml.safe_load(cfg.read_text())
        for item in args.vs:
            key, _, value = item.partition("=")
            section, _, name = key.partition(".")
            data.setdefault(section, {})[name] = yaml.safe_load(value)
        variant = cfg.with_name("config-variant.yaml")
        variant.write_text(yaml.safe_dump(data, sort_keys=False))
    var_steps: dict[str, list[float]] = {s: [] for s in STEPS}
    var_walls: list[float] = []
    for i in range(args.repeats):  # a stall of the machine hits one sample; the minimum drops it
        if variant is not None:  # interleaved with the default's runs
            vstore = work / f"store-{args.features}" / f"variant-{i}"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pathflow", "run", "-c", str(variant), "--store", str(vstore)],
                               capture_output=True, text=True, env=venv, cwd=str(ROOT))
            var_walls.append(time.perf_counter() - t0)
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"pathflow run (variant) failed ({r.returncode})")
            (vdir,) = (vstore / "runs").iterdir()
            vm = json.loads((vdir / "manifest.json").read_text())
            for s in STEPS:
                if s in vm["steps"]:
                    var_steps[s].append(vm["steps"][s]["seconds"])
            shutil.rmtree(vstore, ignore_errors=True)
        store = work / f"store-{args.features}" / str(i)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pathflow", "run", "-c", str(cfg), "--store", str(store)],
                           capture_output=True, text=True, env=env, cwd=str(ROOT))
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"pathflow run failed ({r.returncode})")
        (run_dir,) = (store / "runs").iterdir()
        m = json.loads((run_dir / "manifest.json").read_text())
        walls.append(wall)
        for s in STEPS:
            if s in m["steps"]:
                steps_seen[s].append(m["steps"][s]["seconds"])
        outside.append(wall - sum(m["steps"][s]["seconds"] for s in STEPS if s in m["steps"]))
    steps = {s: min(v) for s, v in steps_seen.items() if v}
    wall = min(walls)
    sizes = output_bytes(run_dir)
    result = {
        "features": len(names), "targets_traced": len(json.loads((run_dir / "pathways" / "candidates.json")
                                                                 .read_text())["targets"]),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "shape": {"kind": args.shape, **({"layers": args.layers, "width": args.width, "d_sae": args.d_sae,
                                          "per_layer": args.per_layer} if args.shape == "study" else {})},
        "seconds": {"bundle": bundle_s, "make_study": make_s, "repeats": args.repeats, "run_wall": wall,
                    "steps": steps,
                    "outside_steps": min(outside),
                    "outside_share": min(o / w for o, w in zip(outside, walls)),
                    "all_walls": walls,
                    "tokens_over_pathways": steps.get("tokens", 0) / max(1e-9, steps.get("pathways", 0))},
        # each step resets the kernel's peak (steps.<step>.peak_rss_bytes), so the run's peak is the largest
        # of theirs and of what getrusage saw after the last reset
        "peak_rss_bytes": max([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]
                              + [m["steps"][s].get("peak_rss_bytes") or 0 for s in STEPS if s in m["steps"]]),
        "peak_rss_bytes_per_step": {s: m["steps"][s].get("peak_rss_bytes") for s in STEPS if s in m["steps"]},
        "bytes": sizes,
        "projected_real": projection(run_dir, sizes),
    }
    if variant is not None:
        vsteps = {s: min(v) for s, v in var_steps.items() if v}
        result["variant"] = {"set": args.vs, "env": args.vs_env, "run_wall": min(var_walls), "steps": vsteps,
                             "default_over_variant": {s: steps[s] / max(vsteps[s], 1e-9) for s in vsteps if s in steps},
                             "wall_default_over_variant": wall / max(min(var_walls), 1e-9)}
    print(json.dumps(result, indent=2))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
