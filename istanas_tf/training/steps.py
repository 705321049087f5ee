"""The steps of an epoch, for every tf.distribute strategy (docs/design.md decision 4).

Keras 3 ``fit()`` fails under MultiWorkerMirroredStrategy, so the runs drive
``strategy.run(model.train_step, ...)`` inside a ``tf.function`` themselves (like TF
Model Garden's trainer): :func:`distributed_step` makes such a function of any model
step, :func:`run_train_steps` and :func:`run_eval_steps` run an epoch of them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable

import keras
import tensorflow as tf
from absl import logging

from istanas_tf import data
from istanas_tf.training import host_memory, runtime


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped before saving anything from it."""


def distributed_step(strategy: tf.distribute.Strategy, step: Callable, model) -> Callable:
    """A traced function running ``step`` on every replica, returning global metrics.

    Traced without AutoGraph: the steps here (the networks', Keras' optimizers') branch
    and loop on Python values only, and AutoGraph's rewriting of every function they
    call was ~1.3 s of the sparse search step's ~6 s first trace in a process (later
    traces reuse the rewrites). A step must branch on tensors with ``tf.cond`` (a Python
    ``if`` on a tensor raises at trace time).

    Args:
      strategy: the run's strategy.
      step: a per-replica step, e.g. ``model.train_step``; it takes the batches.
      model: the model whose ``metrics`` the function returns (aggregated).
    """

    @tf.function(autograph=False)
    def run(*batches):
        strategy.run(step, args=batches)
        # Read metrics in cross-replica context: SyncOnRead variables then aggregate.
        return {m.name: m.result() for m in model.metrics}

    return run


def steps_per_epoch(
    info: data.DatasetInfo,
    splits: Iterable[str],
    batch_size: int,
    strategy: tf.distribute.Strategy,
    cap: int | None = None,
) -> int:
    """Training steps per epoch: the whole batches every one of ``splits`` holds on
    each input pipeline, at most ``cap`` (``--steps_per_epoch``).

    Raises:
      ValueError: the batch is larger than a split.
    """
    pipelines = runtime.num_input_pipelines(strategy)
    splits = list(splits)
    steps = min(
        data.steps_per_epoch(info, split, batch_size, num_input_pipelines=pipelines)
        for split in splits
    )
    if steps < 1:
        what = "the training split" if splits == ["train"] else "a search split"
        hint = "" if splits == ["train"] else " or raise --train_portion"
        raise ValueError(f"--batch_size={batch_size} is larger than {what}; lower it{hint}")
    return min(steps, cap) if cap else steps


# Without a terminal, a long epoch reports its progress this often (a log line).
PROGRESS_LINE_SECONDS = 60.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Progress:
    """Progress within an epoch, on the chief and when verbose, never on stdout (which
    carries a run's JSON result): a Keras progress bar on stderr when stderr is a
    terminal; otherwise (a log file) a log line every :data:`PROGRESS_LINE_SECONDS`
    with the step, the elapsed time and the epoch's ETA."""

    def __init__(self, steps: int, enabled: bool, epoch: int):
        self.steps, self.enabled, self.epoch = steps, enabled, epoch
        interactive = enabled and sys.stderr.isatty()
        self.bar = keras.utils.Progbar(steps, stateful_metrics=None) if interactive else None
        self.start = self.last_line = time.perf_counter()

    def update(self, step: int, logs: dict[str, float]) -> None:
        if self.bar is not None:
            # Keras' bar writes to sys.stdout at each update.
            with contextlib.redirect_stdout(sys.stderr):
                self.bar.update(step, [(k, v) for k, v in logs.items()], finalize=False)
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last_line < PROGRESS_LINE_SECONDS:
            return
        self.last_line = now
        elapsed = now - self.start
        eta = elapsed / step * (self.steps - step)
        values = "  ".join(f"{k} {v:.4g}" for k, v in logs.items())
        logging.info(
            "  epoch %d step %d/%d  %s  elapsed %s  eta %s",
            self.epoch + 1,
            step,
            self.steps,
            values,
            _duration(elapsed),
            _duration(eta),
        )


class EpochClock:
    """Elapsed time and ETA of a run's epochs, for the per-epoch log line.

    Args:
      first_epoch: epochs already done when this process started (a resume).
      epochs: the epochs the run will have done at its end.
    """

    def __init__(self, first_epoch: int, epochs: int):
        self.first_epoch, self.epochs = first_epoch, epochs
        self.start = time.perf_counter()

    def describe(self, epochs_done: int) -> str:
        """``elapsed ...  eta ...`` after ``epochs_done`` epochs (the ETA from this
        process's mean epoch time)."""
        elapsed = time.perf_counter() - self.start
        ran = max(epochs_done - self.first_epoch, 1)
        eta = elapsed / ran * max(self.epochs - epochs_done, 0)
        return f"elapsed {_duration(elapsed)}  eta {_duration(eta)}"


def _to_floats(logs) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()}


def _check_finite(logs: dict[str, float], epoch: int, step: int, model_dir: str) -> None:
    bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"non-finite training values {bad} at epoch {epoch + 1}, step {step}: stopping "
            f"before anything of the epoch is saved ({model_dir} keeps its last checkpoint, if "
            "any); lower --learning_rate or --arch_learning_rate and resume, or start a new "
            "--model_dir."
        )


def log_epoch(title: str, row: dict, keys: Iterable[str], clock: EpochClock | None = None) -> None:
    """One log line for an epoch: ``title``, then ``key value`` for each of ``keys`` in
    the metrics ``row`` (floats to 4 significant digits, a missing key as ``-``), then the
    ``clock``'s elapsed time and ETA, so every run reports its progress alike."""

    def shown(value) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    parts = [title, *(f"{key} {shown(row.get(key))}" for key in keys)]
    if clock is not None:
        parts.append(clock.describe(row["epoch"]))
    logging.info("  ".join(parts))


def with_recovery_summary(row: dict) -> dict:
    """``row`` with its count of certified nodes shown out of the nodes recovered ("8/8")
    for :func:`log_epoch`; unchanged without a recovery report."""
    if "certified" not in row:
        return row
    nodes = sum(len(flags) for flags in row["certified"].values())
    return {**row, "certified_nodes": f"{row['certified_nodes']}/{nodes}"}


def training_dataset(run, split: str, epoch: int, cutout: bool = False):
    """``run``'s distributed training pipeline of ``split`` for epoch ``epoch``."""
    return data.distributed_dataset(
        run.strategy,
        run.config.data,
        run.info,
        split,
        training=True,
        global_batch_size=run.config.loop.batch_size,
        cutout=cutout,
        epoch_seed=epoch,
    )


def run_train_steps(
    step_fn: Callable, model, batches, steps: int, *, epoch: int, model_dir: str, verbose: bool
) -> tuple[dict[str, float], float, float]:
    """One epoch of training steps, shared by every run.

    Resets the model's metrics, runs ``step_fn(batch)`` on up to ``steps`` batches with
    progress reports on stderr (when ``verbose``) and stops on a non-finite value.

    Returns:
      ``(logs, train_time_s, step_time_s)``: the last step's metrics, the epoch's wall
      time, and the time per step after the first (which may include tracing).
    """
    for metric in model.metrics:
        metric.reset_state()
    progress = _Progress(steps, verbose, epoch)
    start = first_step_end = time.perf_counter()
    logs = {}
    for step, batch in enumerate(batches):
        if step >= steps:
            break
        logs = _to_floats(call_step(step_fn, batch, first=step == 0))
        _check_finite(logs, epoch, step + 1, model_dir)
        progress.update(step + 1, logs)
        if step == 0:
            first_step_end = time.perf_counter()
    end = time.perf_counter()
    step_time = (end - first_step_end) / (steps - 1) if steps > 1 else end - start
    return logs, end - start, step_time


def train_on_split(run, split: str, epoch: int, steps: int, cutout: bool = False):
    """One epoch of ``run.train_fn`` on ``split``'s training pipeline (``run_train_steps``).

    Args:
      run: a run (``train_fn``, ``model``, ``strategy``, ``config``, ``info``, ``chief``).
      epoch: 0-based; seeds the epoch's shuffle and augmentation (resumes see the same).
      cutout: apply the data config's cutout.
    """
    config = run.config
    dataset = training_dataset(run, split, epoch, cutout)
    return run_train_steps(
        run.train_fn,
        run.model,
        dataset,
        steps,
        epoch=epoch,
        model_dir=config.model_dir,
        verbose=config.loop.verbose and run.chief,
    )


def evaluate_split(
    eval_fn: Callable,
    model,
    strategy: tf.distribute.Strategy,
    data_config: data.DataConfig,
    info: data.DatasetInfo,
    split: str,
    *,
    batch_size: int,
    max_steps: int | None,
    prefix: str,
    keys: Iterable[str],
) -> dict[str, float]:
    """The model's metrics ``keys`` on ``split`` in inference mode, as ``prefix_key``.

    Args:
      eval_fn: ``distributed_step(strategy, model.test_step, model)``.
      max_steps: cap on batches (None: the whole split; 0: no evaluation, ``{}``).
    """
    if max_steps == 0:
        return {}
    dataset = data.distributed_dataset(
        strategy, data_config, info, split, training=False, global_batch_size=batch_size
    )
    logs = run_eval_steps(eval_fn, model, dataset, max_steps)
    return {f"{prefix}_{key}": logs.get(key, float("nan")) for key in keys}


def run_eval_steps(
    eval_fn: Callable, model, dataset, max_steps: int | None = None
) -> dict[str, float]:
    """Resets the model's metrics, runs ``eval_fn`` on up to ``max_steps`` batches (None:
    all of ``dataset``) and returns the metrics' final values."""
    for metric in model.metrics:
        metric.reset_state()
    logs = {}
    for step, batch in enumerate(dataset):
        if max_steps is not None and step >= max_steps:
            break
        logs = call_step(eval_fn, batch, first=step == 0)
    return _to_floats(logs)


def call_step(step_fn: Callable, *batches, first: bool):
    """``step_fn(*batches)``, as every epoch calls its steps. ``first``: the epoch's first
    call, where a new trace is optimised; the graph optimiser's freed memory is then
    given back as it goes (``host_memory``), which lowers the process's peak."""
    if not first:
        return step_fn(*batches)
    with host_memory.returning_freed_memory():
        return step_fn(*batches)  # eager calls return once the step has run
