"""Compare two runs by their results, not their bookkeeping.

Two runs of the same study and config give the same results but different run ids, graph slugs,
timings, hosts and pids. ``result_differences`` ignores exactly those: JSON outputs are compared
with bookkeeping keys dropped and run ids masked (floats to float32's precision, ``REL_TOL``), text
outputs with run ids masked, Zarr groups as arrays at the precision they were stored with, everything
else byte for byte.
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
# JSON floats come from float32 model work: batches of another size (after an out-of-memory halving)
# reorder its sums, so equal results agree to float32's precision, not to the last digit
REL_TOL, ABS_TOL = 1e-4, 1e-6


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
        return None if math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL) else (path or "(value)")
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


def _zarr_root(rel: str) -> str | None:
    top = rel.split("/", 1)[0]
    return top if top.endswith(".zarr") and "/" in rel else None


def _arrays(group, prefix: str = ""):
    """(path, array, keepbits) of every array under a Zarr group, with the nearest group's keepbits."""
    import zarr

    bits = group.attrs.get("keepbits")
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Group):
            yield from _arrays(member, f"{path}/")
        else:
            yield path, member, bits


def zarr_difference(a: Run, b: Run, root: str) -> str | None:
    """Where two runs' Zarr groups ``root`` first differ as values, at the precision they were stored
    with: two values a rounding step apart (``keepbits``) or a float32 rounding apart are the same."""
    import numpy as np

    from .arrays import open_jacobians

    try:
        ga, gb = (open_jacobians(r.zarr_store(root), mode="r") for r in (a, b))
        xa, xb = ({p: (arr, bits) for p, arr, bits in _arrays(g)} for g in (ga, gb))
    except Exception as e:  # a damaged group: bytes were all there was to compare
        return f"(cannot open as Zarr: {type(e).__name__})"
    for path in sorted(set(xa) | set(xb)):
        if path not in xa or path not in xb:
            return f"{path} (only in {'a' if path in xa else 'b'})"
        (pa, bits), (pb, _) = xa[path], xb[path]
        if pa.shape != pb.shape:
            return f"{path} (shape {pa.shape} vs {pb.shape})"
        va, vb = pa[...], pb[...]
        if va.dtype.kind != "f" or vb.dtype.kind != "f":
            if not np.array_equal(va, vb):
                return path
            continue
        rtol = max(2.0 ** -(bits if bits else 20), 1e-5)
        scale = float(np.nanmax(np.abs(va))) if np.isfinite(va).any() else 0.0
        if not np.allclose(va, vb, rtol=rtol, atol=1e-5 * scale, equal_nan=True):
            return path
    return None


def result_differences(a: Run, b: Run) -> dict:
    """{"compared": n, "differ": [{"file", "where"}], "only_in_a": [...], "only_in_b": [...]}. Zarr
    groups are compared as arrays of values (``zarr_difference``), other files as described above."""
    ids = (a.run_id, b.run_id)
    fa = {f for f in a.files() if not _is_bookkeeping(f)}
    fb = {f for f in b.files() if not _is_bookkeeping(f)}
    differ = []
    for root in sorted({r for r in map(_zarr_root, fa & fb) if r}):
        where = zarr_difference(a, b, root)
        if where is not None:
            differ.append({"file": root, "where": where})
    for rel in sorted(f for f in fa & fb if not _zarr_root(f)):
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
