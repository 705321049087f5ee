"""The search loop: one loop for every tf.distribute strategy (DESIGN.md decision 4).

Keras 3 ``fit()`` fails under MultiWorkerMirroredStrategy, so the loop drives
``strategy.run(model.train_step, ...)`` inside a ``tf.function`` itself. Each epoch:
train (architecture step then weight step per batch), evaluate the super-net on the
architecture split, recover the architecture (the ``tf.function`` LASSO), log the
genotype, checkpoint everything, and trace the step functions again when the support
changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from istanas_tf import data
from istanas_tf import genotypes
from istanas_tf import optimizers
from istanas_tf import run_dir
from istanas_tf import search_model

STRATEGIES = ("default", "mirrored", "multi_worker")


MIXED_PRECISION = (None, "float16", "bfloat16")


def loop_checks(config) -> list[tuple[bool, str]]:
    """(ok, message) checks of the settings every run of the loop shares.

    ``config`` is a SearchConfig or a retraining TrainConfig: both carry the epoch,
    batch, optimizer, strategy and precision fields these checks read.
    """
    return [
        (config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 1, f"--batch_size must be >= 1, got {config.batch_size}"),
        (config.learning_rate > 0, f"--learning_rate must be > 0, got {config.learning_rate}"),
        (0 <= config.learning_rate_min <= config.learning_rate,
         f"--learning_rate_min must be in [0, --learning_rate], got "
         f"{config.learning_rate_min}"),
        (config.grad_clip > 0, f"--grad_clip must be > 0, got {config.grad_clip}"),
        (config.weight_decay >= 0, f"--weight_decay must be >= 0, got {config.weight_decay}"),
        (0 <= config.momentum < 1, f"--momentum must be in [0, 1), got {config.momentum}"),
        (config.strategy in STRATEGIES,
         f"--strategy={config.strategy!r} is not valid; valid: {', '.join(STRATEGIES)}"),
        (config.steps_per_epoch is None or config.steps_per_epoch >= 1,
         f"--steps_per_epoch must be >= 1, got {config.steps_per_epoch}"),
        (config.eval_steps is None or config.eval_steps >= 0,
         f"--eval_steps must be >= 0, got {config.eval_steps}"),
        (config.mixed_precision in MIXED_PRECISION,
         f"--mixed_precision={config.mixed_precision!r} is not valid; valid: float16, "
         "bfloat16 (or unset)"),
    ]


def architecture_checks(config) -> list[tuple[bool, str]]:
    """(ok, message) checks of the architecture optimizer's settings (both searches)."""
    return [
        (config.arch_learning_rate > 0,
         f"--arch_learning_rate must be > 0, got {config.arch_learning_rate}"),
        (config.arch_weight_decay >= 0,
         f"--arch_weight_decay must be >= 0, got {config.arch_weight_decay}"),
    ]


def flat_settings(config, transient=()) -> dict[str, Any]:
    """A config's fields by flag name, nested configs (network, data) flattened into the
    same dict, tuples as lists (JSON), ``transient`` names left out."""
    settings = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            settings.update(dataclasses.asdict(value))
        else:
            settings[field.name] = value
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()
            if k not in transient}


def check_settings(checks: list[tuple[bool, str]]) -> None:
    """Raises ValueError with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped before saving anything from it."""


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """A two-stage search run (METHOD.md section 3); fields mirror the CLI flags.

    Attributes:
      model_dir: run directory (checkpoints, logs, genotypes); rerun to resume.
      network: the super-net settings.
      data: the input settings.
      epochs: search epochs (50).
      batch_size: global batch size over all replicas (256).
      learning_rate, learning_rate_min: cosine schedule of the weight lr (0.1 -> 0.001).
      momentum, weight_decay, grad_clip: weight SGD (0.9, L2 3e-4 on the gradient, 5).
      arch_learning_rate, arch_weight_decay, arch_beta1, arch_beta2: architecture Adam
        (6e-4, L2 1e-3, 0.5, 0.999).
      strategy: ``default`` | ``mirrored`` | ``multi_worker`` (TF_CONFIG).
      steps_per_epoch: cap on training steps per epoch (None: the whole split).
      eval_steps: cap on evaluation steps per epoch (None: the whole architecture split).
      deterministic: reproducible order and kernels (``--seed``).
      mixed_precision: None, ``float16`` (both optimizers scale the loss) or ``bfloat16``.
      verbose: show a progress bar within the epoch.
    """

    model_dir: str
    network: search_model.SearchNetworkConfig = search_model.SearchNetworkConfig()
    data: data.DataConfig = data.DataConfig()
    epochs: int = 50
    batch_size: int = 256
    learning_rate: float = 0.1
    learning_rate_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_learning_rate: float = 6e-4
    arch_weight_decay: float = 1e-3
    arch_beta1: float = 0.5
    arch_beta2: float = 0.999
    strategy: str = "default"
    steps_per_epoch: int | None = None
    eval_steps: int | None = None
    deterministic: bool = False
    mixed_precision: str | None = None
    verbose: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the flag of the first invalid setting."""
        check_settings(loop_checks(self) + architecture_checks(self))
        self.network.validate()
        self.data.validate()

    def run_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the recorded one, by flag name."""
        return flat_settings(self, ("model_dir", "verbose", "num_classes"))


# Settings that may differ when a run is resumed: they do not change its results.
RESUMABLE_CHANGES = ("epochs", "strategy", "verbose", "eval_steps", "data_dir", "manual_dir",
                     "skip_corrupt_images")


def variables_by_path(variables) -> dict[str, Any]:
    """Variables keyed by their Keras path, for tf.train.Checkpoint.

    tf.train.Checkpoint does not follow layers that Keras 3 keeps in lists or dicts (the
    cells, the candidate ops), so checkpointing the model object would silently skip
    most of the super-net. An explicit map saves every variable, trainable or not (BN
    statistics, A, z, support), under a name that is stable across processes.
    """
    mapping = {}
    for variable in variables:
        if variable.path in mapping:
            raise ValueError(f"two variables share the path {variable.path!r}; "
                             "give the layers distinct names")
        mapping[variable.path] = variable
    return mapping


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


def cosine_learning_rate(epoch: int, epochs: int, lr_max: float, lr_min: float) -> float:
    """PyTorch ``CosineAnnealingLR`` stepped per epoch: lr of epoch ``epoch`` (0-based)."""
    return lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for ``--strategy``."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment "
                             "variable describing the cluster and this worker's task")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy={name!r} is not valid; valid: {', '.join(STRATEGIES)}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes logs and the real checkpoints in a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def _distributed_step(strategy, step: Callable, model) -> Callable:
    """A traced function running ``step`` on every replica, returning global metrics."""

    @tf.function
    def run(*batches):
        strategy.run(step, args=batches)
        # Read metrics in cross-replica context: SyncOnRead variables then aggregate.
        return {m.name: m.result() for m in model.metrics}

    return run


def num_input_pipelines(strategy: tf.distribute.Strategy) -> int:
    """Input pipelines of a strategy: one per worker (multi-worker), else one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)


def write_genotype_diagram(model_dir: str, writer, genotype, epoch: int) -> None:
    """``cells/epoch_NNN.png``, ``cells.png`` (latest) and the TensorBoard image."""
    from istanas_tf import diagram  # matplotlib is only imported when drawing
    cells_dir = os.path.join(model_dir, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    title = f"epoch {epoch}"
    diagram.save_genotype_diagram(genotype, os.path.join(cells_dir, f"epoch_{epoch:03d}.png"),
                                  title=title)
    diagram.save_genotype_diagram(genotype, os.path.join(model_dir, "cells.png"), title=title)
    with writer.as_default(step=epoch):
        image = diagram.render_genotype_array(genotype, title=title)
        tf.summary.image("genotype/cells", image[None, ..., :3])


class _Progress:
    """A Keras progress bar within the epoch, only on the chief and when verbose."""

    def __init__(self, steps: int, enabled: bool):
        self.bar = keras.utils.Progbar(steps, stateful_metrics=None) if enabled else None

    def update(self, step: int, logs: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step, [(k, v) for k, v in logs.items()], finalize=False)


def _to_floats(logs) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()}


def _check_finite(logs: dict[str, float], epoch: int, step: int, model_dir: str) -> None:
    bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"non-finite training values {bad} at epoch {epoch + 1}, step {step}: stopping. "
            f"The last good checkpoint in {model_dir}/checkpoints is left intact; lower "
            "--learning_rate or --arch_learning_rate and resume or start a new --model_dir.")


def build_search_model(config, strategy: tf.distribute.Strategy,
                       network_config: search_model.SearchNetworkConfig, image_size: int):
    """The super-net with every weight created and its two optimizers, compiled.

    Built in the strategy's scope under ``config.mixed_precision``; both optimizers are
    built over their variables up front (DESIGN.md decision 5).

    Args:
      config: a SearchConfig or one_stage.OneStageConfig (optimizer and precision fields).

    Returns:
      ``(model, weight_optimizer, arch_optimizer)``: PyTorch-rule SGD on the weights and
      Adam on the architecture, each wrapped in a LossScaleOptimizer under float16.
    """
    with mixed_precision_policy(config.mixed_precision), strategy.scope():
        model = search_model.SearchNetwork(network_config, name="search_network")
        model.build_all(image_size)
        weight_optimizer = optimizers.TorchSGD(
            config.learning_rate, momentum=config.momentum, l2=config.weight_decay,
            clip_global_norm=config.grad_clip)
        arch_optimizer = optimizers.TorchAdam(
            config.arch_learning_rate, beta_1=config.arch_beta1, beta_2=config.arch_beta2,
            l2=config.arch_weight_decay)
        if config.mixed_precision == "float16":
            weight_optimizer = keras.optimizers.LossScaleOptimizer(weight_optimizer)
            arch_optimizer = keras.optimizers.LossScaleOptimizer(arch_optimizer)
        model.compile(weight_optimizer, arch_optimizer)
    return model, weight_optimizer, arch_optimizer


def run_train_steps(step_fn: Callable, model, batches, steps: int, *, epoch: int,
                    model_dir: str, verbose: bool) -> tuple[dict[str, float], float, float]:
    """One epoch of training steps, shared by every loop.

    Resets the model's metrics, runs ``step_fn(batch)`` on up to ``steps`` batches with a
    progress bar (when ``verbose``) and stops on a non-finite value.

    Returns:
      ``(logs, train_time_s, step_time_s)``: the last step's metrics, the epoch's wall
      time, and the time per step after the first (which may include tracing).
    """
    for metric in model.metrics:
        metric.reset_state()
    progress = _Progress(steps, verbose)
    start = first_step_end = time.perf_counter()
    logs = {}
    for step, batch in enumerate(batches):
        if step >= steps:
            break
        logs = _to_floats(step_fn(batch))
        _check_finite(logs, epoch, step + 1, model_dir)
        progress.update(step + 1, logs)
        if step == 0:
            first_step_end = time.perf_counter()
    end = time.perf_counter()
    step_time = (end - first_step_end) / (steps - 1) if steps > 1 else end - start
    return logs, end - start, step_time


def run_eval_steps(eval_fn: Callable, model, dataset,
                   max_steps: int | None = None) -> dict[str, float]:
    """Resets the model's metrics, runs ``eval_fn`` on up to ``max_steps`` batches (None:
    all of ``dataset``) and returns the metrics' final values."""
    for metric in model.metrics:
        metric.reset_state()
    logs = {}
    for step, batch in enumerate(dataset):
        if max_steps is not None and step >= max_steps:
            break
        logs = eval_fn(batch)
    return _to_floats(logs)


class RunState:
    """What a run keeps in its directory: checkpoints, metrics.jsonl, TensorBoard.

    Every variable is checkpointed by Keras path (see :func:`variables_by_path`), with
    the epoch counter. On a multi-worker run every worker saves (saving is collective),
    but only the chief into the run directory; only the chief writes logs.

    Args:
      model_dir: the run directory.
      strategy: the run's tf.distribute strategy.
      variables: groups of variables by name, e.g. model / optimizer variables.
    """

    def __init__(self, model_dir: str, strategy: tf.distribute.Strategy,
                 variables: dict[str, list]):
        self.model_dir = model_dir
        self.chief = is_chief(strategy)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(
            epoch=self.epoch, **{name: variables_by_path(group)
                                 for name, group in variables.items()})
        self.checkpoint_dir = os.path.join(model_dir, "checkpoints")
        directory = self.checkpoint_dir if self.chief else tempfile.mkdtemp(
            prefix="istanas_worker_ckpt_")
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=3)
        self.metrics_log = run_dir.MetricsLog(model_dir)
        self.writer = (tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))
                       if self.chief else tf.summary.create_noop_writer())

    def latest_checkpoint(self) -> str | None:
        return tf.train.latest_checkpoint(self.checkpoint_dir)

    def restore(self) -> bool:
        """Restores the latest checkpoint of the run directory, if any; True if it did."""
        latest = self.latest_checkpoint()
        if not latest:
            return False
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        logging.info("Resumed %s at epoch %d", latest, int(self.epoch.numpy()))
        if self.chief:
            self.metrics_log.truncate_after(int(self.epoch.numpy()))
        return True

    def save(self, epoch: int) -> None:
        self.epoch.assign(epoch)
        self.manager.save(checkpoint_number=epoch)


class SearchRun:
    """Builds (or restores) the search state of ``config`` and runs the remaining epochs."""

    def __init__(self, config: SearchConfig):
        config.validate()
        self.config = config
        if config.deterministic:
            keras.utils.set_random_seed(config.data.seed)
            tf.config.experimental.enable_op_determinism()
        self.strategy = make_strategy(config.strategy)
        self.chief = is_chief(self.strategy)
        data.check_divisible(config.batch_size, self.strategy.num_replicas_in_sync)
        self.info = data.get_dataset_info(config.data)
        # Only the chief records the settings: workers share the run directory, and two
        # writers would race on run_config.json's temporary file.
        self.resumed = (run_dir.check_run_config(config.model_dir, config.run_settings(),
                                                 RESUMABLE_CHANGES) if self.chief else
                        bool(tf.train.latest_checkpoint(
                            os.path.join(config.model_dir, "checkpoints"))))
        # Synchronized BN only matters (and only costs) with more than one replica.
        network_config = dataclasses.replace(
            config.network, num_classes=self.info.num_classes,
            sync_batch_norm=(config.network.sync_batch_norm
                             and self.strategy.num_replicas_in_sync > 1))
        self.model, self.weight_optimizer, self.arch_optimizer = build_search_model(
            config, self.strategy, network_config, self.info.image_size[0])
        with self.strategy.scope():
            self.state = RunState(config.model_dir, self.strategy, {
                "model": self.model.variables,
                "weight_optimizer": self.weight_optimizer.variables,
                "arch_optimizer": self.arch_optimizer.variables})
        self.epoch = self.state.epoch
        self.metrics_log = self.state.metrics_log
        self.writer = self.state.writer
        if self.state.restore():
            self.model.sync_supports()
        else:
            # Draw A, initialise b (done by the encodings), recover z and its support.
            self.model.recover()
        self._train_fn = None
        self._eval_fn = None

    # ------------------------------------------------------------------ pieces
    def _datasets(self, epoch: int):
        config = self.config
        make = lambda split: data.distributed_dataset(
            self.strategy, config.data, self.info, split, training=True,
            global_batch_size=config.batch_size, epoch_seed=epoch)
        return make("search_weights"), make("search_arch")

    def _steps_per_epoch(self) -> int:
        pipelines = num_input_pipelines(self.strategy)
        steps = min(data.steps_per_epoch(self.info, split, self.config.batch_size,
                                         num_input_pipelines=pipelines)
                    for split in ("search_weights", "search_arch"))
        if steps < 1:
            raise ValueError(f"--batch_size={self.config.batch_size} is larger than a search "
                             "split; lower it or raise --train_portion")
        if self.config.steps_per_epoch:
            steps = min(steps, self.config.steps_per_epoch)
        return steps

    def _trace_steps(self) -> None:
        self._train_fn = _distributed_step(
            self.strategy, lambda w, a: self.model.train_step((w, a)), self.model)
        self._eval_fn = _distributed_step(self.strategy, self.model.test_step, self.model)

    def _evaluate(self) -> dict[str, float]:
        dataset = data.distributed_dataset(
            self.strategy, self.config.data, self.info, "search_arch", training=False,
            global_batch_size=self.config.batch_size)
        logs = run_eval_steps(self._eval_fn, self.model, dataset, self.config.eval_steps)
        return {"val_loss": logs.get("loss", float("nan")),
                "val_accuracy": logs.get("accuracy", float("nan"))}

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        """Runs the remaining epochs; returns the last epoch's metrics and the genotype."""
        config = self.config
        start = int(self.epoch.numpy())
        steps = self._steps_per_epoch()
        row: dict[str, Any] = {}
        if start >= config.epochs:
            logging.info("Search already finished (%d epochs) in %s", start, config.model_dir)
        for epoch in range(start, config.epochs):
            row = self._run_epoch(epoch, steps)
        genotype = self.model.genotype()
        return {**row, "genotype": genotypes.to_json_dict(genotype)}

    def _run_epoch(self, epoch: int, steps: int) -> dict[str, Any]:
        config = self.config
        lr = cosine_learning_rate(epoch, config.epochs, config.learning_rate,
                                  config.learning_rate_min)
        self.weight_optimizer.learning_rate = lr
        if self._train_fn is None:
            self._trace_steps()
        weights_data, arch_data = self._datasets(epoch)
        logs, train_time, step_time = run_train_steps(
            lambda pair: self._train_fn(*pair), self.model, zip(weights_data, arch_data),
            steps, epoch=epoch, model_dir=config.model_dir,
            verbose=config.verbose and self.chief)
        eval_logs = self._evaluate() if config.eval_steps != 0 else {}

        supports_before = self.model.supports
        recovery_start = time.perf_counter()
        distances = self.model.recover()
        recovery_time = time.perf_counter() - recovery_start
        changed = self.model.supports != supports_before
        genotype = self.model.genotype()

        row = {"epoch": epoch + 1, "lr": lr, **logs, **eval_logs,
               "train_time_s": train_time, "step_time_s": step_time,
               "recovery_time_s": recovery_time, "support_changed": changed,
               "z_distance": {k: [float(x) for x in v] for k, v in distances.items()},
               "genotype": genotypes.to_json_dict(genotype)}
        if self.chief:
            self.metrics_log.append(row)
            run_dir.write_genotype(config.model_dir, genotype, epoch + 1)
            write_genotype_diagram(config.model_dir, self.writer, genotype, epoch + 1)
            self._write_summaries(row, epoch + 1)
        self.state.save(epoch + 1)
        logging.info(
            "epoch %d/%d  lr %.4g  loss %.4f  acc %.4f  arch_loss %.4f  val_acc %s  "
            "step %.3fs  recovery %.1fms  support %s", epoch + 1, config.epochs, lr,
            logs.get("loss", float("nan")), logs.get("accuracy", float("nan")),
            logs.get("arch_loss", float("nan")),
            f"{eval_logs['val_accuracy']:.4f}" if eval_logs else "-",
            row["step_time_s"], 1e3 * recovery_time, "changed" if changed else "same")
        if changed:
            self._trace_steps()
        return row

    def _write_summaries(self, row: dict[str, Any], epoch: int) -> None:
        with self.writer.as_default(step=epoch):
            for key in ("loss", "accuracy", "arch_loss", "val_loss", "val_accuracy", "lr",
                        "step_time_s", "recovery_time_s"):
                if key in row:
                    tf.summary.scalar(key, row[key])
            tf.summary.text("genotype", json.dumps(row["genotype"]))
            if self.config.network.method == "ista":
                for cell_type in self.model.architectures:
                    z_values = self.model.z_values(cell_type)
                    for node, z in enumerate(z_values):
                        tf.summary.histogram(f"abs_z/{cell_type}/node{node}", np.abs(z))
                    tf.summary.image(f"abs_z/{cell_type}", _z_image(z_values))
            self.writer.flush()


def _z_image(z_values) -> np.ndarray:
    """|z| of the nodes as one grey image [1, nodes, widest, 1], brightest = largest."""
    width = max(len(z) for z in z_values)
    image = np.zeros([len(z_values), width], np.float32)
    for node, z in enumerate(z_values):
        image[node, :len(z)] = np.abs(z)
    image /= max(float(image.max()), 1e-12)
    return image[None, :, :, None]


def run_search(config: SearchConfig) -> dict[str, Any]:
    """Runs (or resumes) a search; returns the final metrics and genotype."""
    return SearchRun(config).run()
