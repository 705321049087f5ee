"""Training a genotype's evaluation network from scratch (docs/method.md section 5).

NetworkCIFAR (C = 36, 20 cells) or NetworkImageNet (C = 48, 14 cells) with the auxiliary
head (weight 0.4), drop path ramped linearly from 0, cutout (CIFAR) or label smoothing
(ImageNet), SGD with L2 on the gradient and global-norm clipping, a cosine lr (CIFAR) or
a 5-epoch warm-up then linear decay (ImageNet). The same run machinery as the searches:
every strategy, resume from the run directory, TensorBoard and metrics.jsonl. The final
network is evaluated on the whole test split and exported as a SavedModel.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from absl import logging

from istanas_tf import export, genotypes, network_size
from istanas_tf.training import builders, run_dir, runtime
from istanas_tf.training import config as config_lib
from istanas_tf.training import state as state_lib
from istanas_tf.training import steps as steps_lib


class TrainRun:
    """Builds (or restores) the retraining of ``config``; ``run()`` runs the rest."""

    def __init__(self, config: config_lib.TrainConfig, **start_options):
        self.config = config
        self.genotype = config_lib.resolve_genotype(config)
        setup = runtime.start(
            config, genotype=genotypes.to_json_dict(self.genotype), **start_options
        )
        self.strategy, self.chief, self.info = setup.strategy, setup.chief, setup.info
        self.model, self.optimizer = builders.build_train_model(
            config, self.strategy, self.genotype, self.info
        )
        with self.strategy.scope():
            self.state = state_lib.RunState(
                config.model_dir,
                self.strategy,
                {"model": self.model.variables, "optimizer": self.optimizer.variables},
                num_classes=self.info.num_classes,
            )
        self.state.restore()
        self.clock = steps_lib.EpochClock(self.state.epochs_done, config.loop.epochs)
        self.train_fn = self._step_fn(self.model.train_step)
        self.eval_fn = self._step_fn(self.model.test_step)

    def _step_fn(self, step):
        if self.config.jit_compile:
            if not tf.config.list_physical_devices("GPU"):
                # Measured (benchmarks/train_step_benchmark.py): XLA's CPU depthwise convs
                # make the step ~14x slower here; it is meant for GPUs and TPUs.
                logging.warning(
                    "--jit_compile on a CPU-only machine: XLA's CPU kernels for "
                    "depthwise convolutions are slow; expect a slower step"
                )
            step = tf.function(step, jit_compile=True, autograph=False)
        return steps_lib.distributed_step(self.strategy, step, self.model)

    def evaluate(self, max_steps: int | None = None) -> dict[str, float]:
        """Loss, top-1 and top-5 of the network on the test split (inference mode)."""
        return steps_lib.evaluate_split(
            self.eval_fn,
            self.model,
            self.strategy,
            self.config.data,
            self.info,
            "test",
            batch_size=self.config.loop.batch_size,
            max_steps=max_steps,
            prefix="test",
            keys=("loss", "top1", "top5"),
        )

    def run(self) -> dict[str, Any]:
        """Runs the remaining epochs, evaluates on the whole test split, exports."""
        config, loop = self.config, self.config.loop
        steps = steps_lib.steps_per_epoch(
            self.info, ("train",), loop.batch_size, self.strategy, loop.steps_per_epoch
        )
        for epoch in range(self.state.epochs_done, loop.epochs):
            self.run_epoch(epoch, steps)
        recorded = self.state.final_metrics()
        # Rerunning a finished run must not export another version; a rerun with more
        # --epochs trained on above and is evaluated and exported again.
        if recorded is not None and recorded.get("epochs") == loop.epochs:
            logging.info("Run already finished in %s", config.model_dir)
            return recorded
        final = self.evaluate()
        result = {
            "epochs": loop.epochs,
            **final,
            "params": network_size.count_parameters(self.model),
            "genotype": genotypes.to_json_dict(self.genotype),
        }
        if self.chief:
            result["export"] = export.export_for_dataset(
                self.model,
                self.info,
                config.export_dir or run_dir.path(config.model_dir, run_dir.EXPORT),
                config.model_name,
            )
            self.state.write_final_metrics(result)
        logging.info("final test top-1 %.4f top-5 %.4f", final["test_top1"], final["test_top5"])
        return result

    def run_epoch(self, epoch: int, steps: int) -> dict[str, Any]:
        """One training epoch (0-based ``epoch``), its evaluation and checkpoint."""
        config, loop = self.config, self.config.loop
        lr = runtime.learning_rate_at(config, epoch)
        self.optimizer.learning_rate = lr
        drop_path = config.drop_path_prob * epoch / loop.epochs  # DARTS' linear ramp
        if self.model.set_drop_path_rate(drop_path):
            self.train_fn = self._step_fn(self.model.train_step)  # drop path in or out
        logs, train_time, _ = steps_lib.train_on_split(
            self, "train", epoch, steps, cutout=config.data.cutout_length > 0
        )
        eval_logs = self.evaluate(loop.eval_steps)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "drop_path_rate": drop_path,
            **logs,
            **eval_logs,
            "train_time_s": train_time,
        }
        self.state.end_epoch(row)
        steps_lib.log_epoch(
            f"epoch {epoch + 1}/{loop.epochs}",
            row,
            ("lr", "loss", "top1", "test_top1", "train_time_s"),
            self.clock,
        )
        return row


def run_training(config: config_lib.TrainConfig, flags_text: str | None = None) -> dict[str, Any]:
    """Runs (or resumes) a retraining; returns the final test metrics.

    ``flags_text`` (the command line's flags) is written to the run's ``flags.txt``.
    """
    return runtime.run_guarded(config, TrainRun, flags_text)
