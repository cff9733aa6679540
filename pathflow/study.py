"""Steps 0–1: read the patching study's output, audit it, and select the causal features.

Checkpoints are cumulative (the producer rewrites every result so far every 50 features),
so the same feature appears in many files: one record per feature, newest file wins, and a
feature whose values differ between files is a warning naming both files.
Problems are structured findings (code, message, file, record), never assertions.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from .config import Config
from .errors import PathflowError

log = logging.getLogger(__name__)

FEATURE_RE = re.compile(r"^L(\d+)-(\d+)$")
TS_RE = re.compile(r"(\d{8}_\d{6})")
NOT_CAUSAL = {"no_causal_effect", "no_effect"}


class Finding(BaseModel):
    code: str
    message: str
    file: str | None = None
    record: int | str | None = None


class FeatureResult(BaseModel):
    """One patched feature, normalised from either checkpoint schema or the summary CSV."""

    feature: str
    layer: int
    feature_id: int
    cohen_d: float | None = None
    effect_size: float | None = None
    is_causal: bool
    direction: Literal["safe", "risky", "neutral"]
    schema_: str
    source_file: str
    values: dict = {}


class Findings:
    def __init__(self) -> None:
        self.errors: list[Finding] = []
        self.warnings: list[Finding] = []

    def error(self, code, message, file=None, record=None):
        self.errors.append(Finding(code=code, message=message, file=file, record=record))
        log.debug("error %s: %s (%s #%s)", code, message, file, record)

    def warn(self, code, message, file=None, record=None):
        self.warnings.append(Finding(code=code, message=message, file=file, record=record))


def parse_feature(name: str) -> tuple[int, int] | None:
    m = FEATURE_RE.match(name or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def expand(specs: list[str]) -> list[Path]:
    """Files named by a list of files, folders (their *.json / *.jsonl) and globs, sorted."""
    out: set[Path] = set()
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            out |= {q for q in p.iterdir() if q.suffix in (".json", ".jsonl") and q.is_file()}
        elif any(ch in spec for ch in "*?["):
            out |= {Path(q) for q in glob.glob(spec, recursive=True)}
        else:
            out.add(p)
    return sorted(out)


def _finite(x, field: str, f: Findings, file: str, rec) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        f.error("bad_type", f"'{field}' must be a number, got {type(x).__name__}", file, rec)
        return None
    if not math.isfinite(x):
        f.error("not_finite", f"'{field}' is {x}", file, rec)
        return None
    return float(x)


def normalise_result(r: dict, file: str, idx: int, f: Findings) -> FeatureResult | None:
    """One checkpoint result (flat or nested schema) -> FeatureResult, or None with an error."""
    if not isinstance(r, dict):
        f.error("bad_record", f"result is a {type(r).__name__}, not an object", file, idx)
        return None
    name = r.get("feature")
    parsed = parse_feature(name) if isinstance(name, str) else None
    layer, fid = r.get("layer"), r.get("feature_id")
    if parsed is None and (layer is None or fid is None):
        f.error("missing_field", "result has neither a valid 'feature' (L{n}-{id}) nor layer/feature_id", file, idx)
        return None
    if layer is None or fid is None:
        layer, fid = parsed
    if not isinstance(layer, int) or not isinstance(fid, int) or isinstance(layer, bool) or isinstance(fid, bool):
        f.error("bad_type", "'layer' and 'feature_id' must be integers", file, idx)
        return None
    if parsed is not None and parsed != (layer, fid):
        f.error("inconsistent", f"feature {name!r} disagrees with layer={layer}, feature_id={fid}", file, idx)
        return None
    cohen_d = _finite(r.get("cohen_d"), "cohen_d", f, file, idx)
    if "causality" in r:
        c = r["causality"]
        if not isinstance(c, dict) or "interpretation" not in c:
            f.error("missing_field", "nested result lacks causality.interpretation", file, idx)
            return None
        is_causal = c["interpretation"] not in NOT_CAUSAL
        effect = max((abs(v) for v in (_finite(c.get("safe_effect_size"), "safe_effect_size", f, file, idx),
                                       _finite(c.get("risky_effect_size"), "risky_effect_size", f, file, idx))
                      if v is not None), default=None)
        # the nested schema records in which context the patch acted, not the feature's side:
        # that comes from the sign of cohen_d (positive = higher in safe decisions)
        direction = ("safe" if (cohen_d or 0) >= 0 else "risky") if is_causal else "neutral"
        schema = "nested"
        values = {"cohen_d": r.get("cohen_d"), **c}
    elif "is_causal" in r:
        if not isinstance(r["is_causal"], bool):
            f.error("bad_type", "'is_causal' must be true or false", file, idx)
            return None
        is_causal = r["is_causal"]
        cls = r.get("classified_as")
        deltas = [_finite(r.get(k), k, f, file, idx) for k in
                  ("safe_stop_delta", "risky_stop_delta", "safe_bet_delta", "risky_bet_delta")]
        effect = max((abs(d) for d in deltas[:2] if d is not None), default=None)
        if cls in ("safe", "risky"):
            direction = cls
        else:
            direction = ("safe" if (cohen_d or 0) >= 0 else "risky") if is_causal else "neutral"
        schema = "flat"
        values = {k: r.get(k) for k in sorted(r) if k not in ("feature", "layer", "feature_id")}
    else:
        f.error("unknown_schema", "result has neither 'is_causal' (flat) nor 'causality' (nested)", file, idx)
        return None
    return FeatureResult(feature=f"L{layer}-{fid}", layer=layer, feature_id=fid, cohen_d=cohen_d,
                         effect_size=effect, is_causal=is_causal, direction=direction, schema_=schema,
                         source_file=file, values=values)


def _file_time(path: Path, body: dict) -> str:
    """Newest-wins order key: the checkpoint's timestamp, else the one in its name, else mtime."""
    ts = body.get("timestamp") if isinstance(body, dict) else None
    if isinstance(ts, str) and TS_RE.fullmatch(ts):
        return ts
    m = TS_RE.search(path.name)
    return m.group(1) if m else f"mtime:{path.stat().st_mtime:020.6f}"


def _reject_constant(name: str):
    # NaN/Infinity are not JSON: reject them rather than let them into the math
    raise ValueError(f"{name} is not valid JSON")


def read_json(path: Path, f: Findings):
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        f.error("not_a_file", "a directory where a file was expected", str(path))
    except FileNotFoundError:
        f.error("missing_file", "file not found", str(path))
    except PermissionError:
        f.error("unreadable", "permission denied", str(path))
    except UnicodeDecodeError as e:
        f.error("not_utf8", f"not UTF-8 text ({e.reason} at byte {e.start})", str(path))
    else:
        if not text.strip():
            f.error("empty_file", "file is empty", str(path))
            return None
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError) as e:
            f.error("bad_json", f"not valid JSON: {e}", str(path))
    return None


def read_checkpoints(paths: list[Path], f: Findings) -> tuple[dict[str, FeatureResult], dict]:
    """All checkpoint files -> one record per feature (newest file wins) and file counts."""
    loaded = []
    counts = {"files_found": len(paths), "files_read": 0, "files_failed": 0, "records": 0}
    for path in paths:
        body = read_json(path, f)
        if body is None:
            counts["files_failed"] += 1
            continue
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            f.error("bad_checkpoint", "checkpoint must be an object with a 'results' list", str(path))
            counts["files_failed"] += 1
            continue
        counts["files_read"] += 1
        loaded.append((_file_time(path, body), str(path), body["results"]))
    features: dict[str, FeatureResult] = {}
    for _ts, file, results in sorted(loaded):
        for i, r in enumerate(results):
            counts["records"] += 1
            rec = normalise_result(r, file, i, f)
            if rec is None:
                continue
            old = features.get(rec.feature)
            if old is not None and old.values != rec.values:
                f.warn("duplicate_disagrees", f"{rec.feature} differs between {old.source_file} and {file}; "
                       f"keeping the newer file {file}", file, i)
            features[rec.feature] = rec
    return features, counts


def read_summary_csv(path: Path, f: Findings) -> dict[str, FeatureResult]:
    """The feature-group summary CSV: no cohen_d; effect size = largest |stop delta|."""
    out: dict[str, FeatureResult] = {}
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as e:
        f.error("unreadable", str(e), str(path))
        return out
    with fh:
        for i, row in enumerate(csv.DictReader(fh)):
            parsed = parse_feature(row.get("feature", ""))
            if parsed is None:
                f.error("bad_record", f"feature {row.get('feature')!r} is not L{{n}}-{{id}}", str(path), i)
                continue
            deltas = []
            for k in ("safe_stop_delta", "risky_stop_delta"):
                try:
                    v = float(row[k]) if row.get(k) not in (None, "") else None
                except ValueError:
                    f.error("bad_type", f"'{k}' is not a number: {row[k]!r}", str(path), i)
                    v = None
                if v is not None and math.isfinite(v):
                    deltas.append(abs(v))
            cls = row.get("classified_as", "")
            if cls not in ("safe", "risky", "neutral"):
                f.error("bad_value", f"classified_as={cls!r} is not safe|risky|neutral", str(path), i)
                continue
            out[row["feature"]] = FeatureResult(
                feature=row["feature"], layer=parsed[0], feature_id=parsed[1], effect_size=max(deltas, default=None),
                is_causal=cls != "neutral", direction=cls, schema_="summary_csv", source_file=str(path), values=row)
    return out


def read_response_logs(paths: list[Path], conditions: list[str], f: Findings) -> dict:
    """Trial counts per feature and condition from response logs (JSON lists or JSONL)."""
    trials: dict[str, Counter] = defaultdict(Counter)
    counts = {"files_found": len(paths), "files_read": 0, "files_failed": 0, "entries": 0, "empty_responses": 0}
    known = set(conditions)
    unknown: Counter = Counter()
    for path in paths:
        if path.suffix == ".jsonl":
            entries = []
            try:
                with open(path, encoding="utf-8") as fh:
                    for j, line in enumerate(fh):
                        if line.strip():
                            try:
                                entries.append(json.loads(line))
                            except json.JSONDecodeError as e:
                                f.error("bad_json", f"line {j + 1}: {e}", str(path), j)
            except (OSError, UnicodeDecodeError) as e:
                f.error("unreadable", str(e), str(path))
                counts["files_failed"] += 1
                continue
        else:
            entries = read_json(path, f)
            if entries is None:
                counts["files_failed"] += 1
                continue
            if not isinstance(entries, list):
                f.error("bad_log", "response log must be a JSON list", str(path))
                counts["files_failed"] += 1
                continue
        counts["files_read"] += 1
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "condition" not in e:
                f.error("bad_record", "log entry lacks 'condition'", str(path), i)
                continue
            name = e.get("feature") or (f"L{e['layer']}-{e['feature_id']}" if "layer" in e else None)
            if not isinstance(name, str):
                f.error("missing_field", "log entry lacks 'feature'", str(path), i)
                continue
            counts["entries"] += 1
            if e["condition"] not in known:
                unknown[e["condition"]] += 1
            if not str(e.get("response") or "").strip():
                counts["empty_responses"] += 1
            trials[name][e["condition"]] += 1
    for cond, n in sorted(unknown.items()):
        f.warn("unknown_condition", f"condition {cond!r} ({n} entries) is not in study.conditions", None, cond)
    return {"trials": {k: dict(v) for k, v in trials.items()}, "counts": counts}


def _metadata_ranges(cfg: Config, f: Findings) -> tuple[int | None, int | None]:
    """(n_layers, d_sae) from the model's config.json and layer 0's hyperparams.json; never weights."""
    n_layers = d_sae = None
    cj = Path(cfg.model.name_or_path) / "config.json"
    try:
        n_layers = int(json.loads(cj.read_text())["num_hidden_layers"])
    except Exception:
        f.warn("range_check_skipped", f"cannot read the model's config.json ({cj}): layer range not checked")
    from .sae import layer_location

    hp = Path(layer_location(cfg.sae.root, cfg.sae.pattern, 0)) / "hyperparams.json"
    try:
        d_sae = int(json.loads(hp.read_text())["d_sae"])
    except Exception:
        f.warn("range_check_skipped", f"cannot read SAE hyperparams ({hp}): feature id range not checked")
    return n_layers, d_sae


def audit(cfg: Config) -> tuple[dict, dict[str, FeatureResult]]:
    """Step 0: read everything, check it, count it. Returns (report, features by name)."""
    f = Findings()
    ck_paths = expand(cfg.study.checkpoints)
    features, ck_counts = read_checkpoints(ck_paths, f)
    if cfg.study.summary_csv:
        for name, rec in read_summary_csv(Path(cfg.study.summary_csv), f).items():
            features.setdefault(name, rec)  # checkpoints carry more (cohen_d): they win
    logs = read_response_logs(expand(cfg.study.response_logs), cfg.study.conditions, f)
    n_layers, d_sae = _metadata_ranges(cfg, f)
    for name, rec in list(features.items()):
        if n_layers is not None and not 0 <= rec.layer < n_layers:
            f.error("layer_out_of_range", f"{name}: layer {rec.layer} not in 0..{n_layers - 1}", rec.source_file, name)
            del features[name]
        elif d_sae is not None and not 0 <= rec.feature_id < d_sae:
            f.error("feature_out_of_range", f"{name}: feature id {rec.feature_id} ≥ d_sae={d_sae}",
                    rec.source_file, name)
            del features[name]
    if not features:
        f.error("no_features", "no feature results found in study.checkpoints / study.summary_csv")
    causal = [r for r in features.values() if r.is_causal]
    logged = set(logs["trials"])
    report = {
        "validated": not f.errors,
        "errors": [e.model_dump() for e in f.errors],
        "warnings": [w.model_dump() for w in f.warnings],
        "counts": {
            "checkpoint_files": ck_counts,
            "response_log_files": logs["counts"],
            "features_total": len(features),
            "causal_total": len(causal),
            "causal_by_layer": dict(sorted(Counter(str(r.layer) for r in causal).items(), key=lambda kv: int(kv[0]))),
            "causal_by_direction": dict(Counter(r.direction for r in causal)),
            "join": {
                "joined": len({r.feature for r in causal} & logged),
                "causal_without_logs": len({r.feature for r in causal} - logged),
                "logs_without_result": len(logged - set(features)),
            },
        },
        "trials": logs["trials"],
        "ranges": {"n_layers": n_layers, "d_sae": d_sae},
    }
    return report, features


def select(features: dict[str, FeatureResult], cfg: Config, include: list[str] = ()) -> list[dict]:
    """Step 1: causal features, top-N per layer by |rank key| (cohen_d, else effect size).

    Features named in ``include`` are kept whatever their rank (and even when not causal);
    ``rank`` is always the feature's rank among its layer's candidates.
    """
    sel = cfg.selection
    by_layer: dict[int, list[tuple[float, str, FeatureResult]]] = defaultdict(list)
    for r in features.values():
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


def file_sha256(paths: list[str]) -> dict[str, str]:
    import hashlib

    out = {}
    for p in paths:
        if os.path.isfile(p):
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[p] = h.hexdigest()
    return out
