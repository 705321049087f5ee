"""The one-stage search and evaluation (docs/method.md section 4) as one run.

The super-net is the target network (``SearchNetworkConfig(one_stage=True)``: 20 cells,
C = 36, auxiliary head, affine BN after every op), in the shape of the evaluation
network of its data: NetworkCIFAR, or NetworkImageNet (two stems of stride 8, C = 48,
14 cells) for ImageNet-sized images. A run has two phases in one run directory, both
resumable:

1. **Search.** Each epoch trains weights and the b of the nodes still searching on the
   same batches (the full training split), lr held at ``learning_rate`` (under
   ``warmup_linear``: reached by a linear warm-up over the first ``warmup_epochs``).
   After the epoch the search ends if every node is frozen; otherwise
   :func:`stopping_step` recovers the nodes, lets ``stopping.decide`` freeze each node
   whose z moved by at most ``freeze_tolerance`` and reject the new z (keeping z_last)
   when its evaluation network would have ``max_params`` parameters or more (or
   ``max_multiply_adds`` multiply-adds or more), and applies the decision. A run whose
   limits leave no architecture at all is refused at its start.
2. **Training.** The architecture fixed, ``loop.epochs`` more epochs with the lr of
   ``lr_schedule`` (cosine ``learning_rate -> learning_rate_min``, or the ImageNet
   retraining's warm-up then linear decay) and drop path ramped ``0 -> drop_path_prob``.

At the end the alphas are folded into the BNs (``absorption.absorb``), the resulting
evaluation network is evaluated on the test split and exported as a SavedModel.
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging

from istanas_tf import (
    absorption,
    architecture,
    export,
    genotypes,
    network_size,
    search_model,
    stopping,
)
from istanas_tf.training import config as config_lib
from istanas_tf.training import evaluate, run_dir, runtime, search_run
from istanas_tf.training import state as state_lib
from istanas_tf.training import steps as steps_lib

CELL_TYPES = genotypes.CELL_TYPES


def stopping_step(
    model: search_model.SearchNetwork,
    freeze_tolerance: float,
    max_params: int,
    recoveries=None,
    max_multiply_adds: int | None = None,
) -> stopping.StopDecision:
    """One after-epoch step of the stopping rule, applied to ``model``.

    Recovers every node (``model.recover()``, unless ``recoveries`` are given), decides
    (``stopping.decide``, multiply-adds counted only when ``max_multiply_adds`` is set
    and at the image size the super-net was built for), then commits the new z of the
    nodes that were searching unless the candidate was rejected, and freezes the nodes that stopped
    (``model.freeze_node``: b stops training, their candidate ops' BN gamma/beta train).
    """
    recoveries = model.recover() if recoveries is None else recoveries
    decision = stopping.decide(
        recoveries,
        model.supports,
        model.frozen_nodes,
        freeze_tolerance,
        max_params,
        model.evaluation_parameter_count,
        max_multiply_adds,
        model.evaluation_multiply_adds,
    )
    if not decision.rejected:
        model.commit(recoveries, nodes=decision.searching)
    for cell_type, nodes in decision.newly_frozen.items():
        for node in nodes:
            model.freeze_node(cell_type, node)
    return decision


def freeze_searching_nodes(model: search_model.SearchNetwork) -> dict[str, list[int]]:
    """Stops the nodes still searching at their last z (the ``--search_epochs`` cap);
    returns them per cell type."""
    forced = {cell_type: [] for cell_type in CELL_TYPES}
    for cell_type, flags in model.frozen_nodes.items():
        for node, frozen in enumerate(flags):
            if not frozen:
                model.freeze_node(cell_type, node)
                forced[cell_type].append(node)
    return forced


def check_limits(model: search_model.SearchNetwork, config: config_lib.OneStageConfig) -> None:
    """Refuses limits that reject every architecture: the smallest evaluation network
    of this C, these cells and this image size (two parameter-free ops per node, as far
    as the search space allows) already reaches ``--max_params`` or
    ``--max_multiply_adds``. Each limit is checked against its own smallest value.

    Warns when the first architecture is over a limit (the search then keeps it until
    a recovered one fits).
    """
    size, network = model.evaluation_size(), config.network
    counts = {
        "max_params": ("parameters", size.smallest_parameters, model.evaluation_parameter_count)
    }
    if config.max_multiply_adds is not None:
        counts["max_multiply_adds"] = (
            "multiply-adds",
            size.smallest_multiply_adds,
            model.evaluation_multiply_adds,
        )
    for flag, (what, smallest, current) in counts.items():
        limit = getattr(config, flag)
        least = smallest(network.sparseness, network.distinct_inputs)
        if least >= limit:
            raise ValueError(
                f"--{flag}={limit} rejects every architecture: the smallest evaluation "
                f"network of --init_channels={network.channels} --layers={network.layers} "
                f"at {model.image_size}x{model.image_size} images has {least:,} {what} "
                f"(an architecture is kept only below the limit); raise --{flag} above "
                f"{least} or lower --init_channels or --layers"
            )
        if current() >= limit:
            logging.warning(
                "the current architecture has %s %s, not below --%s=%d: the search keeps "
                "it until a recovered architecture fits",
                f"{current():,}",
                what,
                flag,
                limit,
            )


def search_learning_rate(config: config_lib.OneStageConfig, epoch: int) -> float:
    """The lr of search epoch ``epoch`` (0-based): ``learning_rate``; under
    ``warmup_linear`` reached by a linear warm-up over the first ``warmup_epochs`` (the
    ImageNet retraining's warm-up: the super-net also starts from scratch)."""
    lr = config.loop.learning_rate
    if config.lr_schedule == "warmup_linear" and epoch < config.warmup_epochs:
        return lr * (epoch + 1) / config.warmup_epochs
    return lr


class OneStageRun(search_run.SearchRun):
    """Builds (or restores) a one-stage run; ``run()`` runs what is left of it.

    Run state beyond the model and optimizers (checkpointed with them): the epoch
    counter over both phases, the search length once the search has ended (0 before),
    and per node the epoch it stopped at and whether the cap forced it
    (``state.OneStageProgress``).
    """

    def __init__(self, config: config_lib.OneStageConfig, **start_options):
        super().__init__(config, **start_options)
        if not self.progress.search_ended:
            check_limits(self.model, config)

    def _extra_state(self) -> dict[str, list]:
        self.progress = state_lib.OneStageProgress()
        return {"one_stage": self.progress.variables}

    def _train_epoch(self, epoch: int, steps: int) -> dict[str, float]:
        """One epoch of one-stage steps on the full training split (cutout), then the
        super-net in inference mode on the test split (reported, not used)."""
        config = self.config
        logs, train_time, _ = steps_lib.train_on_split(
            self, "train", epoch, steps, cutout=config.data.cutout_length > 0
        )
        return {
            **logs,
            "train_time_s": train_time,
            **steps_lib.evaluate_split(
                self.eval_fn,
                self.model,
                self.strategy,
                config.data,
                self.info,
                "test",
                batch_size=config.loop.batch_size,
                max_steps=config.loop.eval_steps,
                prefix="test",
                keys=("loss", "accuracy"),
            ),
        }

    def run(self) -> dict[str, Any]:
        """Runs the rest of the search, the training phase, then absorbs and exports."""
        loop = self.config.loop
        steps = steps_lib.steps_per_epoch(
            self.info, ("train",), loop.batch_size, self.strategy, loop.steps_per_epoch
        )
        while not self.progress.search_ended:
            self.search_epoch(self.state.epochs_done, steps)
        search_epochs = self.progress.search_length
        # The search's length is decided as it runs; the training phase's is known.
        self.clock = steps_lib.EpochClock(self.state.epochs_done, search_epochs + loop.epochs)
        for epoch in range(self.state.epochs_done, search_epochs + loop.epochs):
            self._training_epoch(epoch, epoch - search_epochs, steps)
        final = self.state.final_metrics()
        # A rerun with more --epochs trained on above: absorb and export again.
        if final is not None and final.get("train_epochs") == loop.epochs:
            logging.info("Run already finished in %s", self.config.model_dir)
            return final
        return self._finish()

    def search_epoch(self, epoch: int, steps: int) -> None:
        """One search epoch (0-based ``epoch``) and the stopping rule after it."""
        config = self.config
        lr = search_learning_rate(config, epoch)
        self.weight_optimizer.learning_rate = lr
        if self.model.set_drop_path_rate(0.0):
            self.trace_steps()  # steps without drop path
        logs = self._train_epoch(epoch, steps)
        row: dict[str, Any] = {"epoch": epoch + 1, "phase": "search", "lr": lr, **logs}
        architecture_before = (self.model.supports, self.model.frozen_nodes)
        if all(all(flags) for flags in self.model.frozen_nodes.values()):
            # Every node stopped after the previous epoch: the search ends here.
            self.progress.end_search(epoch + 1)
        else:
            start = time.perf_counter()
            recoveries = self.model.recover()
            decision = stopping_step(
                self.model,
                config.freeze_tolerance,
                config.max_params,
                recoveries=recoveries,
                max_multiply_adds=config.max_multiply_adds,
            )
            row["recovery_time_s"] = time.perf_counter() - start
            for cell_type, nodes in decision.newly_frozen.items():
                for node in nodes:
                    self.progress.stop_node(cell_type, node, epoch + 1)
            row.update(
                **architecture.recovery_report(recoveries, decision.searching),
                newly_frozen=decision.newly_frozen,
                candidate_params=decision.candidate_params,
                rejected=decision.rejected,
            )
            if decision.candidate_multiply_adds is not None:
                row["candidate_multiply_adds"] = decision.candidate_multiply_adds
            if decision.rejected:
                row["rejected_by"] = list(decision.rejected_by)
                row["rejected_genotype"] = genotypes.to_json_dict(
                    self.model.genotype(decision.candidate_supports)
                )
                logging.warning(
                    "epoch %d: the recovered architecture is over %s: rejected, keeping the last z",
                    epoch + 1,
                    decision.rejection_reason(
                        {
                            "max_params": config.max_params,
                            "max_multiply_adds": config.max_multiply_adds,
                        }
                    ),
                )
            if epoch + 1 >= config.search_epochs:
                self._force_stop(epoch + 1)
        if (self.model.supports, self.model.frozen_nodes) != architecture_before:
            self.trace_steps()  # the steps run other ops or train other variables
        genotype = self.model.genotype()
        row.update(
            frozen={t: list(flags) for t, flags in self.model.frozen_nodes.items()},
            params=self.model.evaluation_parameter_count(),
            genotype=genotypes.to_json_dict(genotype),
        )
        if config.max_multiply_adds is not None:
            row["multiply_adds"] = self.model.evaluation_multiply_adds()
        if self.progress.search_ended:
            summary = {
                "search_epochs": self.progress.search_length,
                "node_stop_epochs": self.progress.stop_epochs(),
                "forced_stops": self.progress.forced_stops(),
            }
            row.update(
                search_ended=True,
                node_stop_epochs=summary["node_stop_epochs"],
                forced_stops=summary["forced_stops"],
            )
            if self.chief:
                run_dir.write_json(
                    run_dir.path(config.model_dir, run_dir.SEARCH_SUMMARY),
                    {
                        **summary,
                        "params": row["params"],
                        **(
                            {"multiply_adds": row["multiply_adds"]}
                            if "multiply_adds" in row
                            else {}
                        ),
                        "genotype": row["genotype"],
                    },
                )
        self.state.end_epoch(row, genotype, self.model)
        frozen = sum(sum(flags) for flags in self.model.frozen_nodes.values())
        shown = {
            **steps_lib.with_recovery_summary(row),
            "frozen": f"{frozen}/{2 * genotypes.STEPS}",
        }
        steps_lib.log_epoch(
            f"search epoch {epoch + 1}",
            shown,
            (
                "loss",
                "accuracy",
                "test_accuracy",
                "frozen",
                "rejected",
                "node_stop_epochs",
                "kkt_violation_max",
                "certified_nodes",
            ),
        )

    def _force_stop(self, epoch: int) -> None:
        """Ends the search at the --search_epochs cap, freezing the nodes still searching
        at their last z."""
        forced = freeze_searching_nodes(self.model)
        for cell_type, nodes in forced.items():
            for node in nodes:
                self.progress.stop_node(cell_type, node, epoch, forced=True)
        if any(forced.values()):
            logging.warning(
                "--search_epochs=%d reached with nodes still searching: froze "
                "them at their last z (forced stops %s)",
                self.config.search_epochs,
                self.progress.forced_stops(),
            )
        self.progress.end_search(epoch)

    def _training_epoch(self, epoch: int, phase_epoch: int, steps: int) -> None:
        config, loop = self.config, self.config.loop
        lr = runtime.learning_rate_at(config, phase_epoch)
        drop_path = config.drop_path_prob * phase_epoch / loop.epochs
        self.weight_optimizer.learning_rate = lr
        if self.model.set_drop_path_rate(drop_path):
            self.trace_steps()  # drop path in or out of the steps
        logs = self._train_epoch(epoch, steps)
        row = {
            "epoch": epoch + 1,
            "phase": "train",
            "train_epoch": phase_epoch + 1,
            "lr": lr,
            "drop_path_rate": drop_path,
            **logs,
        }
        self.state.end_epoch(row)
        steps_lib.log_epoch(
            f"train epoch {phase_epoch + 1}/{loop.epochs}",
            row,
            ("lr", "drop_path_rate", "loss", "accuracy", "test_accuracy", "train_time_s"),
            self.clock,
        )

    def _finish(self) -> dict[str, Any]:
        """Absorbs the alphas, evaluates the evaluation network on the test split, exports."""
        config = self.config
        network = absorption.absorb(self.model, self.info.image_size[0], auxiliary=False)
        final = evaluate.evaluate_network(
            network, config.data, self.info, "test", config.loop.batch_size
        )
        result = {
            "search_epochs": self.progress.search_length,
            "train_epochs": config.loop.epochs,
            "node_stop_epochs": self.progress.stop_epochs(),
            "forced_stops": self.progress.forced_stops(),
            "test_top1": final["top1"],
            "test_top5": final["top5"],
            "test_examples": final["examples"],
            "params": network_size.count_parameters(network),
            "multiply_adds": network_size.count_multiply_adds(network, self.info.image_size[0]),
            "genotype": genotypes.to_json_dict(self.model.genotype()),
        }
        if self.chief:
            result["export"] = export.export_for_dataset(
                network,
                self.info,
                config.export_dir or run_dir.path(config.model_dir, run_dir.EXPORT),
                config.model_name,
            )
            self.state.write_final_metrics(result)
        logging.info(
            "one-stage run finished: test top-1 %.4f top-5 %.4f, %d parameters, search %d epochs",
            final["top1"],
            final["top5"],
            result["params"],
            result["search_epochs"],
        )
        return result


def run_one_stage(
    config: config_lib.OneStageConfig, flags_text: str | None = None
) -> dict[str, Any]:
    """Runs (or resumes) a one-stage search and training; returns the final metrics.

    ``flags_text`` (the command line's flags) is written to the run's ``flags.txt``.
    """
    return runtime.run_guarded(config, OneStageRun, flags_text)
