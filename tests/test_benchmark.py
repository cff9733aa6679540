"""The benchmark script runs and reports the ratios the issue names (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pathways.py"


def test_cpu_benchmark_reports_ratios():
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "cpu-small", "--targets", "4", "--batch", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout[out.stdout.index("{"):])
    for key in ("jacobian_per_target_over_plain", "jacobian_speedup_vs_naive", "replay_per_candidate_over_forward",
                "peak_memory_bytes"):
        assert result[key] > 0, key
    assert result["shapes"]["targets"] == 4 and result["shapes"]["candidates"] == 25
