"""Helpers for tests that run pathflow end to end: configs, CLI subprocesses, and the science of a
run folder (what must not depend on how a run was executed)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from storage.arrays import attribution

from .conftest import clean_env


def config(demo_cfg, store, **gradients):
    cfg = demo_cfg.model_copy(deep=True)
    cfg.store.url = str(store)
    for k, v in gradients.items():
        setattr(cfg.gradients, k, v)
    return cfg


def batch_markers(run_dir: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "pathways" / "parts").glob("*.done.json"))}


def science(run_dir: Path) -> dict:
    """The results of a run that must not depend on how it was executed."""
    g = zarr.open_group(str(run_dir / "jacobians.zarr"), mode="r")
    val = json.loads((run_dir / "pathways" / "validated_pathways.json").read_text())["targets"]
    feats = json.loads((run_dir / "integrated" / "features.json").read_text())["features"]
    return {
        "grad": g["grad"][:],
        "attribution": attribution(g),
        "targets": g.attrs["targets"],
        "keepbits": g.attrs.get("keepbits"),
        "ranking": {f: {p: [c["feature"] for c in r["candidates"]] for p, r in pp.items()} for f, pp in val.items()},
        "actual": {
            f: {p: [c["actual_change"] for c in r["candidates"]] for p, r in pp.items()} for f, pp in val.items()
        },
        "pathways": [(r["feature"], {p: [c["feature"] for c in cs] for p, cs in r["pathways"].items()}) for r in feats],
    }


def same_science(a: dict, b: dict) -> None:
    assert a["targets"] == b["targets"] and a["ranking"] == b["ranking"] and a["pathways"] == b["pathways"]
    # stored values are rounded to keepbits mantissa bits: two computations a float rounding apart may
    # round an entry to neighbouring values, 2^-keepbits apart relatively
    tol = 1e-5 if a["keepbits"] is None else 2.0 ** -a["keepbits"]
    for k in ("grad", "attribution"):
        assert np.array_equal(np.isnan(a[k]), np.isnan(b[k]))
        x, y = np.nan_to_num(a[k]), np.nan_to_num(b[k])
        assert np.linalg.norm(x - y) <= tol * np.linalg.norm(y)
    for f in a["actual"]:
        for p in a["actual"][f]:
            np.testing.assert_allclose(a["actual"][f][p], b["actual"][f][p], rtol=1e-4, atol=1e-6)


def pathflow(args, **env) -> subprocess.CompletedProcess:
    """`pathflow ARGS` to completion, in a clean environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "pathflow", *args], env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def run_cli(args, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "pathflow", *args],
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def write_cfg(demo_cfg, tmp_path, **gradients) -> Path:
    cfg = config(demo_cfg, "unused", **gradients)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json", exclude={"store"})))
    return path
