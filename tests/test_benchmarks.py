"""Every script in benchmarks/ runs at its --smoke size and ends with its figure (a broken benchmark fails CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
#: the figure each script's last line carries
LAST_LINE = {
    "bench_ablation.py": r"^ablation_seconds=\d",
    "bench_cache.py": r"^int8_r1_delta=[-+]\d",
    "bench_decode.py": r"^decode_speedup=\d",
    "bench_distractors.py": r"^distractor_min_gain=[-+]\d",
    "bench_extract.py": r"^videos_per_s_tiny=\d",
    "bench_index.py": r"^auto_recall_at_15_\d+=\d",
    "bench_retrieve.py": r"^rerank_overhead=-?\d",
    "bench_scale.py": r"^scale_rerank_p50_ms=\d",
    "bench_serve.py": r"^serve_p95_ms=\d",
    "bench_train_cost.py": r"^cache_speedup=\d",
    "gpu_suite.py": r"^gpu_suite_sections=(\d+)/\1$",  # every section ran
}


def test_every_benchmark_is_covered():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(LAST_LINE)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(LAST_LINE))
def test_benchmark_runs_at_smoke_size(script, tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.search(LAST_LINE[script], last), last


@pytest.mark.slow
def test_scale_sweep_runs_at_smoke_size(tmp_path):
    """bench_scale.py --sweep: every index setting's recall and latency, and the best one."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_scale.py"), "--sweep", "--smoke"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    rows = [line for line in lines if re.match(r"^(HNSW32|IVF128,Flat) +(efSearch|nprobe)=\d+ ", line)]
    assert len(rows) == 4, result.stdout
    for row in rows:  # recall of both query sets in [0, 1], then p50 / p95 ms
        assert re.search(r" (0|1)\.\d{3} +(0|1)\.\d{3} +\d+\.\d\d / \d+\.\d\d$", row), row
    assert re.fullmatch(r"sweep_best=(HNSW32 efSearch=\d+|IVF128,Flat nprobe=\d+|none)", lines[-1]), lines[-1]
