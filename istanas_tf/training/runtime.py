"""Where a run executes: its strategy, which worker is the chief, precision, seeds, lr.

:func:`start` is how every run begins: it checks the config, seeds the process, makes
the ``tf.distribute`` strategy, loads the dataset, and (on the chief) records the run's
settings in its directory, or checks them against the recorded ones on a resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import keras
import tensorflow as tf
from absl import logging

from istanas_tf import data
from istanas_tf.training import config as config_lib
from istanas_tf.training import recorded, run_dir, run_guard


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for ``--strategy``."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy=multi_worker needs the TF_CONFIG environment "
                "variable describing the cluster and this worker's task"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy={name!r} is not valid; valid: {', '.join(config_lib.STRATEGIES)}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes logs and the real checkpoints in a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def num_input_pipelines(strategy: tf.distribute.Strategy) -> int:
    """Input pipelines of a strategy: one per worker (multi-worker), else one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)


@contextlib.contextmanager
def mixed_precision_policy(mixed_precision: str | None):
    """Builds layers under ``mixed_<mixed_precision>`` (None: float32), then restores."""
    previous = keras.mixed_precision.global_policy()
    if mixed_precision:
        keras.mixed_precision.set_global_policy(f"mixed_{mixed_precision}")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process (None: unknown).

    TensorFlow decides once, when it starts, from ``TF_ENABLE_ONEDNN_OPTS`` (unset: on
    only for CPUs with AVX-512 or AMX); ``train/main.py`` sets it to 1 unless it is set.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a TensorFlow without the (private) query
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def log_cpu_kernels() -> None:
    """Logs which CPU kernels the run's float32 ops use: oneDNN's, or TensorFlow's own
    (about 1.4-1.8x slower steps on an AVX2 CPU, WORKSPACE.md) with how to switch."""
    enabled = onednn_enabled()
    if enabled:
        logging.info(
            "CPU kernels: oneDNN (TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow starts: TF's own)"
        )
    elif enabled is False:
        logging.info(
            "CPU kernels: TensorFlow's own, not oneDNN's; on x86 CPUs oneDNN's are faster: "
            "set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow starts (train/main.py does)"
        )


def seed_process(loop: config_lib.LoopConfig) -> None:
    """With ``--deterministic``: seeds Python, NumPy and TF, and makes TF's kernels
    deterministic. (The data pipeline is seeded by its own config either way.)"""
    if loop.deterministic:
        keras.utils.set_random_seed(loop.seed)
        tf.config.experimental.enable_op_determinism()


def cosine_learning_rate(epoch: int, epochs: int, lr_max: float, lr_min: float) -> float:
    """PyTorch ``CosineAnnealingLR`` stepped per epoch: lr of epoch ``epoch`` (0-based)."""
    return lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def warmup_linear_learning_rate(
    epoch: int, epochs: int, lr_max: float, lr_min: float, warmup_epochs: int
) -> float:
    """A linear warm-up to ``lr_max`` over ``warmup_epochs``, then a linear decay that
    reaches ``lr_min`` one epoch after the last (the ImageNet schedule)."""
    if epoch < warmup_epochs:
        return lr_max * (epoch + 1) / warmup_epochs
    progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    return lr_min + (lr_max - lr_min) * (1.0 - progress)


def learning_rate_at(
    config: config_lib.TrainConfig | config_lib.OneStageConfig, epoch: int
) -> float:
    """The lr of epoch ``epoch`` (0-based) of ``config.loop.epochs`` under
    ``config.lr_schedule``: a retraining, or a one-stage run's training phase."""
    loop = config.loop
    if config.lr_schedule == "cosine":
        return cosine_learning_rate(epoch, loop.epochs, loop.learning_rate, loop.learning_rate_min)
    return warmup_linear_learning_rate(
        epoch, loop.epochs, loop.learning_rate, loop.learning_rate_min, config.warmup_epochs
    )


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What :func:`start` set up for a run.

    Attributes:
      strategy: the run's tf.distribute strategy.
      chief: this process writes the run directory.
      info: the loaded dataset.
    """

    strategy: tf.distribute.Strategy
    chief: bool
    info: data.DatasetInfo


def start(
    config: config_lib.RunConfig,
    check_data=None,
    guard: run_guard.RunGuard | None = None,
    flags_text: str | None = None,
    **resolved,
) -> Runtime:
    """Checks ``config``, seeds, makes the strategy, loads the data, records the run.

    Args:
      config: any mode's config.
      check_data: optional ``info -> None`` raising ValueError for data the run cannot
        use; called before anything is written to the run directory.
      guard: the run's ``RunGuard`` (entered); on the chief it takes the run directory's
        lock and removes stale temporaries. None: no lock (a run object built directly).
      flags_text: written to ``flags.txt`` (the command-line flags that replay the run).
      **resolved: recorded instead of the config's value (see
        ``recorded.recorded_settings``).

    Raises:
      ValueError: an invalid setting (naming its flag), a batch that does not divide
        over the replicas, or a run directory holding another run (``RunDirError``).
    """
    config.validate()
    log_cpu_kernels()
    seed_process(config.loop)
    strategy = make_strategy(config.loop.strategy)
    chief = is_chief(strategy)
    data.check_divisible(config.loop.batch_size, strategy.num_replicas_in_sync)
    info = data.get_dataset_info(config.data)
    if check_data is not None:
        check_data(info)
    # Only the chief records the settings: workers share the run directory, and two
    # writers would race on run_config.json's temporary file.
    if chief:
        if guard is not None:
            guard.acquire()
        run_dir.check_run_config(config.model_dir, recorded.recorded_settings(config, **resolved))
        if guard is not None:
            for stale in guard.remove_stale_temporaries():
                logging.info("Removed %s, left half-written by a stopped run", stale)
        run_dir.write_dataset_info(config.model_dir, info)
        if flags_text is not None:
            run_dir.atomic_write_text(run_dir.path(config.model_dir, run_dir.FLAGS), flags_text)
    return Runtime(strategy=strategy, chief=chief, info=info)


def guard_run_dir(config: config_lib.RunConfig) -> run_guard.RunGuard:
    """The ``RunGuard`` of ``config``'s run directory (and its ``--export_dir``)."""
    export_dir = getattr(config, "export_dir", None)
    return run_guard.RunGuard(config.model_dir, (export_dir,) if export_dir else ())


def run_guarded(config: config_lib.RunConfig, run_class, flags_text: str | None = None):
    """``run_class(config, guard=..., flags_text=...).run()`` inside the run directory's
    guard (:func:`guard_run_dir`): how every kind of run is started."""
    with guard_run_dir(config) as guard:
        return run_class(config, guard=guard, flags_text=flags_text).run()
