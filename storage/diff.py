"""Compare two runs by their results, not their bookkeeping.

Two runs of the same study and config give the same results but different run ids, graph slugs,
timings, hosts and pids. ``result_differences`` ignores exactly those: JSON outputs are compared
with bookkeeping keys dropped and run ids masked (floats to a relative 1e-5), text outputs with
run ids masked, everything else (Zarr chunks) byte for byte.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .store import Run

BOOKKEEPING_KEYS = {"run_id", "slug", "seconds", "wall_seconds", "finished", "host", "pid", "at", "created",
                    "updated", "peak_memory_bytes", "memory_kind", "attempt", "sub_batch_size", "resumed"}
BOOKKEEPING_FILES = (".done.json", ".memory.json", "pathways/batches.json")
TEXT = (".md", ".html", ".csv", ".txt")


def _is_bookkeeping(rel: str) -> bool:
    return rel.endswith(BOOKKEEPING_FILES) or rel.startswith("prototype/")


def _normal(x: Any, ids: tuple[str, str]) -> Any:
    if isinstance(x, dict):
        return {k: _normal(v, ids) for k, v in x.items() if k not in BOOKKEEPING_KEYS}
    if isinstance(x, list):
        return [_normal(v, ids) for v in x]
    if isinstance(x, str):
        for rid in ids:
            x = x.replace(rid, "<run>").replace(rid.lower(), "<run>")
        return x
    return x


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two normalised JSON values first differ (a dotted path), or None."""
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        return None if math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) else (path or "(value)")
    if type(a) is not type(b):
        return path or "(value)"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k}" if path else str(k)
            d = first_difference(a[k], b[k], f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else (path or "(value)")


def result_differences(a: Run, b: Run) -> dict:
    """{"compared": n, "differ": [{"file", "where"}], "only_in_a": [...], "only_in_b": [...]}"""
    ids = (a.run_id, b.run_id)
    fa = {f for f in a.files() if not _is_bookkeeping(f)}
    fb = {f for f in b.files() if not _is_bookkeeping(f)}
    differ = []
    for rel in sorted(fa & fb):
        if rel.endswith(".json"):
            try:
                x, y = (_normal(json.loads(r.read_bytes(rel)), ids) for r in (a, b))
            except ValueError:
                where = None if a.read_bytes(rel) == b.read_bytes(rel) else "(not JSON; bytes differ)"
            else:
                where = first_difference(x, y)
        elif rel.endswith(TEXT):
            x, y = (_normal(r.read_bytes(rel).decode("utf-8", "replace"), ids) for r in (a, b))
            where = None if x == y else "(text)"
        else:
            where = None if a.sha256(rel) == b.sha256(rel) else "(bytes)"
        if where is not None:
            differ.append({"file": rel, "where": where})
    return {"compared": len(fa & fb), "differ": differ, "only_in_a": sorted(fa - fb), "only_in_b": sorted(fb - fa)}
