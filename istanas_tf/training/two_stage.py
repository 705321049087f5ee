"""The two-stage search (docs/method.md section 3): ISTA-NAS, or the DARTS baseline.

Each epoch: train (per batch an architecture step on a ``search_arch`` batch, then a
weight step on a ``search_weights`` batch), evaluate the super-net on the architecture
split, recover the architecture (one batched exact LASSO), log the genotype, checkpoint
everything, and trace the step functions again when the support changed. The final
genotype is then retrained from scratch (``retrain.run_training``).
"""

from __future__ import annotations

from typing import Any

from absl import logging

from istanas_tf import genotypes
from istanas_tf.training import config as config_lib
from istanas_tf.training import runtime, search_run
from istanas_tf.training import steps as steps_lib


class TwoStageRun(search_run.SearchRun):
    """Builds (or restores) the search of ``config``; ``run()`` runs the remaining epochs.

    Attributes:
      model: the super-net (``search_model.SearchNetwork``), compiled.
      state: the run directory's checkpoints, metrics and summaries.
      strategy, chief, info: as ``runtime.start`` set them up.
    """

    def __init__(self, config: config_lib.TwoStageConfig, **start_options):
        super().__init__(config, **start_options)

    def _train_step(self, weights_batch, arch_batch):
        return self.model.train_step((weights_batch, arch_batch))

    def run(self) -> dict[str, Any]:
        """Runs the remaining epochs; returns the last epoch's metrics and the genotype."""
        loop = self.config.loop
        steps = steps_lib.steps_per_epoch(
            self.info,
            ("search_weights", "search_arch"),
            loop.batch_size,
            self.strategy,
            loop.steps_per_epoch,
        )
        row: dict[str, Any] = {}
        if self.state.epochs_done >= loop.epochs:
            logging.info(
                "Search already finished (%d epochs) in %s",
                self.state.epochs_done,
                self.config.model_dir,
            )
        for epoch in range(self.state.epochs_done, loop.epochs):
            row = self._run_epoch(epoch, steps)
        return {**row, "genotype": genotypes.to_json_dict(self.model.genotype())}

    def _run_epoch(self, epoch: int, steps: int) -> dict[str, Any]:
        config, loop = self.config, self.config.loop
        lr = runtime.cosine_learning_rate(
            epoch, loop.epochs, loop.learning_rate, loop.learning_rate_min
        )
        self.weight_optimizer.learning_rate = lr
        weights_data, arch_data = (
            steps_lib.training_dataset(self, split, epoch)
            for split in ("search_weights", "search_arch")
        )
        logs, train_time, step_time = steps_lib.run_train_steps(
            lambda pair: self.train_fn(*pair),
            self.model,
            zip(weights_data, arch_data),
            steps,
            epoch=epoch,
            model_dir=config.model_dir,
            verbose=loop.verbose and self.chief,
        )
        eval_logs = steps_lib.evaluate_split(
            self.eval_fn,
            self.model,
            self.strategy,
            config.data,
            self.info,
            "search_arch",
            batch_size=loop.batch_size,
            max_steps=loop.eval_steps,
            prefix="val",
            keys=("loss", "accuracy"),
        )

        recovery = search_run.recover_and_commit(self.model)
        changed, genotype = recovery.changed, recovery.genotype

        row = {
            "epoch": epoch + 1,
            "lr": lr,
            **logs,
            **eval_logs,
            "train_time_s": train_time,
            "step_time_s": step_time,
            "recovery_time_s": recovery.seconds,
            "support_changed": changed,
            **recovery.report,
            "genotype": genotypes.to_json_dict(genotype),
        }
        self.state.end_epoch(row, genotype, self.model)
        steps_lib.log_epoch(
            f"epoch {epoch + 1}/{loop.epochs}",
            steps_lib.with_recovery_summary(row),
            (
                "lr",
                "loss",
                "accuracy",
                "arch_loss",
                "val_accuracy",
                "step_time_s",
                "recovery_time_s",
                "support_changed",
                "kkt_violation_max",
                "certified_nodes",
            ),
            self.clock,
        )
        if changed:
            self.trace_steps()
        return row


def run_two_stage(
    config: config_lib.TwoStageConfig, flags_text: str | None = None
) -> dict[str, Any]:
    """Runs (or resumes) a two-stage search; returns the final metrics and genotype.

    ``flags_text`` (the command line's flags) is written to the run's ``flags.txt``.
    """
    return runtime.run_guarded(config, TwoStageRun, flags_text)
