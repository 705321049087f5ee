"""Training-step cost of the evaluation network, with and without ``--jit_compile`` (XLA).

Issue 7's benchmark: one training step of the evaluation network (genotype
``ISTA_twostage``, NetworkCIFAR, C = 16, 8 cells, 10 classes, batch 64, 32x32 images,
auxiliary head on with weight 0.4, drop path 0.2) on this CPU, once as a plain traced
graph and once with the per-replica step XLA-compiled. For comparison, the published
PyTorch code measured 1.0 s for this step on a machine of this kind.

The step is built as the retraining loop builds it (``retrain.TrainRun``): the
network as ``builders.evaluation_network`` makes it (``networks.build_network("cifar", ...,
auxiliary=True, seed=...)``), ``TorchSGD(0.025, momentum=0.9, l2=3e-4,
clip_global_norm=5.0)`` and ``model.compile(optimizer, auxiliary_weight=0.4)``, all
under the default strategy's scope; ``model.drop_path_rate`` set to 0.2 (the rate the
loop's linear ramp reaches at the last epoch); the step as ``TrainRun._step_fn`` makes
it: ``steps.distributed_step`` (a ``tf.function`` running
``strategy.run(model.train_step)`` and returning the metrics), with, for ``xla``,
``model.train_step`` first wrapped in ``tf.function(..., jit_compile=True)``. Each
step's metrics are read back to Python floats, as ``TrainRun._run_epoch`` does.

Data: one batch of random images (N(0, 1)) and labels (uniform over 10 classes) from a
fixed seed, reused every step; weights seeded too.

Each variant runs in its own subprocess (a fresh process, graph and XLA cache). Per
variant: 2 warm-up steps (the first includes tracing, and for ``xla`` the XLA
compilation; both are reported), then ``--steps`` timed steps, of which the median is
reported.

On CPU, expect XLA to be much slower per step than the plain graph: XLA's CPU backend
lowers the depthwise convolutions of the separable and dilated convs (grouped
convolutions) without TensorFlow's optimised (Eigen / oneDNN) kernels; a depthwise
3x3 or 5x5 forward+backward at 64x32x32x16 takes 0.1-0.3 s under XLA against 3-12 ms
as TensorFlow ops. ``--jit_compile`` is meant for GPUs and TPUs.

Command (from the repository root; about 3 minutes on 2 idle CPU cores):

    python benchmarks/train_step_benchmark.py

Options: ``--batch_size 64 --channels 16 --layers 8 --image_size 32 --num_classes 10
--drop_path 0.2 --steps 10 --variants graph,xla --seed 0 --json out.json``.

Reading the output (a markdown table, one row per variant):

- ``first step s``: the first call (tracing, and XLA compilation for ``xla``);
  ``2nd step s``: the second warm-up call.
- ``s/step (median)`` and ``min-max s``: over the ``--steps`` timed steps.
- ``vs PyTorch 1.0 s``: median / 1.0 s (below 1 is faster than the published code).
- ``vs graph``: the variant's median over the plain graph's median (for ``xla``: the
  XLA / no-XLA ratio; below 1 means XLA is faster).
- ``build s``: building the network (two forward passes), the optimizer and its slots.
- ``load avg before/after``: the 1-minute load average when the variant's subprocess
  started and ended; above the CPU count, other processes were competing for the
  CPUs and the times are inflated (rerun on an idle machine).

A variant whose subprocess fails (e.g. an op XLA cannot compile on this device) is
reported as a failed row with the end of its error, and the other variants still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (benchmarks/harness.py, beside this file)

VARIANTS = ("graph", "xla")
LABELS = {"graph": "tf.function (no XLA)", "xla": "tf.function + jit_compile (XLA)"}
WARMUP_STEPS = 2
PUBLISHED_S_PER_STEP = 1.0
RESULT_PREFIX = "TRAIN_STEP_BENCHMARK_RESULT "

# TrainConfig defaults for CIFAR.
LEARNING_RATE = 0.025
MOMENTUM = 0.9
WEIGHT_DECAY = 3e-4
GRAD_CLIP = 5.0
AUXILIARY_WEIGHT = 0.4
GENOTYPE = "ISTA_twostage"


# ---------------------------------------------------------------------------- worker
def build_step(args: argparse.Namespace, variant: str = "graph"):
    """The evaluation network, its traced training step and one batch, as TrainRun
    makes them. Returns ``(model, train_fn, batch, build seconds)``."""
    import keras
    import tensorflow as tf

    from istanas_tf import networks, optimizers
    from istanas_tf.training import runtime
    from istanas_tf.training import steps as steps_lib

    keras.utils.set_random_seed(args.seed)

    build_start = time.perf_counter()
    strategy = runtime.make_strategy("default")
    with strategy.scope():
        model = networks.build_network(
            "cifar",
            GENOTYPE,
            args.channels,
            args.layers,
            args.num_classes,
            args.image_size,
            auxiliary=True,
            bn_after_param_free_ops=False,
            seed=args.seed,
            name="network",
        )
        optimizer = optimizers.TorchSGD(
            LEARNING_RATE, momentum=MOMENTUM, l2=WEIGHT_DECAY, clip_global_norm=GRAD_CLIP
        )
        model.compile(optimizer, auxiliary_weight=AUXILIARY_WEIGHT, label_smoothing=0.0)
    model.drop_path_rate.assign(args.drop_path)
    build_s = time.perf_counter() - build_start

    shape = [args.batch_size, args.image_size, args.image_size, 3]
    batch = (
        tf.random.stateless_normal(shape, [args.seed, 0]),
        tf.random.stateless_uniform(
            [args.batch_size], [args.seed, 1], 0, args.num_classes, tf.int32
        ),
    )

    # As retrain.TrainRun._step_fn.
    step = model.train_step
    if variant == "xla":
        step = tf.function(step, jit_compile=True)
    train_fn = steps_lib.distributed_step(strategy, step, model)
    return model, train_fn, batch, build_s


def _worker(args: argparse.Namespace) -> dict:
    """Builds the evaluation network like TrainRun, times its traced training step."""
    import keras
    import numpy as np
    import tensorflow as tf

    from istanas_tf import network_size

    variant = args.worker
    model, train_fn, batch, build_s = build_step(args, variant)

    def timed_step(first: bool = False) -> float:
        start = time.perf_counter()
        logs = {k: float(v) for k, v in harness.call_step(train_fn, batch, first=first).items()}
        seconds = time.perf_counter() - start
        bad = {k: v for k, v in logs.items() if not np.isfinite(v)}
        if bad:
            raise RuntimeError(f"{variant}: non-finite training values {bad}")
        return seconds

    trace_s = harness.trace_seconds(train_fn, batch)
    warmup = [timed_step(first=i == 0) for i in range(WARMUP_STEPS)]  # as an epoch's steps
    times = [timed_step() for _ in range(args.steps)]
    return {
        "variant": variant,
        "build_s": build_s,
        # The first step as an epoch's: tracing, then the first call.
        "first_step_s": trace_s + warmup[0],
        "trace_s": trace_s,
        "second_step_s": warmup[1] if len(warmup) > 1 else None,
        "step_times_s": times,
        "median_s": statistics.median(times),
        "tracing_count": train_fn.experimental_get_tracing_count(),
        "graph_ops": len(train_fn.get_concrete_function(batch).graph.get_operations()),
        "parameters": network_size.count_parameters(model),
        "parameters_with_auxiliary": network_size.count_parameters(model, include_auxiliary=True),
        "drop_path_rate": float(model.drop_path_rate.numpy()),
        "peak_rss_mb": harness.peak_rss_mb(),
        # Mapped files' pages (the libraries' code): not freed while they stay loaded.
        "rss_file_mb": harness.proc_status_mb("RssFile"),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


# ---------------------------------------------------------------------------- parent
def _run_variant(variant: str, args: argparse.Namespace) -> dict:
    print(
        f"[{variant}] {WARMUP_STEPS} warm-up steps, then {args.steps} timed steps ...",
        file=sys.stderr,
        flush=True,
    )
    load_before = harness.load_average()
    result, wall, process = harness.run_worker(
        __file__,
        variant,
        args,
        ["--steps", str(args.steps), "--drop_path", str(args.drop_path)],
        RESULT_PREFIX,
    )
    load = {"load_before": load_before, "load_after": harness.load_average()}
    if result is not None:
        result.update(subprocess_wall_s=wall, **load)
        print(f"[{variant}] done in {wall:.0f} s", file=sys.stderr, flush=True)
        return result
    tail = (process.stdout[-3000:] + process.stderr[-6000:]).strip()
    print(
        f"[{variant}] FAILED (exit code {process.returncode}) after {wall:.0f} s:\n{tail}",
        file=sys.stderr,
        flush=True,
    )
    error_lines = [line.strip() for line in tail.splitlines() if line.strip()]
    summary = next(
        (line for line in reversed(error_lines) if "Error" in line),
        error_lines[-1] if error_lines else "no output",
    )
    return {
        "variant": variant,
        "failed": True,
        "returncode": process.returncode,
        "error": summary[:300],
        "error_tail": tail,
        "subprocess_wall_s": wall,
        **load,
    }


def _loads(result: dict) -> str:
    values = (result.get("load_before"), result.get("load_after"))
    return "/".join("-" if v is None else f"{v:.1f}" for v in values)


def _print_report(results: dict, args: argparse.Namespace) -> None:
    import tensorflow as tf  # only for the version line

    print(
        f"\nTraining step of the evaluation network ({GENOTYPE}, NetworkCIFAR), batch "
        f"{args.batch_size}, {args.image_size}x{args.image_size}, C = {args.channels}, "
        f"{args.layers} cells, {args.num_classes} classes, auxiliary head (weight "
        f"{AUXILIARY_WEIGHT}), drop path {args.drop_path}; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), "
        f"TensorFlow {tf.__version__} ({harness.cpu_kernels()}); "
        f"{WARMUP_STEPS} warm-up steps, then {args.steps} timed steps\n"
    )
    graph = results.get("graph")
    graph_median = None if graph is None or graph.get("failed") else graph["median_s"]
    print(
        "| variant | first step s (trace/compile) | 2nd step s | s/step (median) "
        "| min-max s | vs PyTorch 1.0 s | vs graph (XLA / no-XLA) | build s "
        "| load avg before/after |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, r in results.items():
        label = LABELS.get(variant, variant)
        if r.get("failed"):
            print(
                f"| {label} | FAILED: {r['error'].replace('|', '/')} | - | - | - | - | - "
                f"| - | {_loads(r)} |"
            )
            continue
        times = r["step_times_s"]
        versus = "-" if graph_median is None else f"{r['median_s'] / graph_median:.2f}"
        print(
            f"| {label} | {r['first_step_s']:.1f} | {r['second_step_s']:.2f} | "
            f"{r['median_s']:.3f} | {min(times):.3f}-{max(times):.3f} | "
            f"{r['median_s'] / PUBLISHED_S_PER_STEP:.2f} | {versus} | {r['build_s']:.1f} | "
            f"{_loads(r)} |"
        )
    print(f"| published PyTorch | - | - | {PUBLISHED_S_PER_STEP:.1f} | - | 1.00 | - | - | - |")
    ok = [r for r in results.values() if not r.get("failed")]
    if ok:
        print(
            f"\nParameters: {ok[0]['parameters'] / 1e6:.3f} M without the auxiliary head, "
            f"{ok[0]['parameters_with_auxiliary'] / 1e6:.3f} M with it; traces per "
            f"variant: " + ", ".join(f"{r['variant']} {r['tracing_count']}" for r in ok)
        )
    harness.save_results(args, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_network_arguments(parser)
    parser.add_argument("--drop_path", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up ones")
    parser.add_argument("--variants", default="graph,xla", help="variants, each in a process")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not 0 <= args.drop_path < 1:
        parser.error("--drop_path must be in [0, 1)")

    if args.worker:
        print(RESULT_PREFIX + json.dumps(_worker(args)), flush=True)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    results = {v: _run_variant(v, args) for v in variants}
    _print_report(results, args)
    if any(r.get("failed") for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
