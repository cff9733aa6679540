"""Steps 0–1: audit the patching study's output, and select the causal features.

The readers (``readers``) turn every file into records and findings; the audit counts and
joins them and checks feature ids against the model's and SAEs' metadata (never weights);
selection ranks the causal features per layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

from .config import Config
from .errors import PathflowError
from .readers import (
    FeatureResult,
    Findings,
    Progress,
    expand,
    iter_entries,
    normalise_trial,
    parse_feature,
    read_checkpoints,
    read_json,
    read_revalidation,
    read_summary_csv,
)

__all__ = ["audit", "select", "load_prompts", "parse_feature", "FeatureResult", "Findings"]

log = logging.getLogger(__name__)


def read_response_logs(paths: list[Path], conditions: list[str], f: Findings, progress: Progress | None = None
                       ) -> dict:
    """Trial counts per feature and condition from response logs, streamed one entry at a time."""
    trials: dict[str, Counter] = defaultdict(Counter)
    counts = {"files_found": len(paths), "files_read": 0, "files_failed": 0, "entries": 0, "empty_responses": 0}
    known = set(conditions)
    unknown: dict[str, list] = {}
    for path in paths:
        n_err, empty, first_empty, n = len(f.errors), 0, None, 0
        for i, e in iter_entries(path, f):
            t = normalise_trial(e, str(path), i, f)
            if t is None:
                continue
            n += 1
            if t.condition not in known:
                unknown.setdefault(t.condition, [0, str(path), i])[0] += 1
            if not (t.response or "").strip():
                empty += 1
                first_empty = i if first_empty is None else first_empty
            trials[t.feature][t.condition] += 1
        if empty:
            f.warn("empty_response", f"{empty} entries with an empty or missing response (first at record "
                   f"{first_empty})", path, first_empty)
        counts["entries"] += n
        counts["empty_responses"] += empty
        failed = n == 0 and len(f.errors) > n_err
        counts["files_failed" if failed else "files_read"] += 1
        if progress:
            progress(path, path.stat().st_size if path.is_file() else 0)
    for cond, (n, file, rec) in sorted(unknown.items()):
        f.warn("unknown_condition", f"condition {cond!r} ({n} entries) is not in study.conditions", file, rec)
    return {"trials": {k: dict(v) for k, v in trials.items()}, "counts": counts}


def collect_responses(cfg: Config, features: set[str], per_condition: int = 500) -> dict[str, dict[str, list[str]]]:
    """Logged responses of ``features``: {feature: {condition: [text]}}, at most ``per_condition`` each
    (streamed; bad records are skipped here, the audit reports them)."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    f = Findings()
    for path in expand(cfg.study.response_logs):
        for i, e in iter_entries(path, f):
            t = normalise_trial(e, str(path), i, f)
            if t is not None and t.feature in features and t.response:
                texts = out[t.feature][t.condition]
                if len(texts) < per_condition:
                    texts.append(t.response)
    return {k: dict(v) for k, v in out.items()}


def _metadata(local: Path, repo: str, filename: str) -> dict | None:
    """A small metadata JSON: the local file, else ``filename`` of hub ``repo`` from the hub client's
    cache. Never downloads, never reads weights."""
    path = local
    if not path.is_file() and "/" in repo and not repo.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, filename)
        path = Path(cached) if isinstance(cached, str) else path
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def model_layers(cfg: Config) -> int | None:
    name = cfg.model.name_or_path
    meta = _metadata(Path(name) / "config.json", name, "config.json")
    return meta.get("num_hidden_layers") if meta else None


def sae_width(cfg: Config, layer: int) -> int | None:
    from .sae import HYPERPARAMS, layer_location

    sub = cfg.sae.pattern.format(layer=layer)
    meta = _metadata(Path(layer_location(cfg.sae.root, cfg.sae.pattern, layer)) / HYPERPARAMS,
                     cfg.sae.root.format(layer=layer), f"{sub}/{HYPERPARAMS}" if sub and sub != "." else HYPERPARAMS)
    return meta.get("d_sae") if meta else None


def check_ranges(features: dict[str, FeatureResult], cfg: Config, f: Findings) -> dict:
    """Drop (as errors) features whose layer is beyond the model or whose id is ≥ d_sae."""
    n_layers = model_layers(cfg)
    if n_layers is None:
        f.warn("range_check_skipped", f"cannot read config.json of model {cfg.model.name_or_path!r}: "
               "layers not checked against the model")
    widths: dict[int, int | None] = {}
    for name, rec in sorted(features.items()):
        if n_layers is not None and rec.layer >= n_layers:
            f.error("layer_out_of_range", f"{name}: layer {rec.layer} is beyond the model (layers 0..{n_layers - 1})",
                    rec.source_file, name)
            del features[name]
            continue
        if rec.layer not in widths:
            widths[rec.layer] = sae_width(cfg, rec.layer)
            if widths[rec.layer] is None:
                f.warn("range_check_skipped", f"cannot read hyperparams.json of the layer-{rec.layer} SAE: "
                       "its feature ids not checked")
        d_sae = widths[rec.layer]
        if d_sae is not None and rec.feature_id >= d_sae:
            f.error("feature_out_of_range", f"{name}: feature id {rec.feature_id} ≥ d_sae = {d_sae}",
                    rec.source_file, name)
            del features[name]
    known = [w for w in widths.values() if w is not None]
    return {"n_layers": n_layers, "d_sae": max(known) if known else sae_width(cfg, 0)}


def check_paths(cfg: Config) -> None:
    """Configured paths that are plain names must exist: a wrong one is a usage error."""
    s = cfg.study
    named = [("study.checkpoints", p) for p in s.checkpoints] + [("study.response_logs", p) for p in s.response_logs]
    named += [("study.revalidation", p) for p in s.revalidation]
    named += [(k, p) for k, p in (("study.summary_csv", s.summary_csv),) if p]
    missing = [f"{k}: {p}" for k, p in named if not any(c in p for c in "*?[") and not os.path.exists(p)]
    if missing:
        raise PathflowError("configured study paths do not exist:\n  " + "\n  ".join(missing))


_REMEMBERED: dict[tuple, tuple[dict, dict]] = {}  # an audit kept for the next one of the same, unchanged files


def _audit_key(cfg: Config) -> tuple:
    """What an audit reads: the study config and every input file's path, size and modification time."""
    s = cfg.study
    files = expand(s.checkpoints + s.response_logs + s.revalidation) + [Path(p) for p in (s.summary_csv,) if p]
    stats = []
    for p in files:
        try:
            st = p.stat()
            stats.append((str(p), st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            stats.append((str(p), None, None, None))
    return s.model_dump_json(), tuple(stats)


def audit(cfg: Config, progress: Progress | None = None, remember: bool = False
          ) -> tuple[dict, dict[str, FeatureResult]]:
    """Step 0: read everything, check it, count it, join it. Returns (report, features by name).

    ``progress(path, bytes)`` is called as each file is done (for a progress bar). ``remember``
    keeps the result for the next audit of the same files, unchanged (path, size, modification time,
    inode), in this process, once: `pathflow run` audits before it starts a server, and its flow's
    audit step, in the same process, takes that result instead of reading the study again.
    """
    import copy

    check_paths(cfg)
    key = _audit_key(cfg)
    kept = _REMEMBERED.pop(key, None)
    _REMEMBERED.clear()
    result = kept or _audit(cfg, progress)
    if remember:
        _REMEMBERED[key] = copy.deepcopy(result)
    return result


def _audit(cfg: Config, progress: Progress | None) -> tuple[dict, dict[str, FeatureResult]]:
    f = Findings()
    features, ck_counts = read_checkpoints(expand(cfg.study.checkpoints, f), f, progress)
    if cfg.study.summary_csv:
        for name, rec in read_summary_csv(Path(cfg.study.summary_csv), f).items():
            features.setdefault(name, rec)  # checkpoints carry more (cohen_d): they win
    if not cfg.study.checkpoints and not cfg.study.summary_csv:
        f.error("no_inputs", "neither study.checkpoints nor study.summary_csv is set")
    logs = read_response_logs(expand(cfg.study.response_logs, f), cfg.study.conditions, f, progress)
    reval: dict[str, Counter] = defaultdict(Counter)
    n_reval = 0
    for t in read_revalidation(expand(cfg.study.revalidation, f), f, progress):
        reval[t.feature][f"{t.prompt_type}@{t.scale:g}"] += 1
        n_reval += 1
    ranges = check_ranges(features, cfg, f)
    for feature, by_cond in sorted(logs["trials"].items()):
        for cond in cfg.study.conditions:
            n = by_cond.get(cond, 0)
            if 0 < n < cfg.study.min_trials or (n == 0 and by_cond):
                f.warn("few_trials", f"{feature} / {cond}: {n} trials < study.min_trials = {cfg.study.min_trials}",
                       None, feature)
    if not features and (cfg.study.checkpoints or cfg.study.summary_csv):
        f.error("no_features", "no usable feature results in study.checkpoints / study.summary_csv")
    causal = [r for r in features.values() if r.is_causal]
    logged = set(logs["trials"])
    causal_names = {r.feature for r in causal}
    report = {
        "validated": not f.errors,
        "errors": [e.model_dump() for e in f.errors],
        "warnings": [w.model_dump() for w in f.warnings],
        "counts": {
            "checkpoint_files": ck_counts,
            "response_log_files": logs["counts"],
            "features_total": len(features),
            "causal_total": len(causal),
            "causal_by_layer": {str(k): v for k, v in sorted(Counter(r.layer for r in causal).items())},
            "causal_by_direction": dict(sorted(Counter(r.direction for r in causal).items())),
            "by_schema": dict(sorted(Counter(r.schema_ for r in features.values()).items())),
            "join": {
                "joined": len(causal_names & logged),
                "causal_without_logs": len(causal_names - logged),
                "logs_without_result": len(logged - set(features)),
            },
            "revalidation": {"records": n_reval, "features": len(reval)},
        },
        "trials": logs["trials"],
        "revalidation": {k: dict(v) for k, v in sorted(reval.items())},
        "ranges": ranges,
    }
    return report, features


def select(features: dict[str, FeatureResult], cfg: Config, include: list[str] = ()) -> list[dict]:
    """Step 1: causal features, top-N per layer by |rank key| (cohen_d, else effect size).

    Features named in ``include`` are kept whatever their rank (and even when not causal);
    ``rank`` is always the feature's rank among its layer's candidates.
    """
    sel = cfg.selection
    include = set(include) | set(sel.include) | set(sel.features or ())
    by_layer: dict[int, list[tuple[float, str, FeatureResult]]] = defaultdict(list)
    for r in features.values():
        if r.feature in sel.exclude or (sel.features is not None and r.feature not in sel.features):
            continue
        forced = r.feature in include
        if not forced and (not r.is_causal or (sel.layers is not None and r.layer not in sel.layers)
                           or (sel.direction is not None and r.direction != sel.direction)):
            continue
        key = sel.rank_by if (sel.rank_by == "cohen_d" and r.cohen_d is not None) else "effect_size"
        value = r.cohen_d if key == "cohen_d" else r.effect_size
        by_layer[r.layer].append((abs(value) if value is not None else -1.0, key, r))
    out = []
    for layer in sorted(by_layer):
        ranked = sorted(by_layer[layer], key=lambda t: (-t[0], t[2].feature_id))
        for rank, (v, key, r) in enumerate(ranked, start=1):
            if rank > sel.top_per_layer and r.feature not in include:
                continue
            out.append({"feature": r.feature, "layer": r.layer, "feature_id": r.feature_id,
                        "direction": r.direction, "cohen_d": r.cohen_d, "effect_size": r.effect_size,
                        "rank_key": key, "rank_value": None if v < 0 else v, "rank": rank,
                        "reason": "requested" if r.feature in include else f"top {sel.top_per_layer} in layer",
                        "source_file": r.source_file})
    return out


def audit_errors(report: dict) -> str:
    """What a run says when the study audit found errors (they are in audit/data_validation.json)."""
    first = report["errors"][0]
    where = f" ({first['file']}" + (f", record {first['record']}" if first.get("record") is not None else "") + ")" \
        if first.get("file") else ""
    return (f"the study audit found {len(report['errors'])} errors, first {first['code']}: {first['message']}{where}; "
            "fix them (`pathflow audit` lists them all) or allow them (--allow-audit-errors, or the flow parameter "
            "allow_audit_errors=true)")


def missing_features(features: dict[str, FeatureResult], names: list[str], ranges: dict | None = None) -> str | None:
    """A one-line error for requested feature names that are beyond the model or its SAEs (with the
    audit's ``ranges``) or that the study has no result for; else None."""
    for name in names:
        layer, fid = parse_feature(name) or (None, None)
        if layer is None:
            return f"{name!r} is not of the form L{{layer}}-{{id}}, e.g. L3-142"
        if ranges and ranges.get("n_layers") is not None and layer >= ranges["n_layers"]:
            return f"{name}: layer {layer} is beyond the model (layers 0..{ranges['n_layers'] - 1})"
        if ranges and ranges.get("d_sae") is not None and fid >= ranges["d_sae"]:
            return f"{name}: id {fid} ≥ d_sae = {ranges['d_sae']}"
    missing = [n for n in names if n not in features]
    if not missing:
        return None
    causal = sorted((k for k, v in features.items() if v.is_causal), key=lambda k: parse_feature(k))
    return (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in the study's results; its causal "
            f"features include: {', '.join(causal[:12]) or 'none'}")


def load_prompts(path: str | None) -> dict[str, str]:
    """The study's prompts.json -> {"safe": text, "risky": text}."""
    if not path:
        raise PathflowError("study.prompts is not set: point it at the study's prompts.json")
    p = Path(path)
    f = Findings()
    body = read_json(p, f)
    if body is None:
        raise PathflowError(f"study.prompts: {f.errors[0].message}: {p}" if f.errors else f"cannot read {p}")
    if not isinstance(body, dict):
        raise PathflowError(f"{p}: prompts must be an object with 'safe' and 'risky'")
    prompts = {k: body[k] for k in ("safe", "risky") if isinstance(body.get(k), str) and body[k]}
    if not prompts:
        raise PathflowError(f"{p}: no 'safe' or 'risky' prompt text found")
    return prompts


_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256: a file is hashed once per process


def sha256_of(path: str) -> str:
    """sha256 of a regular file, cached while its size, mtime and inode stay the same."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def file_sha256(paths: list[str]) -> dict[str, str]:
    return {p: sha256_of(p) for p in paths if os.path.isfile(p)}
