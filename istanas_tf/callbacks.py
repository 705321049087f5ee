"""Keras callbacks that run a search's architecture updates inside ``model.fit``.

``SearchNetwork.fit`` trains with the super-net's own ``train_step`` (two-stage: an
architecture step on the ``search_arch`` batch, then a weight step; one-stage: one
shared backward pass); these callbacks do what the command line's loop does after each
epoch, with the same code:

- :class:`SparseRecovery` (two-stage, docs/method.md section 3): the exact recovery of
  every node and its commit (``search_run.recover_and_commit``), the genotype logged;
- :class:`OneStageStopping` (docs/method.md section 4): the stopping rule
  (``one_stage.stopping_step``), nodes frozen, ``model.stop_training`` when the search
  has ended;
- :func:`cosine_learning_rate_schedule`: the command line's per-epoch cosine lr, as a
  standard ``LearningRateScheduler``.

The support and the frozen nodes are Python data baked into the traced steps
(docs/design.md decision 1): when they change, the callbacks make Keras trace its train,
test and predict functions again (``make_*_function(force=True)``: ``fit`` reads
``model.train_function`` at every step, while ``evaluate`` and ``predict`` would keep
the functions they already have). They also re-read the architecture at each epoch's start, so a
``BackupAndRestore`` that restored the variables is picked up whatever the callback
order. They add numbers only to the epoch's ``logs`` (``support_changed``,
``recovery_time_s``, ...): list them before ``CSVLogger`` and ``TensorBoard``, which
then record those too.

Keras 3 ``fit`` fails under ``MultiWorkerMirroredStrategy`` (docs/design.md decision
4): multi-machine searches run through the command line.
"""

from __future__ import annotations

import json
import time

import keras
from absl import logging

from istanas_tf import architecture, genotypes, search_model
from istanas_tf.training import config as config_lib
from istanas_tf.training import one_stage, run_dir, runtime, search_run


def retrace(model: keras.Model) -> None:
    """Makes Keras trace ``model``'s train, test and predict functions again (the next
    call of each traces the current architecture)."""
    model.make_train_function(force=True)
    model.make_test_function(force=True)
    model.make_predict_function(force=True)


def cosine_learning_rate_schedule(
    epochs: int, learning_rate: float, learning_rate_min: float = 0.0
) -> keras.callbacks.LearningRateScheduler:
    """The command line's lr schedule: cosine from ``learning_rate`` to
    ``learning_rate_min`` over ``epochs``, set at each epoch's start
    (``runtime.cosine_learning_rate``, PyTorch's ``CosineAnnealingLR`` per epoch)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return keras.callbacks.LearningRateScheduler(
        lambda epoch: runtime.cosine_learning_rate(epoch, epochs, learning_rate, learning_rate_min)
    )


def _report_scalars(report: dict) -> dict[str, float]:
    """The numbers of an ``architecture.recovery_report`` that fit an epoch's logs: the
    largest KKT violation (units of lam) and the count of certified nodes."""
    return {
        key: float(report[key]) for key in ("kkt_violation_max", "certified_nodes") if key in report
    }


class _ArchitectureCallback(keras.callbacks.Callback):
    """What both search callbacks share: the super-net check, the resync at each
    epoch's start, and genotype files.

    Args:
      genotype_dir: optional directory; after each epoch its ``genotype.json`` and
        ``genotypes/epoch_NNN.json`` get the genotype (the command line's file names).
    """

    one_stage = False

    def __init__(self, genotype_dir: str | None = None):
        super().__init__()
        self.genotype_dir = genotype_dir
        self.genotypes: list[genotypes.Genotype] = []
        self._epochs_begun = 0  # in this fit; reset by on_train_begin

    def set_model(self, model):
        wanted = "OneStageStopping" if not self.one_stage else "SparseRecovery"
        if not isinstance(model, search_model.SearchNetwork):
            raise ValueError(
                f"{type(self).__name__} drives a search_model.SearchNetwork, got "
                f"{type(model).__name__}"
            )
        if model.config.one_stage != self.one_stage:
            raise ValueError(
                f"{type(self).__name__} does not run the "
                f"{'one' if model.config.one_stage else 'two'}-stage search of this "
                f"super-net (SearchNetworkConfig(one_stage={model.config.one_stage})); "
                f"use callbacks.{wanted}"
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        self._epochs_begun = 0

    def on_epoch_begin(self, epoch, logs=None):
        if self._epochs_begun == 0:
            self._resume(epoch)
        self._epochs_begun += 1
        if self.model.sync_supports():
            logging.info(
                "epoch %d: the super-net's architecture was restored: %s",
                epoch + 1,
                json.dumps(genotypes.to_json_dict(self.model.genotype())),
            )
            retrace(self.model)

    def _resume(self, epoch: int) -> None:
        """Called at the first epoch of each ``fit`` (0-based ``epoch``)."""

    def _record(self, epoch: int, genotype: genotypes.Genotype) -> None:
        self.genotypes.append(genotype)
        if self.genotype_dir:
            run_dir.write_genotype(self.genotype_dir, genotype, epoch + 1)


class SparseRecovery(_ArchitectureCallback):
    """The two-stage search's recovery after each epoch (Algorithm 1) inside ``fit``.

    At each epoch's end: recovers every node from the trained b and commits it
    (``search_run.recover_and_commit``, as the command line), traces Keras' functions
    again when the support changed, logs the genotype, and adds ``support_changed``
    (0/1) and ``recovery_time_s`` to the epoch's logs.

    When ``fit`` starts past epoch 0 (``initial_epoch`` or a ``BackupAndRestore``
    resume), the first epoch's start recovers again: a backup taken before the last
    recovery (``BackupAndRestore`` listed first) then ends where the uninterrupted run
    was, and one taken after it recovers the z it holds (same b, same optimum).

    Args:
      genotype_dir: see ``_ArchitectureCallback``.

    Attributes:
      genotypes: the genotype after each epoch's recovery, in order.
      z_distances: per epoch, ``||z_new - z_last||_2`` per cell type and node.
    """

    def __init__(self, genotype_dir: str | None = None):
        super().__init__(genotype_dir)
        self.z_distances: list[dict[str, list[float]]] = []

    def _resume(self, epoch: int) -> None:
        if epoch > 0 and search_run.recover_and_commit(self.model).changed:
            logging.info("epoch %d: recovered the restored architecture codes", epoch + 1)
            retrace(self.model)

    def on_epoch_end(self, epoch, logs=None):
        recovery = search_run.recover_and_commit(self.model)
        if recovery.changed:
            retrace(self.model)
        self.z_distances.append(recovery.report.get("z_distance", {}))
        self._record(epoch, recovery.genotype)
        if logs is not None:
            logs.update(
                support_changed=float(recovery.changed),
                recovery_time_s=recovery.seconds,
                **_report_scalars(recovery.report),
            )
        logging.info(
            "epoch %d: recovery %.3f s, support changed %s, genotype %s",
            epoch + 1,
            recovery.seconds,
            recovery.changed,
            json.dumps(genotypes.to_json_dict(recovery.genotype)),
        )


class OneStageStopping(_ArchitectureCallback):
    """The one-stage search's stopping rule after each epoch inside ``fit``.

    As the command line's search epoch: when every node had stopped before this epoch,
    the search ends here (``model.stop_training``); otherwise ``one_stage.stopping_step``
    recovers the searching nodes, freezes those whose z moved by at most
    ``freeze_tolerance``, rejects (keeps z_last) an architecture of ``max_params``
    parameters or more (or ``max_multiply_adds`` multiply-adds), and at ``search_epochs``
    freezes the nodes still searching and ends the search. The epoch's logs get
    ``frozen_nodes`` (count), ``newly_frozen``, ``rejected`` (0/1), ``params`` (of the
    evaluation network), ``recovery_time_s`` and the recovery report's
    ``kkt_violation_max`` and ``certified_nodes``.

    List it before ``BackupAndRestore``, so that each backup holds the epoch's decision
    (the rule is not idempotent: it cannot be replayed on a resume). Once the search has
    ended it does nothing: the training phase (``fit`` again, e.g. with
    ``cosine_learning_rate_schedule`` and ``model.drop_path_rate`` ramped) may keep it.

    Args:
      freeze_tolerance, max_params, search_epochs, max_multiply_adds: as
        ``OneStageConfig`` (the flags of the same names; ``max_multiply_adds`` None: no
        multiply-add limit).
      genotype_dir: see ``_ArchitectureCallback``.

    Attributes:
      search_ended: the epoch (1-based) the search ended at, 0 while it goes on.
      stop_epochs: per cell type and node, the epoch the node stopped at (0: searching).
      forced_stops: per cell type, the nodes the ``search_epochs`` cap froze.
      genotypes: the genotype after each epoch.
    """

    one_stage = True

    def __init__(
        self,
        freeze_tolerance: float = config_lib.OneStageConfig.freeze_tolerance,
        max_params: int = config_lib.OneStageConfig.max_params,
        search_epochs: int = config_lib.OneStageConfig.search_epochs,
        genotype_dir: str | None = None,
        max_multiply_adds: int | None = None,
    ):
        super().__init__(genotype_dir)
        for name, value, least in (
            ("freeze_tolerance", freeze_tolerance, 0),
            ("max_params", max_params, 1),
            ("search_epochs", search_epochs, 1),
            ("max_multiply_adds", 1 if max_multiply_adds is None else max_multiply_adds, 1),
        ):
            if not value >= least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        self.freeze_tolerance, self.max_params = freeze_tolerance, max_params
        self.search_epochs, self.max_multiply_adds = search_epochs, max_multiply_adds
        self.search_ended = 0
        self.stop_epochs = {t: [0] * genotypes.STEPS for t in genotypes.CELL_TYPES}
        self.forced_stops = {t: [] for t in genotypes.CELL_TYPES}

    def on_epoch_end(self, epoch, logs=None):
        if self.search_ended:
            return  # a later fit (the training phase) with this callback still listed
        model = self.model
        before = (model.supports, model.frozen_nodes)
        row = dict(recovery_time_s=0.0, newly_frozen=0.0, rejected=0.0)
        if all(all(flags) for flags in model.frozen_nodes.values()):
            self.search_ended = epoch + 1  # every node stopped after the last epoch
        else:
            self._stopping_rule(epoch, row)
        if (model.supports, model.frozen_nodes) != before:
            retrace(model)  # the steps run other ops or train other variables
        if self.search_ended:
            model.stop_training = True
            logging.info(
                "the one-stage search ended at epoch %d; node stop epochs %s, forced %s",
                self.search_ended,
                self.stop_epochs,
                self.forced_stops,
            )
        self._record(epoch, model.genotype())
        frozen = sum(sum(flags) for flags in model.frozen_nodes.values())
        row.update(frozen_nodes=float(frozen), params=float(model.evaluation_parameter_count()))
        if logs is not None:
            logs.update(row)

    def _stopping_rule(self, epoch: int, row: dict) -> None:
        """One stopping step after epoch ``epoch`` (0-based), its result in ``row``."""
        start = time.perf_counter()
        recoveries = self.model.recover()
        decision = one_stage.stopping_step(
            self.model,
            freeze_tolerance=self.freeze_tolerance,
            max_params=self.max_params,
            recoveries=recoveries,
            max_multiply_adds=self.max_multiply_adds,
        )
        row["recovery_time_s"] = time.perf_counter() - start
        row.update(_report_scalars(architecture.recovery_report(recoveries, decision.searching)))
        for cell_type, nodes in decision.newly_frozen.items():
            for node in nodes:
                self.stop_epochs[cell_type][node] = epoch + 1
        row["newly_frozen"] = float(sum(len(n) for n in decision.newly_frozen.values()))
        row["rejected"] = float(decision.rejected)
        logging.info(
            "epoch %d: stopped nodes %s, z distances %s",
            epoch + 1,
            decision.newly_frozen,
            decision.distances,
        )
        if decision.rejected:
            logging.warning(
                "epoch %d: the recovered architecture is over %s: rejected, keeping the last z",
                epoch + 1,
                decision.rejection_reason(
                    {"max_params": self.max_params, "max_multiply_adds": self.max_multiply_adds}
                ),
            )
        if epoch + 1 >= self.search_epochs:
            self.forced_stops = one_stage.freeze_searching_nodes(self.model)
            for cell_type, nodes in self.forced_stops.items():
                for node in nodes:
                    self.stop_epochs[cell_type][node] = epoch + 1
            if any(self.forced_stops.values()):
                logging.warning(
                    "search_epochs=%d reached with nodes still searching: froze them at "
                    "their last z (forced stops %s)",
                    self.search_epochs,
                    self.forced_stops,
                )
            self.search_ended = epoch + 1
