"""``DatasetInfo``: a loaded dataset, where its examples are, and how its splits are cut."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import tensorflow as tf

from istanas_tf.data.config import SPLITS, DataError


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """Where a dataset's examples come from, after loading and checking.

    kind "memory": ``examples[split] = (images [N, H, W, 3] uint8, labels [N] int32)``,
      decoded once, on the CPU. kind "files": ``(paths [N] string, labels [N] int32)``,
      decoded per epoch. kind "tfds": ``builder`` streams them; ``tfds_splits`` maps
      our ``train``/``test`` to the builder's split names.
    """

    kind: str
    examples: dict[str, tuple[tf.Tensor, tf.Tensor]] = dataclasses.field(default_factory=dict)
    builder: Any = None
    tfds_splits: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A loaded dataset, as :func:`get_dataset_info` describes it.

    Attributes:
      name: the ``--dataset`` value.
      num_classes: number of labels; labels are ``0 .. num_classes - 1``.
      image_size: ``(height, width)`` of the images the pipeline yields.
      class_names: label ``i`` is ``class_names[i]``.
      mean: per-channel normalisation mean in [0, 1] pixel units.
      std: per-channel normalisation standard deviation.
      num_train: examples in the training split (after skipped corrupt files).
      num_test: examples in the test split.
      train_portion: fraction of ``train`` in ``search_weights``.
      augmentation: ``"cifar"`` (pad-crop, flip) or ``"imagenet"`` (random resized
        crop, flip, colour jitter; evaluation resize and centre crop).
      source: where the examples come from (read by ``make_dataset``); None for an
        info that only describes a dataset.
    """

    name: str
    num_classes: int
    image_size: tuple[int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_train: int
    num_test: int
    train_portion: float
    augmentation: str
    source: Source | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def num_search_weights(self) -> int:
        """Examples of ``search_weights``: ``floor(train_portion * num_train)``."""
        return int(math.floor(self.train_portion * self.num_train))

    def split_range(self, split: str) -> tuple[str, int, int]:
        """``(base split, start, stop)``: ``split`` is examples [start, stop) of base."""
        _check_split(split)
        if split == "train":
            return "train", 0, self.num_train
        if split == "test":
            return "test", 0, self.num_test
        if split == "search_weights":
            return "train", 0, self.num_search_weights
        return "train", self.num_search_weights, self.num_train


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def num_examples(info: DatasetInfo, split: str) -> int:
    """Examples in ``split`` (one of :data:`SPLITS`)."""
    _, start, stop = info.split_range(split)
    return stop - start


def steps_per_epoch(
    info: DatasetInfo, split: str, global_batch_size: int, *, num_input_pipelines: int = 1
) -> int:
    """Training steps per epoch of ``make_dataset(..., training=True)``.

    Each input pipeline keeps the same whole number of batches of
    ``global_batch_size / num_input_pipelines`` examples from its
    ``floor(N / num_input_pipelines)`` examples, so workers step in lockstep.
    """
    pipeline_batch = global_batch_size // num_input_pipelines
    return (num_examples(info, split) // num_input_pipelines) // pipeline_batch


def to_cpu(array: np.ndarray) -> tf.Tensor:
    """``array`` as a tensor placed on the CPU, where the input pipeline reads it."""
    with tf.device("/cpu:0"):
        return tf.convert_to_tensor(array)
