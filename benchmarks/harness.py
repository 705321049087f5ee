"""What the step benchmarks share: network-size flags and a worker per subprocess.

Each configuration runs in a fresh process (``--worker NAME``), so its first step
includes tracing and its memory is its own; the worker prints one line
``<prefix><json result>`` that the parent reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

# The command line's CPU kernels (train/main.py turns oneDNN on unless told otherwise),
# set before any script imports TensorFlow; workers inherit it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NETWORK_FLAGS = ("batch_size", "channels", "layers", "image_size", "num_classes", "seed")


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's shape: batch 64 of 32x32 images, C = 16, 8 cells, 10 classes."""
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the raw results here")


def save_results(args: argparse.Namespace, results: dict) -> None:
    """Writes the raw results to ``--json`` when it is given."""
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the CPUs), if known."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_kernels() -> str:
    """Which CPU kernels this process's TensorFlow runs, for the reports' header."""
    from istanas_tf.training import runtime

    return {True: "oneDNN kernels", False: "TF's own kernels (oneDNN off)"}.get(
        runtime.onednn_enabled(), "kernels unknown"
    )


def proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, RssFile) in MB, None where
    unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory (``ru_maxrss``) in MB."""
    import resource

    # ru_maxrss is in kB on Linux (bytes on macOS).
    scale = 1.0 / (1024 * 1024) if sys.platform == "darwin" else 1.0 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_worker(
    script: str,
    name: str,
    args: argparse.Namespace,
    extra: list[str],
    prefix: str,
    library: str | None = None,
    env_overrides: dict[str, str] | None = None,
    python: str | None = None,
) -> tuple[dict | None, float, subprocess.CompletedProcess]:
    """Runs ``script --worker name`` with the network flags of ``args`` and ``extra``.

    Args:
      library: a checkout whose ``istanas_tf`` the worker imports instead of the
        installed one (put first on PYTHONPATH): to measure another commit's code with
        this commit's benchmark, in the same run.
      env_overrides: environment variables set for the worker only (e.g.
        ``TF_ENABLE_ONEDNN_OPTS=0`` for a baseline on TensorFlow's own kernels).
      python: the interpreter to run it with (default: this one), e.g. a virtual
        environment with PyTorch for the published code.

    Returns:
      ``(result or None if the worker printed none, wall seconds, the process)``.
    """
    command = [python or sys.executable, os.path.abspath(script), "--worker", name, *extra]
    for flag in NETWORK_FLAGS:
        command += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, **(env_overrides or {})}
    if library:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(library), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    for line in process.stdout.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix) :]), wall, process
    return None, wall, process


def run_configuration(
    label: str,
    script: str,
    name: str,
    args: argparse.Namespace,
    extra: list[str],
    prefix: str,
    **worker_options,
) -> dict:
    """:func:`run_worker` for one configuration of a same-run comparison: progress on
    stderr, the load average before and after, the wall time in the result; a worker
    that prints no result raises with the end of its output. ``worker_options``:
    ``library``, ``env_overrides``, ``python`` of :func:`run_worker`."""
    print(f"[{label}] ...", file=sys.stderr, flush=True)
    load_before = load_average()
    result, wall, process = run_worker(script, name, args, extra, prefix, **worker_options)
    if result is None:
        sys.stderr.write(process.stdout[-3000:] + process.stderr[-5000:])
        raise RuntimeError(f"{label} failed (exit {process.returncode})")
    result.update(load_before=load_before, load_after=load_average(), wall_s=wall)
    print(f"[{label}] {result['median_s']:.3f} s/step, {wall:.0f} s", file=sys.stderr, flush=True)
    return result


def median(runs: list[dict], key: str):
    """The median of ``key`` over the runs that report it (None if none does)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def trace_seconds(step_fn, *batches) -> float:
    """Seconds to trace the ``tf.function`` ``step_fn`` for ``batches``: the part of its
    first step that is tracing. Its first call then reuses the trace and runs the rest
    (grappler's passes, the first execution)."""
    start = time.perf_counter()
    step_fn.get_concrete_function(*batches)
    return time.perf_counter() - start


def call_step(step_fn, *batches, first: bool):
    """``step_fn(*batches)`` as an epoch of the library calls its steps
    (``training.steps.call_step``: the first inside the freed-memory return); a plain
    call on checkouts from before it, so a baseline's worker measures that code."""
    from istanas_tf.training import steps

    epoch_call = getattr(steps, "call_step", None)
    return epoch_call(step_fn, *batches, first=first) if epoch_call else step_fn(*batches)
