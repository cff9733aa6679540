"""Every ``PATHFLOW_*`` environment variable, read in one place and validated with its range.

A value outside its range is a ``PathflowError`` naming the variable, its value and what it
takes; the CLI checks them all (``check_all``) before any work, so a wrong value is one line and
exit 2, never a traceback mid-run or a silently dangerous setting (a lease TTL of 0 would let
``runs rm`` delete a run that is being written).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import PathflowError


@dataclass(frozen=True)
class Number:
    name: str
    default: float
    lo: float
    hi: float
    integer: bool = False
    help: str = ""

    def read(self) -> float | int:
        raw = os.environ.get(self.name)
        if raw is None or raw == "":  # unset, or set empty (`VAR= pathflow …`): the default
            return self.default
        kind = "an integer" if self.integer else "a number"
        try:
            value = int(raw.strip()) if self.integer else float(raw.strip())
        except ValueError:
            raise PathflowError(f"{self.name}={raw[:40]!r} is not {kind}: {self.help}, {self.lo:g} to "
                                f"{self.hi:g} (default {self.default:g}); fix or unset it") from None
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise PathflowError(f"{self.name}={raw[:40]!r} is out of range: {self.help}, {self.lo:g} to "
                                f"{self.hi:g} (default {self.default:g}); fix or unset it")
        return value


# the floor of the lease TTL: renewals every ttl/3 must outrun a loaded machine's stalls
LEASE_TTL_S = Number("PATHFLOW_LEASE_TTL_S", 120.0, 5.0, 86400.0, help="seconds a run's write lease lasts unrenewed")
INTERRUPT_GRACE_S = Number("PATHFLOW_INTERRUPT_GRACE_S", 10.0, 0.0, 3600.0,
                           help="seconds a stopping run may take before the process exits at once")
MAX_JSON_MB = Number("PATHFLOW_MAX_JSON_MB", 512, 1, 1 << 20, integer=True,
                     help="the largest study JSON file read whole, in MB")
SIMULATE_OOM_ABOVE = Number("PATHFLOW_SIMULATE_OOM_ABOVE", -1, 0, 1 << 30, integer=True,  # unset (-1): off
                            help="(testing) batches larger than this fail as out of memory")
BATCH_DELAY_S = Number("PATHFLOW_BATCH_DELAY_S", 0.0, 0.0, 3600.0, help="(testing) seconds each batch waits")

COMPUTE_THREAD = Number("PATHFLOW_COMPUTE_THREAD", 1, 0, 1, integer=True,
                        help="(benchmarking) 1: a process's model work runs on one thread; 0: on the calling one")

NUMBERS = (LEASE_TTL_S, INTERRUPT_GRACE_S, MAX_JSON_MB, SIMULATE_OOM_ABOVE, BATCH_DELAY_S, COMPUTE_THREAD)


def check_all() -> None:
    """Read every variable once: the first bad one raises (before any work)."""
    for v in NUMBERS:
        v.read()
