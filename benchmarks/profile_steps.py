"""Where a training step's time goes, op type by op type (TF profiler trace).

Builds the sparse search step (``--step search``, as ``search_benchmark.py`` builds it)
or the evaluation network's training step (``--step eval``, as
``train_step_benchmark.py`` builds it), runs warm-up steps, then records ``--steps``
steps with ``tf.profiler.experimental`` and sums the host trace's op events by op type.
The trace stays in ``--logdir`` for TensorBoard's profile plugin (trace viewer).

Command (from the repository root; about a minute per step kind on 2 cores):

    python benchmarks/profile_steps.py --step eval
    python benchmarks/profile_steps.py --step search

Reading the output: per op type, the milliseconds per step summed over its calls
(``op ms/step``; CPU time: with 2 threads running ops side by side it may exceed the
wall time), the calls per step, the mean per call and the share of all op time. The
wall time per step measured outside the profiler is printed first.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import shutil
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (benchmarks/harness.py, beside this file)
import search_benchmark  # noqa: E402
import train_step_benchmark  # noqa: E402

# Events of the executor and function runtime that enclose op events.
ENCLOSING = ("Process", "Run", "__inference", "ExecutorState", "FunctionRun")


def op_times(xspace_path: str) -> tuple[collections.Counter, collections.Counter]:
    """Milliseconds and calls per op type over the host plane of an ``.xplane.pb``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xspace_path, "rb") as trace:
        space.ParseFromString(trace.read())
    milliseconds, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Op events are named "op_name:OpType".
                if ":" not in name:
                    continue
                op_type = name.rsplit(":", 1)[1]
                if op_type.strip().startswith(ENCLOSING):
                    continue
                milliseconds[op_type] += event.duration_ps / 1e9
                calls[op_type] += 1
    return milliseconds, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_network_arguments(parser)
    parser.add_argument("--step", choices=("eval", "search"), default="eval")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=25, help="op types listed")
    parser.add_argument("--logdir", default="/tmp/istanas_profile", help="trace output")
    parser.add_argument("--drop_path", type=float, default=0.2, help="eval step's rate")
    args = parser.parse_args()
    import tensorflow as tf

    if args.step == "eval":
        model, train_fn, batch, _ = train_step_benchmark.build_step(args)
        model.drop_path_rate.assign(args.drop_path)
        batches = (batch,)
    else:
        _, train_fn, weights_batch, arch_batch, _ = search_benchmark.build_step(args)
        batches = (weights_batch, arch_batch)

    def step():
        return {k: float(v) for k, v in train_fn(*batches).items()}

    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    shutil.rmtree(args.logdir, ignore_errors=True)
    tf.profiler.experimental.start(args.logdir)
    for _ in range(args.steps):
        step()
    tf.profiler.experimental.stop()
    path = glob.glob(os.path.join(args.logdir, "**", "*.xplane.pb"), recursive=True)[0]
    milliseconds, calls = op_times(path)
    total = sum(milliseconds.values())
    print(
        f"\n{args.step} step: {statistics.median(times):.3f} s/step wall (median of 5, "
        f"load {harness.load_average():.1f}); op time {total / args.steps:.0f} ms/step over "
        f"{sum(calls.values()) // args.steps} op calls/step; trace in {args.logdir}\n"
    )
    print("| op type | op ms/step | calls/step | ms/call | share |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for op_type, ms in milliseconds.most_common(args.top):
        n = calls[op_type] / args.steps
        print(
            f"| {op_type} | {ms / args.steps:.1f} | {n:.0f} | {ms / calls[op_type]:.2f} "
            f"| {100 * ms / total:.1f} % |"
        )


if __name__ == "__main__":
    main()
