"""A run directory's trained network, rebuilt from what the directory records.

``--mode=eval --model_dir`` and ``--mode=export`` need the evaluation network of a run:
a retraining run's network, or the one-stage super-net with its architecture weights
folded into BN (``absorption.absorb``). The directory records everything needed
(``run_config.json``, ``dataset.json``, the checkpoints), so neither the dataset nor the
original command is required. A two-stage search holds a genotype, not a trained
network: it is refused with the command that retrains it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf
from absl import logging

from istanas_tf import absorption, data, export, genotypes, network_size
from istanas_tf.training import builders, recorded, run_dir
from istanas_tf.training import config as config_lib
from istanas_tf.training import state as state_lib


def recorded_dataset_info(model_dir: str, settings: dict[str, Any]):
    """What an export needs about a run's data: its ``dataset.json``, else the dataset
    the run's settings name (loaded)."""
    recorded = run_dir.read_dataset_info(model_dir)
    if recorded is not None:
        return recorded
    return data.get_dataset_info(recorded.from_recorded_settings(model_dir, settings).data)


def _latest_checkpoint(model_dir: str, advice: str) -> str:
    checkpoint = tf.train.latest_checkpoint(run_dir.path(model_dir, run_dir.CHECKPOINTS))
    if not checkpoint:
        raise run_dir.RunDirError(f"--model_dir={model_dir} holds no checkpoint yet; {advice}")
    return checkpoint


def _checkpoint_classes(checkpoint: str) -> int | None:
    """The output width of the main classifier saved in ``checkpoint``."""
    shapes = tf.train.load_checkpoint(checkpoint).get_variable_to_shape_map()
    for key, shape in shapes.items():
        if (
            key.startswith("model/")
            and "auxiliary" not in key
            and key.endswith("classifier.Skernel/.ATTRIBUTES/VARIABLE_VALUE")
        ):
            return int(shape[-1])
    return None


def _restore_train_network(model_dir: str, config: config_lib.TrainConfig, info):
    """The evaluation network of a retraining run with its latest weights."""
    checkpoint = _latest_checkpoint(model_dir, "train first, or pass --saved_model")
    classes = _checkpoint_classes(checkpoint)
    if classes is not None and classes != info.num_classes:
        raise ValueError(
            f"--dataset={info.name} has {info.num_classes} classes but the checkpoint in "
            f"{model_dir} was trained for {classes}"
        )
    model = builders.evaluation_network(config, config_lib.resolve_genotype(config), info)
    tf.train.Checkpoint(model=state_lib.variables_by_path(model.variables)).restore(
        checkpoint
    ).expect_partial()
    return model


def restore_one_stage(model_dir: str, config: config_lib.OneStageConfig, info):
    """The absorbed evaluation network of a one-stage run's latest checkpoint.

    ``info``: the run's data (its classes, image size and network family).

    Returns:
      ``(network, status)``: status holds the epoch, the search length and the training
      epochs done.

    Raises:
      run_dir.RunDirError: no checkpoint, or the search has not ended yet.
    """
    checkpoint = _latest_checkpoint(model_dir, "run the one-stage search first")
    image_size = info.image_size[0]
    network = dataclasses.replace(config.network, family=builders.network_family(info))
    model = builders.search_network(network, info.num_classes, image_size)
    progress = state_lib.OneStageProgress()
    epoch = tf.Variable(0, dtype=tf.int64)
    tf.train.Checkpoint(
        epoch=epoch,
        model=state_lib.variables_by_path(model.variables),
        one_stage=state_lib.variables_by_path(progress.variables),
    ).restore(checkpoint).expect_partial()
    model.sync_supports()
    epoch = int(epoch.numpy())
    if not progress.search_ended:
        frozen = sum(sum(flags) for flags in model.frozen_nodes.values())
        raise run_dir.RunDirError(
            f"--model_dir={model_dir}: the one-stage search has not ended (epoch {epoch}, "
            f"{frozen} of {2 * genotypes.STEPS} nodes frozen), so there is no final "
            "architecture to export yet; resume the run with its command"
        )
    status = {
        "epoch": epoch,
        "search_epochs": progress.search_length,
        "train_epochs_done": epoch - progress.search_length,
        "train_epochs": config.loop.epochs,
    }
    if status["train_epochs_done"] < config.loop.epochs:
        logging.warning(
            "%s: the training phase is at epoch %d of %d; exporting its latest checkpoint",
            model_dir,
            status["train_epochs_done"],
            config.loop.epochs,
        )
    return absorption.absorb(model, image_size, auxiliary=False), status


def restore_network(model_dir: str, info=None):
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
    config = recorded.from_recorded_settings(model_dir, settings)
    if isinstance(config, config_lib.TwoStageConfig):
        raise run_dir.RunDirError(
            f"--model_dir={model_dir} is a two-stage search (--method="
            f"{config.network.method}): it holds a genotype, not a trained network; "
            f"retrain it with --mode=train --genotype="
            f"{run_dir.path(model_dir, run_dir.GENOTYPE)}"
        )
    if info is None:
        info = recorded_dataset_info(model_dir, settings)
    if isinstance(config, config_lib.OneStageConfig):
        network, _ = restore_one_stage(model_dir, config, info)
        return network, info
    return _restore_train_network(model_dir, config, info), info


def export_run(
    model_dir: str,
    export_dir: str | None = None,
    model_name: str = "istanas",
    version: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``--mode=export``: the SavedModel of a run directory's latest trained network.

    Args:
      model_dir: a ``--mode=train`` run or a one-stage run whose search has ended.
      export_dir: SavedModel root; default ``<model_dir>/export``.
      model_name, version, overwrite: as in ``export.export_saved_model`` (version
        None: the next free one; an existing version is refused unless ``overwrite``).
    """
    network, info = restore_network(model_dir)
    version_dir = export.export_for_dataset(
        network,
        info,
        export_dir or run_dir.path(model_dir, run_dir.EXPORT),
        model_name,
        version,
        overwrite,
    )
    return {"export": version_dir, "params": network_size.count_parameters(network)}
