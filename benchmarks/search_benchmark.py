"""Search-step cost: the sparse ISTA-NAS super-net against the dense DARTS super-net.

Issue 5's acceptance: one search step (an architecture step then a weight step, as in
``SearchNetwork.train_step``) at batch 64, 32x32 images, C = 16, 8 cells, 10 classes,
of the sparse super-net (``method="ista"``: each node runs only its k = 2 supported ops)
against the dense DARTS super-net (``method="darts"``: every edge runs all 7 ops), in
the same run on this CPU. Targets: sparse step time <= 0.1x the dense one, and sparse
peak memory <= 0.3x the dense one. For comparison, the published PyTorch code on a
machine of this kind: sparse 1.8 s/step, dense 22 s/step, peak memory 1.4 GB against
9.2 GB.

The step is built as the training loop builds it (``istanas_tf.training``): the model
and both optimizers as ``training.builders`` makes them for a ``TwoStageRun`` (default
strategy scope, TorchSGD 0.1 / momentum 0.9 / L2 3e-4 / clip 5, TorchAdam 6e-4 / 0.5 /
0.999 / L2 1e-3, first recovery), and the step as ``steps.distributed_step`` traces it
(a ``tf.function`` running ``strategy.run(model.train_step)`` and returning the
metrics), each step's metrics read
back to Python floats as the loop does. Data: random images (N(0, 1)) and labels
(uniform over 10 classes) from fixed seeds, one weight batch and one architecture batch
reused every step.

Each method runs in its own subprocess, so that its peak memory is its own. Per method:
2 warm-up steps (the first includes tracing), then ``--steps`` timed steps.

Command (from the repository root; about 3 minutes on 2 cores, ~0.5 for ista and ~2.5
for darts, of which ~2 are the dense step's first step: tracing its ~80k-op graph
(~40-50 s) and its first call (~60-90 s, most of it TensorFlow's graph optimisation)):

    python benchmarks/search_benchmark.py

``--methods ista`` alone takes about half a minute.

Options: ``--batch_size 64 --channels 16 --layers 8 --image_size 32``,
``--steps ista=5,darts=3`` (or one number for every method), ``--methods ista,darts``,
``--breakdown`` (also time the architecture step, the weight step and a training-mode
forward pass separately, each in its own ``tf.function``), ``--tensor_memory`` (see
below).

Reading the output (a markdown table, one row per method, then the ratios):

- ``s/step (median)``: median wall time of the timed steps (arch + weight step).
- ``first step s``: the first step as an epoch's: tracing, then the first call, where
  TensorFlow optimises the traced graph before running it; ``of it tracing s``: the
  tracing alone; ``2nd step s``: the second warm-up step.
- ``build s``: constructing and building the super-net (all candidate ops' weights),
  the optimizers' slots and the first recovery.
- ``peak RSS MB``: ``ru_maxrss`` of the subprocess at the end: its whole peak resident
  memory (Python, TensorFlow, weights, optimizer slots, step activations).
- ``baseline RSS MB``: resident memory after imports, model build and data creation,
  before the first step.
- ``step peak +MB``: the peak resident memory during the steps minus that baseline
  (the peak is reset with ``/proc/self/clear_refs`` before the first step): the memory
  the training step itself needs (activations, gradients, graph).
- ``graph ops``: operations in the traced step graph (shows whether inactive candidate
  ops are traced: the sparse graph should be ~7x smaller in the cells).
- ``updated weights``: weight variables the weight step updates.
- ``tensor peak MB``: the most memory TensorFlow's CPU allocator held for tensors at
  once during the timed steps (and, with ``--breakdown``, during each part's timed
  calls). It separates the step's own data (activations kept for the backward pass,
  gradients) from the process's fixed cost (TensorFlow, the Keras objects, the traced
  and optimised graphs, freed memory the C allocator keeps). Only TensorFlow's BFC
  allocator counts: TensorFlow runs it with oneDNN's kernels (the benchmarks' default,
  as the command line's); ``--tensor_memory`` forces it (``TF_CPU_ALLOCATOR_USE_BFC``)
  when oneDNN is off, whose times and RSS are then not those of a run without the flag.
- ratios sparse / dense for the median step time (target <= 0.1), peak RSS (target
  <= 0.3) and the step's memory increment, next to the published PyTorch ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (benchmarks/harness.py, beside this file)

METHODS = ("ista", "darts")
DEFAULT_STEPS = {"ista": 5, "darts": 3}
WARMUP_STEPS = 2
RESULT_PREFIX = "SEARCH_BENCHMARK_RESULT "
PUBLISHED = {
    "ista": {"s_per_step": 1.8, "peak_mb": 1400.0},
    "darts": {"s_per_step": 22.0, "peak_mb": 9200.0},
}
TARGET_TIME_RATIO = 0.1
TARGET_MEMORY_RATIO = 0.3


# ---------------------------------------------------------------------------- memory
def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


_max_rss_mb = harness.peak_rss_mb


# ---------------------------------------------------------------------------- worker
def build_step(args: argparse.Namespace, method: str = "ista"):
    """The super-net, its traced search step and its two batches, as TwoStageRun makes
    them. Returns ``(model, train_fn, weights_batch, arch_batch, build seconds)``."""
    import tensorflow as tf

    from istanas_tf import search_model
    from istanas_tf.training import builders, runtime
    from istanas_tf.training import config as config_lib
    from istanas_tf.training import steps as steps_lib

    tf.random.set_seed(args.seed)
    build_start = time.perf_counter()
    # As TwoStageRun.__init__ with the default strategy and the default TwoStageConfig:
    # the super-net (its first architecture recovered) and both optimizers.
    strategy = runtime.make_strategy("default")
    config = config_lib.TwoStageConfig(
        model_dir="unused",
        network=search_model.SearchNetworkConfig(
            channels=args.channels, layers=args.layers, method=method, seed=args.seed
        ),
    )
    with strategy.scope():
        model = builders.search_network(
            config.network,
            args.num_classes,
            args.image_size,
            replicas=strategy.num_replicas_in_sync,
        )
        model.compile(
            builders.weight_optimizer(config.loop),
            builders.architecture_optimizer(config.arch, None),
        )
    build_s = time.perf_counter() - build_start

    shape = [args.batch_size, args.image_size, args.image_size, 3]
    seeds = tf.constant([[args.seed, i] for i in range(4)], tf.int32)
    weights_batch = (
        tf.random.stateless_normal(shape, seeds[0]),
        tf.random.stateless_uniform([args.batch_size], seeds[1], 0, args.num_classes, tf.int32),
    )
    arch_batch = (
        tf.random.stateless_normal(shape, seeds[2]),
        tf.random.stateless_uniform([args.batch_size], seeds[3], 0, args.num_classes, tf.int32),
    )

    # As TwoStageRun._trace_steps / _run_epoch.
    train_fn = steps_lib.distributed_step(strategy, lambda w, a: model.train_step((w, a)), model)
    return model, train_fn, weights_batch, arch_batch, build_s


def _tensor_peak_mb(reset: bool = False) -> float | None:
    """TensorFlow's CPU allocator's peak since the last reset, in MB (None unless the
    process runs on the BFC allocator: with oneDNN, or --tensor_memory); ``reset``
    starts anew."""
    import tensorflow as tf

    try:
        if reset:
            tf.config.experimental.reset_memory_stats("CPU:0")
            return None
        return tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20
    except ValueError:  # "Allocator stats not available": the default allocator
        return None


def _worker(args: argparse.Namespace) -> dict:
    """Builds one super-net like TwoStageRun, times its traced search step, measures memory."""
    import numpy as np
    import tensorflow as tf  # noqa: F401  (imported before measuring)

    from istanas_tf.training import builders  # noqa: F401  (imported before measuring)

    method = args.worker
    rss_after_imports = harness.proc_status_mb("VmRSS")
    model, train_fn, weights_batch, arch_batch, build_s = build_step(args, method)

    def step(first: bool = False) -> float:
        start = time.perf_counter()
        outputs = harness.call_step(train_fn, weights_batch, arch_batch, first=first)
        logs = {k: float(v) for k, v in outputs.items()}
        seconds = time.perf_counter() - start
        bad = {k: v for k, v in logs.items() if not np.isfinite(v)}
        if bad:
            raise RuntimeError(f"{method}: non-finite training values {bad}")
        return seconds

    baseline_rss = harness.proc_status_mb("VmRSS")
    peak_before_steps = _max_rss_mb()
    peak_reset = _reset_peak_rss()

    trace_s = harness.trace_seconds(train_fn, weights_batch, arch_batch)
    warmup = [step(first=i == 0) for i in range(WARMUP_STEPS)]  # as an epoch's steps
    _tensor_peak_mb(reset=True)
    timed = [step() for _ in range(args.steps)]
    tensor_peak = _tensor_peak_mb()

    step_peak = harness.proc_status_mb("VmHWM") if peak_reset else None
    graph = train_fn.get_concrete_function(weights_batch, arch_batch).graph
    result = {
        "method": method,
        "build_s": build_s,
        # The first step as an epoch's: tracing, then the first call.
        "first_step_s": trace_s + warmup[0],
        "trace_s": trace_s,
        "second_step_s": warmup[1] if len(warmup) > 1 else None,
        "step_times_s": timed,
        "median_s": statistics.median(timed),
        "tracing_count": train_fn.experimental_get_tracing_count(),
        "graph_ops": len(graph.get_operations()),
        "updated_weights": len(model.active_weight_variables()),
        "all_weights": len(model.weight_variables),
        "weight_parameters": int(sum(np.prod(v.shape) for v in model.weight_variables)),
        "rss_after_imports_mb": rss_after_imports,
        "baseline_rss_mb": baseline_rss,
        "peak_before_steps_mb": peak_before_steps,
        "step_peak_rss_mb": step_peak,
        "step_increment_mb": (
            None if step_peak is None or baseline_rss is None else step_peak - baseline_rss
        ),
        "peak_rss_mb": _max_rss_mb(),
        # Mapped files' pages (the libraries' code): not freed while they stay loaded.
        "rss_file_mb": harness.proc_status_mb("RssFile"),
        "tensor_peak_mb": tensor_peak,
        "supports": {k: [list(s) for s in v] for k, v in model.supports.items()},
    }
    if args.breakdown:
        result["breakdown"] = _breakdown(model, weights_batch, arch_batch, args.steps)
    return result


def _breakdown(model, weights_batch, arch_batch, steps: int) -> dict:
    """Median times of the architecture step, the weight step and a forward pass.

    Each part is its own ``tf.function`` made of the same code as ``train_step``; the
    optimizers really step (the benchmark's numbers above are already taken).
    """
    import tensorflow as tf

    from istanas_tf.search_steps import apply_present_gradients as _apply

    @tf.function
    def forward(images):
        return model(images, training=True)

    @tf.function
    def arch_step(images, labels):
        arch_vars = model.architecture_variables
        with tf.GradientTape() as tape:
            _, loss = model._loss(labels, model(images, training=True))
        _apply(model.arch_optimizer, tape.gradient(loss, arch_vars), arch_vars)
        return loss

    @tf.function
    def weight_step(images, labels):
        weight_vars = model.active_weight_variables()
        with tf.GradientTape() as tape:
            _, loss = model._loss(labels, model(images, training=True))
        _apply(model.optimizer, tape.gradient(loss, weight_vars), weight_vars)
        return loss

    parts = {
        "forward (training mode)": (forward, weights_batch[0]),
        "architecture step": (arch_step, *arch_batch),
        "weight step": (weight_step, *weights_batch),
    }
    out = {}
    for name, (fn, *fn_args) in parts.items():
        start = time.perf_counter()
        fn(*fn_args).numpy()
        first = time.perf_counter() - start
        fn(*fn_args).numpy()  # one more warm-up, then the timed calls
        _tensor_peak_mb(reset=True)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn(*fn_args).numpy()
            times.append(time.perf_counter() - start)
        out[name] = {
            "first_s": first,
            "median_s": statistics.median(times),
            "tensor_peak_mb": _tensor_peak_mb(),
            "graph_ops": len(fn.get_concrete_function(*fn_args).graph.get_operations()),
        }
    return out


# ---------------------------------------------------------------------------- parent
def _parse_steps(text: str, methods) -> dict[str, int]:
    if "=" not in text:
        return {m: int(text) for m in methods}
    steps = dict(DEFAULT_STEPS)
    for part in text.split(","):
        name, value = part.split("=")
        steps[name.strip()] = int(value)
    return steps


def _run_method(method: str, steps: int, args: argparse.Namespace) -> dict:
    extra = ["--steps", str(steps)] + (["--breakdown"] if args.breakdown else [])
    extra += ["--tensor_memory"] if args.tensor_memory else []
    print(
        f"[{method}] running {steps} timed steps after {WARMUP_STEPS} warm-up steps ...",
        file=sys.stderr,
        flush=True,
    )
    result, wall, process = harness.run_worker(__file__, method, args, extra, RESULT_PREFIX)
    if result is not None:
        result["subprocess_wall_s"] = wall
        print(f"[{method}] done in {wall:.0f} s", file=sys.stderr, flush=True)
        return result
    sys.stderr.write(process.stdout[-5000:] + process.stderr[-5000:])
    raise RuntimeError(f"the {method} subprocess failed (exit code {process.returncode})")


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(results, key: str):
    if "ista" not in results or "darts" not in results:
        return None
    sparse, dense = results["ista"].get(key), results["darts"].get(key)
    if sparse is None or not dense:
        return None
    return sparse / dense


def _print_report(results: dict, args: argparse.Namespace) -> None:
    import tensorflow as tf  # only for the version line

    print(
        f"\nSearch step (architecture step + weight step), batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, C = {args.channels}, {args.layers} cells, "
        f"{args.num_classes} classes; {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__} ({harness.cpu_kernels()}); "
        f"{WARMUP_STEPS} warm-up steps, then the timed steps\n"
    )
    print(
        "| method | timed steps | s/step (median) | min-max s | first step s "
        "| of it tracing s | 2nd step s | build s | peak RSS MB | baseline RSS MB "
        "| step peak +MB | graph ops | updated weights | tensor peak MB |"
    )
    print("| --- |" + " ---: |" * 13)
    for method, r in results.items():
        label = {"ista": "ista (sparse)", "darts": "darts (dense)"}.get(method, method)
        times = r["step_times_s"]
        print(
            f"| {label} | {len(times)} | {r['median_s']:.3f} | "
            f"{min(times):.2f}-{max(times):.2f} | {r['first_step_s']:.1f} | "
            f"{_fmt(r.get('trace_s'), '.1f')} | {_fmt(r['second_step_s'])} | "
            f"{r['build_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{_fmt(r['baseline_rss_mb'], '.0f')} | {_fmt(r['step_increment_mb'], '.0f')} | "
            f"{r['graph_ops']} | {r['updated_weights']}/{r['all_weights']} | "
            f"{_fmt(r.get('tensor_peak_mb'), '.0f')} |"
        )
    for method, published in PUBLISHED.items():
        label = {"ista": "published PyTorch, sparse", "darts": "published PyTorch, dense"}
        print(
            f"| {label[method]} | - | {published['s_per_step']:.1f} | - | - | - | - | - | "
            f"{published['peak_mb']:.0f} | - | - | - | - | - |"
        )

    time_ratio = _ratio(results, "median_s")
    peak_ratio = _ratio(results, "peak_rss_mb")
    inc_ratio = _ratio(results, "step_increment_mb")
    if time_ratio is not None:
        pub_t = PUBLISHED["ista"]["s_per_step"] / PUBLISHED["darts"]["s_per_step"]
        pub_m = PUBLISHED["ista"]["peak_mb"] / PUBLISHED["darts"]["peak_mb"]
        verdict = lambda ratio, target: "meets" if ratio <= target else "MISSES"
        print("\n| ratio sparse / dense | this run | target | verdict | published PyTorch |")
        print("| --- | ---: | ---: | --- | ---: |")
        print(
            f"| step time (median) | {time_ratio:.3f} | <= {TARGET_TIME_RATIO} | "
            f"{verdict(time_ratio, TARGET_TIME_RATIO)} | {pub_t:.3f} |"
        )
        print(
            f"| peak RSS | {peak_ratio:.3f} | <= {TARGET_MEMORY_RATIO} | "
            f"{verdict(peak_ratio, TARGET_MEMORY_RATIO)} | {pub_m:.3f} |"
        )
        if inc_ratio is not None:
            print(
                f"| step memory increment (peak - baseline) | {inc_ratio:.3f} | "
                f"(<= {TARGET_MEMORY_RATIO}) | {verdict(inc_ratio, TARGET_MEMORY_RATIO)} "
                f"| - |"
            )

    if args.breakdown:
        print(
            "\n| method | part | first call s (tracing) | median s | graph ops | tensor peak MB |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for method, r in results.items():
            for part, b in r.get("breakdown", {}).items():
                print(
                    f"| {method} | {part} | {b['first_s']:.1f} | {b['median_s']:.3f} | "
                    f"{b['graph_ops']} | {_fmt(b.get('tensor_peak_mb'), '.0f')} |"
                )
    harness.save_results(args, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_network_arguments(parser)
    steps_help = "timed steps after 2 warm-up steps: N, or method=N pairs (ista=5,darts=3)"
    parser.add_argument("--steps", default="ista=5,darts=3", help=steps_help)
    parser.add_argument("--methods", default="ista,darts", help="methods, each in a process")
    parser.add_argument("--breakdown", action="store_true", help="also time the step's parts")
    parser.add_argument(
        "--tensor_memory",
        action="store_true",
        help="report the peak memory of tensors with oneDNN off too (runs TF's BFC allocator; "
        "see above)",
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.tensor_memory:  # read when TensorFlow starts, which it has not yet
            os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
        args.steps = int(args.steps)
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        result = _worker(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; valid: {', '.join(METHODS)}")
    steps = _parse_steps(args.steps, methods)
    if any(steps[m] < 1 for m in methods):
        parser.error("--steps must be >= 1")
    results = {m: _run_method(m, steps[m], args) for m in methods}
    _print_report(results, args)


if __name__ == "__main__":
    main()
