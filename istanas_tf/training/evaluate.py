"""Accuracy of a trained network: top-1, top-5 and per class (``--mode=eval``).

The network is evaluated in inference mode on a whole split, in the pipeline's fixed
evaluation order: an in-memory network, a run directory's latest checkpoint, or an
exported SavedModel fed raw 0-255 pixels through its serving signature (so the export's
own normalisation is what gets tested).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from istanas_tf import data
from istanas_tf.training import restore


def evaluate_network(
    network: keras.Model,
    data_config: data.DataConfig,
    info,
    split: str = "test",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy of an in-memory network in inference mode."""
    return _accuracy(
        lambda images: network(images, training=False), data_config, info, split, batch_size
    )


def evaluate(
    data_config: data.DataConfig,
    split: str = "test",
    model_dir: str | None = None,
    saved_model: str | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
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
            raise ValueError(
                f"--saved_model={saved_model} holds no SavedModel "
                "(saved_model.pb); pass an export version directory"
            )
        serving = tf.saved_model.load(saved_model).signatures["serving_default"]
        mean = tf.constant(info.mean, tf.float32)
        std = tf.constant(info.std, tf.float32)
        predict = lambda images: serving(images=(images * std + mean) * 255.0)["logits"]
        return _accuracy(predict, data_config, info, split, batch_size)
    model, _ = restore.restore_network(model_dir, info)
    return evaluate_network(model, data_config, info, split, batch_size)


def _accuracy(
    predict: Callable, data_config: data.DataConfig, info, split: str, batch_size: int
) -> dict[str, Any]:
    """Counts correct top-1 and top-5 predictions per class over one pass of ``split``."""
    correct = np.zeros(info.num_classes)
    counts = np.zeros(info.num_classes)
    top5 = 0
    for images, labels in data.make_dataset(
        data_config, info, split, training=False, batch_size=batch_size
    ):
        logits = tf.cast(predict(images), tf.float32).numpy()
        labels = labels.numpy()
        predicted = logits.argmax(axis=1)
        np.add.at(counts, labels, 1)
        np.add.at(correct, labels, predicted == labels)
        k = min(5, logits.shape[1])
        top5 += int(np.sum(np.any(np.argsort(-logits, axis=1)[:, :k] == labels[:, None], axis=1)))
    total = counts.sum()
    return {
        "split": split,
        "examples": int(total),
        "top1": float(correct.sum() / total),
        "top5": float(top5 / total),
        "per_class_accuracy": {
            name: float(c / n) if n else None
            for name, c, n in zip(info.class_names, correct, counts)
        },
    }
