"""The networks and optimizers each kind of run builds, from its config.

Built in the strategy's scope under the run's precision policy; every optimizer is
built over its variables up front (docs/design.md decision 5: a lazily built second
optimizer crashes under MirroredStrategy in Keras 3.15) and wrapped in a
``LossScaleOptimizer`` under ``mixed_float16``.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from istanas_tf import data, genotypes, networks, optimizers, search_model
from istanas_tf.training import config as config_lib
from istanas_tf.training import runtime


def _loss_scaled(optimizer, mixed_precision: str | None):
    """Loss scaling for float16 (every optimizer needs it, not only the compiled one)."""
    if mixed_precision == "float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def weight_optimizer(loop: config_lib.LoopConfig):
    """PyTorch-rule SGD on the network weights (lr set per epoch by the run)."""
    return _loss_scaled(
        optimizers.TorchSGD(
            loop.learning_rate,
            momentum=loop.momentum,
            l2=loop.weight_decay,
            clip_global_norm=loop.grad_clip,
        ),
        loop.mixed_precision,
    )


def architecture_optimizer(
    arch: config_lib.ArchitectureOptimizerConfig, mixed_precision: str | None
):
    """PyTorch-rule Adam on the architecture variables."""
    return _loss_scaled(
        optimizers.TorchAdam(
            arch.learning_rate, beta_1=arch.beta1, beta_2=arch.beta2, l2=arch.weight_decay
        ),
        mixed_precision,
    )


def search_network(
    network: search_model.SearchNetworkConfig, num_classes: int, image_size: int, replicas: int = 1
) -> search_model.SearchNetwork:
    """The super-net for a dataset, every weight created and the first architecture
    recovered. Synchronized BN only matters (and only costs) with several replicas."""
    network = dataclasses.replace(
        network, num_classes=num_classes, sync_batch_norm=network.sync_batch_norm and replicas > 1
    )
    model = search_model.SearchNetwork(network, name="search_network")
    model.build_all(image_size)
    return model


def build_search_model(
    config: config_lib.TwoStageConfig | config_lib.OneStageConfig,
    strategy: tf.distribute.Strategy,
    info: data.DatasetInfo,
):
    """The super-net of a search run and its two optimizers, compiled.

    Returns:
      ``(model, weight_optimizer, arch_optimizer)``: PyTorch-rule SGD on the weights and
      Adam on the architecture.
    """
    network, label_smoothing = config.network, 0.0
    if isinstance(config, config_lib.OneStageConfig):
        # The one-stage super-net has the evaluation network's shape for its data.
        network = dataclasses.replace(network, family=network_family(info))
        label_smoothing = config.label_smoothing
    with runtime.mixed_precision_policy(config.loop.mixed_precision), strategy.scope():
        model = search_network(
            network, info.num_classes, info.image_size[0], strategy.num_replicas_in_sync
        )
        weights = weight_optimizer(config.loop)
        arch = architecture_optimizer(config.arch, config.loop.mixed_precision)
        model.compile(weights, arch, label_smoothing=label_smoothing)
    return model, weights, arch


def network_family(info) -> str:
    """ImageNet-sized inputs get NetworkImageNet, CIFAR-sized ones NetworkCIFAR (``info``:
    a ``data.DatasetInfo`` or the ``run_dir.RecordedDatasetInfo`` of a run)."""
    return "imagenet" if info.augmentation == "imagenet" else "cifar"


def evaluation_network(
    config: config_lib.TrainConfig, genotype: genotypes.Genotype, info
) -> networks.NetworkCIFAR | networks.NetworkImageNet:
    """The evaluation network of ``genotype`` for the dataset, weights created."""
    family = network_family(info)
    channels, layers = config.network_settings(family)
    return networks.build_network(
        networks.FAMILIES[family]["kind"],
        genotype,
        channels,
        layers,
        info.num_classes,
        info.image_size[0],
        auxiliary=config.auxiliary,
        bn_after_param_free_ops=config.bn_after_param_free_ops,
        seed=config.loop.seed,
        name="network",
    )


def build_train_model(
    config: config_lib.TrainConfig,
    strategy: tf.distribute.Strategy,
    genotype: genotypes.Genotype,
    info: data.DatasetInfo,
):
    """The evaluation network of a retraining run and its optimizer, compiled.

    Returns:
      ``(model, optimizer)``.
    """
    with runtime.mixed_precision_policy(config.loop.mixed_precision), strategy.scope():
        model = evaluation_network(config, genotype, info)
        optimizer = weight_optimizer(config.loop)
        model.compile(
            optimizer,
            auxiliary_weight=config.auxiliary_weight,
            label_smoothing=config.label_smoothing,
        )
    return model, optimizer
