"""The search-step benchmark's tensor-memory report, at a tiny size."""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SEARCH_BENCHMARK = REPO_ROOT / "benchmarks" / "search_benchmark.py"
TINY = ["--channels", "4", "--layers", "3", "--batch_size", "8", "--steps", "1"]


def test_tensor_peak_is_reported_only_where_the_allocator_counts(tmp_path):
    """With --tensor_memory the worker runs on TF's BFC allocator and reports the step's
    tensor peak: above zero and within the process's whole peak. The allocator the tests
    run on keeps no statistics: the report is then empty, not zero."""
    sys.path.insert(0, str(SEARCH_BENCHMARK.parent))
    try:
        import search_benchmark
    finally:
        sys.path.remove(str(SEARCH_BENCHMARK.parent))
    assert search_benchmark._tensor_peak_mb() is None

    raw = tmp_path / "results.json"
    command = [sys.executable, str(SEARCH_BENCHMARK), "--methods", "ista", "--tensor_memory"]
    process = subprocess.run(
        command + TINY + ["--json", str(raw)], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(raw.read_text())["ista"]
    assert 0 < result["tensor_peak_mb"] < result["peak_rss_mb"]
    header = next(line for line in process.stdout.splitlines() if line.startswith("| method"))
    assert header.rstrip().endswith("| tensor peak MB |")
