"""The artifact store (DESIGN §5): run folders under a local path or any fsspec URL.

A run is ``<store>/runs/<run_id>/`` holding the outputs of DESIGN §1 and ``manifest.json``.
Every write is atomic (temporary name, then rename; an object store's PUT is atomic already),
and a run is complete only once its manifest says so.

What keeps a run from being lost or silently changed, each in one place:
- ``check_run_id``: one pattern for run ids, so none walks out of the store (``../x``, ``/abs``);
- ``check_store_url``: only stores that persist, with their filesystem package installed, no
  credentials in the URL, never inside a run folder or on a file;
- ``Lease``: one writer per run at a time (an exclusive-create marker with an expiry, which works
  on object stores too), renewed while the run is written;
- a complete manifest is never changed (``RunComplete``), and ``Run.unlisted`` names files a
  complete manifest does not list.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import posixpath
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pathflow.errors import PathflowError
from pathflow.locations import (
    RUN_ID_RE,
    StoreError,
    check_run_id,
    check_store_url,
    enclosing_run,
    nearest_folder,
    redact,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LEASE = "lease.json"
_MANIFEST_LOCK = threading.RLock()  # tasks of one process update the manifest one at a time
__all__ = ["Store", "Run", "Lease", "StoreError", "RunComplete", "LeaseHeld", "check_run_id", "redact", "new_run_id",
           "git_commit", "now", "MANIFEST", "LEASE", "RUN_ID_RE"]


class RunComplete(PathflowError):
    """A write to a complete run: complete runs are never changed."""


class LeaseHeld(PathflowError):
    """Another process is writing this run."""


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
    """A store URL: a local folder (default) or ``s3://…``/``gs://…`` through fsspec.

    Refuses, before anything is read or written, stores that do not persist, unknown schemes,
    credentials in the URL, a local path that is a file, and a location inside a run folder.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        check_store_url(url)
        self.url = url.rstrip("/") or "/"
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError) as e:
            raise StoreError(f"store {redact(url)}: {e}") from None
        self.root = root.rstrip("/") if not isinstance(self.fs, LocalFileSystem) else os.path.abspath(root)
        self.storage_options = storage_options
        if self.is_local:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise StoreError(f"store {self.root} is a file, not a folder: give a folder (it is created if "
                                 "missing) or an s3:// / gs:// URL")
            inside = enclosing_run(self.root)
        else:
            inside = enclosing_run(self.root, self.fs) if "/runs/" in f"/{self.root}/" else None
        if inside:
            raise StoreError(f"store {redact(url)} is inside the run folder {inside}: a run folder is never written "
                             "into; give the store that holds it (the folder above 'runs/')")

    def __repr__(self) -> str:
        return f"Store({redact(self.url)!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def run(self, run_id: str) -> Run:
        return Run(self, run_id)

    def check_writable(self) -> None:
        """A local store's folder can be created and written (a one-line error, before any work)."""
        if not self.is_local:
            return
        if nearest_folder(self.root) is None:
            raise StoreError(f"store {self.root} cannot be written (it is not in a writable folder)")

    def run_ids(self) -> list[str]:
        """The run folders' names (entries that are not valid run ids are skipped)."""
        base = posixpath.join(self.root, "runs")
        try:
            if not self.fs.exists(base):
                return []
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False)]
        except PermissionError:
            raise StoreError(f"store {redact(self.url)}: cannot list {base} (permission denied)") from None
        except NotADirectoryError:
            raise StoreError(f"store {redact(self.url)}: {base} is not a folder") from None
        return sorted(n for n in names if RUN_ID_RE.fullmatch(n) and ".." not in n)


class Run:
    """One immutable run folder ``<store>/runs/<run_id>/``."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, check_run_id(run_id)
        self.path = posixpath.join(store.root, "runs", run_id)
        self.sealed = False  # set once this process has marked the run complete

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
        if self.sealed:
            raise RunComplete(f"run {self.run_id} is complete; a complete run is never changed")
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
        """JSON, indented for a person where it is small; large files (features.json at 1,500 features)
        compact, which json encodes in C, many times faster. NaN/inf are refused either way."""
        text = json.dumps(obj, allow_nan=False, default=str, separators=(",", ":"))
        if len(text) < 1 << 20:
            text = json.dumps(obj, indent=2, allow_nan=False, default=str)
        return self.write_bytes(rel, (text + "\n").encode())

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self._abs(rel), "rb") as fh:
            return fh.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

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
            if rel not in (MANIFEST, LEASE) and ".tmp-" not in rel:
                out.append(rel)
        return sorted(out)

    def unlisted(self, manifest: dict) -> list[str]:
        """Files in the folder that a complete manifest does not list (temporaries and the lease too)."""
        listed = set(manifest.get("outputs", {})) | {MANIFEST}
        return sorted(r for r in (posixpath.relpath(p, self.path) for p in self.fs.find(self.path))
                      if r not in listed)

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._abs(rel), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    # -- manifest -------------------------------------------------------------------------
    def manifest(self) -> dict:
        """The manifest, checked: a truncated, non-object or field-less one is a StoreError naming it."""
        try:
            m = self.read_json(MANIFEST)
        except FileNotFoundError:
            raise StoreError(f"run {self.run_id} has no {MANIFEST} in {redact(self.url)}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{redact(self.url)}/{MANIFEST} is not valid JSON ({e}); the run cannot be "
                             "used") from None
        missing = [k for k in ("run_id", "status", "config") if not isinstance(m, dict) or k not in m]
        if not isinstance(m, dict) or missing:
            what = "not an object" if not isinstance(m, dict) else f"lacks {', '.join(missing)}"
            raise StoreError(f"{redact(self.url)}/{MANIFEST} is {what}; the run cannot be used")
        if not isinstance(m.get("steps", {}), dict) or not isinstance(m.get("outputs", {}), dict):
            raise StoreError(f"{redact(self.url)}/{MANIFEST}: 'steps' and 'outputs' must be objects")
        return m

    def start(self, manifest: dict) -> dict:
        """The first manifest of a new run; refuses a run id that is already in use."""
        if self.exists():
            raise StoreError(f"run {self.run_id} already exists in {redact(self.store.url)}: choose another run id, "
                             f"or finish it with resume (pathflow run --resume {self.run_id})")
        m = {"run_id": self.run_id, "status": "running", "created": now(), "updated": now(),
             "steps": {}, "outputs": {}, **manifest}
        self.write_json(MANIFEST, m)
        return m

    def _change(self, fn) -> dict:
        """Read-modify-write the manifest; a complete manifest is never changed."""
        with _MANIFEST_LOCK:
            m = self.manifest()
            if m.get("status") == "complete":
                self.sealed = True
                raise RunComplete(f"run {self.run_id} is complete; a complete run is never changed")
            fn(m)
            m["updated"] = now()
            self.write_json(MANIFEST, m)
            return m

    def update(self, **changes: Any) -> dict:
        return self._change(lambda m: m.update(changes))

    def step(self, name: str, status: str, **info: Any) -> None:
        self._change(lambda m: m.setdefault("steps", {}).setdefault(name, {}).update(
            {"status": status, "at": now(), **info}))

    def complete(self) -> dict:
        """Hash every output, then mark the run complete (the last write of a run)."""
        outputs = {rel: self.sha256(rel) for rel in self.files()}
        m = self.update(outputs=outputs, status="complete", finished=now())
        self.sealed = True
        return m

    def fail(self, error: str) -> None:
        """Mark the run failed (resumable); never touches a complete or missing run."""
        try:
            if self.exists():
                self.update(status="failed", error=error)
        except RunComplete:
            log.info("run %s is complete; not marked failed", self.run_id)

    # -- the lease: one writer at a time -------------------------------------------------------
    def remove(self) -> int:
        """Delete this run's folder — only a run that is not complete and that nobody is writing
        (its lease is taken for the deletion, so no resume can start meanwhile). Returns the number
        of files removed."""
        m = self.manifest()
        if m.get("status") == "complete":
            raise RunComplete(f"run {self.run_id} is complete; a complete run is never deleted")
        lease = self.acquire(note="remove")
        try:
            files = len(self.files())
            self.fs.rm(self.path, recursive=True)
        finally:
            lease.release()  # its file went with the folder: this stops the renewals
        return files

    def writer(self) -> dict | None:
        """The live lease holder of this run ({host, pid, expires, …}), or None when nobody writes it."""
        lease = Lease(self)
        h = lease.holder()
        return None if h is None or lease._stale(h) else h

    def acquire(self, ttl: float | None = None, note: str = "") -> Lease:
        """Take this run's lease (see ``Lease``); raises LeaseHeld naming the holder."""
        lease = Lease(self, ttl)
        lease.acquire(note)
        return lease


_ACTIVE: set = set()  # leases held by this process (a hard exit releases them)


def release_all(fail: str | None = None) -> None:
    """Release every lease this process still holds — after an interrupt that did not unwind through
    the flow — marking each such run failed with ``fail`` first (it is ours: nobody else writes it)."""
    for lease in list(_ACTIVE):
        try:
            if fail:
                lease.run.fail(fail)
            lease.release()
        except Exception as e:  # the store is unreachable: the lease expires by itself
            log.warning("lease of run %s not released: %s", lease.run.run_id, e)


def _lease_ttl() -> float:
    return float(os.environ.get("PATHFLOW_LEASE_TTL_S", "120"))


class Lease:
    """One writer per run: ``<run>/lease.json``, created exclusively (``O_EXCL`` locally, a
    conditional PUT — ``If-None-Match: *`` — on S3) and renewed every ttl/3 by a thread.

    A lease whose expiry has passed, or whose holder is a dead process on this host, is taken
    over. The renewing thread that finds the lease taken by someone else calls ``on_lost``.
    """

    def __init__(self, run: Run, ttl: float | None = None) -> None:
        self.run, self.ttl = run, ttl or _lease_ttl()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.path = run._abs(LEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_lost = None

    def _body(self, note: str = "") -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired": now(), "expires": time.time() + self.ttl, "note": note}).encode()

    def _create(self, data: bytes) -> bool:
        """Exclusive create; False if the lease file exists."""
        fs = self.run.fs
        fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        if self.run.store.is_local:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        try:
            fs.pipe_file(self.path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without conditional writes: check, then write (racy)
            log.warning("store %s has no conditional create; the run lease is best-effort", redact(self.run.store.url))
            if fs.exists(self.path):
                return False
            fs.pipe_file(self.path, data)
            return True
        except OSError as e:  # S3 answers 412 PreconditionFailed when the object exists
            if "412" in str(e) or "PreconditionFailed" in str(e):
                return False
            raise

    def _write(self, data: bytes) -> None:
        """Overwrite our lease atomically (a reader never sees a torn file and takes it for stale)."""
        if self.run.store.is_local:
            tmp = f"{self.path}.tmp-{secrets.token_hex(4)}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)
        else:
            self.run.fs.pipe_file(self.path, data)  # a PUT is all-or-nothing

    def holder(self) -> dict | None:
        try:
            self.run.fs.invalidate_cache(self.path)
            with self.run.fs.open(self.path, "rb") as fh:
                h = json.loads(fh.read())
            return h if isinstance(h, dict) else {}
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # a torn or foreign file: treated as stale below

    def _stale(self, h: dict) -> bool:
        if not h or not isinstance(h.get("expires"), (int, float)):
            return True
        if h["expires"] < time.time():
            return True
        if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int) and h["pid"] != os.getpid():
            try:
                os.kill(h["pid"], 0)
            except ProcessLookupError:
                return True  # its holder on this host is gone (killed): no need to wait for the expiry
            except PermissionError:
                return False
        return False

    def acquire(self, note: str = "") -> None:
        for _ in range(3):
            if self._create(self._body(note)):
                break
            h = self.holder()
            if h is None:
                continue  # released meanwhile: try again
            if not self._stale(h):
                until = _dt.datetime.fromtimestamp(h["expires"], _dt.timezone.utc).isoformat(timespec="seconds")
                raise LeaseHeld(f"run {self.run.run_id} is being written by another process ({h.get('host')}, pid "
                                f"{h.get('pid')}; lease until {until}): wait for it to finish, or stop it first")
            log.warning("taking over the stale lease of run %s (held by %s)", self.run.run_id, h.get("owner"))
            self.run.fs.rm_file(self.path)
        else:
            raise LeaseHeld(f"run {self.run.run_id}: could not take its lease (another process keeps taking it)")
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.run.run_id}", daemon=True)
        self._thread.start()
        _ACTIVE.add(self)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            h = self.holder()
            if not h or h.get("owner") != self.owner:
                log.error("run %s: lease lost to %s", self.run.run_id, (h or {}).get("owner"))
                if self.on_lost:
                    self.on_lost()
                return
            try:
                self._write(self._body())
            except Exception as e:  # a transient store error: the next renewal tries again
                log.warning("run %s: lease not renewed: %s", self.run.run_id, e)

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still ours."""
        self._stop.set()
        _ACTIVE.discard(self)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        h = self.holder()
        if h is not None and h.get("owner") == self.owner:
            try:
                self.run.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
