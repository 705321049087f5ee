"""Are old traces released? Live traced functions and RSS over a search whose support
changes every epoch.

The super-net runs only the ops of the current support, held as Python data, so each
recovery that changes the support makes the loop trace its step functions again
(docs/design.md decision 1). Over a long search the old traces must be released: this
benchmark runs ``--epochs`` epochs of a tiny search in which the support changes after
EVERY epoch and reports, after each epoch (``gc.collect()`` first):

- ``RSS MB``: VmRSS of /proc/self/status; ``peak MB``: VmHWM (the process's peak);
- live traced functions, counted with ``gc.get_objects()`` by TensorFlow class:
  ``Function`` (``tf.function`` objects), ``Concrete`` (ConcreteFunction), ``Atomic``
  (AtomicFunction), ``FuncGraph``; and ``runtime fns``: the functions registered in
  the eager context (``context.list_function_names()``, the C++ side of traces);
  ``gradient fns``: entries of TF's global gradient registry (``tf.custom_gradient``
  registers one per traced call, for good, with the traced graph in reach);
- ``traces``: the traces made so far by the run's step functions (the sum of
  ``experimental_get_tracing_count()`` over every step function the run has used).

Modes (each in a fresh subprocess, so the counts and the memory are its own):

- ``two_stage``: ``training.two_stage.TwoStageRun``, the command line's loop, as built
  by ``TwoStageConfig`` (run directory, checkpoints, metrics, TensorBoard included);
- ``one_stage``: ``training.one_stage.OneStageRun``'s search epochs (``search_epoch``),
  limits set so that no node stops and no architecture is rejected;
- ``fit``: ``SearchNetwork.fit`` with ``callbacks.SparseRecovery`` (Keras' train and
  test functions traced again through ``callbacks.retrace``).

The support changes every epoch because ``model.recover`` is replaced by a scripted
recovery (``ArchitectureEncoding.recovery_of`` of a z whose two largest entries rotate
by one candidate per epoch), committed by the loop's own code through
``SearchNetwork.commit``; everything else is the library's. Data: a generated folder
of random 8x8 PNGs (2 classes, 32 training and 8 test images per class), read through
``--dataset=folder:``; 2 training steps and 1 evaluation step per epoch, batch 8,
C = 4, 5 cells (``one_stage``: 32x32 images, which its auxiliary head needs).
``--replicas N`` runs it under ``MirroredStrategy`` on N logical CPUs (synchronized BN,
all-reduced gradients: what a multi-GPU search traces; each epoch is several times
slower to trace).

Command (from the repository root; on 2 cores most of an epoch is tracing, ~10-30 s,
so the default 30 epochs of one mode take ~5-15 min depending on the load):

    python benchmarks/memory_benchmark.py                      # --modes two_stage
    python benchmarks/memory_benchmark.py --modes two_stage,one_stage,fit --epochs 10
    python benchmarks/memory_benchmark.py --replicas 2 --epochs 8

Reading the output: one table per mode, a row per epoch, then a summary row per mode:
first and last epoch, and the growth per epoch fitted (least squares) over the epochs
after the second (the first epochs trace the recovery and Keras' own functions once).
Counts that stay flat mean the old traces are released; a count growing by 1-2 per
epoch means every epoch's trace is kept. RSS drifts with the allocator (glibc keeps
freed arenas; TF caches kernels), so read its growth per epoch against the graph
counts, not alone. ``--json PATH`` also writes every sample.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (benchmarks/harness.py, beside this file)

MODES = ("two_stage", "one_stage", "fit")
RESULT_PREFIX = "MEMORY_BENCHMARK_RESULT "
# The TensorFlow classes of a trace, short names for the table.
TRACE_CLASSES = {
    "Function": "Function",
    "ConcreteFunction": "Concrete",
    "AtomicFunction": "Atomic",
    "FuncGraph": "FuncGraph",
}
CLASSES, IMAGES_PER_CLASS, TEST_IMAGES_PER_CLASS = 2, 32, 8


# ---------------------------------------------------------------------------- worker
_status_mb = harness.proc_status_mb


def live_traces() -> dict[str, int]:
    """Live objects of each TensorFlow trace class (after ``gc.collect()``), and the
    functions registered in the eager context (``runtime fns``)."""
    from tensorflow.python.eager import context
    from tensorflow.python.framework import ops

    gc.collect()
    counts = collections.Counter({name: 0 for name in TRACE_CLASSES.values()})
    for obj in gc.get_objects():
        for cls in type(obj).__mro__:
            name = TRACE_CLASSES.get(cls.__name__)
            if name and cls.__module__.startswith("tensorflow."):
                counts[name] += 1
                break
    counts["runtime fns"] = len(context.context().list_function_names())
    counts["gradient fns"] = len(ops._gradient_registry._registry)  # no public API
    return dict(counts)


def _image_folder(root: str, image_size: int, seed: int) -> str:
    """A folder of random PNGs (``train/`` and ``test/``, one folder per class)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "images")
    for split, count in (("train", IMAGES_PER_CLASS), ("test", TEST_IMAGES_PER_CLASS)):
        for label in range(CLASSES):
            directory = os.path.join(folder, split, f"class{label}")
            os.makedirs(directory)
            for i in range(count):
                pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                tf.io.write_file(os.path.join(directory, f"{i}.png"), tf.io.encode_png(pixels))
    return folder


class RotatingRecovery:
    """Stands in for ``SearchNetwork.recover``: each call returns, per cell type, the
    recovery (``ArchitectureEncoding.recovery_of``) of a z whose two nonzero entries of
    node j sit at candidates ``(calls + j) mod n_j`` and the next one, so every node's
    support moves by one candidate per call."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self):
        import numpy as np

        self.calls += 1
        recoveries = {}
        for cell_type, encoding in self.model.architectures.items():
            z = np.zeros((encoding.steps, encoding.num_candidates[-1]))
            for node, candidates in enumerate(encoding.num_candidates):
                z[node, (self.calls + node) % candidates] = 2.0
                z[node, (self.calls + node + 1) % candidates] = 1.0
            recoveries[cell_type] = encoding.recovery_of(z)
        return recoveries


class _Recorder:
    """Per-epoch samples, and the traces of every step function the run has used (held
    by id and count only, so that the recorder keeps no trace alive)."""

    def __init__(self):
        self.samples: list[dict] = []
        self.tracing_counts: dict[int, int] = {}
        self.start = time.perf_counter()

    def note_functions(self, *functions) -> None:
        for function in functions:
            count = getattr(function, "experimental_get_tracing_count", None)
            if count is not None:
                self.tracing_counts[id(function)] = count()

    def sample(self, epoch: int, support_changed: bool) -> None:
        now = time.perf_counter()
        self.samples.append(
            {
                "epoch": epoch + 1,
                "epoch_s": now - self.start,
                "support_changed": bool(support_changed),
                "rss_mb": _status_mb("VmRSS"),
                "peak_mb": _status_mb("VmHWM"),
                "traces": sum(self.tracing_counts.values()),
                **live_traces(),
            }
        )
        # Progress on stderr, which the parent keeps (and shows if the worker fails).
        print("epoch sample", json.dumps(self.samples[-1]), file=sys.stderr, flush=True)
        self.start = time.perf_counter()


def _configs(args: argparse.Namespace, root: str):
    from istanas_tf import data, search_model
    from istanas_tf.training import config as config_lib

    # The one-stage super-net has the evaluation network's auxiliary head, whose 5x5
    # pool needs 32x32 images (8x8 features after the second reduction).
    image_size = max(args.image_size, 32) if args.worker == "one_stage" else args.image_size
    folder = _image_folder(root, image_size, args.seed)
    network = dict(channels=args.channels, layers=args.layers, seed=args.seed)
    loop = config_lib.LoopConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        # Random images and labels: a net memorising them sees its validation loss grow
        # without bound, and at lr 0.05 the loop's divergence guard stopped a 30-epoch
        # run at epoch 27 (val_loss 154.8 > 100 ln 2); the benchmark is about memory.
        learning_rate=0.005,
        steps_per_epoch=args.steps,
        eval_steps=1,
        verbose=False,
        seed=args.seed,
        strategy="mirrored" if args.replicas > 1 else "default",
    )
    data_config = data.DataConfig(dataset=f"folder:{folder}")
    two_stage = config_lib.TwoStageConfig(
        model_dir=os.path.join(root, "run"),
        network=search_model.SearchNetworkConfig(**network),
        data=data_config,
        loop=loop,
    )
    one_stage = config_lib.OneStageConfig(
        model_dir=os.path.join(root, "run"),
        network=search_model.SearchNetworkConfig(**network, one_stage=True),
        data=data_config,
        loop=loop,
        # Every node moves by ~2 per epoch (never at the tolerance), and no support is
        # rejected: the search goes on with a new support every epoch.
        max_params=10**12,
        search_epochs=args.epochs + 1,
    )
    return two_stage, one_stage


def _two_stage(config, recorder: _Recorder) -> None:
    """The command line's loop (``TwoStageRun.run``), sampled after each epoch."""
    from istanas_tf.training import two_stage

    class SampledRun(two_stage.TwoStageRun):
        def _run_epoch(self, epoch, steps):
            functions = (self.train_fn, self.eval_fn)  # replaced at the epoch's end
            row = super()._run_epoch(epoch, steps)
            recorder.note_functions(*functions)
            del functions  # before counting the live traces
            recorder.sample(epoch, row["support_changed"])
            return row

    run = SampledRun.__new__(SampledRun)
    _construct(run, config)
    # The scripted supports switch on ops whose BNs have never updated their running
    # statistics, so the validation loss (inference mode, random labels) can pass the
    # divergence guard's 100 ln(classes) (it did at epochs 27 and 14); this measures memory.
    run.state.loss_limit = float("inf")
    run.run()


def _construct(run, config) -> None:
    """``run.__init__(config)``, with the scripted recovery in place before the first epoch."""
    type(run).__init__(run, config)
    run.model.recover = RotatingRecovery(run.model)


def _one_stage(config, recorder: _Recorder, epochs: int) -> None:
    """``OneStageRun.search_epoch`` ``epochs`` times (the search phase of ``run()``)."""
    from istanas_tf.training import one_stage, steps

    run = one_stage.OneStageRun(config)
    run.model.recover = RotatingRecovery(run.model)
    loop = config.loop
    steps_per_epoch = steps.steps_per_epoch(
        run.info, ("train",), loop.batch_size, run.strategy, loop.steps_per_epoch
    )
    for epoch in range(epochs):
        before, functions = run.model.supports, (run.train_fn, run.eval_fn)
        run.search_epoch(epoch, steps_per_epoch)
        recorder.note_functions(*functions)
        del functions  # before counting the live traces
        recorder.sample(epoch, run.model.supports != before)


def _fit(config, recorder: _Recorder, epochs: int) -> None:
    """``SearchNetwork.fit`` with ``callbacks.SparseRecovery``, sampled after its
    ``on_epoch_end`` (listed after it)."""
    import keras
    import tensorflow as tf

    from istanas_tf import callbacks, data, search_data
    from istanas_tf.training import builders

    info = data.get_dataset_info(config.data)
    model, _, _ = builders.build_search_model(config, tf.distribute.get_strategy(), info)
    model.recover = RotatingRecovery(model)
    loop = config.loop
    fit_data = search_data.search_datasets(
        config.data, info, loop.batch_size, steps_per_epoch=loop.steps_per_epoch, eval_steps=1
    )

    class Sample(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            # Keras' functions of this epoch (SparseRecovery replaces them at its end).
            self.functions = [model.train_function, model.test_function]

        def on_epoch_end(self, epoch, logs=None):
            recorder.note_functions(*self.functions, model.test_function)
            self.functions = []  # before counting the live traces
            recorder.sample(epoch, bool(logs.get("support_changed")))

    model.fit(
        **fit_data.fit_arguments(),
        epochs=epochs,
        verbose=0,
        callbacks=[callbacks.SparseRecovery(), Sample()],
    )


def _worker(args: argparse.Namespace) -> dict:
    if args.replicas > 1:
        import tensorflow as tf  # before anything starts TF's runtime

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas
        )
    recorder = _Recorder()
    with tempfile.TemporaryDirectory(prefix="memory_benchmark_") as root:
        two_stage, one_stage = _configs(args, root)
        start = time.perf_counter()
        if args.worker == "two_stage":
            _two_stage(two_stage, recorder)
        elif args.worker == "one_stage":
            _one_stage(one_stage, recorder, args.epochs)
        else:
            _fit(two_stage, recorder, args.epochs)
        wall = time.perf_counter() - start
    return {"mode": args.worker, "samples": recorder.samples, "run_s": wall}


# ---------------------------------------------------------------------------- parent
COLUMNS = ("rss_mb", "peak_mb", *TRACE_CLASSES.values(), "runtime fns", "gradient fns", "traces")


def growth_per_epoch(samples: list[dict], key: str, skip: int = 2) -> float | None:
    """Least-squares slope of ``key`` over the epochs after the first ``skip``."""
    points = [(s["epoch"], s[key]) for s in samples[skip:] if s.get(key) is not None]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def _cell(value, spec=".0f") -> str:
    return "-" if value is None else format(value, spec)


def _print_report(results: dict, args: argparse.Namespace, loads: tuple) -> None:
    import tensorflow as tf  # only for the version line

    print(
        f"\nLive traces over a search whose support changes every epoch: C = "
        f"{args.channels}, {args.layers} cells, {args.image_size}x{args.image_size} "
        f"(one_stage: at least 32x32), batch "
        f"{args.batch_size}, {args.steps} steps per epoch, {args.replicas} replica(s); "
        f"{os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__} ({harness.cpu_kernels()}); "
        f"load average {_cell(loads[0], '.2f')} before, "
        f"{_cell(loads[1], '.2f')} after"
    )
    header = ("epoch", "s", "changed", "RSS MB", "peak MB", *COLUMNS[2:])
    summary = []
    for mode, result in results.items():
        samples = result["samples"]
        print(f"\n{mode} ({result['run_s']:.0f} s)\n")
        print("| " + " | ".join(header) + " |")
        print("|" + " ---: |" * len(header))
        for s in samples:
            cells = [s["epoch"], f"{s['epoch_s']:.1f}", "yes" if s["support_changed"] else "no"]
            cells += [_cell(s.get(key)) for key in COLUMNS]
            print("| " + " | ".join(str(c) for c in cells) + " |")
        first, last = samples[0], samples[-1]
        for label, row in (("first", first), ("last", last)):
            summary.append([mode, f"{label} (epoch {row['epoch']})"])
            summary[-1] += [_cell(row.get(key)) for key in COLUMNS]
        summary.append([mode, "growth per epoch (after epoch 2)"])
        summary[-1] += [_cell(growth_per_epoch(samples, key), ".2f") for key in COLUMNS]
    print("\n| mode | epoch | RSS MB | peak MB | " + " | ".join(COLUMNS[2:]) + " |")
    print("| --- | --- |" + " ---: |" * len(COLUMNS))
    for row in summary:
        print("| " + " | ".join(row) + " |")
    harness.save_results(args, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="two_stage", help=f"of {', '.join(MODES)}")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2, help="training steps per epoch")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--replicas", type=int, default=1, help="> 1: MirroredStrategy on that many logical CPUs"
    )
    parser.add_argument("--json", default="", help="also write the raw results here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = _worker(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    if args.replicas < 1 or args.batch_size % args.replicas:
        parser.error(
            f"--replicas={args.replicas}: must be >= 1 and divide --batch_size={args.batch_size}"
        )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: valid modes are {', '.join(MODES)}")
    load_before = harness.load_average()
    results = {}
    for mode in modes:
        print(f"[{mode}] {args.epochs} epochs ...", file=sys.stderr, flush=True)
        extra = [
            f"--{flag}={getattr(args, flag)}"
            for flag in (
                "epochs",
                "steps",
                "batch_size",
                "channels",
                "layers",
                "image_size",
                "replicas",
            )
        ]
        result, wall, process = _run(mode, extra, args.seed)
        if result is None:
            sys.stderr.write(process.stdout[-5000:] + process.stderr[-5000:])
            raise RuntimeError(f"the {mode} subprocess failed (exit code {process.returncode})")
        print(f"[{mode}] done in {wall:.0f} s", file=sys.stderr, flush=True)
        results[mode] = result
    _print_report(results, args, (load_before, harness.load_average()))


def _run(mode: str, extra: list[str], seed: int):
    """This script's worker for ``mode`` in a fresh process."""
    import subprocess

    command = [sys.executable, os.path.abspath(__file__), "--worker", mode, *extra]
    command.append(f"--seed={seed}")
    start = time.perf_counter()
    process = subprocess.run(command, cwd=harness.REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :]), wall, process
    return None, wall, process


if __name__ == "__main__":
    main()
