"""What ``SearchNetwork.fit`` takes for a search, from the pipeline the command line uses.

The command line builds epoch e's pipeline at the start of epoch e (``epoch_seed=e``)
and stops it after the epoch's steps. ``model.fit`` keeps one iterator across epochs
when it is given ``steps_per_epoch``, so :func:`search_datasets` hands it repeated
streams cut to that many batches per epoch: fit's epoch e then trains on exactly the
batches of the command line's epoch e (``data.make_dataset``'s ``steps_per_epoch``).

- Two-stage (docs/method.md section 3): each element is
  ``((weight_images, weight_labels), (arch_images, arch_labels))``, a ``search_weights``
  batch beside a ``search_arch`` batch, as ``SearchSteps.train_step`` unpacks it; the
  validation data is the ``search_arch`` split in evaluation mode (the command line's
  ``val_*`` metrics).
- One-stage (docs/method.md section 4): ``(images, labels)`` of the whole training
  split, with the data config's cutout; the validation data is the test split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from istanas_tf import data


@dataclasses.dataclass(frozen=True)
class SearchData:
    """The datasets and step counts of a search through ``model.fit``.

    Attributes:
      train: the repeated training stream (see the module docstring).
      validation: the evaluation pipeline, or None (``eval_steps=0``).
      steps_per_epoch: training steps per epoch: the whole batches every training split
        holds, at most the cap asked for.
      validation_steps: batches of ``validation`` per evaluation (None: all of it).
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    steps_per_epoch: int
    validation_steps: int | None

    def fit_arguments(self) -> dict[str, Any]:
        """``model.fit(**search_data.fit_arguments(), epochs=..., callbacks=...)``."""
        return dict(
            x=self.train,
            validation_data=self.validation,
            steps_per_epoch=self.steps_per_epoch,
            validation_steps=self.validation_steps,
            shuffle=False,  # the streams shuffle every epoch themselves
        )


def search_datasets(
    config: data.DataConfig,
    info: data.DatasetInfo,
    batch_size: int,
    *,
    one_stage: bool = False,
    steps_per_epoch: int | None = None,
    eval_steps: int | None = None,
    initial_epoch: int = 0,
) -> SearchData:
    """The training and validation data of a two-stage (or one-stage) search.

    Args:
      config: the data settings (``DataConfig``); ``info`` from
        ``data.get_dataset_info(config)``.
      batch_size: the global batch size; under ``MirroredStrategy`` ``fit`` splits each
        batch over the replicas.
      one_stage: the one-stage search's data (one batch per step, cutout).
      steps_per_epoch: cap on training steps per epoch (``--steps_per_epoch``; None:
        the whole split).
      eval_steps: cap on validation batches (``--eval_steps``; None: the whole split,
        0: no validation data).
      initial_epoch: the epoch ``fit`` starts at (``fit(initial_epoch=...)``): the
        stream starts with that epoch's shuffle and augmentation.

    Raises:
      ValueError: a batch larger than a training split, or a negative cap.
    """
    for name, value in (("steps_per_epoch", steps_per_epoch), ("eval_steps", eval_steps)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    splits = ("train",) if one_stage else ("search_weights", "search_arch")
    steps = min(data.steps_per_epoch(info, split, batch_size) for split in splits)
    if steps < 1:
        hint = "" if one_stage else " or raise train_portion"
        raise ValueError(
            f"batch_size={batch_size} is larger than a training split "
            f"({', '.join(splits)}); lower it{hint}"
        )
    steps = min(steps, steps_per_epoch) if steps_per_epoch else steps
    streams = [
        data.make_dataset(
            config,
            info,
            split,
            training=True,
            batch_size=batch_size,
            cutout=one_stage and config.cutout_length > 0,
            repeat=True,
            epoch_seed=initial_epoch,
            steps_per_epoch=steps,
        )
        for split in splits
    ]
    train = streams[0] if one_stage else tf.data.Dataset.zip(tuple(streams))
    validation = None
    if eval_steps != 0:
        validation = data.make_dataset(
            config,
            info,
            "test" if one_stage else "search_arch",
            training=False,
            batch_size=batch_size,
        )
    return SearchData(
        train=train,
        validation=validation,
        steps_per_epoch=steps,
        validation_steps=eval_steps or None,
    )
