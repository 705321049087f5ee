"""The search-step benchmark's tensor-memory report, at a tiny size."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

from istanas_tf.training import runtime

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
TINY = ["--channels", "4", "--layers", "3", "--batch_size", "8", "--steps", "1"]


def _load(name: str, monkeypatch):
    """A benchmark script as a module; registered as an import would (the scripts import
    ``harness`` beside them by name)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_no_tensor_peak_where_the_allocator_keeps_no_statistics(monkeypatch):
    """TF's CPU allocator without oneDNN counts nothing: the report is empty, not 0."""
    _load("harness", monkeypatch)
    search_benchmark = _load("search_benchmark", monkeypatch)

    def no_statistics(device):
        raise ValueError(f"Allocator stats not available on {device}")  # TF's words

    monkeypatch.setattr(tf.config.experimental, "get_memory_info", no_statistics)
    monkeypatch.setattr(tf.config.experimental, "reset_memory_stats", no_statistics)
    assert search_benchmark._tensor_peak_mb(reset=True) is None
    assert search_benchmark._tensor_peak_mb() is None


def test_tensor_peak_is_counted_with_onednn(monkeypatch):
    """With oneDNN's kernels (the tests' and the command line's) TensorFlow runs its BFC
    allocator, which counts: a tensor held raises the peak by at least its size."""
    _load("harness", monkeypatch)
    search_benchmark = _load("search_benchmark", monkeypatch)
    if not runtime.onednn_enabled():
        pytest.skip("oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0): TF's allocator counts nothing")
    search_benchmark._tensor_peak_mb(reset=True)
    held = tf.ones([4, 2**20])  # 16 MB
    assert search_benchmark._tensor_peak_mb() >= 16
    del held


@pytest.mark.slow  # ~40 s: a worker process builds and traces a tiny super-net
def test_tensor_peak_is_reported_on_the_bfc_allocator(tmp_path):
    """With --tensor_memory the worker runs on TF's BFC allocator and reports the step's
    tensor peak: above zero and within the process's whole peak."""
    raw = tmp_path / "results.json"
    command = [sys.executable, str(BENCHMARKS / "search_benchmark.py"), "--methods", "ista"]
    process = subprocess.run(
        command + ["--tensor_memory", *TINY, "--json", str(raw)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(raw.read_text())["ista"]
    assert 0 < result["tensor_peak_mb"] < result["peak_rss_mb"]
    header = next(line for line in process.stdout.splitlines() if line.startswith("| method"))
    assert header.rstrip().endswith("| tensor peak MB |")
