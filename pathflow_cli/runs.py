"""`pathflow runs …`: the runs in a store: list, show, verify, diff, rm."""

from __future__ import annotations

import json
import sys

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from pathflow.errors import PathflowError

from .common import JsonOpt, StoreOpt, _fail, _manifest, _print_json, _run_or_fail, _store, app, console, styled

runs_app = typer.Typer(help="the runs in a store: list, show, verify, diff, rm", no_args_is_help=True)


app.add_typer(runs_app, name="runs")


def _when(iso) -> str:
    """A manifest's timestamp for a table: minutes, UTC (the manifest keeps it to the microsecond)."""
    from datetime import datetime, timezone

    try:
        return datetime.fromisoformat(str(iso)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(iso or "")


@runs_app.command("list")
def runs_list(store: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Every run in the store, newest last."""
    s = _store(store)
    rows = []
    t = Table(title=f"runs in {s.url}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("run", no_wrap=True, min_width=22)
    for col in ("status", "kind", "created (UTC)", "files", "config"):
        t.add_column(col, overflow="fold", no_wrap=col != "config")
    try:
        ids = s.run_ids()
    except PathflowError as e:
        _fail(str(e), 1)
    for rid in ids:
        try:
            m = s.run(rid).manifest()
        except (PathflowError, OSError) as e:
            rows.append({"run_id": rid, "status": "unreadable", "error": str(e)})
            t.add_row(rid, Text("unreadable", style="red"), "", "", "", str(e)[:60])
            continue
        rows.append({"run_id": rid, "status": m.get("status"), "kind": m.get("kind"), "created": m.get("created"),
                     "outputs": len(m.get("outputs") or {}), "config_hash": m.get("config_hash"),
                     "error": m.get("error")})
        t.add_row(rid, str(m.get("status", "?")), str(m.get("kind", "")),
                  _when(m.get("created")), str(len(m.get("outputs", {}))),
                  str(m.get("config_hash", ""))[:8])
    if as_json:
        _print_json({"store": s.url, "runs": rows})
        return
    console.print(t)


@runs_app.command("show")
def runs_show(run_id: str, store: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """A run's manifest: status, versions, inputs, steps, outputs."""
    m = _manifest(_run_or_fail(store, run_id))
    if as_json:
        _print_json(m)
        return
    model, sae = m.get("model") or {}, m.get("sae") or {}
    console.print(styled((run_id, "bold"), f" {m['status']}  created {m.get('created')}  pathflow "
                         f"{m.get('pathflow_version')}  commit {m.get('git_commit') or '–'}  config "
                         f"{str(m.get('config_hash', ''))[:12]}"))
    console.print(f"model {model.get('name_or_path')} @ {model.get('revision') or 'local'};  "
                  f"SAEs {sae.get('root')} ({len(sae.get('layers') or {})} layers hashed);  "
                  f"{len(m.get('inputs') or {})} input files hashed;  positions {m.get('positions') or '–'}")
    t = Table(title="steps")
    for col in ("step", "status", "seconds"):
        t.add_column(col)
    for name, st in (m.get("steps") or {}).items():
        st = st if isinstance(st, dict) else {}
        t.add_row(str(name), str(st.get("status", "")), str(st.get("seconds", "")))
    console.print(t)
    console.print(f"{len(m.get('outputs') or {})} outputs with sha256" + (f"; error: {m['error']}" if m.get("error")
                                                                           else ""))


@runs_app.command("rm")
def runs_rm(run_ids: list[str] = typer.Argument(..., help="runs to delete (failed or interrupted ones only)"),
            store: str | None = StoreOpt,
            yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")) -> None:
    """Delete failed or interrupted runs. A complete run is never deleted, nor one being written."""
    runs = [_run_or_fail(store, rid) for rid in run_ids]
    for run in runs:
        status = _manifest(run).get("status")
        if status == "complete":
            _fail(f"run {run.run_id} is complete; a complete run is never deleted")
        if run.writer():
            _fail(f"run {run.run_id} is being written by another process; stop it first")
    if not yes:
        if not sys.stdin.isatty():
            _fail("pass --yes to delete without a prompt")
        if not typer.confirm(f"delete {len(runs)} run folder(s): {', '.join(r.run_id for r in runs)}?"):
            raise typer.Exit(1)
    for run in runs:
        try:
            n = run.remove()
        except PathflowError as e:
            _fail(str(e), 1)
        console.print(styled("removed ", (run.run_id, "bold"), f" ({n} files)"))


@runs_app.command("verify")
def runs_verify(run_id: str, store: str | None = StoreOpt) -> None:
    """Check every output's sha256 against the manifest, and that the folder holds nothing else.
    Exit 1 on a mismatch, a missing file or a file the manifest does not list."""
    from storage.store import TMP  # the infix of an unfinished write's temporary

    run = _run_or_fail(store, run_id)
    m = _manifest(run)
    if m.get("status") != "complete":
        _fail(f"run {run_id} is {m.get('status')}, not complete: nothing to verify yet", 1)
    try:
        present = set(run.files())
    except OSError as e:
        _fail(f"run {run_id} cannot be listed: {e}", 1)
    bad = []
    for rel, digest in sorted(m["outputs"].items()):
        what = run.not_regular(rel)
        if rel not in present:
            bad.append((rel, "missing"))
        elif what:
            bad.append((rel, f"{what}, not a regular file (not read)"))
        elif run.sha256(rel) != digest:
            bad.append((rel, "sha256 differs"))
    extra = run.unlisted(m)
    for rel, why in bad:
        console.print(styled((why, "red"), f" {rel}"))
    for rel in extra:
        what = run.not_regular(rel)
        why = ("leftover temporary (a write that never finished)" if TMP in rel else
               f"not in the manifest ({what})" if what else "not in the manifest")
        console.print(styled((why, "red"), f" {rel}"))
    if bad or extra:
        _fail(f"run {run_id} does not match its manifest: {len(bad)} of {len(m['outputs'])} outputs missing or "
              f"changed, {len(extra)} files it does not list", 1)
    console.print(styled(("ok", "green"), f": {len(m['outputs'])} outputs match the manifest, nothing else in the "
                         "folder"))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _grouped(differ: list[dict]) -> list[tuple[str, str, int]]:
    """Differing files with a Zarr array's chunks (``x.zarr/array/c/…``) as one row: (name, its first
    difference, how many files)."""
    out: dict[str, list] = {}
    for d in differ:
        name = d["file"].split("/c/")[0] if ".zarr/" in d["file"] else d["file"]
        out.setdefault(name, [d["where"], 0])[1] += 1
    return [(k, v[0], v[1]) for k, v in out.items()]


@runs_app.command("diff")
def runs_diff(run_a: str, run_b: str, store: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Config and result differences between two runs. Results are compared as results: run ids,
    graph slugs, timings, hosts and other bookkeeping are ignored, floats to float32 precision, Zarr
    arrays to the precision they were stored with. Exit 0 when the
    results are the same, 1 when they differ."""
    from storage.diff import result_differences

    a, b = _run_or_fail(store, run_a), _run_or_fail(store, run_b)
    for r in (a, b):
        for rel in r.files():
            what = r.not_regular(rel)
            if what:
                _fail(f"run {r.run_id} holds {rel}, {what}, not a regular file: check it with `pathflow runs verify "
                      f"{r.run_id}`", 1)
    ma, mb = _manifest(a), _manifest(b)
    ca, cb = _flat(ma.get("config") or {}), _flat(mb.get("config") or {})
    config = {k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
    results = result_differences(a, b)
    pathways = []
    try:
        va = a.read_json("pathways/validated_pathways.json")["targets"]
        vb = b.read_json("pathways/validated_pathways.json")["targets"]
    except Exception:
        va = vb = {}
    for feat in sorted(set(va) | set(vb)):
        for prompt in sorted(set(va.get(feat, {})) | set(vb.get(feat, {}))):
            ta = [c["feature"] for c in va.get(feat, {}).get(prompt, {}).get("candidates", [])[:5]]
            tb = [c["feature"] for c in vb.get(feat, {}).get(prompt, {}).get("candidates", [])[:5]]
            if ta != tb:
                pathways.append({"feature": feat, "prompt": prompt, "top5_a": ta, "top5_b": tb})
    same = not (results["differ"] or results["only_in_a"] or results["only_in_b"])
    if as_json:
        _print_json({"a": run_a, "b": run_b, "config": config, "results": results, "pathways": pathways,
                     "same_results": same})
        raise typer.Exit(0 if same else 1)
    t = Table(title="config", box=box.SIMPLE_HEAD)
    for col in ("key", run_a, run_b):
        t.add_column(col, overflow="fold")
    for k, (x, y) in config.items():
        t.add_row(k, json.dumps(x), json.dumps(y))
    console.print(t if t.row_count else "config: identical")
    if pathways:  # what a researcher asks first: did the pathways change?
        t = Table(title=f"pathways: {len(pathways)} feature × prompt with a different top 5", box=box.SIMPLE_HEAD)
        for col in ("feature", "prompt", f"top-5 {run_a}", f"top-5 {run_b}"):
            t.add_column(col, overflow="fold")
        for p in pathways:
            t.add_row(p["feature"], p["prompt"], " ".join(p["top5_a"]) or "–", " ".join(p["top5_b"]) or "–")
        console.print(t)
    if same:
        console.print(styled(("results: identical", "green"), f" ({results['compared']} files compared; run ids, "
                             "timings and other bookkeeping ignored)"))
    else:
        groups = _grouped(results["differ"])
        t = Table(title=f"results: {len(results['differ'])} of {results['compared']} files differ",
                  box=box.SIMPLE_HEAD)
        for col in ("file or array", "first difference"):
            t.add_column(col, overflow="fold")
        for name, first, n in groups[:20]:
            t.add_row(name + (f" ({n} chunks)" if n > 1 else ""), first)
        for rel in results["only_in_a"][:10]:
            t.add_row(rel, f"only in {run_a}")
        for rel in results["only_in_b"][:10]:
            t.add_row(rel, f"only in {run_b}")
        console.print(t)
        if len(groups) > 20:
            console.print(f"… and {len(groups) - 20} more; all of them with --json")
    raise typer.Exit(0 if same else 1)

