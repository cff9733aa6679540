"""Where pathflow reads and writes: run ids, store URLs, output paths — each checked in one place.

- ``check_run_id``: one pattern for run ids, so none walks out of the store (``../x``, ``/abs``);
- ``check_store_url``: only stores that persist, with their filesystem package installed, and no
  credentials in the URL (``redact`` hides them wherever a URL is shown);
- ``enclosing_run`` / ``check_out_path``: nothing is written into a run folder but by its run.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import PathflowError

MANIFEST = "manifest.json"
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# schemes whose stores persist, and the package that provides each
PERSISTENT = {"file": None, "local": None, "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs",
              "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
EXTRA = {"s3fs": "s3", "gcsfs": "gcs"}


class StoreError(PathflowError, ValueError):
    """A store URL or run id that cannot be used; the message says what to do."""


def redact(url: Any) -> Any:
    """``url`` with any user:password part replaced by ``***`` (for messages and logs)."""
    if not isinstance(url, str) or "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{sep}{path}"


def check_run_id(run_id: Any) -> str:
    """A run id is one path segment of letters, digits, ``_``, ``.``, ``-`` (≤ 128 characters,
    starting with a letter or digit, no ``..``): it can never name a folder outside ``<store>/runs/``."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        raise StoreError(f"invalid run id {run_id!r}: use letters, digits, '_', '.' and '-' (no '/', no '..'), "
                         "starting with a letter or digit, as `pathflow runs list` shows them")
    return run_id


def url_scheme(url: str) -> str:
    return urlsplit(url).scheme.lower() if "://" in url else ""


def check_store_url(url: Any, package: bool = True) -> str:
    """Checks of a store URL that need no I/O: a scheme that persists, no credentials, and (with
    ``package``) its fsspec package installed here. Returns the URL."""
    if not isinstance(url, str) or not url.strip():
        raise StoreError("the store URL is empty: give a folder or an s3:// / gs:// URL")
    scheme = url_scheme(url)
    if not scheme:
        return url
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        raise StoreError(f"store URL {redact(url)} carries credentials: remove them from the URL and give them the "
                         "usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or "
                         "GOOGLE_APPLICATION_CREDENTIALS); pathflow never writes them to a run")
    if scheme == "memory":
        raise StoreError(f"store {url} does not persist (everything would be gone when the process exits): "
                         "use a folder or an s3:// / gs:// URL")
    if scheme in ("http", "https"):
        raise StoreError(f"store {url} is read-only over {scheme}: use a folder or an s3:// / gs:// URL")
    if scheme not in PERSISTENT:
        raise StoreError(f"store {url}: unsupported scheme {scheme!r}; use a folder, file://, s3://, gs:// or az://")
    pkg = PERSISTENT[scheme]
    if package and pkg is not None and importlib.util.find_spec(pkg) is None:
        hint = f"pip install 'pathflow[{EXTRA[pkg]}]'" if pkg in EXTRA else f"pip install {pkg}"
        raise StoreError(f"store {url} needs the {pkg} package: {hint}")
    return url


def enclosing_run(path: str, fs=None) -> str | None:
    """The run folder (``…/runs/<id>``, with a manifest) that is or contains ``path``, else None.
    Local paths by default; object-store paths with their fsspec ``fs``."""
    parts = path.replace("\\", "/").split("/")
    for i in range(len(parts) - 1):
        if parts[i] == "runs" and parts[i + 1]:
            folder = "/".join(parts[: i + 2])
            manifest = posixpath.join(folder, MANIFEST)
            try:
                if fs.exists(manifest) if fs is not None else os.path.isfile(manifest):
                    return folder
            except Exception:  # an unreachable store is reported by whoever uses it
                return None
    return None


def nearest_folder(path: str | os.PathLike) -> Path | None:
    """The folder ``path`` would be created in (its nearest existing ancestor) when that is a folder
    this process can write into, else None."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return probe if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK) else None


def check_out_path(path: str | os.PathLike) -> Path:
    """An output file a command may write: its folder exists or can be made and written, it is not
    a folder, and it is not inside a run folder (runs are written only by their own run)."""
    p = Path(path).expanduser()
    if p.is_symlink():  # /dev/stdout and friends: replacing the link would replace what it names
        raise PathflowError(f"--out {p} is a symbolic link: give a regular file or a new path")
    absolute = p.resolve()
    if absolute.is_dir():
        raise PathflowError(f"--out {p} is a folder: give a file name")
    if absolute.exists() and not absolute.is_file():
        raise PathflowError(f"--out {p} is not a regular file (a device, FIFO or socket): give a regular file or a "
                            "new path")
    inside = enclosing_run(str(absolute))
    if inside:
        raise PathflowError(f"--out {p} is inside the run folder {inside}; runs are never changed: write elsewhere")
    if nearest_folder(absolute.parent) is None:
        raise PathflowError(f"--out {p}: {absolute.parent} is not a writable folder")
    if absolute.exists() and not os.access(absolute, os.W_OK):
        raise PathflowError(f"--out {p} exists and cannot be written")
    return p
