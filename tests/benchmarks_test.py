"""The search-step benchmark's tensor-memory report, at a tiny size."""

import importlib.util
import json
import pathlib
import subprocess
import sys
from types import SimpleNamespace

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


def test_speed_report_gives_traced_ops_and_their_ratio(monkeypatch, capsys):
    """The traced step's op count is the one number of the report without noise: each
    code's median, and current / baseline, as for the times."""
    _load("harness", monkeypatch)
    speed_benchmark = _load("speed_benchmark", monkeypatch)
    run = dict(median_s=1.0, first_step_s=20.0, build_s=10.0, peak_rss_mb=1600.0)
    run.update(load_before=1.0, load_after=1.0)
    results = {
        "sparse search step": {
            "baseline": [{**run, "graph_ops": 11625}, {**run, "graph_ops": 11625}],
            "current": [{**run, "graph_ops": 9788}, {**run, "graph_ops": 9788}],
        }
    }
    args = SimpleNamespace(batch_size=64, image_size=32, channels=16, layers=8, rounds=2)
    args.baseline_env, args.json = {}, ""
    speed_benchmark._print_report(results, args)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert rows[0].split(" | ")[-2] == "traced ops"
    assert rows[2].split(" | ")[-2] == "11625" and rows[3].split(" | ")[-2] == "9788"
    assert rows[4].split(" | ")[-2] == "0.84"
