"""The benchmark script runs and reports the ratios the issue names (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pathways.py"


def test_cpu_benchmark_reports_ratios():
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "cpu-small", "--targets", "4", "--batch", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout[out.stdout.index("{"):])
    for key in ("jacobian_per_target_over_plain", "jacobian_speedup_vs_naive", "replay_per_candidate_over_forward",
                "whole_prompt_over_last_position", "whole_prompt_per_target_over_plain", "peak_memory_bytes"):
        assert result[key] > 0, key
    assert result["shapes"]["targets"] == 4 and result["shapes"]["candidates"] == 25


def test_study_gpu_benchmark_runs_its_code_path_on_a_cpu():
    """benchmarks/gpu_8b.sh's second script, at the cpu-small preset: every phase measured, the full run
    projected from each layer's cost per target."""
    script = SCRIPT.parent / "bench_study_gpu.py"
    out = subprocess.run([sys.executable, str(script), "--preset", "cpu-small", "--targets", "14", "--budget-s", "1",
                          "--token-features", "4", "--responses", "8", "--graph-targets", "2"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout[out.stdout.index("{"):])
    m, proj = result["seconds"]["measured"], result["projected_full_run_seconds"]
    assert m["targets"] >= 7 and all(m[k] > 0 for k in ("phase_a", "phase_b", "phase_c", "tokens"))
    assert set(result["seconds"]["per_target_by_layer"]) == {str(l) for l in range(1, 8)}  # every layer sampled
    assert proj["total"] == sum(proj[k] for k in ("phase_a", "phase_b", "phase_c", "tokens"))
    assert proj["phase_a"] >= m["phase_a"] * 0.99 and result["peak_memory_bytes"] > 0
    # the graphs step: two targets' graphs on each prompt, each with nodes beyond the target and decision
    assert m["graph_targets"] == 2 and m["graphs"] > 0 and len(m["graph_nodes"]) == 4
    assert all(n > 2 for n in m["graph_nodes"])
    assert proj["graphs_every_target"] == pytest.approx(14 * proj["graphs_per_target_both_prompts"])
    # the contrast step on those graphs: both targets' records, the prompts' differing spans swapped
    assert m["contrast_targets"] == 2 and m["contrast"] > 0 and m["contrast_spans"] >= 1
    assert proj["contrast_32_targets"] == pytest.approx(16 * m["contrast"])
