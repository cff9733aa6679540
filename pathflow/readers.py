"""Readers for every study format of DESIGN §4, normalised into one record per feature or trial.

Nothing here raises on bad data: every problem becomes a ``Finding`` (code, message, file,
record) and reading goes on with the next record or file. Response logs are streamed
(``ijson``), so a folder of gigabytes needs the memory of one record, not of one file.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import ijson
from pydantic import BaseModel, ConfigDict

FEATURE_RE = re.compile(r"^L(\d+)-(\d+)$")
TS_RE = re.compile(r"(\d{8}_\d{6})")
NOT_CAUSAL = {"no_causal_effect", "no_effect"}
Progress = Callable[[Path, int], None]  # (file done, its size in bytes)
# Bounds on what one study file or record may hold: past them it is an error finding, never a
# crash or an unbounded allocation. Real checkpoints are a few MB, records a few levels deep.
def max_json_bytes() -> int:
    """The largest file read whole (checkpoints, prompts): PATHFLOW_MAX_JSON_MB, 512 by default."""
    from .envvars import MAX_JSON_MB

    return int(MAX_JSON_MB.read()) << 20
MAX_LINE_BYTES = 16 << 20  # one JSONL line
MAX_DEPTH = 32  # nesting of one record


def non_finite(x: Any, path: str = "") -> str | None:
    """The path of the first NaN/±inf number in a parsed JSON value (``1e999`` parses to inf), else None."""
    stack = [(x, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return p or "(value)"
        if isinstance(v, dict):
            stack.extend((c, f"{p}.{k}" if p else str(k)) for k, c in v.items())
        elif isinstance(v, list):
            stack.extend((c, f"{p}[{i}]") for i, c in enumerate(v))
    return None


def check_record(r: Any, file, idx, f: Findings) -> bool:
    """A record is bounded in depth and holds only finite numbers; else an error naming it.

    One pass over the record for both (it runs on every logged trial); the path of a bad number is
    looked up only when there is one."""
    stack, finite = [(r, 1)], True
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict) or isinstance(v, list):
            if d > MAX_DEPTH:
                f.error("too_deep", f"record is nested more than {MAX_DEPTH} levels", file, idx)
                return False
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
        elif isinstance(v, float) and not math.isfinite(v):
            finite = False
    if not finite:
        f.error("not_finite", f"'{non_finite(r)}' is not a finite number", file, idx)
        return False
    return True


class Finding(BaseModel):
    code: str
    message: str
    file: str | None = None
    record: int | str | None = None


class Findings:
    """Errors and warnings of one audit, in the order found."""

    def __init__(self) -> None:
        self.errors: list[Finding] = []
        self.warnings: list[Finding] = []

    def error(self, code: str, message: str, file=None, record=None) -> None:
        self.errors.append(Finding(code=code, message=message, file=None if file is None else str(file), record=record))

    def warn(self, code: str, message: str, file=None, record=None) -> None:
        self.warnings.append(Finding(code=code, message=message, file=None if file is None else str(file),
                                     record=record))


class FeatureResult(BaseModel):
    """One patched feature, from either checkpoint schema or the summary CSV."""

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


class Trial(BaseModel):
    """One logged response of the patching study (a response-log entry)."""

    model_config = ConfigDict(frozen=True)
    feature: str
    condition: str
    trial: int | None = None
    response: str | None = None
    action: str | None = None
    bet: float | None = None
    valid: bool | None = None
    source_file: str
    record: int


class RevalidationTrial(BaseModel):
    """One line of the revalidation JSONL: a response under a patch of a given scale."""

    model_config = ConfigDict(frozen=True)
    layer: int
    feature_id: int
    prompt_type: str
    scale: float
    trial_index: int
    response: str
    decision: str | None = None
    bet: float | None = None
    valid: bool | None = None

    @property
    def feature(self) -> str:
        return f"L{self.layer}-{self.feature_id}"


def parse_feature(name: Any) -> tuple[int, int] | None:
    m = FEATURE_RE.match(name) if isinstance(name, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def expand(specs: list[str], f: Findings | None = None, suffixes=(".json", ".jsonl")) -> list[Path]:
    """Files named by files, folders (their ``suffixes`` files) and globs, sorted and unique.

    A folder or glob that yields nothing is a warning; a plain path that does not exist is left
    in the list, for the reader to report with its name.
    """
    out: set[Path] = set()
    for spec in specs:
        p = Path(spec)
        found: set[Path]
        if p.is_dir():
            try:
                found = {q for q in p.iterdir() if q.suffix in suffixes}
            except OSError as e:
                if f is not None:
                    f.error("unreadable", f"cannot list the folder: {e.strerror or e}", spec)
                found = set()
                out |= found
                continue
        elif any(ch in spec for ch in "*?["):
            found = bounded_glob(spec, f)
        else:
            found = {p}
        if not found and f is not None:
            f.warn("no_files", f"{spec} names no {'/'.join(suffixes)} files", spec)
        out |= found
    return sorted(out)


MAX_GLOB_ENTRIES = 200_000  # directory entries one glob may visit


def bounded_glob(spec: str, f: Findings | None = None) -> set[Path]:
    """The paths a glob names, without following symlinked folders (a link back up the tree would
    make ``**`` endless) and visiting at most MAX_GLOB_ENTRIES entries (past that an error finding)."""
    parts = Path(spec).parts
    i = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    root = Path(*parts[:i]) if i else Path(".")
    pattern = str(Path(*parts[i:]))
    out: set[Path] = set()
    visited = 0
    try:
        for q in root.glob(pattern):  # pathlib's ** does not descend into symlinked folders
            visited += 1
            if visited > MAX_GLOB_ENTRIES:
                if f is not None:
                    f.error("too_many_files", f"the glob matches more than {MAX_GLOB_ENTRIES} paths: narrow it", spec)
                return set()
            out.add(q)
    except OSError as e:
        if f is not None:
            f.error("unreadable", f"cannot list: {e.strerror or e}", spec)
    return out


class NotRegularFile(OSError):
    """A FIFO, socket or device where a study file was expected (reading it could block forever)."""


def _open(path: Path):
    """The one place study files are opened (a seam for tests of unreadable files). Only regular
    files: a FIFO named ``*.json`` would block the audit forever."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, "is a directory", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path} is not a regular file")
    return open(path, "rb")


def reject_constant(name: str):
    # NaN/Infinity are not JSON: reject them rather than let them into the math
    raise ValueError(f"{name} is not valid JSON")


def _io_error(path: Path, e: OSError, f: Findings) -> None:
    if isinstance(e, IsADirectoryError):
        f.error("not_a_file", "a directory where a file was expected", path)
    elif isinstance(e, NotRegularFile):
        f.error("not_a_file", "not a regular file (a FIFO, socket or device): not read", path)
    elif isinstance(e, FileNotFoundError):
        f.error("missing_file", "file not found", path)
    elif isinstance(e, PermissionError):
        f.error("unreadable", "permission denied", path)
    else:
        f.error("unreadable", f"cannot read: {e}", path)


def read_json(path: Path, f: Findings) -> Any:
    """A whole JSON file (checkpoints, prompts), or None with an error naming the file."""
    limit = max_json_bytes()
    try:
        with _open(path) as fh:
            raw = fh.read(limit + 1)
    except OSError as e:
        _io_error(path, e, f)
        return None
    if len(raw) > limit:
        f.error("too_large", f"file is larger than {limit >> 20} MB (PATHFLOW_MAX_JSON_MB): not read", path)
        return None
    if not raw.strip():
        f.error("empty_file", "file is empty", path)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        f.error("not_utf8", f"not UTF-8 text ({e.reason} at byte {e.start})", path)
        return None
    try:
        return json.loads(text, parse_constant=reject_constant)
    except RecursionError:
        f.error("too_deep", "JSON nested too deeply to read", path)
        return None
    except (json.JSONDecodeError, ValueError) as e:
        f.error("bad_json", f"not valid JSON: {e}", path)
        return None


def _number(x, field: str, f: Findings, file, rec) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        f.error("bad_type", f"'{field}' must be a number, got {type(x).__name__}", file, rec)
        return None
    if not math.isfinite(x):
        f.error("not_finite", f"'{field}' is {x}", file, rec)
        return None
    return float(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# -- checkpoints ---------------------------------------------------------------------------


def normalise_result(r: Any, file: str, idx: int, f: Findings) -> FeatureResult | None:
    """One checkpoint result (flat or nested schema) -> FeatureResult, or None with an error."""
    if not isinstance(r, dict):
        f.error("bad_record", f"result is a {type(r).__name__}, not an object", file, idx)
        return None
    if not check_record(r, file, idx, f):
        return None
    name, parsed = r.get("feature"), parse_feature(r.get("feature"))
    layer, fid = r.get("layer"), r.get("feature_id")
    if parsed is None and (layer is None or fid is None):
        f.error("missing_field", "result has neither a valid 'feature' (L{n}-{id}) nor layer/feature_id", file, idx)
        return None
    if layer is None or fid is None:
        layer, fid = parsed
    if not _int(layer) or not _int(fid):
        f.error("bad_type", "'layer' and 'feature_id' must be integers", file, idx)
        return None
    if layer < 0 or fid < 0:
        f.error("out_of_range", f"negative layer or feature id ({layer}, {fid})", file, idx)
        return None
    if parsed is not None and parsed != (layer, fid):
        f.error("inconsistent", f"feature {str(name)[:80]!r} disagrees with layer={layer}, feature_id={fid}", file,
                idx)
        return None
    n_err = len(f.errors)
    cohen_d = _number(r.get("cohen_d"), "cohen_d", f, file, idx)
    if "causality" in r:
        c = r["causality"]
        if not isinstance(c, dict) or not isinstance(c.get("interpretation"), str):
            f.error("missing_field", "nested result lacks causality.interpretation", file, idx)
            return None
        is_causal = c["interpretation"] not in NOT_CAUSAL
        sizes = [_number(c.get(k), k, f, file, idx) for k in ("safe_effect_size", "risky_effect_size")]
        effect = max((abs(v) for v in sizes if v is not None), default=None)
        # the nested schema says in which context the patch acted, not the feature's side:
        # that comes from the sign of cohen_d (positive = higher before safe decisions)
        direction = ("safe" if (cohen_d or 0) >= 0 else "risky") if is_causal else "neutral"
        schema, values = "nested", {"cohen_d": r.get("cohen_d"), **c}
    elif "is_causal" in r:
        if not isinstance(r["is_causal"], bool):
            f.error("bad_type", "'is_causal' must be true or false", file, idx)
            return None
        is_causal, cls = r["is_causal"], r.get("classified_as")
        if cls is not None and cls not in ("safe", "risky", "neutral"):
            f.error("bad_value", f"classified_as={cls!r} is not safe|risky|neutral", file, idx)
            return None
        deltas = [_number(r.get(k), k, f, file, idx) for k in
                  ("safe_stop_delta", "risky_stop_delta", "safe_bet_delta", "risky_bet_delta")]
        effect = max((abs(d) for d in deltas[:2] if d is not None), default=None)
        if cls in ("safe", "risky"):
            direction = cls
        else:
            direction = ("safe" if (cohen_d or 0) >= 0 else "risky") if is_causal else "neutral"
        schema = "flat"
        values = {k: r[k] for k in sorted(r) if k not in ("feature", "layer", "feature_id")}
    else:
        f.error("unknown_schema", "result has neither 'is_causal' (flat) nor 'causality' (nested)", file, idx)
        return None
    if len(f.errors) > n_err:
        return None  # a bad number: the record is not used
    return FeatureResult(feature=f"L{layer}-{fid}", layer=layer, feature_id=fid, cohen_d=cohen_d,
                         effect_size=effect, is_causal=is_causal, direction=direction, schema_=schema,
                         source_file=file, values=values)


def _parse_time(text: str) -> dt.datetime | None:
    """``YYYYMMDD_HHMMSS`` (the study's) or ISO 8601; naive times are taken as UTC."""
    try:
        t = dt.datetime.strptime(text, "%Y%m%d_%H%M%S") if TS_RE.fullmatch(text) else dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def file_time(path: Path, body: dict) -> tuple[dt.datetime, str]:
    """When a checkpoint was written, as one comparable UTC time, and where that came from: its
    ``timestamp`` field, else the timestamp in its name, else the file's modification time."""
    ts = body.get("timestamp")
    if isinstance(ts, str) and (t := _parse_time(ts)) is not None:
        return t, "its timestamp field"
    m = TS_RE.search(path.name)
    if m and (t := _parse_time(m.group(1))) is not None:
        return t, "the timestamp in its name"
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc), "its modification time"


def read_checkpoints(paths: list[Path], f: Findings, progress: Progress | None = None
                     ) -> tuple[dict[str, FeatureResult], dict]:
    """Cumulative checkpoints (either schema, either file name) -> one record per feature.

    Files are taken oldest first, so the newest file wins; a feature whose values differ
    between two files is a warning naming both.
    """
    counts = {"files_found": len(paths), "files_read": 0, "files_failed": 0, "records": 0}
    dated = []
    for path in paths:
        body = read_json(path, f)
        if progress:
            progress(path, path.stat().st_size if path.is_file() else 0)
        if body is None:
            counts["files_failed"] += 1
            continue
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            f.error("bad_checkpoint", "a checkpoint must be an object with a 'results' list", path)
            counts["files_failed"] += 1
            continue
        counts["files_read"] += 1
        recs = [normalise_result(r, str(path), i, f) for i, r in enumerate(body["results"])]
        counts["records"] += len(recs)
        when, why = file_time(path, body)
        dated.append((when, str(path), why, [(i, r) for i, r in enumerate(recs) if r is not None]))
    features: dict[str, FeatureResult] = {}
    seen: dict[str, tuple[dt.datetime, str]] = {}  # file -> (time, why)
    for when, file, why, recs in sorted(dated, key=lambda d: (d[0], d[1])):
        seen[file] = (when, why)
        for i, rec in recs:
            old = features.get(rec.feature)
            if old is not None and old.values != rec.values:
                t_old, why_old = seen[old.source_file]
                reason = (f"written {when.isoformat()} by {why} vs {t_old.isoformat()} by {why_old}" if when != t_old
                          else f"both dated {when.isoformat()}; the later name wins")
                f.warn("duplicate_disagrees", f"{rec.feature} differs between {old.source_file} and {file}; {file} "
                       f"wins as the newer ({reason})", file, i)
            features[rec.feature] = rec
    return features, counts


# -- the summary CSV -----------------------------------------------------------------------


def read_summary_csv(path: Path, f: Findings) -> dict[str, FeatureResult]:
    """The feature-group summary: no cohen_d; effect size = the largest |stop delta|."""
    out: dict[str, FeatureResult] = {}
    try:
        with _open(path) as raw:
            text = raw.read().decode("utf-8")
    except OSError as e:
        _io_error(path, e, f)
        return out
    except UnicodeDecodeError as e:
        f.error("not_utf8", f"not UTF-8 text ({e.reason} at byte {e.start})", path)
        return out
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "feature" not in reader.fieldnames or "classified_as" not in reader.fieldnames:
        f.error("bad_header", "the CSV needs 'feature' and 'classified_as' columns", path)
        return out
    for i, row in enumerate(reader):
        parsed = parse_feature(row.get("feature"))
        if parsed is None:
            f.error("bad_record", f"feature {row.get('feature')!r} is not L{{n}}-{{id}}", path, i)
            continue
        deltas, bad = [], False
        for k in [c for c in reader.fieldnames if c.endswith("_delta")]:
            v = row.get(k)
            if v in (None, ""):
                continue  # the real file has empty cells
            try:
                x = float(v)
            except ValueError:
                f.error("bad_type", f"'{k}' is not a number: {v!r}", path, i)
                bad = True
                continue
            if not math.isfinite(x):
                f.error("not_finite", f"'{k}' is {v}", path, i)
                bad = True
            elif k.endswith("stop_delta"):
                deltas.append(abs(x))
        cls = row.get("classified_as")
        if cls not in ("safe", "risky", "neutral"):
            f.error("bad_value", f"classified_as={cls!r} is not safe|risky|neutral", path, i)
            continue
        if bad:
            continue
        out[row["feature"]] = FeatureResult(
            feature=row["feature"], layer=parsed[0], feature_id=parsed[1], effect_size=max(deltas, default=None),
            is_causal=cls != "neutral", direction=cls, schema_="summary_csv", source_file=str(path), values=row)
    return out


# -- response logs (streamed) --------------------------------------------------------------


def iter_entries(path: Path, f: Findings) -> Iterator[tuple[int, Any]]:
    """(record index, entry) of a JSON-list or JSONL file, streamed; problems become findings."""
    try:
        fh = _open(path)
    except OSError as e:
        _io_error(path, e, f)
        return
    with fh:
        head = fh.read(1 << 16)
        if not head.strip():
            f.error("empty_file", "file is empty", path)
            return
        fh.seek(0)
        if path.suffix == ".jsonl" or not head.lstrip().startswith(b"["):
            if path.suffix != ".jsonl" and head.lstrip().startswith(b"{"):
                f.error("bad_log", "a response log must be a JSON list (or JSONL)", path)
                return
            i = -1
            while line := fh.readline(MAX_LINE_BYTES + 1):
                i += 1
                if len(line) > MAX_LINE_BYTES:
                    f.error("too_large", f"line {i + 1} is longer than {MAX_LINE_BYTES >> 20} MB: the rest of the "
                            "file is not read", path, i)
                    return
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line.decode("utf-8"), parse_constant=reject_constant)
                except UnicodeDecodeError as e:
                    f.error("not_utf8", f"line {i + 1} is not UTF-8 ({e.reason})", path, i)
                except RecursionError:
                    f.error("too_deep", f"line {i + 1} is nested too deeply to read", path, i)
                except ValueError as e:
                    f.error("bad_json", f"line {i + 1}: {e}", path, i)
            return
        i = -1
        try:
            for i, entry in enumerate(list_items(fh)):
                if entry is TOO_DEEP:
                    f.error("too_deep", f"record is nested more than {MAX_DEPTH} levels", path, i)
                    continue
                yield i, entry
        except UnicodeDecodeError as e:
            f.error("not_utf8", f"not UTF-8 after record {i} ({e.reason})", path, i + 1)
        except (ijson.JSONError, ValueError) as e:
            f.error("bad_json", f"not valid JSON after record {i}: {e}", path, i + 1)


TOO_DEEP = object()  # what ``list_items`` yields for an item nested beyond MAX_DEPTH


def list_items(fh, max_depth: int = MAX_DEPTH) -> Iterator[Any]:
    """The items of a top-level JSON list, streamed, each built from ijson's prefix-free events.

    ``ijson.items`` keeps the dotted path of every open level, so an item nested 100,000 deep
    costs gigabytes; here an item deeper than ``max_depth`` is skipped (counted, never built) and
    yielded as ``TOO_DEEP``, with memory bounded by ``max_depth``.
    """
    parsed = ijson.basic_parse(fh, use_float=True)

    def events_():
        yield from parsed
        raise ValueError("the JSON ends inside a record")  # a truncated file, not StopIteration

    events = events_()
    first = next(events, None)
    if first is None or first[0] != "start_array":
        raise ValueError("the top level is not a JSON list")
    for ev, val in events:
        if ev == "end_array":
            return
        if ev not in ("start_map", "start_array"):
            yield val
            continue
        stack: list = [{} if ev == "start_map" else []]
        keys: list = [None]
        while stack:
            ev, val = next(events)
            if ev in ("start_map", "start_array"):
                if len(stack) >= max_depth:
                    depth = len(stack) + 1  # the open levels: skip to the item's end without building it
                    while depth:
                        ev, _ = next(events)
                        depth += ev in ("start_map", "start_array")
                        depth -= ev in ("end_map", "end_array")
                    yield TOO_DEEP
                    break
                stack.append({} if ev == "start_map" else [])
                keys.append(None)
                continue
            if ev == "map_key":
                keys[-1] = val
                continue
            if ev in ("end_map", "end_array"):
                val = stack.pop()
                keys.pop()
                if not stack:
                    yield val
                    break
            parent = stack[-1]
            if isinstance(parent, list):
                parent.append(val)
            else:
                parent[keys[-1]] = val


def normalise_trial(e: Any, file: str, idx: int, f: Findings) -> Trial | None:
    if not isinstance(e, dict):
        f.error("bad_record", f"log entry is a {type(e).__name__}, not an object", file, idx)
        return None
    if not check_record(e, file, idx, f):
        return None
    name = e.get("feature")
    if parse_feature(name) is None:
        f.error("missing_field", f"log entry has no valid 'feature' (got {str(name)[:80]!r})", file, idx)
        return None
    cond = e.get("condition")
    if not isinstance(cond, str) or not cond:
        f.error("missing_field", "log entry lacks 'condition'", file, idx)
        return None
    parsed = e.get("parsed") if isinstance(e.get("parsed"), dict) else {}
    bet = parsed.get("bet")
    bet = float(bet) if isinstance(bet, (int, float)) and not isinstance(bet, bool) and math.isfinite(bet) else None
    resp = e.get("response")
    trial = e.get("trial")
    return Trial(feature=name, condition=cond, trial=trial if _int(trial) else None,
                 response=resp if isinstance(resp, str) else None,
                 action=parsed.get("action") if isinstance(parsed.get("action"), str) else None, bet=bet,
                 valid=parsed.get("valid") if isinstance(parsed.get("valid"), bool) else None,
                 source_file=file, record=idx)


def read_revalidation(paths: list[Path], f: Findings, progress: Progress | None = None) -> Iterator[RevalidationTrial]:
    """Revalidation JSONL lines as records; a bad line is an error naming file and line."""
    from pydantic import ValidationError

    for path in paths:
        for i, e in iter_entries(path, f):
            if not check_record(e, path, i, f):
                continue
            try:
                yield RevalidationTrial.model_validate(e)
            except ValidationError as err:
                first = err.errors()[0]
                f.error("bad_record", f"line {i + 1}: {'.'.join(map(str, first['loc']))}: {first['msg']}", path, i)
        if progress:
            progress(path, path.stat().st_size if path.is_file() else 0)
