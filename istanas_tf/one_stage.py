"""The one-stage search and evaluation (METHOD.md section 4) as one run.

The super-net is the target network (``SearchNetworkConfig(one_stage=True)``: 20 cells,
C = 36, auxiliary head, affine BN after every op). A run has two phases in one run
directory, both resumable:

1. **Search.** Each epoch trains weights and the b of the nodes still searching on the
   same batches (the full training split, cutout), lr held at ``learning_rate``. After
   the epoch the search ends if every node is frozen; otherwise :func:`stopping_step`
   recovers the nodes still searching, freezes each node whose z moved by at most
   ``freeze_tolerance``, and rejects the new z (keeping z_last) when its evaluation
   network would have ``max_params`` parameters or more.
2. **Training.** The architecture fixed, ``epochs`` more epochs with a cosine lr
   ``learning_rate -> learning_rate_min`` and drop path ramped ``0 -> drop_path_prob``.

At the end the alphas are folded into the BNs (``absorption.absorb``), the resulting
evaluation network is evaluated on the test split and exported as a SavedModel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from istanas_tf import absorption
from istanas_tf import data
from istanas_tf import export
from istanas_tf import genotypes
from istanas_tf import networks
from istanas_tf import run_dir
from istanas_tf import search_model
from istanas_tf import sparse_coding
from istanas_tf import training

CELL_TYPES = ("normal", "reduce")
# The published code's cap: a larger candidate network "may cause out of memory".
DEFAULT_MAX_PARAMS = 3_700_000


def default_network() -> search_model.SearchNetworkConfig:
    """The paper's one-stage super-net: the CIFAR target network, 20 cells, C = 36."""
    return search_model.SearchNetworkConfig(channels=36, layers=20, one_stage=True)


@dataclasses.dataclass(frozen=True)
class OneStageConfig:
    """A one-stage run (METHOD.md section 4); fields mirror the CLI flags.

    Attributes:
      model_dir: run directory; rerun the same command to resume (in either phase).
      network: the super-net (``one_stage=True``; 20 cells, C = 36 in the paper).
      data: input settings (``cutout_length`` 16); the whole training split is used.
      search_epochs: the most search epochs. The search normally ends earlier, when
        every node has frozen; nodes still searching at this cap are frozen at their
        last z (reported as forced).
      epochs: training epochs after the search, architecture fixed (600).
      batch_size: global batch size (96).
      learning_rate: weight lr, held during the search; the cosine schedule of the
        training phase starts here (0.025).
      learning_rate_min: lr of the training phase's last epoch (0.001).
      momentum, weight_decay, grad_clip: weight SGD (0.9, L2 3e-4, global norm 5).
      arch_learning_rate, arch_weight_decay, arch_beta1, arch_beta2: Adam on b (3e-4,
        L2 1e-3, 0.5, 0.999).
      drop_path_prob: drop path rate reached at the last training epoch (0 in search).
      freeze_tolerance: node j stops searching when ``||z_new - z_last||_2`` is at most
        this (1e-3).
      max_params: a recovered architecture whose evaluation network (this run's C and
        cells, auxiliary head not counted) has this many parameters or more is rejected
        and z_last kept (3.7M; the freeze decisions of that epoch still stand).
      strategy, steps_per_epoch, eval_steps, deterministic, mixed_precision, verbose: as
        in training.SearchConfig (evaluation is on the test split, only reported).
      export_dir, model_name: the final SavedModel goes to
        ``<export_dir>/<model_name>/<next version>``; default ``<model_dir>/export``.
    """

    model_dir: str
    network: search_model.SearchNetworkConfig = dataclasses.field(
        default_factory=default_network)
    data: data.DataConfig = data.DataConfig(cutout_length=16)
    search_epochs: int = 600
    epochs: int = 600
    batch_size: int = 96
    learning_rate: float = 0.025
    learning_rate_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_learning_rate: float = 3e-4
    arch_weight_decay: float = 1e-3
    arch_beta1: float = 0.5
    arch_beta2: float = 0.999
    drop_path_prob: float = 0.2
    freeze_tolerance: float = 1e-3
    max_params: int = DEFAULT_MAX_PARAMS
    strategy: str = "default"
    steps_per_epoch: int | None = None
    eval_steps: int | None = None
    deterministic: bool = False
    mixed_precision: str | None = None
    verbose: bool = True
    export_dir: str | None = None
    model_name: str = "istanas"

    def validate(self) -> None:
        """Raises ValueError naming the flag of the first invalid setting."""
        training.check_settings(training.loop_checks(self) + [
            (self.network.one_stage,
             "the one-stage run needs SearchNetworkConfig(one_stage=True)"),
            (self.search_epochs >= 1,
             f"--search_epochs must be >= 1, got {self.search_epochs}"),
            (0 <= self.drop_path_prob < 1,
             f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob}"),
            (self.freeze_tolerance >= 0,
             f"--freeze_tolerance must be >= 0, got {self.freeze_tolerance}"),
            (self.max_params >= 1, f"--max_params must be >= 1, got {self.max_params}"),
        ] + training.architecture_checks(self))
        self.network.validate()
        self.data.validate()

    def run_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the recorded one, by flag name."""
        return {"run": "one_stage", **training.flat_settings(
            self, ("model_dir", "verbose", "num_classes", "export_dir", "model_name"))}

    @classmethod
    def from_run_settings(cls, model_dir: str, settings: dict[str, Any]) -> "OneStageConfig":
        """The config recorded in a run directory's run_config.json."""
        pick = lambda klass: {f.name: _tuple(settings[f.name])
                              for f in dataclasses.fields(klass) if f.name in settings}
        network = search_model.SearchNetworkConfig(**pick(search_model.SearchNetworkConfig))
        data_config = data.DataConfig(**pick(data.DataConfig))
        own = {f.name: settings[f.name] for f in dataclasses.fields(cls)
               if f.name in settings and f.name not in ("network", "data")}
        return cls(model_dir=model_dir, network=network, data=data_config, **own)


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


# Settings that may differ when a run is resumed: they do not change its results so far.
RESUMABLE_CHANGES = ("epochs", "search_epochs", "strategy", "eval_steps", "data_dir",
                     "manual_dir", "skip_corrupt_images")


# ---------------------------------------------------------------------- stopping rule
def evaluation_parameter_count(model: search_model.SearchNetwork,
                               supports: dict[str, Sequence[Sequence[int]]] | None = None
                               ) -> int:
    """Parameters of the evaluation network of ``supports`` (default: the current ones).

    The one-stage super-net holds the evaluation network of any support: the same stem,
    preprocessing, classifier and candidate ops (each ending in a BN, as with
    ``bn_after_param_free_ops``). So the count is the super-net's trainable parameters
    outside the candidate ops, the architecture and the auxiliary head, plus those of
    the candidate ops on the support, in every cell. This matches
    ``networks.count_parameters`` of the absorbed network, without building it.
    """
    supports = model.supports if supports is None else supports
    excluded = {id(v) for cell in model.cells for node in range(cell.steps)
                for op in cell.candidate_ops(node) for v in op.trainable_variables}
    excluded |= {id(v) for v in model.architecture_variables}
    if model.auxiliary_head is not None:
        excluded |= {id(v) for v in model.auxiliary_head.trainable_variables}
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables
                if id(v) not in excluded)
    for cell in model.cells:
        cell_type = "reduce" if cell.reduction else "normal"
        for op in cell.active_ops(supports[cell_type]):
            total += sum(int(np.prod(v.shape)) for v in op.trainable_variables)
    return total


@dataclasses.dataclass(frozen=True)
class StopDecision:
    """What one after-epoch step of the stopping rule decided.

    Attributes:
      distances: per cell type, ``||z_new - z_last||_2`` of each node (0 for nodes frozen
        before this epoch, which are not recovered).
      newly_frozen: per cell type, the nodes that stopped searching at this epoch.
      candidate_genotype: the genotype of the new z (frozen nodes keeping z_last).
      candidate_params: its evaluation network's parameters (auxiliary head excluded).
      rejected: the candidate had ``max_params`` or more, so z_last was kept.
    """

    distances: dict[str, list[float]]
    newly_frozen: dict[str, list[int]]
    candidate_genotype: genotypes.Genotype
    candidate_params: int
    rejected: bool


def stopping_step(model: search_model.SearchNetwork, freeze_tolerance: float,
                  max_params: int,
                  solve: Callable = sparse_coding.solve_jointly) -> StopDecision:
    """The after-epoch step of METHOD.md section 4 for the nodes still searching.

    Recovers z_new for every cell type; a node not yet frozen freezes when
    ``||z_new - z_last||_2 <= freeze_tolerance`` (``model.freeze_node``: its b stops
    training, the BN gamma/beta inside its candidate ops in every cell of its type
    become trainable). If the evaluation network of the new supports has ``max_params``
    parameters or more, z_last is kept for every node (the freeze decisions stand);
    otherwise the nodes that were searching take z_new.

    Args:
      model: a one-stage SearchNetwork.
      freeze_tolerance: the distance at or below which a node stops.
      max_params: the rejection threshold.
      solve: ``solve_jointly``-like: encodings -> one ``Recovery`` per encoding (tests
        script it).
    """
    frozen_before = model.frozen_nodes
    encodings = [model.architectures[cell_type] for cell_type in CELL_TYPES]
    recoveries = solve(encodings)
    distances, newly_frozen, supports, searching = {}, {}, {}, {}
    for cell_type, encoding, recovery in zip(CELL_TYPES, encodings, recoveries):
        searching[cell_type] = np.logical_not(frozen_before[cell_type])
        distance = np.where(searching[cell_type], np.asarray(recovery.distances), 0.0)
        distances[cell_type] = [float(d) for d in distance]
        newly_frozen[cell_type] = [int(j) for j in np.flatnonzero(
            searching[cell_type] & (distance <= freeze_tolerance))]
        support = np.where(searching[cell_type][:, None], np.asarray(recovery.support),
                           encoding.support.numpy())
        supports[cell_type] = tuple(tuple(int(i) for i in row) for row in support)
    candidate = genotypes.genotype_from_picks(
        *(sparse_coding.picks_from_support(supports[t], search_model.NUM_OPS)
          for t in CELL_TYPES))
    params = evaluation_parameter_count(model, supports)
    rejected = params >= max_params
    if not rejected:
        for cell_type, encoding, recovery in zip(CELL_TYPES, encodings, recoveries):
            encoding.commit(recovery, nodes=searching[cell_type])
    for cell_type, nodes in newly_frozen.items():
        for node in nodes:
            model.freeze_node(cell_type, node)
    model.sync_supports()
    return StopDecision(distances, newly_frozen, candidate, params, rejected)


# ---------------------------------------------------------------------- the run
class OneStageRun:
    """Builds (or restores) a one-stage run and runs what is left of it.

    Run state beyond the model and optimizers (checkpointed with them): the epoch
    counter over both phases, the search length once the search has ended (0 before),
    and per node the epoch it stopped at and whether the cap forced it.
    """

    def __init__(self, config: OneStageConfig):
        config.validate()
        self.config = config
        if config.deterministic:
            keras.utils.set_random_seed(config.data.seed)
            tf.config.experimental.enable_op_determinism()
        self.strategy = training.make_strategy(config.strategy)
        self.chief = training.is_chief(self.strategy)
        data.check_divisible(config.batch_size, self.strategy.num_replicas_in_sync)
        self.info = data.get_dataset_info(config.data)
        if self.info.augmentation != "cifar":
            raise ValueError(f"--method=ista_onestage builds the CIFAR network; "
                             f"--dataset={config.data.dataset} has {self.info.image_size} "
                             "images (ImageNet-sized input is not supported)")
        if self.chief:
            run_dir.check_run_config(config.model_dir, config.run_settings(),
                                     RESUMABLE_CHANGES)
            run_dir.write_dataset_info(config.model_dir, self.info)
        network_config = dataclasses.replace(
            config.network, num_classes=self.info.num_classes,
            sync_batch_norm=(config.network.sync_batch_norm
                             and self.strategy.num_replicas_in_sync > 1))
        self.model, self.weight_optimizer, self.arch_optimizer = \
            training.build_search_model(config, self.strategy, network_config,
                                        self.info.image_size[0])
        with self.strategy.scope():
            self.progress = _SearchProgress()
            self.state = training.RunState(config.model_dir, self.strategy, {
                "model": self.model.variables,
                "weight_optimizer": self.weight_optimizer.variables,
                "arch_optimizer": self.arch_optimizer.variables,
                "one_stage": self.progress.variables})
        if self.state.restore():
            self.model.sync_supports()
        else:
            self.model.recover()
        self._train_fn = None
        self._eval_fn = None

    # ------------------------------------------------------------------ pieces
    def _steps_per_epoch(self) -> int:
        steps = data.steps_per_epoch(self.info, "train", self.config.batch_size,
                                     num_input_pipelines=training.num_input_pipelines(
                                         self.strategy))
        if steps < 1:
            raise ValueError(f"--batch_size={self.config.batch_size} is larger than the "
                             "training split")
        return min(steps, self.config.steps_per_epoch or steps)

    def _trace_steps(self) -> None:
        self._train_fn = training._distributed_step(self.strategy, self.model.train_step,
                                                    self.model)
        self._eval_fn = training._distributed_step(self.strategy, self.model.test_step,
                                                   self.model)

    def _train_epoch(self, epoch: int, steps: int) -> dict[str, float]:
        """One epoch of one-stage steps on the full training split (cutout)."""
        if self._train_fn is None:
            self._trace_steps()
        dataset = data.distributed_dataset(
            self.strategy, self.config.data, self.info, "train", training=True,
            global_batch_size=self.config.batch_size,
            cutout=self.config.data.cutout_length > 0, epoch_seed=epoch)
        logs, train_time, _ = training.run_train_steps(
            self._train_fn, self.model, dataset, steps, epoch=epoch,
            model_dir=self.config.model_dir, verbose=self.config.verbose and self.chief)
        return {**logs, "train_time_s": train_time}

    def _evaluate(self) -> dict[str, float]:
        """The super-net in inference mode on the test split (reported, not used)."""
        if self.config.eval_steps == 0:
            return {}
        dataset = data.distributed_dataset(self.strategy, self.config.data, self.info,
                                           "test", training=False,
                                           global_batch_size=self.config.batch_size)
        logs = training.run_eval_steps(self._eval_fn, self.model, dataset,
                                       self.config.eval_steps)
        return {"test_loss": logs.get("loss", float("nan")),
                "test_accuracy": logs.get("accuracy", float("nan"))}

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        """Runs the rest of the search, the training phase, then absorbs and exports."""
        final_path = os.path.join(self.config.model_dir, "final_metrics.json")
        steps = self._steps_per_epoch()
        while not self.progress.search_ended:
            self._search_epoch(int(self.state.epoch.numpy()), steps)
        search_epochs = self.progress.search_length
        for epoch in range(int(self.state.epoch.numpy()), search_epochs + self.config.epochs):
            self._training_epoch(epoch, epoch - search_epochs, steps)
        if os.path.exists(final_path):
            with open(final_path) as f:
                final = json.load(f)
            # A rerun with more --epochs trained on above: absorb and export again.
            if final.get("train_epochs") == self.config.epochs:
                logging.info("Run already finished in %s", self.config.model_dir)
                return final
        return self._finish(final_path)

    def _search_epoch(self, epoch: int, steps: int) -> None:
        config = self.config
        self.weight_optimizer.learning_rate = config.learning_rate
        self.model.drop_path_rate.assign(0.0)
        logs = self._train_epoch(epoch, steps)
        logs.update(self._evaluate())
        row: dict[str, Any] = {"epoch": epoch + 1, "phase": "search",
                               "lr": config.learning_rate, **logs}
        architecture_before = (self.model.supports, self.model.frozen_nodes)
        if all(all(flags) for flags in self.model.frozen_nodes.values()):
            # Every node stopped after the previous epoch: the search ends here.
            self.progress.end_search(epoch + 1)
        else:
            start = time.perf_counter()
            decision = stopping_step(self.model, config.freeze_tolerance, config.max_params)
            row["recovery_time_s"] = time.perf_counter() - start
            for cell_type, nodes in decision.newly_frozen.items():
                for node in nodes:
                    self.progress.stop_node(cell_type, node, epoch + 1)
            row.update(z_distance=decision.distances, newly_frozen=decision.newly_frozen,
                       candidate_params=decision.candidate_params,
                       rejected=decision.rejected)
            if decision.rejected:
                row["rejected_genotype"] = genotypes.to_json_dict(decision.candidate_genotype)
                logging.warning("epoch %d: the recovered architecture has %d parameters "
                                ">= --max_params=%d: rejected, keeping the last z", epoch + 1,
                                decision.candidate_params, config.max_params)
            if epoch + 1 >= config.search_epochs:
                self._force_stop(epoch + 1)
        if (self.model.supports, self.model.frozen_nodes) != architecture_before:
            self._trace_steps()  # the steps run other ops or train other variables
        genotype = self.model.genotype()
        row.update(frozen=self._frozen_lists(), params=evaluation_parameter_count(self.model),
                   genotype=genotypes.to_json_dict(genotype))
        if self.progress.search_ended:
            row.update(search_ended=True, node_stop_epochs=self.progress.stop_epochs(),
                       forced_stops=self.progress.forced_stops())
        if self.chief:
            self.state.metrics_log.append(row)
            run_dir.write_genotype(config.model_dir, genotype, epoch + 1)
            training.write_genotype_diagram(config.model_dir, self.state.writer, genotype,
                                            epoch + 1)
            self._write_summaries(row, epoch + 1, search=True)
            if self.progress.search_ended:
                self._write_search_summary(genotype)
        self.state.save(epoch + 1)
        frozen = sum(sum(flags) for flags in self.model.frozen_nodes.values())
        logging.info("search epoch %d  loss %.4f  acc %.4f  test_acc %s  frozen %d/%d%s%s",
                     epoch + 1, logs.get("loss", float("nan")),
                     logs.get("accuracy", float("nan")),
                     _fmt(logs.get("test_accuracy")), frozen, 2 * genotypes.STEPS,
                     "  (rejected)" if row.get("rejected") else "",
                     f"  search ended after {epoch + 1} epochs; node stop epochs "
                     f"{self.progress.stop_epochs()}" if self.progress.search_ended else "")

    def _force_stop(self, epoch: int) -> None:
        """Ends the search at the --search_epochs cap, freezing the nodes still searching
        at their last z."""
        forced = False
        for cell_type, flags in self.model.frozen_nodes.items():
            for node, frozen in enumerate(flags):
                if not frozen:
                    self.model.freeze_node(cell_type, node)
                    self.progress.stop_node(cell_type, node, epoch, forced=True)
                    forced = True
        if forced:
            logging.warning("--search_epochs=%d reached with nodes still searching: froze "
                            "them at their last z (forced stops %s)",
                            self.config.search_epochs, self.progress.forced_stops())
        self.progress.end_search(epoch)

    def _training_epoch(self, epoch: int, phase_epoch: int, steps: int) -> None:
        config = self.config
        lr = training.cosine_learning_rate(phase_epoch, config.epochs, config.learning_rate,
                                           config.learning_rate_min)
        drop_path = config.drop_path_prob * phase_epoch / config.epochs
        self.weight_optimizer.learning_rate = lr
        self.model.drop_path_rate.assign(drop_path)
        logs = self._train_epoch(epoch, steps)
        logs.update(self._evaluate())
        row = {"epoch": epoch + 1, "phase": "train", "train_epoch": phase_epoch + 1,
               "lr": lr, "drop_path_rate": drop_path, **logs}
        if self.chief:
            self.state.metrics_log.append(row)
            self._write_summaries(row, epoch + 1, search=False)
        self.state.save(epoch + 1)
        logging.info("train epoch %d/%d  lr %.4g  drop path %.3f  loss %.4f  acc %.4f  "
                     "test_acc %s  %.1fs", phase_epoch + 1, config.epochs, lr, drop_path,
                     logs.get("loss", float("nan")), logs.get("accuracy", float("nan")),
                     _fmt(logs.get("test_accuracy")), logs["train_time_s"])

    def _finish(self, final_path: str) -> dict[str, Any]:
        """Absorbs the alphas, evaluates the evaluation network on the test split, exports."""
        from istanas_tf import retraining
        network = absorption.absorb(self.model, self.info.image_size[0], auxiliary=False)
        final = retraining.evaluate_network(network, self.config.data, self.info, "test",
                                            self.config.batch_size)
        result = {"search_epochs": self.progress.search_length,
                  "train_epochs": self.config.epochs,
                  "node_stop_epochs": self.progress.stop_epochs(),
                  "forced_stops": self.progress.forced_stops(),
                  "test_top1": final["top1"], "test_top5": final["top5"],
                  "test_examples": final["examples"],
                  "params": networks.count_parameters(network),
                  "genotype": genotypes.to_json_dict(self.model.genotype())}
        if self.chief:
            result["export"] = export.export_for_dataset(
                network, self.info, self.config.export_dir
                or os.path.join(self.config.model_dir, "export"), self.config.model_name)
            run_dir.atomic_write_text(final_path, json.dumps(result, indent=2) + "\n")
        logging.info("one-stage run finished: test top-1 %.4f top-5 %.4f, %d parameters, "
                     "search %d epochs", final["top1"], final["top5"], result["params"],
                     result["search_epochs"])
        return result

    # ------------------------------------------------------------------ logs
    def _frozen_lists(self) -> dict[str, list[bool]]:
        return {t: list(flags) for t, flags in self.model.frozen_nodes.items()}

    def _write_summaries(self, row: dict[str, Any], epoch: int, search: bool) -> None:
        with self.state.writer.as_default(step=epoch):
            for key in ("loss", "accuracy", "test_loss", "test_accuracy", "lr",
                        "drop_path_rate", "train_time_s", "recovery_time_s",
                        "candidate_params", "params"):
                if key in row:
                    tf.summary.scalar(key, row[key])
            if search:
                tf.summary.scalar("frozen_nodes",
                                  sum(sum(flags) for flags in row["frozen"].values()))
                tf.summary.text("genotype", json.dumps(row["genotype"]))
                for cell_type in CELL_TYPES:
                    for node, z in enumerate(self.model.z_values(cell_type)):
                        tf.summary.histogram(f"abs_z/{cell_type}/node{node}", np.abs(z))
            self.state.writer.flush()

    def _write_search_summary(self, genotype: genotypes.Genotype) -> None:
        summary = {"search_epochs": self.progress.search_length,
                   "node_stop_epochs": self.progress.stop_epochs(),
                   "forced_stops": self.progress.forced_stops(),
                   "params": evaluation_parameter_count(self.model),
                   "genotype": genotypes.to_json_dict(genotype)}
        run_dir.atomic_write_text(os.path.join(self.config.model_dir, "search_summary.json"),
                                  json.dumps(summary, indent=2) + "\n")


class _SearchProgress:
    """Checkpointed one-stage bookkeeping: search length and per-node stop epochs."""

    def __init__(self):
        shape = (len(CELL_TYPES), genotypes.STEPS)
        self.search_epochs = keras.Variable(0, dtype="int64", trainable=False,
                                            name="one_stage_search_epochs")
        self.stop_epoch = keras.Variable(np.zeros(shape, np.int64), trainable=False,
                                         name="one_stage_node_stop_epoch")
        self.forced = keras.Variable(np.zeros(shape, np.int64), trainable=False,
                                     name="one_stage_node_stop_forced")

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
        index = [[CELL_TYPES.index(cell_type), node]]
        self.stop_epoch.assign(tf.tensor_scatter_nd_update(
            self.stop_epoch.value, index, tf.constant([epoch], tf.int64)))
        self.forced.assign(tf.tensor_scatter_nd_update(
            self.forced.value, index, tf.constant([int(forced)], tf.int64)))

    def stop_epochs(self) -> dict[str, list[int]]:
        """Per cell type, the epoch each node stopped searching at (0: still searching)."""
        values = self.stop_epoch.numpy()
        return {t: [int(v) for v in values[i]] for i, t in enumerate(CELL_TYPES)}

    def forced_stops(self) -> dict[str, list[int]]:
        """Per cell type, the nodes frozen by the --search_epochs cap."""
        values = self.forced.numpy()
        return {t: [int(j) for j in np.flatnonzero(values[i])]
                for i, t in enumerate(CELL_TYPES)}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------- restoring a run
def restore_network(model_dir: str, settings: dict[str, Any], num_classes: int,
                    image_size: int) -> tuple[networks.NetworkCIFAR, dict[str, Any]]:
    """The absorbed evaluation network of a one-stage run directory's latest checkpoint.

    Returns the network and a status dict (epoch, search_epochs, train_epochs done).

    Raises:
      run_dir.RunDirError: no checkpoint, or the search has not ended yet.
    """
    config = OneStageConfig.from_run_settings(model_dir, settings)
    checkpoint = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if not checkpoint:
        raise run_dir.RunDirError(f"--model_dir={model_dir} holds no checkpoint yet; run "
                                  "the one-stage search first")
    model = search_model.SearchNetwork(
        dataclasses.replace(config.network, num_classes=num_classes, sync_batch_norm=False),
        name="search_network")
    model.build_all(image_size)
    progress = _SearchProgress()
    epoch = tf.Variable(0, dtype=tf.int64)
    tf.train.Checkpoint(epoch=epoch, model=training.variables_by_path(model.variables),
                        one_stage=training.variables_by_path(progress.variables)
                        ).restore(checkpoint).expect_partial()
    model.sync_supports()
    epoch = int(epoch.numpy())
    if not progress.search_ended:
        frozen = sum(sum(flags) for flags in model.frozen_nodes.values())
        raise run_dir.RunDirError(
            f"--model_dir={model_dir}: the one-stage search has not ended (epoch {epoch}, "
            f"{frozen} of {2 * genotypes.STEPS} nodes frozen), so there is no final "
            "architecture to export yet; resume the run with its command")
    status = {"epoch": epoch, "search_epochs": progress.search_length,
              "train_epochs_done": epoch - progress.search_length,
              "train_epochs": config.epochs}
    if status["train_epochs_done"] < config.epochs:
        logging.warning("%s: the training phase is at epoch %d of %d; exporting its latest "
                        "checkpoint", model_dir, status["train_epochs_done"], config.epochs)
    return absorption.absorb(model, image_size, auxiliary=False), status


def run_one_stage(config: OneStageConfig) -> dict[str, Any]:
    """Runs (or resumes) a one-stage search and training; returns the final metrics."""
    return OneStageRun(config).run()
