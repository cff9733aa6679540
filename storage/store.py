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

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import secrets
import socket
import stat
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
from pathflow.readers import reject_constant

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LEASE = "lease.json"
_MANIFEST_LOCK = threading.RLock()  # tasks of one process update the manifest one at a time
__all__ = ["Store", "Run", "Lease", "StoreError", "RunComplete", "LeaseHeld", "LeaseLost", "TMP", "check_run_id",
           "redact", "new_run_id",
           "git_commit", "now", "MANIFEST", "LEASE", "RUN_ID_RE"]


class RunComplete(PathflowError):
    """A write to a complete run: complete runs are never changed."""


class LeaseHeld(PathflowError):
    """Another process is writing this run."""


class LeaseLost(PathflowError):
    """This process's lease of a run was taken by another writer: it writes nothing more."""


TMP = ".tmp-"  # the infix of a write's temporary name (write, then rename)


def _precondition_failed(e: BaseException) -> bool:
    """An object store's 412 (a conditional PUT refused), however its client words it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if "412" in text or "PreconditionFailed" in text or "pre-conditions you specified" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _checked_manifest(m: Any, where: str) -> dict:
    """A manifest's shape, checked once, so every reader can trust it: one StoreError naming the file."""
    missing = [k for k in ("run_id", "status", "config") if not isinstance(m, dict) or k not in m]
    if not isinstance(m, dict) or missing:
        what = "not an object" if not isinstance(m, dict) else f"lacks {', '.join(missing)}"
        raise StoreError(f"{where} is {what}; the run cannot be used")
    if not isinstance(m["config"], dict):
        raise StoreError(f"{where}: 'config' must be an object; the run cannot be used")
    if not isinstance(m["status"], str):
        raise StoreError(f"{where}: 'status' must be a string; the run cannot be used")
    outputs, steps = m.get("outputs", {}), m.get("steps", {})
    if not isinstance(steps, dict) or not all(isinstance(v, dict) for v in steps.values()):
        raise StoreError(f"{where}: 'steps' must be an object of objects; the run cannot be used")
    if not isinstance(outputs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in outputs.items()):
        raise StoreError(f"{where}: 'outputs' must map file names to sha256 strings; the run cannot be used")
    if m["status"] == "complete" and "outputs" not in m:
        raise StoreError(f"{where}: a complete run without 'outputs'; the run cannot be verified")
    return m


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
            if os.path.islink(self.root) and not os.path.exists(self.root):
                raise StoreError(f"store {self.root} is a symbolic link to {os.readlink(self.root)}, which does not "
                                 "exist: create that folder or give another store")
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
        self._check_lease()
        dst = self._abs(rel)
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        if self.store.is_local:
            tmp = f"{dst}{TMP}{secrets.token_hex(4)}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, dst)
            except BaseException:  # a full disk, a signal: nothing half-written stays behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
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
        what = self.not_regular(rel)
        if what:
            raise StoreError(f"{rel} in run {self.run_id} is {what}, not a regular file: not read")
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
            if rel not in (MANIFEST, LEASE) and TMP not in rel:
                out.append(rel)
        return sorted(out)

    def unlisted(self, manifest: dict) -> list[str]:
        """Files in the folder that a complete manifest does not list (temporaries and the lease too)."""
        listed = set(manifest.get("outputs", {})) | {MANIFEST}
        return sorted(r for r in (posixpath.relpath(p, self.path) for p in self.fs.find(self.path))
                      if r not in listed)

    def temporaries(self) -> list[str]:
        """Leftover temporaries of writes that never finished (a SIGKILL mid-write), relative paths."""
        return sorted(r for r in (posixpath.relpath(p, self.path) for p in self.fs.find(self.path)) if TMP in r)

    def remove_temporaries(self) -> int:
        """Delete leftover temporaries (a resume does, under the run's lease); returns how many."""
        tmps = self.temporaries()
        for rel in tmps:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._abs(rel))
        return len(tmps)

    def not_regular(self, rel: str) -> str | None:
        """What ``rel`` is when it is not a regular file of a local run (a FIFO, a device, a symlink),
        else None. Such a thing is never opened: a FIFO would block, /dev/zero never ends."""
        if not self.store.is_local:
            return None
        try:
            st = os.lstat(self._abs(rel))
        except FileNotFoundError:
            return None
        if stat.S_ISREG(st.st_mode):
            return None
        for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                           (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
            if test(st.st_mode):
                return what
        return "not a regular file"

    def sha256(self, rel: str) -> str:
        what = self.not_regular(rel)
        if what:
            raise StoreError(f"{rel} in run {self.run_id} is {what}, not a regular file: not read")
        h = hashlib.sha256()
        with self.fs.open(self._abs(rel), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    # -- manifest -------------------------------------------------------------------------
    def manifest(self) -> dict:
        """The manifest, checked: a truncated, non-object or field-less one is a StoreError naming it."""
        try:
            m = json.loads(self.read_bytes(MANIFEST), parse_constant=reject_constant)
        except FileNotFoundError:
            raise StoreError(f"run {self.run_id} has no {MANIFEST} in {redact(self.url)}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{redact(self.url)}/{MANIFEST} is not valid JSON ({e}); the run cannot be "
                             "used") from None
        missing = [k for k in ("run_id", "status", "config") if not isinstance(m, dict) or k not in m]
        if not isinstance(m, dict) or missing:
            what = "not an object" if not isinstance(m, dict) else f"lacks {', '.join(missing)}"
            raise StoreError(f"{redact(self.url)}/{MANIFEST} is {what}; the run cannot be used")
        return _checked_manifest(m, f"{redact(self.url)}/{MANIFEST}")

    def start(self, manifest: dict) -> dict:
        """The first manifest of a new run; refuses a run id that is already in use."""
        if self.exists():
            raise StoreError(f"run {self.run_id} already exists in {redact(self.store.url)}: choose another run id, "
                             f"or finish it with resume (pathflow run --resume {self.run_id})")
        m = {"run_id": self.run_id, "status": "running", "created": now(), "updated": now(),
             "steps": {}, "outputs": {}, **manifest}
        self.write_json(MANIFEST, m)
        return m

    def _check_lease(self) -> None:
        """A writer whose lease of this run was lost (taken over after it stalled) writes nothing more."""
        for lease in list(_ACTIVE):
            if lease.run.path == self.path and lease.store_url == self.store.url and lease.lost:
                raise LeaseLost(f"run {self.run_id}: this process lost its lease to another writer; it writes "
                                "nothing more to the run")

    def _held_lease(self) -> Lease | None:
        for lease in list(_ACTIVE):
            if lease.run.path == self.path and lease.store_url == self.store.url:
                return lease
        return None

    @contextlib.contextmanager
    def _locked(self):
        """The manifest's critical section: this process's tasks one at a time, and, in a local store,
        every process too (an flock on the run folder, which a lease takeover also holds)."""
        with _MANIFEST_LOCK:
            if not self.store.is_local or not os.path.isdir(self.path):
                yield
                return
            with run_lock(self.path, self.run_id):
                yield

    def _change(self, fn) -> dict:
        """Read-modify-write the manifest as a compare-and-swap: under the run's lock (local) or with a
        conditional PUT on the version read (object stores), and only while this process still holds
        the run's lease when it holds one. A complete manifest is never changed."""
        for _ in range(20):
            with self._locked():
                self._check_lease()
                lease = self._held_lease()
                if lease is not None:
                    lease.check_still_ours()
                etag = self._etag()
                m = self.manifest()
                if m.get("status") == "complete":
                    self.sealed = True
                    raise RunComplete(f"run {self.run_id} is complete; a complete run is never changed")
                fn(m)
                m["updated"] = now()
                if self._write_manifest(m, etag):
                    return m
            time.sleep(0.05)  # another writer changed it between our read and write: read again
        raise StoreError(f"run {self.run_id}: the manifest keeps changing under this writer; is another process "
                         "writing the run?")

    def _etag(self) -> str | None:
        if self.store.is_local:
            return None
        self.fs.invalidate_cache(self._abs(MANIFEST))
        try:
            return self.fs.info(self._abs(MANIFEST)).get("ETag")
        except FileNotFoundError:
            return None

    def _write_manifest(self, m: dict, etag: str | None) -> bool:
        """Write the manifest if it is still the version ``etag`` (object stores); False if not."""
        if self.store.is_local or etag is None:
            self.write_json(MANIFEST, m)
            return True
        self._check_lease()
        data = (json.dumps(m, indent=2, allow_nan=False, default=str) + "\n").encode()
        try:
            self.fs.pipe_file(self._abs(MANIFEST), data, IfMatch=etag)
        except TypeError:  # a filesystem without conditional writes: best effort, said once in the log
            log.warning("store %s has no conditional PUT; manifest writes are not compare-and-swap",
                        redact(self.store.url))
            self.fs.pipe_file(self._abs(MANIFEST), data)
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

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
        except LeaseLost:
            log.warning("run %s: lease lost to another writer; not marked failed", self.run_id)

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
LOCK_WAIT_S = 60.0


@contextlib.contextmanager
def run_lock(path: str, run_id: str, wait: float | None = None):
    """An exclusive flock on a local run folder: manifest writes, lease renewals and takeovers hold it,
    so each is a compare-and-swap against the others, across processes. A holder stalled past
    ``wait`` seconds is an error rather than a hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:  # the folder is not there (yet, or any more): nothing to lock
        yield
        return
    try:
        deadline = time.monotonic() + (LOCK_WAIT_S if wait is None else wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LeaseHeld(f"run {run_id} is locked by a process that does not let go (stalled?): stop "
                                    "it, then try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
    from pathflow.envvars import LEASE_TTL_S

    return LEASE_TTL_S.read()


class Lease:
    """One writer per run: ``<run>/lease.json``, created exclusively (``O_EXCL`` locally, a
    conditional PUT — ``If-None-Match: *`` — on S3) and renewed every ttl/3 by a thread.

    A lease whose expiry has passed, or whose holder is a dead process on this host, is taken
    over. The renewing thread that finds the lease taken by someone else calls ``on_lost``.
    """

    def __init__(self, run: Run, ttl: float | None = None) -> None:
        self.run, self.ttl = run, ttl or _lease_ttl()
        self.store_url = run.store.url
        self.lost = False  # set once another writer took the lease: this one writes nothing more
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
            if _precondition_failed(e):
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

    def _lock(self):
        return run_lock(self.run.path, self.run.run_id) if self.run.store.is_local else contextlib.nullcontext()

    def check_still_ours(self) -> None:
        """Raise LeaseLost (and remember it) unless the lease file still names this holder."""
        if self.lost:
            raise LeaseLost(f"run {self.run.run_id}: this process lost its lease; it writes nothing more")
        h = self.holder()
        if not h or h.get("owner") != self.owner:
            self.lost = True
            log.error("run %s: lease lost to %s", self.run.run_id, (h or {}).get("owner"))
            raise LeaseLost(f"run {self.run.run_id}: its lease was taken by another writer "
                            f"({(h or {}).get('host')}, pid {(h or {}).get('pid')}); this process writes nothing more")

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
            with self._lock():  # no manifest write of the old holder is under way, none starts meanwhile
                if self.holder() != h:
                    continue  # renewed or taken meanwhile: look again
                log.warning("taking over the stale lease of run %s (held by %s)", self.run.run_id, h.get("owner"))
                self.run.fs.rm_file(self.path)
        else:
            raise LeaseHeld(f"run {self.run.run_id}: could not take its lease (another process keeps taking it)")
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.run.run_id}", daemon=True)
        self._thread.start()
        _ACTIVE.add(self)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                with self._lock():  # check and renew as one step against a takeover
                    self.check_still_ours()
                    self._write(self._body())
            except LeaseLost:
                if self.on_lost:
                    self.on_lost()
                return
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
