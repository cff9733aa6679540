"""The artifact store (DESIGN §5): run folders under a local path or any fsspec URL.

A run is ``<store>/runs/<run_id>/`` holding the outputs of DESIGN §1 and ``manifest.json``.
Every write is atomic (temporary name, then rename; an object store's PUT is atomic already),
and a run is complete only once its manifest says so.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import posixpath
import secrets
import subprocess
import threading
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_MANIFEST_LOCK = threading.RLock()  # tasks of one process update the manifest one at a time


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def git_commit() -> str | None:
    """The source tree's commit, when pathflow runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Store:
    """A store URL: a local folder (default) or ``s3://…``/``gs://…`` through fsspec."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url.rstrip("/") or "/"
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/") if not isinstance(self.fs, LocalFileSystem) else os.path.abspath(root)
        self.storage_options = storage_options

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def run(self, run_id: str) -> Run:
        return Run(self, run_id)

    def run_ids(self) -> list[str]:
        base = posixpath.join(self.root, "runs")
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False))


class Run:
    """One immutable run folder ``<store>/runs/<run_id>/``."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.path = posixpath.join(store.root, "runs", run_id)

    @property
    def fs(self):
        return self.store.fs

    @property
    def url(self) -> str:
        """The run folder as a URL (a plain path for local stores)."""
        if self.store.is_local:
            return self.path
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{proto}://{self.path}"

    def _abs(self, rel: str) -> str:
        return posixpath.join(self.path, rel)

    def exists(self, rel: str = MANIFEST) -> bool:
        return self.fs.exists(self._abs(rel))

    def listdir(self, rel: str) -> list[str]:
        """The names in folder ``rel`` as of now (one listing; an object store's cached listing is
        refreshed first); [] when it does not exist."""
        path = self._abs(rel)
        self.fs.invalidate_cache(path)
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Atomically write ``rel``; returns its sha256."""
        dst = self._abs(rel)
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        if self.store.is_local:
            tmp = f"{dst}.tmp-{secrets.token_hex(4)}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dst)
        else:
            self.fs.pipe_file(dst, data)  # an object store PUT is all-or-nothing
        return hashlib.sha256(data).hexdigest()

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n").encode())

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self._abs(rel), "rb") as fh:
            return json.loads(fh.read())

    def zarr_store(self, rel: str):
        """A Zarr v3 store for ``rel`` inside the run folder."""
        import zarr

        if self.store.is_local:
            return zarr.storage.LocalStore(self._abs(rel))
        return zarr.storage.FsspecStore.from_url(f"{self.url}/{rel}", storage_options=self.store.storage_options)

    def files(self) -> list[str]:
        """Every file of the run (relative paths), manifest excluded, temporaries skipped."""
        out = []
        for p in self.fs.find(self.path):
            rel = posixpath.relpath(p, self.path)
            if rel != MANIFEST and ".tmp-" not in rel:
                out.append(rel)
        return sorted(out)

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._abs(rel), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    # -- manifest -------------------------------------------------------------------------
    def manifest(self) -> dict:
        return self.read_json(MANIFEST)

    def start(self, manifest: dict) -> dict:
        m = {"run_id": self.run_id, "status": "running", "created": now(), "updated": now(),
             "steps": {}, "outputs": {}, **manifest}
        self.write_json(MANIFEST, m)
        return m

    def update(self, **changes: Any) -> dict:
        with _MANIFEST_LOCK:
            m = self.manifest()
            m.update(changes)
            m["updated"] = now()
            self.write_json(MANIFEST, m)
            return m

    def step(self, name: str, status: str, **info: Any) -> None:
        with _MANIFEST_LOCK:
            m = self.manifest()
            m["steps"].setdefault(name, {}).update({"status": status, "at": now(), **info})
            m["updated"] = now()
            self.write_json(MANIFEST, m)

    def complete(self) -> dict:
        """Hash every output, then mark the run complete (the last write of a run)."""
        outputs = {rel: self.sha256(rel) for rel in self.files()}
        return self.update(outputs=outputs, status="complete", finished=now())

    def fail(self, error: str) -> None:
        if self.exists():
            self.update(status="failed", error=error)
