"""The data flags (``DataConfig``), their validation, and the dataset registry.

Also the constants that more than one module of the package reads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SPLITS: tuple[str, ...] = ("train", "test", "search_weights", "search_arch")
FOLDER_PREFIX = "folder:"

# Normalisation statistics of the tfds datasets, in [0, 1] pixel units
# (the values of the DARTS code, on which the published ISTA-NAS code is built).
TFDS_DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        streamed=False,
        test_split="test",
    ),
    "cifar100": dict(
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        streamed=False,
        test_split="test",
    ),
    # The ILSVRC2012 test split has no labels: the validation set is the test split.
    "imagenet2012": dict(
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        streamed=True,
        test_split="validation",
    ),
}
VALID_DATASETS = (*TFDS_DATASETS, f"{FOLDER_PREFIX}PATH")

IMAGENET_CROP = 224  # network input side for ImageNet-style data
DECODE_BATCH = 1024  # images per batch of the one-time decode pass


class DataError(ValueError):
    """A dataset, flag value or file that the input pipeline cannot use."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to augment it. Each field is the flag of the same name.

    Attributes:
      dataset: ``cifar10``, ``cifar100``, ``imagenet2012`` or ``folder:PATH``.
      data_dir: tfds data directory (None: tfds' default, ``~/tensorflow_datasets``).
        For folders, the statistics cache goes to ``<data_dir>/istanas_tf/``
        (None: ``$XDG_CACHE_HOME/istanas_tf`` or ``~/.cache/istanas_tf``).
      manual_dir: directory with the ImageNet tars (None: ``<data_dir>/downloads/manual``).
      train_portion: fraction of the training split that trains the weights in the
        two-stage search; the rest trains the architecture.
      cutout_length: side of the cutout square in pixels; 0 turns cutout off.
      deterministic: keep the training batches' order fixed (parallel maps deliver in
        order); False lets a slow batch be overtaken. Contents are seeded either way.
      seed: seeds the shuffles and the augmentation.
      skip_corrupt_images: skip (and log) unreadable images instead of failing.
      mean: per-channel normalisation mean in [0, 1] units (None: the dataset's).
      std: per-channel normalisation standard deviation (None: the dataset's).
      max_examples_per_class: keep only the first N examples of each class of each
        split (0: all); for small runs and tests.
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    manual_dir: str | None = None
    train_portion: float = 0.5
    cutout_length: int = 0
    deterministic: bool = False
    seed: int = 0
    skip_corrupt_images: bool = False
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    max_examples_per_class: int = 0

    def __post_init__(self):
        # Flags hand over lists (of floats or strings); keep tuples so configs hash.
        for field in ("mean", "std"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, str):
                try:
                    object.__setattr__(self, field, tuple(float(v) for v in value))
                except (TypeError, ValueError):
                    pass  # validate() names the flag

    @property
    def folder(self) -> str | None:
        """PATH of ``folder:PATH``, else None."""
        if self.dataset.startswith(FOLDER_PREFIX):
            return self.dataset[len(FOLDER_PREFIX) :]
        return None

    def validate(self) -> None:
        """Raises DataError naming the flag of the first invalid field."""
        if self.dataset not in TFDS_DATASETS and not self.folder:
            raise DataError(
                f"--dataset={self.dataset!r} is not a known dataset; valid choices: "
                f"{', '.join(VALID_DATASETS)} (an image folder PATH/train/<class>/*.jpg "
                "and PATH/test/<class>/*.jpg)"
            )
        if (
            isinstance(self.train_portion, bool)
            or not isinstance(self.train_portion, (int, float))
            or not 0.0 < self.train_portion < 1.0
        ):
            raise DataError(
                f"--train_portion={self.train_portion!r} must be a number "
                "strictly between 0 and 1 (0.5 splits the training set in halves)"
            )
        if not _is_int(self.cutout_length) or self.cutout_length < 0:
            raise DataError(
                f"--cutout_length={self.cutout_length!r} must be an integer "
                ">= 0 (0 turns cutout off; the paper uses 16 on CIFAR)"
            )
        if not _is_int(self.seed):
            raise DataError(f"--seed={self.seed!r} must be an integer")
        if not _is_int(self.max_examples_per_class) or self.max_examples_per_class < 0:
            raise DataError(
                f"--max_examples_per_class={self.max_examples_per_class!r} "
                "must be an integer >= 0 (0 keeps every example)"
            )
        if self.max_examples_per_class and TFDS_DATASETS.get(self.dataset, {}).get("streamed"):
            raise DataError(
                f"--max_examples_per_class is not supported for "
                f"--dataset={self.dataset}; it works with cifar10, cifar100 "
                "and folder:PATH"
            )
        if (self.mean is None) != (self.std is None):
            raise DataError(
                "--mean and --std must be given together (3 floats each) "
                "or both left unset to use the dataset's statistics"
            )
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is None:
                continue
            if (
                not isinstance(values, tuple)
                or len(values) != 3
                or not all(math.isfinite(v) for v in values)
            ):
                raise DataError(
                    f"{flag}={values!r} must be 3 finite floats, one per "
                    "RGB channel, in [0, 1] pixel units"
                )
        if self.std is not None and min(self.std) <= 0:
            raise DataError(f"--std={self.std!r} must be positive in every channel")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
