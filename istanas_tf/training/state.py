"""What a run keeps between processes: checkpoints by variable path, metrics, summaries.

All run state is checkpointed state (docs/design.md decision 3): weights, both optimizers,
the architecture (b, z, support, A, freeze flags), the epoch and, for the one-stage run,
its search progress. Rerunning the same command restores it and carries on.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from istanas_tf import genotypes
from istanas_tf.training import run_dir, runtime, summaries


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
            raise ValueError(
                f"two variables share the path {variable.path!r}; give the layers distinct names"
            )
        mapping[variable.path] = variable
    return mapping


# A loss above this many times that of a uniform guess (ln of the number of classes)
# has diverged: no network that learned anything is that wrong on average.
DIVERGENCE_FACTOR = 100.0


class DivergedError(RuntimeError):
    """An epoch's loss became non-finite or exploded; nothing of it was saved."""


def divergence_limit(num_classes: int) -> float:
    """The largest epoch loss a run accepts: ``DIVERGENCE_FACTOR * ln(num_classes)``
    (230 for 10 classes, 691 for 1000)."""
    return DIVERGENCE_FACTOR * math.log(max(num_classes, 2))


def check_divergence(row: dict[str, Any], limit: float, model_dir: str) -> None:
    """Raises DivergedError when a loss of the epoch's ``row`` (training, architecture,
    validation or test) is non-finite or above ``limit``.

    Every worker sees the same (globally reduced) row, so all stop together, before the
    epoch's checkpoint, metrics row and genotype are written.
    """
    bad = {
        key: value
        for key, value in row.items()
        if key.endswith("loss")
        and isinstance(value, float)
        and not (math.isfinite(value) and value <= limit)
    }
    if bad:
        shown = ", ".join(f"{key} {value:.4g}" for key, value in sorted(bad.items()))
        raise DivergedError(
            f"the run diverged at epoch {row['epoch']} ({shown}; the limit is "
            f"{limit:.4g}, {DIVERGENCE_FACTOR:g} x ln(classes)): stopping before its "
            f"checkpoint. {model_dir} keeps the last good epoch; resume it with a lower "
            "--learning_rate (or --arch_learning_rate), or start a new --model_dir."
        )


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

    def __init__(
        self,
        model_dir: str,
        strategy: tf.distribute.Strategy,
        variables: dict[str, list],
        num_classes: int,
    ):
        self.model_dir = model_dir
        self.loss_limit = divergence_limit(num_classes)
        self.chief = runtime.is_chief(strategy)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(
            epoch=self.epoch,
            **{name: variables_by_path(group) for name, group in variables.items()},
        )
        self.checkpoint_dir = run_dir.path(model_dir, run_dir.CHECKPOINTS)
        directory = (
            self.checkpoint_dir if self.chief else tempfile.mkdtemp(prefix="istanas_worker_ckpt_")
        )
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=3)
        self.metrics_log = run_dir.MetricsLog(model_dir)
        self.writers = summaries.Writers(run_dir.path(model_dir, run_dir.TENSORBOARD), self.chief)
        settings = run_dir.read_json(run_dir.path(model_dir, run_dir.RUN_CONFIG))
        if self.chief and settings is not None:
            summaries.write_hparams(self.writers, settings)

    @property
    def epochs_done(self) -> int:
        """Epochs finished and checkpointed (0 for a new run)."""
        return int(self.epoch.numpy())

    def restore(self) -> bool:
        """Restores the latest checkpoint of the run directory, if any; True if it did."""
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("Resumed %s at epoch %d", latest, self.epochs_done)
        if self.chief:
            # Rows of epochs past the checkpoint (a run stopped between writing its row
            # and its checkpoint; with no checkpoint, every row) are computed again.
            self.metrics_log.truncate_after(self.epochs_done)
        return bool(latest)

    def save(self, epoch: int) -> None:
        self.epoch.assign(epoch)
        self.manager.save(checkpoint_number=epoch)

    def end_epoch(
        self, row: dict[str, Any], genotype: genotypes.Genotype | None = None, model=None
    ) -> None:
        """Everything an epoch leaves behind, then its checkpoint.

        On the chief: the metrics.jsonl row, the genotype files and diagrams (when a
        search gives one) and the TensorBoard summaries (with ``model``'s |z|); then, on
        every worker (saving is collective), the checkpoint of epoch ``row["epoch"]``.
        """
        epoch = row["epoch"]
        check_divergence(row, self.loss_limit, self.model_dir)
        if self.chief:
            self.metrics_log.append(row)
            if genotype is not None:
                summaries.write_genotype(self.model_dir, self.writers, genotype, epoch)
            summaries.write_epoch(self.writers, row, epoch, model)
        self.save(epoch)

    def final_metrics(self) -> dict[str, Any] | None:
        """The ``final_metrics.json`` of a finished run, or None."""
        return run_dir.read_json(run_dir.path(self.model_dir, run_dir.FINAL_METRICS))

    def write_final_metrics(self, result: dict[str, Any]) -> None:
        if self.chief:
            run_dir.write_json(run_dir.path(self.model_dir, run_dir.FINAL_METRICS), result)


class OneStageProgress:
    """Checkpointed one-stage bookkeeping: search length and per-node stop epochs."""

    def __init__(self):
        shape = (len(genotypes.CELL_TYPES), genotypes.STEPS)
        self.search_epochs = keras.Variable(
            0, dtype="int64", trainable=False, name="one_stage_search_epochs"
        )
        self.stop_epoch = keras.Variable(
            np.zeros(shape, np.int64), trainable=False, name="one_stage_node_stop_epoch"
        )
        self.forced = keras.Variable(
            np.zeros(shape, np.int64), trainable=False, name="one_stage_node_stop_forced"
        )

    @property
    def variables(self) -> list:
        return [self.search_epochs, self.stop_epoch, self.forced]

    @property
    def search_ended(self) -> bool:
        return int(self.search_epochs.numpy()) > 0

    @property
    def search_length(self) -> int:
        return int(self.search_epochs.numpy())

    def end_search(self, epochs: int) -> None:
        self.search_epochs.assign(epochs)

    def stop_node(self, cell_type: str, node: int, epoch: int, forced: bool = False) -> None:
        index = [[genotypes.CELL_TYPES.index(cell_type), node]]
        self.stop_epoch.assign(
            tf.tensor_scatter_nd_update(
                self.stop_epoch.value, index, tf.constant([epoch], tf.int64)
            )
        )
        self.forced.assign(
            tf.tensor_scatter_nd_update(
                self.forced.value, index, tf.constant([int(forced)], tf.int64)
            )
        )

    def stop_epochs(self) -> dict[str, list[int]]:
        """Per cell type, the epoch each node stopped searching at (0: still searching)."""
        values = self.stop_epoch.numpy()
        return {t: [int(v) for v in values[i]] for i, t in enumerate(genotypes.CELL_TYPES)}

    def forced_stops(self) -> dict[str, list[int]]:
        """Per cell type, the nodes frozen by the --search_epochs cap."""
        values = self.forced.numpy()
        return {
            t: [int(j) for j in np.flatnonzero(values[i])]
            for i, t in enumerate(genotypes.CELL_TYPES)
        }
