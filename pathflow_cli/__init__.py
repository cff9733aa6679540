"""The ``pathflow`` command line, above ``flows/``: the science package ``pathflow`` imports no Prefect and
no flows; this package drives them, one module per command group (``run``: demo, local, run; ``study``:
audit, select; ``graphs``; ``runs``). It prints for people; errors are one clear line and a non-zero exit.

User text (run ids, paths, study values, error messages) is always printed as text, never parsed
as Rich markup: both consoles have markup off, and styling comes from ``Text`` spans.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

from pathflow.errors import PathflowError

from .common import CONSOLE, VERBOSE, app, console, err, styled  # noqa: F401  (console: callers set its width)

# the command groups register their commands on ``app`` as they are imported, in this order (--help's)
from . import run  # noqa: E402,F401,I001  isort: skip
from . import study  # noqa: E402,F401  isort: skip
from . import graphs  # noqa: E402,F401  isort: skip
from . import runs  # noqa: E402,F401  isort: skip


def console_main() -> None:
    """The ``pathflow`` console script and ``python -m pathflow``: ``main`` in a process of its own.
    Such a process freezes what it has built before a run's flow (``_settle``) and again at exit, so the
    garbage collector never walks those objects again — at 1,500 features the final collection of
    half a million objects alone took 1.2 s."""
    CONSOLE[0] = True
    _bound_malloc_arenas()
    code = 1
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        gc.freeze()
        server = sys.modules.get("flows.server")
        if server is not None and server.used_temporary_server():
            _bound_exit(code)


EXIT_DRAIN_S = 2.0  # after the command has returned: nothing of pathflow's is left to finish


def _bound_exit(code: int, seconds: float = EXIT_DRAIN_S) -> None:
    """End the process ``seconds`` from now if the interpreter's exit is still waiting. The command used a
    temporary Prefect server and has stopped it; what Prefect still has queued at exit (events, a task
    thread's last state report after Ctrl-C) can never be delivered, and its client retries a dead server
    for ~1 min (2 + 4 + … + 32 s) before the process may end. Everything pathflow writes is written."""

    def cut() -> None:
        time.sleep(seconds)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001  a closed pipe: nothing more to say
                pass
        os._exit(code)

    threading.Thread(target=cut, name="pathflow-exit", daemon=True).start()


def _bound_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena and keeps it (~0.2 GiB each after large
    tensor work); Prefect runs every task in a thread of its own, so a long run grows by an arena per batch.
    Two arenas (MALLOC_ARENA_MAX=2, here set from inside) halved a 16-layer run's peak with no slowdown.
    A MALLOC_ARENA_MAX the user set wins."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


def _is_prefect_api_error(e: BaseException) -> bool:
    """An HTTP transport error on the way to the Prefect API (its server died, the network went)."""
    try:
        import httpx
    except ImportError:
        return False
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (httpx.TransportError, httpx.HTTPStatusError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def main() -> None:
    """Entry point: a user's problem is one line and exit 2 (usage) or 1; an unexpected error is one
    line too (with ``-v``, its traceback), never a bare traceback."""
    try:
        app()
    except KeyboardInterrupt:
        err.print(styled(("interrupted", "bold red")))
        sys.exit(130)
    except PathflowError as e:
        err.print(styled(("error: ", "bold red"), str(e)))
        sys.exit(1)
    except Exception as e:
        if VERBOSE[0]:
            import traceback

            traceback.print_exc()
        name = type(e).__name__
        if _is_prefect_api_error(e):
            err.print(styled(("error: ", "bold red"), f"the Prefect API stopped answering ({name}: {str(e)[:120]}); "
                             "was its server stopped? The run can be resumed: pathflow runs list shows it"))
            sys.exit(1)
        if isinstance(e, OSError) or any(w in name for w in ("Connection", "Endpoint", "Timeout", "Credentials")):
            # the environment, not pathflow: an unreachable store, missing credentials, a full disk
            err.print(styled(("error: ", "bold red"), f"{name}: {e}",
                             ("  (check the store URL, credentials and network; -v shows the traceback)", "dim")))
        else:
            err.print(styled(("error: ", "bold red"), f"unexpected {name}: {e}",
                             ("  (a bug in pathflow: run again with -v for the traceback and report it)", "dim")))
        sys.exit(1)

