"""training/host_memory.py: the C allocator's free pages go back to the system while a
block runs, and an epoch's first step runs inside that block."""

import contextlib
import pathlib
import subprocess
import sys
import threading
import types

import pytest

from istanas_tf.training import host_memory, steps

MODULE = pathlib.Path(host_memory.__file__)

# A fresh interpreter (no TensorFlow, no other threads) frees 40 MB in the middle of
# glibc's heap, where free() never returns it, then reads its resident memory before,
# during and after the block. The module is loaded from its file: importing istanas_tf
# would bring TensorFlow's allocations into the measurement.
_FREED_IN_THE_HEAP = """
import ctypes, ctypes.util, importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[1])
host_memory = importlib.util.module_from_spec(spec); spec.loader.exec_module(host_memory)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # free() itself never trims
libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)  # 64 KB blocks come from the heap
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
blocks = [libc.malloc(64 << 10) for _ in range(640)]
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
pin = libc.malloc(64 << 10)  # above the freed blocks: the heap's top stays in use
for block in blocks:
    libc.free(block)
freed = rss_mb()
time.sleep(0.3)
untouched = rss_mb()
with host_memory.returning_freed_memory(period_s=0.01):
    deadline = time.monotonic() + 10
    while rss_mb() > freed - 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    during = rss_mb()
print(json.dumps({"freed": freed, "untouched": untouched, "during": during}))
"""


@pytest.mark.skipif(not host_memory.available(), reason="needs glibc's malloc_trim")
def test_free_pages_in_the_heap_go_back_while_the_block_runs():
    process = subprocess.run(
        [sys.executable, "-c", _FREED_IN_THE_HEAP, str(MODULE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    rss = __import__("json").loads(process.stdout)
    # Without the block, glibc keeps the 40 MB; inside it, the background thread gives
    # them back before the block ends.
    assert rss["untouched"] > rss["freed"] - 5, rss
    assert rss["during"] <= rss["freed"] - 30, rss


def _trimmer_threads():
    return [t for t in threading.enumerate() if t.name == "malloc_trim"]


@pytest.mark.skipif(not host_memory.available(), reason="needs glibc's malloc_trim")
def test_the_thread_stops_and_the_error_passes_when_the_block_fails():
    with pytest.raises(ValueError, match="step failed"):
        with host_memory.returning_freed_memory(period_s=0.001):
            assert len(_trimmer_threads()) == 1
            raise ValueError("step failed")
    assert _trimmer_threads() == []


def test_without_malloc_trim_the_block_just_runs(monkeypatch):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    with host_memory.returning_freed_memory():
        assert _trimmer_threads() == []
        ran = True
    assert ran


def _recording_context(inside):
    @contextlib.contextmanager
    def context():
        inside.append(True)
        try:
            yield
        finally:
            inside.append(False)

    return context


def test_an_epochs_first_step_runs_inside_the_block_and_later_ones_outside(monkeypatch):
    inside = []
    monkeypatch.setattr(host_memory, "returning_freed_memory", _recording_context(inside))
    seen = []

    def step_fn(batch):
        seen.append((batch, bool(inside) and inside[-1]))
        return {"loss": 1.0}

    model = types.SimpleNamespace(metrics=[])
    steps.run_train_steps(step_fn, model, range(10), 3, epoch=0, model_dir="RUN", verbose=False)
    steps.run_eval_steps(step_fn, model, range(10), 2)
    assert seen == [(0, True), (1, False), (2, False), (0, True), (1, False)]
