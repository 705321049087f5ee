"""Input pipelines: tensorflow-datasets and image folders, search splits, augmentation.

A training loop asks four questions, one function each:

* :func:`get_dataset_info` loads and checks a dataset once and describes it: classes,
  network input size, normalisation statistics, split sizes.
* :func:`make_dataset` builds the ``tf.data`` pipeline of one split, yielding
  ``(images float32 [B, H, W, 3] normalised, labels int32 [B])``.
* :func:`distributed_dataset` splits a global batch across replicas and workers.
* :func:`num_examples` and :func:`steps_per_epoch` size an epoch.

Datasets (``--dataset``):

* ``cifar10``, ``cifar100``: tensorflow-datasets, downloaded on first use; the decoded
  uint8 images are held in memory.
* ``imagenet2012``: tensorflow-datasets built from the ILSVRC2012 tars in its manual
  directory; streamed from the TFRecords and decoded per epoch.
* ``folder:PATH``: ``PATH/train/<class>/*.jpg|png`` and ``PATH/test/<class>/...``
  (``val``/``validation`` also name the test split). Labels are the sorted class-folder
  names. Images up to 64 pixels a side are decoded once into memory and get the CIFAR
  augmentation; larger ones are decoded per epoch and get the ImageNet augmentation.

Splits (docs/method.md sections 3-5): ``train`` and ``test``; the two-stage search cuts
``train`` into ``search_weights`` (its first ``floor(train_portion * N)`` examples)
and ``search_arch`` (the rest). Example order is the tfds order for tfds datasets and,
for folders, the sorted file paths of each class taken round-robin over the classes
(airplane/0000, automobile/0000, ..., truck/0000, airplane/0001, ...), so that both
search halves hold every class in proportion; the purely sorted order would give the
weight half the first classes and the architecture half the last ones.

Determinism: every random choice is a stateless function of ``(seed, epoch, example
index)``: the shuffle of epoch e, each example's crop, flip, jitter and cutout. It does
not depend on threads, on the process, on TF's global seed, or on where a stream
started, so a run resumed at epoch e (``epoch_seed=e``) sees the batches an
uninterrupted run would. ``deterministic=True`` also fixes the order in which the
parallel maps deliver training batches; evaluation order is always fixed. (The
streamed ImageNet shuffle is an exception: a seeded tf.data shuffle buffer; see
:func:`make_dataset`.)

Modules, each importing only those above it:

* ``config``: ``DataConfig`` (the flags) and its validation, ``DataError``, the dataset
  registry, constants shared by the others.
* ``info``: ``DatasetInfo`` (a loaded dataset and where its examples are), split ranges,
  epoch sizes.
* ``augment``: normalisation, CIFAR and ImageNet augmentation, all stateless.
* ``folders``: image folders: listing, the decode pass, corrupt files, the statistics
  cache.
* ``sources``: ``get_dataset_info``; the tensorflow-datasets sources.
* ``pipeline``: ``make_dataset``, ``distributed_dataset``, batching and shuffles.
"""

from istanas_tf.data.augment import (
    CIFAR_PADDING,
    COLOR_JITTER,
    HUE_JITTER,
    IMAGENET_AREA_RANGE,
    IMAGENET_RATIO_RANGE,
    IMAGENET_RESIZE,
    color_jitter,
    cutout,
    flip_left_right,
    normalize,
    pad_and_crop,
)
from istanas_tf.data.config import (
    FOLDER_PREFIX,
    IMAGENET_CROP,
    SPLITS,
    VALID_DATASETS,
    DataConfig,
    DataError,
)
from istanas_tf.data.folders import SMALL_IMAGE_MAX_SIDE
from istanas_tf.data.info import DatasetInfo, num_examples, steps_per_epoch
from istanas_tf.data.pipeline import check_divisible, distributed_dataset, make_dataset
from istanas_tf.data.sources import get_dataset_info

__all__ = [
    "CIFAR_PADDING",
    "COLOR_JITTER",
    "FOLDER_PREFIX",
    "HUE_JITTER",
    "IMAGENET_AREA_RANGE",
    "IMAGENET_CROP",
    "IMAGENET_RATIO_RANGE",
    "IMAGENET_RESIZE",
    "SMALL_IMAGE_MAX_SIDE",
    "SPLITS",
    "VALID_DATASETS",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "check_divisible",
    "color_jitter",
    "cutout",
    "distributed_dataset",
    "flip_left_right",
    "get_dataset_info",
    "make_dataset",
    "normalize",
    "num_examples",
    "pad_and_crop",
    "steps_per_epoch",
]
