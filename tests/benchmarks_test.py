"""The search-step benchmark's tensor-memory report, at a tiny size."""

import importlib.util
import json
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
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


def test_search_report_splits_the_first_step_into_tracing_and_the_rest(monkeypatch, capsys):
    """The dense step's first step is mostly tracing and graph optimisation: the report
    gives the tracing apart, per method, under its own header."""
    _load("harness", monkeypatch)
    search_benchmark = _load("search_benchmark", monkeypatch)
    run = dict(step_times_s=[1.0, 2.0], median_s=1.5, second_step_s=1.2, build_s=8.0)
    run.update(peak_rss_mb=1500.0, baseline_rss_mb=700.0, step_increment_mb=800.0)
    run.update(graph_ops=7957, updated_weights=115, all_weights=1399)
    results = {
        "ista": {**run, "first_step_s": 7.2, "trace_s": 3.4},
        "darts": {**run, "first_step_s": 109.7, "trace_s": 49.6},
    }
    args = SimpleNamespace(batch_size=64, image_size=32, channels=16, layers=8, num_classes=10)
    args.breakdown, args.json = False, ""
    search_benchmark._print_report(results, args)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = rows[0].strip("| ").split(" | ")
    cells = {row.strip("| ").split(" | ")[0]: row.strip("| ").split(" | ") for row in rows}
    column = header.index("of it tracing s")
    assert header[column - 1] == "first step s"
    assert cells["ista (sparse)"][column - 1 : column + 1] == ["7.2", "3.4"]
    assert cells["darts (dense)"][column - 1 : column + 1] == ["109.7", "49.6"]
    assert all(len(cells[label]) == len(header) for label in cells if "PyTorch" in label)


@pytest.fixture
def published_benchmark(monkeypatch):
    """benchmarks/published_benchmark.py as a module; the stand-in published packages it
    registers are dropped afterwards."""
    _load("harness", monkeypatch)
    module = _load("published_benchmark", monkeypatch)
    yield module
    for name in [n for n in sys.modules if n == "ista_nas" or n.startswith("ista_nas.")]:
        del sys.modules[name]


def test_the_published_step_runs_exactly_the_support(published_benchmark):
    """As the published Trainer.sample_and_proj: off the support every op's weight is
    exactly 0 whatever the architecture code (MixedOp skips it), and at the code b = A z
    of z = 1 on the support the weights are z."""
    rng = np.random.default_rng(0)
    num_ops = 7
    bases = [rng.random((7, (i + 2) * num_ops)) for i in range(4)]
    supports = [[1, 9], [18, 19], [8, 16], [13, 5]]
    matrices, bias = published_benchmark.support_projections(bases, supports, num_ops)
    biases = np.split(bias.reshape(-1), np.cumsum([m.shape[1] for m in matrices])[:-1])
    for base, matrix, node_bias, support in zip(bases, matrices, biases, supports):
        off = np.setdiff1d(np.arange(matrix.shape[1]), support)
        code = rng.normal(size=matrix.shape[0]).astype(np.float32)
        weights = code @ matrix - node_bias  # the published proj_alphas
        assert np.all(weights[off] == 0.0) and np.all(weights[support] != 0.0)
        z = np.zeros(matrix.shape[1])
        z[support] = 1.0
        consistent = (base @ z).astype(np.float32) @ matrix - node_bias
        np.testing.assert_allclose(consistent, z, atol=1e-4)


def test_published_modules_load_without_their_packages_init(published_benchmark, tmp_path):
    """The published packages' __init__ files import torchvision and MOSEK; the module the
    step needs loads without running them, relative imports included."""
    search = tmp_path / "ista_nas" / "search"
    (search / "models").mkdir(parents=True)
    for package in (tmp_path / "ista_nas", search, search / "models"):
        (package / "__init__.py").write_text("raise ImportError('torchvision')\n")
    (search / "operations.py").write_text("OPS = {'skip_connect': 1}\n")
    (search / "models" / "model_search.py").write_text(
        "from ..operations import OPS\nN = len(OPS)\n"
    )
    module = published_benchmark.import_published(
        str(tmp_path), "ista_nas.search.models.model_search"
    )
    assert module.N == 1


def test_a_directory_that_is_not_the_published_code_is_named(
    published_benchmark, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "argv", ["published_benchmark.py", "--published_repo", str(tmp_path)])
    with pytest.raises(SystemExit):
        published_benchmark.main()
    assert (
        f"--published_repo='{tmp_path}' is not a checkout of the published"
        in capsys.readouterr().err
    )


def test_published_report_gives_ours_over_published(published_benchmark, capsys):
    run = dict(first_step_s=10.0, build_s=2.0, rss_file_mb=100.0, load_before=1.0, load_after=1.0)
    published = {**run, "code": "published (torch 2.13.0+cpu, 2 threads)"}
    results = {
        "configs": {
            "search": {
                "ours": [{**run, "median_s": 0.6, "peak_rss_mb": 1500.0}],
                "published": [{**published, "median_s": 3.0, "peak_rss_mb": 1400.0}],
            },
            "evaluation": {
                "ours": [{**run, "median_s": 0.5, "peak_rss_mb": 1600.0}],
                "published": [{**published, "median_s": 4.0, "peak_rss_mb": 1600.0}],
            },
        },
        "supports": {"normal": [[0, 1]] * 4, "reduce": [[0, 1]] * 4},
    }
    args = SimpleNamespace(batch_size=64, image_size=32, channels=16, layers=8, rounds=1, json="")
    published_benchmark._print_report(results, args)
    rows = [line for line in capsys.readouterr().out.splitlines() if "ours / published" in line]
    assert rows == [
        "| search | ours / published | 0.20 | 1.00 | 1.00 | 1.07 | 1.00 | |",
        "| evaluation | ours / published | 0.12 | 1.00 | 1.00 | 1.00 | 1.00 | |",
    ]


def test_an_unknown_configuration_is_named(published_benchmark, monkeypatch, capsys):
    argv = ["published_benchmark.py", "--published_repo", "/x", "--configs", "search,eval"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        published_benchmark.main()
    assert "--configs: unknown ['eval']; valid: search, evaluation" in capsys.readouterr().err


def test_trace_seconds_traces_the_step_its_first_call_then_reuses(monkeypatch):
    """The workers' ``trace s`` is the first step's tracing: timing it must not add a
    trace, or the first call would be measured without its own."""
    harness = _load("harness", monkeypatch)
    step = tf.function(lambda x: x * 2.0)
    seconds = harness.trace_seconds(step, tf.ones([3]))
    assert seconds > 0 and step.experimental_get_tracing_count() == 1
    assert float(tf.reduce_sum(step(tf.ones([3])))) == 6.0
    assert step.experimental_get_tracing_count() == 1
