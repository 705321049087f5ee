"""Training a genotype's evaluation network from scratch, and evaluating it.

METHOD.md section 5: NetworkCIFAR (C = 36, 20 cells) or NetworkImageNet (C = 48, 14
cells) with the auxiliary head (weight 0.4), drop path ramped linearly from 0, cutout
(CIFAR) or label smoothing (ImageNet), SGD with L2 on the gradient and global-norm
clipping, a cosine lr (CIFAR) or a 5-epoch warm-up then linear decay (ImageNet). The
same loop machinery as the search (training.RunState): every strategy, resume from the
run directory, TensorBoard and metrics.jsonl. The final network is exported as a
SavedModel.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from istanas_tf import data
from istanas_tf import genotypes
from istanas_tf import networks
from istanas_tf import optimizers
from istanas_tf import run_dir
from istanas_tf import training

LR_SCHEDULES = ("cosine", "warmup_linear")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Retraining a genotype (METHOD.md section 5); fields mirror the CLI flags.

    Attributes:
      model_dir: run directory; rerun the same command to resume.
      genotype: a named genotype or a genotype .json path.
      data: input settings (``cutout_length`` 16 for CIFAR).
      channels, layers: C and cells; None picks the family default (36/20, 48/14).
      auxiliary, auxiliary_weight: auxiliary head and its loss weight (0.4).
      drop_path_prob: drop path rate reached at the last epoch (linear ramp from 0).
      bn_after_param_free_ops: the one-stage network's extra BNs.
      epochs, batch_size: 600 / 96 (CIFAR), 250 / 1024 (ImageNet).
      learning_rate, learning_rate_min: peak and final lr.
      lr_schedule: ``cosine`` (CIFAR) or ``warmup_linear`` (ImageNet).
      warmup_epochs: linear warm-up length of ``warmup_linear``.
      momentum, weight_decay, grad_clip: SGD (L2 on the gradient; 3e-4 CIFAR, 3e-5 ImageNet).
      label_smoothing: 0.1 for ImageNet.
      mixed_precision: None, ``float16`` (loss scaling) or ``bfloat16``.
      jit_compile: XLA-compile the per-replica step.
      export_dir, model_name: where the final SavedModel goes
        (``<export_dir>/<model_name>/<version>``); default ``<model_dir>/export``.
    """

    model_dir: str
    genotype: str = "ISTA_twostage"
    data: data.DataConfig = data.DataConfig(cutout_length=16)
    channels: int | None = None
    layers: int | None = None
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    bn_after_param_free_ops: bool = False
    epochs: int = 600
    batch_size: int = 96
    learning_rate: float = 0.025
    learning_rate_min: float = 0.0
    lr_schedule: str = "cosine"
    warmup_epochs: int = 5
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    mixed_precision: str | None = None
    jit_compile: bool = False
    strategy: str = "default"
    steps_per_epoch: int | None = None
    eval_steps: int | None = None
    deterministic: bool = False
    seed: int = 0
    export_dir: str | None = None
    model_name: str = "istanas"
    verbose: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the flag of the first invalid setting."""
        training.check_settings(training.loop_checks(self) + [
            (self.lr_schedule in LR_SCHEDULES,
             f"--lr_schedule={self.lr_schedule!r} is not valid; valid: "
             f"{', '.join(LR_SCHEDULES)}"),
            (0 <= self.drop_path_prob < 1,
             f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob}"),
            (0 <= self.label_smoothing < 1,
             f"--label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.channels is None or self.channels >= 2,
             f"--init_channels must be >= 2, got {self.channels}"),
        ])
        if self.layers is not None:
            networks.check_layers(self.layers)
        self.data.validate()

    def run_settings(self, genotype: genotypes.Genotype) -> dict[str, Any]:
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("data", "model_dir", "verbose", "export_dir",
                                      "model_name")}
        settings.update(dataclasses.asdict(self.data))
        settings["genotype"] = genotypes.to_json_dict(genotype)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


RESUMABLE_CHANGES = ("epochs", "strategy", "eval_steps", "data_dir", "manual_dir",
                     "skip_corrupt_images", "jit_compile")


def learning_rate_at(config: TrainConfig, epoch: int) -> float:
    """The lr of epoch ``epoch`` (0-based) under ``config.lr_schedule``."""
    if config.lr_schedule == "cosine":
        return training.cosine_learning_rate(epoch, config.epochs, config.learning_rate,
                                             config.learning_rate_min)
    if epoch < config.warmup_epochs:
        return config.learning_rate * (epoch + 1) / config.warmup_epochs
    decay_epochs = max(1, config.epochs - config.warmup_epochs)
    progress = (epoch - config.warmup_epochs) / decay_epochs
    return config.learning_rate_min + (config.learning_rate - config.learning_rate_min) * (
        1.0 - progress)


def network_family(info: data.DatasetInfo) -> str:
    """ImageNet-sized inputs get NetworkImageNet, CIFAR-sized ones NetworkCIFAR."""
    return "imagenet" if info.augmentation == "imagenet" else "cifar"


def build_evaluation_network(config: TrainConfig, genotype, info: data.DatasetInfo):
    """The evaluation network of ``genotype`` for the dataset, weights created."""
    family = network_family(info)
    defaults = networks.FAMILIES[family]
    return networks.build_network(
        defaults["kind"], genotype, config.channels or defaults["channels"],
        config.layers or defaults["layers"], info.num_classes, info.image_size[0],
        auxiliary=config.auxiliary, bn_after_param_free_ops=config.bn_after_param_free_ops,
        seed=config.seed, name="network")


class TrainRun:
    """Builds (or restores) the retraining of ``config`` and runs the remaining epochs."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        if config.deterministic:
            keras.utils.set_random_seed(config.seed)
            tf.config.experimental.enable_op_determinism()
        self.genotype = genotypes.get_genotype(config.genotype)
        self.strategy = training.make_strategy(config.strategy)
        data.check_divisible(config.batch_size, self.strategy.num_replicas_in_sync)
        self.info = data.get_dataset_info(config.data)
        run_dir.check_run_config(config.model_dir, config.run_settings(self.genotype),
                                 RESUMABLE_CHANGES)
        run_dir.write_dataset_info(config.model_dir, self.info)
        with training.mixed_precision_policy(config.mixed_precision), self.strategy.scope():
            self.model = build_evaluation_network(config, self.genotype, self.info)
            self.optimizer = optimizers.TorchSGD(
                config.learning_rate, momentum=config.momentum, l2=config.weight_decay,
                clip_global_norm=config.grad_clip)
            if config.mixed_precision == "float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.model.compile(self.optimizer, auxiliary_weight=config.auxiliary_weight,
                               label_smoothing=config.label_smoothing)
            self.state = training.RunState(config.model_dir, self.strategy, {
                "model": self.model.variables, "optimizer": self.optimizer.variables})
        self.state.restore()
        self._train_fn = self._step_fn(self.model.train_step)
        self._eval_fn = self._step_fn(self.model.test_step)

    def _step_fn(self, step):
        if self.config.jit_compile:
            if not tf.config.list_physical_devices("GPU"):
                # Measured (benchmarks/train_step_benchmark.py): XLA's CPU depthwise convs
                # make the step ~14x slower here; it is meant for GPUs and TPUs.
                logging.warning("--jit_compile on a CPU-only machine: XLA's CPU kernels for "
                                "depthwise convolutions are slow; expect a slower step")
            step = tf.function(step, jit_compile=True)
        return training._distributed_step(self.strategy, step, self.model)

    def _steps_per_epoch(self) -> int:
        steps = data.steps_per_epoch(
            self.info, "train", self.config.batch_size,
            num_input_pipelines=training.num_input_pipelines(self.strategy))
        if steps < 1:
            raise ValueError(f"--batch_size={self.config.batch_size} is larger than the "
                             "training split")
        return min(steps, self.config.steps_per_epoch or steps)

    def evaluate(self, max_steps: int | None = None) -> dict[str, float]:
        """Top-1 / top-5 / loss of the network on the test split (inference mode)."""
        dataset = data.distributed_dataset(self.strategy, self.config.data, self.info, "test",
                                           training=False,
                                           global_batch_size=self.config.batch_size)
        logs = training.run_eval_steps(self._eval_fn, self.model, dataset, max_steps)
        return {"test_loss": logs.get("loss", float("nan")),
                "test_top1": logs.get("top1", float("nan")),
                "test_top5": logs.get("top5", float("nan"))}

    def run(self) -> dict[str, Any]:
        """Runs the remaining epochs, evaluates on the whole test split, exports."""
        config = self.config
        steps = self._steps_per_epoch()
        for epoch in range(int(self.state.epoch.numpy()), config.epochs):
            self._run_epoch(epoch, steps)
        final_path = os.path.join(config.model_dir, "final_metrics.json")
        if os.path.exists(final_path):
            with open(final_path) as f:
                recorded = json.load(f)
            # Rerunning a finished run must not export another version; a rerun with
            # more --epochs trained on above and is evaluated and exported again.
            if recorded.get("epochs") == config.epochs:
                logging.info("Run already finished in %s", config.model_dir)
                return recorded
        final = self.evaluate()
        result = {"epochs": config.epochs, **final,
                  "params": networks.count_parameters(self.model),
                  "genotype": genotypes.to_json_dict(self.genotype)}
        if self.state.chief:
            result["export"] = self.export()
            run_dir.atomic_write_text(final_path, json.dumps(result, indent=2) + "\n")
        logging.info("final test top-1 %.4f top-5 %.4f", final["test_top1"],
                     final["test_top5"])
        return result

    def export(self) -> str:
        from istanas_tf import export
        export_dir = self.config.export_dir or os.path.join(self.config.model_dir, "export")
        return export.export_for_dataset(self.model, self.info, export_dir,
                                         self.config.model_name)

    def _run_epoch(self, epoch: int, steps: int) -> dict[str, Any]:
        config = self.config
        lr = learning_rate_at(config, epoch)
        self.optimizer.learning_rate = lr
        drop_path = config.drop_path_prob * epoch / config.epochs  # DARTS' linear ramp
        self.model.drop_path_rate.assign(drop_path)
        dataset = data.distributed_dataset(
            self.strategy, config.data, self.info, "train", training=True,
            global_batch_size=config.batch_size, cutout=config.data.cutout_length > 0,
            epoch_seed=epoch)
        logs, train_time, _ = training.run_train_steps(
            self._train_fn, self.model, dataset, steps, epoch=epoch,
            model_dir=config.model_dir, verbose=config.verbose and self.state.chief)
        eval_logs = self.evaluate(config.eval_steps) if config.eval_steps != 0 else {}
        row = {"epoch": epoch + 1, "lr": lr, "drop_path_rate": drop_path, **logs,
               **eval_logs, "train_time_s": train_time}
        if self.state.chief:
            self.state.metrics_log.append(row)
            with self.state.writer.as_default(step=epoch + 1):
                for key, value in row.items():
                    if key != "epoch":
                        tf.summary.scalar(key, value)
            self.state.writer.flush()
        self.state.save(epoch + 1)
        logging.info("epoch %d/%d  lr %.4g  loss %.4f  top1 %.4f  test_top1 %s  %.1fs",
                     epoch + 1, config.epochs, lr, logs.get("loss", float("nan")),
                     logs.get("top1", float("nan")),
                     f"{eval_logs['test_top1']:.4f}" if eval_logs else "-", train_time)
        return row


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) a retraining; returns the final test metrics."""
    return TrainRun(config).run()


def _checkpoint_classes(checkpoint: str) -> int | None:
    """The output width of the main classifier saved in ``checkpoint``."""
    shapes = tf.train.load_checkpoint(checkpoint).get_variable_to_shape_map()
    for key, shape in shapes.items():
        if key.startswith("model/") and "auxiliary" not in key and \
                key.endswith("classifier.Skernel/.ATTRIBUTES/VARIABLE_VALUE"):
            return int(shape[-1])
    return None


def _restore_train_network(model_dir: str, settings: dict[str, Any], checkpoint: str,
                           info: data.DatasetInfo):
    """The evaluation network of a --mode=train run directory with its latest weights."""
    classes = _checkpoint_classes(checkpoint)
    if classes is not None and classes != info.num_classes:
        raise ValueError(
            f"--dataset={info.name} has {info.num_classes} classes but the checkpoint in "
            f"{model_dir} was trained for {classes}")
    config = TrainConfig(model_dir=model_dir, channels=settings["channels"],
                         layers=settings["layers"], auxiliary=settings["auxiliary"],
                         bn_after_param_free_ops=settings["bn_after_param_free_ops"])
    model = build_evaluation_network(config, genotypes.from_json_dict(settings["genotype"]),
                                     info)
    tf.train.Checkpoint(model=training.variables_by_path(model.variables)).restore(
        checkpoint).expect_partial()
    return model


def restore_network(model_dir: str, info: data.DatasetInfo | None = None):
    """The evaluation network a run directory holds, with its latest weights.

    Args:
      model_dir: a ``--mode=train`` run, or a one-stage run whose search has ended (its
        super-net absorbed into the evaluation network).
      info: the dataset; default: the one recorded in the run directory.

    Returns:
      ``(network, info)``.

    Raises:
      run_dir.RunDirError: not such a run directory (e.g. a two-stage search, whose
        genotype must be retrained), no checkpoint, or a one-stage search still running.
    """
    settings = run_dir.read_run_config(model_dir)
    kind = run_dir.run_kind(settings)
    if kind == "two_stage":
        raise run_dir.RunDirError(
            f"--model_dir={model_dir} is a two-stage search (--method="
            f"{settings.get('method', 'ista')}): it holds a genotype, not a trained network; "
            f"retrain it with --mode=train --genotype={model_dir}/genotype.json")
    if info is None:
        info = recorded_dataset_info(model_dir, settings)
    if kind == "one_stage":
        from istanas_tf import one_stage
        network, _ = one_stage.restore_network(model_dir, settings, info.num_classes,
                                               info.image_size[0])
        return network, info
    checkpoint = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if not checkpoint:
        raise run_dir.RunDirError(f"--model_dir={model_dir} holds no checkpoint of its "
                                  "--mode=train run yet; train first, or pass --saved_model")
    return _restore_train_network(model_dir, settings, checkpoint, info), info


def recorded_dataset_info(model_dir: str, settings: dict[str, Any]):
    """What an export needs about a run's data: from ``dataset.json``, else the dataset
    the run's settings name (runs that predate the file)."""
    recorded = run_dir.read_dataset_info(model_dir)
    if recorded is not None:
        return recorded
    fields = {f.name for f in dataclasses.fields(data.DataConfig)}
    return data.get_dataset_info(data.DataConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
        if k in fields}))


def export_run(model_dir: str, export_dir: str | None = None, model_name: str = "istanas",
               version: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``--mode=export``: the SavedModel of a run directory's latest trained network.

    Args:
      model_dir: a ``--mode=train`` run or a one-stage run whose search has ended.
      export_dir: SavedModel root; default ``<model_dir>/export``.
      model_name, version, overwrite: as in ``export.export_saved_model`` (version
        None: the next free one; an existing version is refused unless ``overwrite``).
    """
    from istanas_tf import export
    network, info = restore_network(model_dir)
    version_dir = export.export_for_dataset(
        network, info, export_dir or os.path.join(model_dir, "export"), model_name, version,
        overwrite)
    return {"export": version_dir, "params": networks.count_parameters(network)}


def evaluate_network(network: keras.Model, data_config: data.DataConfig, info,
                     split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy of an in-memory network in inference mode."""
    return _accuracy(lambda images: network(images, training=False), data_config, info,
                     split, batch_size)


def evaluate(data_config: data.DataConfig, split: str = "test", model_dir: str | None = None,
             saved_model: str | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy of a run's checkpoint or a SavedModel.

    Args:
      data_config: the dataset to evaluate on.
      split: ``test`` or ``train`` (evaluation order, no augmentation).
      model_dir: a ``--mode=train`` or one-stage run directory (its latest checkpoint), or
      saved_model: an exported SavedModel version directory (fed raw 0-255 pixels).
    """
    info = data.get_dataset_info(data_config)
    if saved_model:
        if not os.path.exists(os.path.join(saved_model, "saved_model.pb")):
            raise ValueError(f"--saved_model={saved_model} holds no SavedModel "
                             "(saved_model.pb); pass an export version directory")
        serving = tf.saved_model.load(saved_model).signatures["serving_default"]
        mean = tf.constant(info.mean, tf.float32)
        std = tf.constant(info.std, tf.float32)
        predict = lambda images: serving(images=(images * std + mean) * 255.0)["logits"]
        return _accuracy(predict, data_config, info, split, batch_size)
    model, _ = restore_network(model_dir, info)
    return evaluate_network(model, data_config, info, split, batch_size)


def _accuracy(predict, data_config: data.DataConfig, info, split: str,
              batch_size: int) -> dict[str, Any]:
    correct = np.zeros(info.num_classes)
    counts = np.zeros(info.num_classes)
    top5 = 0
    for images, labels in data.make_dataset(data_config, info, split, training=False,
                                            batch_size=batch_size):
        logits = tf.cast(predict(images), tf.float32).numpy()
        labels = labels.numpy()
        predicted = logits.argmax(axis=1)
        np.add.at(counts, labels, 1)
        np.add.at(correct, labels, predicted == labels)
        k = min(5, logits.shape[1])
        top5 += int(np.sum(np.any(np.argsort(-logits, axis=1)[:, :k] == labels[:, None],
                                  axis=1)))
    total = counts.sum()
    return {"split": split, "examples": int(total), "top1": float(correct.sum() / total),
            "top5": float(top5 / total),
            "per_class_accuracy": {name: float(c / n) if n else None for name, c, n in
                                   zip(info.class_names, correct, counts)}}
