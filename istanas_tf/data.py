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

Splits (METHOD.md sections 3-5): ``train`` and ``test``; the two-stage search cuts
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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
from typing import Any, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

SPLITS: tuple[str, ...] = ("train", "test", "search_weights", "search_arch")
FOLDER_PREFIX = "folder:"

# Normalisation statistics of the tfds datasets, in [0, 1] pixel units
# (METHOD.md sections 3-5; the DARTS code uses the same values).
_TFDS_DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    streamed=False, test_split="test"),
    "cifar100": dict(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     streamed=False, test_split="test"),
    # The ILSVRC2012 test split has no labels: the validation set is the test split.
    "imagenet2012": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         streamed=True, test_split="validation"),
}
VALID_DATASETS = (*_TFDS_DATASETS, f"{FOLDER_PREFIX}PATH")

CIFAR_PADDING = 4  # zero padding before the random crop (RandomCrop(32, padding=4))
IMAGENET_CROP = 224  # network input side for ImageNet-style data
IMAGENET_RESIZE = 256  # evaluation: shorter side resized to this, then centre crop
IMAGENET_AREA_RANGE = (0.08, 1.0)  # random resized crop: fraction of the image area
IMAGENET_RATIO_RANGE = (3 / 4, 4 / 3)  # random resized crop: aspect ratio w/h
COLOR_JITTER = 0.4  # brightness, contrast and saturation factors in [0.6, 1.4]
HUE_JITTER = 0.2  # hue shift in [-0.2, 0.2] of the colour circle
# Folder images at most this many pixels a side are "CIFAR-like": held in memory,
# padded-crop augmentation at native size. Larger ones are ImageNet-like.
SMALL_IMAGE_MAX_SIDE = 64

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_FOLDER_TEST_SPLITS = ("test", "val", "validation")
_STREAM_SHUFFLE_BUFFER = 10_000  # streamed tfds data: examples in the shuffle buffer
_DECODE_BATCH = 1024  # images per batch of the one-time decode pass
_SHOWN_FILES = 5  # corrupt files named in an error before "and N more"
_CACHE_FORMAT = 1  # version of the folder statistics JSON
# Salts keep the shuffle and the augmentation random streams apart.
_SHUFFLE_SALT = 0x5F1
_AUGMENT_SALT = 0xA06


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
            return self.dataset[len(FOLDER_PREFIX):]
        return None

    def validate(self) -> None:
        """Raises DataError naming the flag of the first invalid field."""
        if self.dataset not in _TFDS_DATASETS and not self.folder:
            raise DataError(
                f"--dataset={self.dataset!r} is not a known dataset; valid choices: "
                f"{', '.join(VALID_DATASETS)} (an image folder PATH/train/<class>/*.jpg "
                "and PATH/test/<class>/*.jpg)")
        if (isinstance(self.train_portion, bool)
                or not isinstance(self.train_portion, (int, float))
                or not 0.0 < self.train_portion < 1.0):
            raise DataError(f"--train_portion={self.train_portion!r} must be a number "
                            "strictly between 0 and 1 (0.5 splits the training set in halves)")
        if not _is_int(self.cutout_length) or self.cutout_length < 0:
            raise DataError(f"--cutout_length={self.cutout_length!r} must be an integer "
                            ">= 0 (0 turns cutout off; the paper uses 16 on CIFAR)")
        if not _is_int(self.seed):
            raise DataError(f"--seed={self.seed!r} must be an integer")
        if not _is_int(self.max_examples_per_class) or self.max_examples_per_class < 0:
            raise DataError(f"--max_examples_per_class={self.max_examples_per_class!r} "
                            "must be an integer >= 0 (0 keeps every example)")
        if self.max_examples_per_class and _TFDS_DATASETS.get(self.dataset, {}).get(
                "streamed"):
            raise DataError(f"--max_examples_per_class is not supported for "
                            f"--dataset={self.dataset}; it works with cifar10, cifar100 "
                            "and folder:PATH")
        if (self.mean is None) != (self.std is None):
            raise DataError("--mean and --std must be given together (3 floats each) "
                            "or both left unset to use the dataset's statistics")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is None:
                continue
            if (not isinstance(values, tuple) or len(values) != 3
                    or not all(math.isfinite(v) for v in values)):
                raise DataError(f"{flag}={values!r} must be 3 finite floats, one per "
                                "RGB channel, in [0, 1] pixel units")
        if self.std is not None and min(self.std) <= 0:
            raise DataError(f"--std={self.std!r} must be positive in every channel")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, eq=False)
class _Source:
    """Where a dataset's examples come from, after loading and checking.

    kind "memory": ``examples[split] = (images [N, H, W, 3] uint8, labels [N] int32)``,
      decoded once, on the CPU. kind "files": ``(paths [N] string, labels [N] int32)``,
      decoded per epoch. kind "tfds": ``builder`` streams them; ``tfds_splits`` maps
      our ``train``/``test`` to the builder's split names.
    """

    kind: str
    examples: dict[str, tuple[tf.Tensor, tf.Tensor]] = dataclasses.field(
        default_factory=dict)
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
    _source: _Source | None = dataclasses.field(default=None, compare=False, repr=False)

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


def steps_per_epoch(info: DatasetInfo, split: str, global_batch_size: int, *,
                    num_input_pipelines: int = 1) -> int:
    """Training steps per epoch of ``make_dataset(..., training=True)``.

    Each input pipeline keeps the same whole number of batches of
    ``global_batch_size / num_input_pipelines`` examples from its
    ``floor(N / num_input_pipelines)`` examples, so workers step in lockstep.
    """
    pipeline_batch = global_batch_size // num_input_pipelines
    return (num_examples(info, split) // num_input_pipelines) // pipeline_batch


def get_dataset_info(config: DataConfig) -> DatasetInfo:
    """Loads and checks ``config.dataset`` once; the result feeds :func:`make_dataset`.

    Memory datasets (CIFAR, small-image folders) are decoded here; folders are listed,
    validated (every image decoded once) and their statistics computed or read from
    the cache. Raises DataError for anything unusable, naming the flag or file.
    """
    config.validate()
    if config.folder:
        info = _folder_info(config, config.folder)
    else:
        info = _tfds_info(config)
    if config.mean is not None:
        info = dataclasses.replace(info, mean=config.mean, std=config.std)
    logging.info("Dataset %s: %d classes, %dx%d images, %d train / %d test, "
                 "mean %s std %s, %s augmentation", info.name, info.num_classes,
                 *info.image_size, info.num_train, info.num_test,
                 _fmt(info.mean), _fmt(info.std), info.augmentation)
    return info


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


# ----------------------------------------------------------------------------- tfds


def _tfds_info(config: DataConfig) -> DatasetInfo:
    name = config.dataset
    spec = _TFDS_DATASETS[name]
    builder = _prepared_builder(config)
    class_names = tuple(builder.info.features["label"].names)
    splits = {"train": "train", "test": spec["test_split"]}
    if spec["streamed"]:
        sizes = {split: _tfds_split_size(builder, tfds_split)
                 for split, tfds_split in splits.items()}
        source = _Source("tfds", builder=builder, tfds_splits=splits)
        image_size = (IMAGENET_CROP, IMAGENET_CROP)
    else:
        examples = {split: _load_tfds_split(config, builder, tfds_split)
                    for split, tfds_split in splits.items()}
        sizes = {split: int(labels.shape[0]) for split, (_, labels) in examples.items()}
        source = _Source("memory", examples=examples)
        image_size = tuple(int(d) for d in examples["train"][0].shape[1:3])
    return DatasetInfo(
        name=name, num_classes=len(class_names), image_size=image_size,
        class_names=class_names, mean=spec["mean"], std=spec["std"],
        num_train=sizes["train"], num_test=sizes["test"],
        train_portion=config.train_portion,
        augmentation="imagenet" if spec["streamed"] else "cifar", _source=source)


def _prepared_builder(config: DataConfig):
    """The tfds builder of ``config.dataset``, downloaded and prepared if need be."""
    name = config.dataset
    builder = tfds.builder(name, data_dir=config.data_dir)
    if builder.is_prepared():
        return builder
    data_dir = config.data_dir or tfds.core.constants.DATA_DIR
    try:
        if name == "imagenet2012":
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=config.manual_dir))
        else:
            builder.download_and_prepare()
    except Exception as error:  # tfds raises many types; all mean "no usable copy"
        if name == "imagenet2012":
            manual_dir = config.manual_dir or os.path.join(data_dir, "downloads", "manual")
            how = (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                   f"--manual_dir={manual_dir} (tfds prepares them once), pass "
                   "--data_dir with an already prepared copy, or use "
                   "--dataset=folder:PATH with PATH/train/<class>/*.JPEG and "
                   "PATH/val/<class>/*.JPEG")
        else:
            how = (f"pass --data_dir=DIR with a prepared tfds copy (DIR/{name}/...), run "
                   "once on a machine with internet access, or use "
                   "--dataset=folder:PATH with PATH/train/<class>/*.png and "
                   "PATH/test/<class>/*.png")
        raise DataError(f"--dataset={name}: no prepared copy under --data_dir={data_dir} "
                        f"and preparing one failed ({type(error).__name__}: {error}). "
                        f"To supply the data, {how}.") from error
    return builder


def _tfds_split_size(builder, split: str) -> int:
    # as_dataset asserts the cardinality from the split metadata without reading data.
    size = int(builder.as_dataset(split=split).cardinality())
    if size < 0:
        size = builder.info.splits[split].num_examples
    if size <= 0:
        raise DataError(f"--dataset={builder.name}: split {split!r} is empty")
    return size


def _load_tfds_split(config: DataConfig, builder, split: str):
    """Decodes a small tfds split into memory: images [N, H, W, 3] uint8, labels [N]."""
    dataset = builder.as_dataset(split=split, shuffle_files=False, as_supervised=True)
    images, labels = [], []
    for image_batch, label_batch in dataset.batch(_DECODE_BATCH).as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    if not labels:
        raise DataError(f"--dataset={config.dataset}: split {split!r} is empty")
    images = np.concatenate(images)
    labels = np.concatenate(labels).astype(np.int32)
    if config.max_examples_per_class:
        # First N of each class in tfds order, keeping that order.
        keep = np.zeros(len(labels), dtype=bool)
        for label in np.unique(labels):
            keep[np.flatnonzero(labels == label)[:config.max_examples_per_class]] = True
        images, labels = images[keep], labels[keep]
    return _to_cpu(images), _to_cpu(labels)


def _to_cpu(array: np.ndarray) -> tf.Tensor:
    with tf.device("/cpu:0"):
        return tf.convert_to_tensor(array)


# --------------------------------------------------------------------------- folders


def _folder_info(config: DataConfig, path: str) -> DatasetInfo:
    flag = f"--dataset={config.dataset}"
    root = os.path.abspath(os.path.expanduser(path))
    class_names, split_files = _list_folder(flag, root, config.max_examples_per_class)
    height, width = _first_image_size(flag, split_files["train"][0])
    small = max(height, width) <= SMALL_IMAGE_MAX_SIDE
    cache_path = _stats_cache_path(config, root)
    fingerprint = _fingerprint(root, split_files)
    cached = _read_stats_cache(cache_path, fingerprint)

    examples, corrupt, stats = {}, {}, None
    if small or cached is None:
        for split, (paths, labels) in split_files.items():
            scan = _decode_folder_split(paths, (height, width) if small else None)
            if scan.wrong_size:
                path_, shape = scan.wrong_size[0]
                raise DataError(
                    f"{flag}: {path_} is {shape[0]}x{shape[1]} but the folder's images are "
                    f"{height}x{width} (the size of {split_files['train'][0][0]}); "
                    f"{len(scan.wrong_size)} image(s) of split {split!r} differ. Images up "
                    f"to {SMALL_IMAGE_MAX_SIDE} pixels a side must all have one size.")
            corrupt[split] = [paths[i] for i in np.flatnonzero(~scan.ok)]
            if split == "train":
                stats = scan.mean_std()
            if small:
                examples[split] = (scan.images[scan.ok], labels[scan.ok])
        if cached is None:
            _write_stats_cache(cache_path, {
                "format": _CACHE_FORMAT, "folder": root, "fingerprint": fingerprint,
                "max_examples_per_class": config.max_examples_per_class,
                "image_size": [height, width], "mean": stats[0], "std": stats[1],
                "corrupt": {split: [os.path.relpath(p, root) for p in files]
                            for split, files in corrupt.items()}})
        else:  # small images are decoded again, but the statistics are the cached ones
            stats = (cached["mean"], cached["std"])
    else:
        stats = (cached["mean"], cached["std"])
        corrupt = {split: [os.path.join(root, p) for p in files]
                   for split, files in cached["corrupt"].items()}

    sizes = {}
    for split, (paths, labels) in split_files.items():
        bad = corrupt.get(split, [])
        _check_corrupt(config, flag, split, bad)
        if small:
            images, labels = examples[split]
            examples[split] = (_to_cpu(images), _to_cpu(labels))
        else:
            keep = ~np.isin(paths, bad)
            examples[split] = (_to_cpu(paths[keep]), _to_cpu(labels[keep]))
        sizes[split] = int(examples[split][1].shape[0])
        if sizes[split] == 0:
            raise DataError(f"{flag}: every image of split {split!r} is unreadable")
    return DatasetInfo(
        name=config.dataset, num_classes=len(class_names),
        image_size=(height, width) if small else (IMAGENET_CROP, IMAGENET_CROP),
        class_names=class_names, mean=tuple(stats[0]), std=tuple(stats[1]),
        num_train=sizes["train"], num_test=sizes["test"],
        train_portion=config.train_portion,
        augmentation="cifar" if small else "imagenet",
        _source=_Source("memory" if small else "files", examples=examples))


def _list_folder(flag: str, root: str, max_per_class: int):
    """Class names and, per split, (paths [N] str, labels [N] int32) in dataset order."""
    layout = f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
    if not os.path.isdir(root):
        raise DataError(f"{flag}: {root} is not a directory; expected an image folder "
                        f"{layout}")
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    test_dirs = [name for name in _FOLDER_TEST_SPLITS if name in subdirs]
    if "train" not in subdirs or not test_dirs:
        raise DataError(f"{flag}: {root} needs a 'train' and a 'test' (or 'val') "
                        f"subfolder, found {subdirs}; expected {layout}")
    split_dirs = {"train": "train", "test": test_dirs[0]}
    classes = {}
    for split, name in split_dirs.items():
        classes[split] = sorted(e.name for e in os.scandir(os.path.join(root, name))
                                if e.is_dir() and not e.name.startswith("."))
        if not classes[split]:
            raise DataError(f"{flag}: split {split!r} ({os.path.join(root, name)}) is "
                            "empty: it has no class folders; expected " + layout)
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataError(
            f"{flag}: the class folders of train and {split_dirs['test']} differ, so "
            f"labels would not match; only in train: {only_train}, only in "
            f"{split_dirs['test']}: {only_test}")
    class_names = tuple(classes["train"])
    split_files = {}
    for split, name in split_dirs.items():
        per_class = []
        for class_name in class_names:
            class_dir = os.path.join(root, name, class_name)
            files = sorted(e.path for e in os.scandir(class_dir)
                           if e.is_file() and e.name.lower().endswith(_IMAGE_EXTENSIONS))
            if not files:
                raise DataError(f"{flag}: class folder {class_dir} of split {split!r} is "
                                f"empty: no {'/'.join(_IMAGE_EXTENSIONS)} files")
            if max_per_class:
                files = files[:max_per_class]
            per_class.append(files)
        # Round-robin over the classes (see the module docstring).
        columns = [[(path, label) for path in files]
                   for label, files in enumerate(per_class)]
        ordered = [item for row in itertools.zip_longest(*columns)
                   for item in row if item is not None]
        split_files[split] = (np.array([p for p, _ in ordered]),
                              np.array([label for _, label in ordered], dtype=np.int32))
    return class_names, split_files


def _first_image_size(flag: str, paths: np.ndarray) -> tuple[int, int]:
    """Height and width of the first decodable training image."""
    for path in paths:
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                                       expand_animations=False)
        except tf.errors.OpError:
            continue  # reported with the other corrupt files by the decode pass
        return int(image.shape[0]), int(image.shape[1])
    raise DataError(f"{flag}: no image of the training split can be decoded")


@dataclasses.dataclass
class _Scan:
    """What one decode pass over a folder split found.

    Attributes:
      ok: [N] bool, the image decoded (and had the expected size).
      images: [N, H, W, 3] uint8 when decoded into memory, else None.
      wrong_size: (path, (h, w)) of decodable images of another size.
      sums, squares: per-channel sums of pixel values and of their squares, [0, 1] units.
      pixels: number of pixels summed.
    """

    ok: np.ndarray
    images: np.ndarray | None
    wrong_size: list
    sums: np.ndarray
    squares: np.ndarray
    pixels: int

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and population standard deviation over all pixels."""
        mean = self.sums / max(self.pixels, 1)
        var = np.maximum(self.squares / max(self.pixels, 1) - mean ** 2, 0.0)
        return mean.tolist(), np.sqrt(var).tolist()


def _decode_folder_split(paths: np.ndarray, size: tuple[int, int] | None) -> _Scan:
    """Decodes every image once, in parallel: validation, statistics, optional pixels.

    Args:
      paths: [N] image file paths.
      size: ``(H, W)`` to keep the pixels in memory (all images must have this size),
        or None to only validate and sum.
    """
    num = len(paths)

    def decode(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                                   expand_animations=False)
        shape = tf.shape(image)[:2]
        if size is not None:
            # Wrong-size images are dropped below; zeros give the element a static shape.
            right = tf.reduce_all(tf.equal(shape, size))
            image = tf.cond(right, lambda: tf.reshape(image, [*size, 3]),
                            lambda: tf.zeros([*size, 3], tf.uint8))
            return dict(index=index, shape=shape, image=image)
        pixels = tf.cast(image, tf.float32) / 255.0
        return dict(index=index, shape=shape,
                    sums=tf.reduce_sum(pixels, axis=[0, 1]),
                    squares=tf.reduce_sum(tf.square(pixels), axis=[0, 1]))

    dataset = tf.data.Dataset.from_tensor_slices((np.arange(num), paths))
    # A read or decode error drops the element; the missing indices are the corrupt files.
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    dataset = dataset.ignore_errors().batch(_DECODE_BATCH).prefetch(2)
    ok = np.zeros(num, dtype=bool)
    images = np.zeros((num, *size, 3), np.uint8) if size is not None else None
    # Per-image sums, added up in index order at the end: the batches arrive in any
    # order, and a different summation order would change the statistics' last digits.
    sums, squares, pixels = np.zeros((num, 3)), np.zeros((num, 3)), np.zeros(num)
    wrong_size = []
    for batch in dataset.as_numpy_iterator():
        index, shape = batch["index"], batch["shape"]
        right = (np.all(shape == np.array(size), axis=1) if size is not None
                 else np.ones(len(index), dtype=bool))
        wrong_size += [(paths[i], tuple(s)) for i, s in zip(index[~right], shape[~right])]
        index = index[right]
        ok[index] = True
        pixels[index] = np.prod(shape[right], axis=1)
        if images is None:
            sums[index], squares[index] = batch["sums"][right], batch["squares"][right]
        else:
            kept = batch["image"][right]
            images[index] = kept
            values = kept.reshape(len(index), -1, 3).astype(np.float64) / 255.0
            sums[index] = values.sum(axis=1)
            squares[index] = np.square(values).sum(axis=1)
    return _Scan(ok=ok, images=images, wrong_size=wrong_size, sums=sums.sum(axis=0),
                 squares=squares.sum(axis=0), pixels=int(pixels.sum()))


def _check_corrupt(config: DataConfig, flag: str, split: str, bad: list[str]) -> None:
    if not bad:
        return
    shown = ", ".join(bad[:_SHOWN_FILES])
    more = f" and {len(bad) - _SHOWN_FILES} more" if len(bad) > _SHOWN_FILES else ""
    if not config.skip_corrupt_images:
        raise DataError(f"{flag}: {len(bad)} unreadable or corrupt image(s) in split "
                        f"{split!r}: {shown}{more}. Repair or remove them, or pass "
                        "--skip_corrupt_images to leave them out.")
    logging.warning("Skipping %d unreadable or corrupt image(s) in split %r of %s "
                    "(--skip_corrupt_images): %s%s", len(bad), split, config.dataset,
                    shown, more)


def _stats_cache_path(config: DataConfig, root: str) -> str:
    """The JSON file caching a folder's statistics, outside the (maybe read-only) folder."""
    if config.data_dir:
        cache_dir = os.path.join(config.data_dir, "istanas_tf")
    else:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(cache_home, "istanas_tf")
    key = hashlib.sha1(f"{root}\0{config.max_examples_per_class}".encode()).hexdigest()
    return os.path.join(cache_dir, f"folder_{key[:16]}.json")


def _fingerprint(root: str, split_files) -> str:
    # The file listing: adding, removing or renaming an image invalidates the cache.
    digest = hashlib.sha1()
    for split, (paths, _) in sorted(split_files.items()):
        digest.update(split.encode())
        for path in paths:
            digest.update(os.path.relpath(path, root).encode() + b"\0")
    return digest.hexdigest()


def _read_stats_cache(path: str, fingerprint: str) -> dict | None:
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if cached.get("format") != _CACHE_FORMAT or cached.get("fingerprint") != fingerprint:
        return None
    logging.info("Folder statistics read from %s", path)
    return cached


def _write_stats_cache(path: str, content: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(content, f, indent=1)
        os.replace(tmp, path)
        logging.info("Folder statistics cached in %s", path)
    except OSError as error:
        # A read-only cache only costs the next run one more pass.
        logging.warning("Could not cache folder statistics in %s: %s", path, error)


# ----------------------------------------------------------------------- augmentation


def normalize(images: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """``(x - mean) / std`` per channel.

    Args:
      images: [..., 3], uint8 in [0, 255] or float in [0, 1].
      mean, std: 3 floats in [0, 1] units.

    Returns:
      float32 tensor of the same shape.
    """
    if images.dtype == tf.uint8:
        images = tf.cast(images, tf.float32) / 255.0
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (tf.cast(images, tf.float32) - mean) / std


def pad_and_crop(images: tf.Tensor, offsets: tf.Tensor, padding: int) -> tf.Tensor:
    """Zero-pads by ``padding`` on each side, then crops back to the input size.

    The crop of image b starts at ``offsets[b]`` in the padded image, so offsets in
    ``[0, 2 * padding]`` give torchvision's ``RandomCrop(size, padding)``.

    Args:
      images: [B, H, W, C].
      offsets: [B, 2] int32, (row, column) of each crop's top-left corner.
      padding: pixels of zeros added on every side.

    Returns:
      [B, H, W, C], same dtype.
    """
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)[tf.newaxis]  # [B, H]
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis]  # [B, W]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def flip_left_right(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """Mirrors the images where ``flip`` is true. images: [B, H, W, C]; flip: [B] bool."""
    return tf.where(flip[:, tf.newaxis, tf.newaxis, tf.newaxis],
                    tf.reverse(images, axis=[2]), images)


def cutout(images: tf.Tensor, centers: tf.Tensor, length: int) -> tf.Tensor:
    """Zeroes a ``length`` x ``length`` square per image, clipped at the borders.

    As the DARTS ``Cutout``: applied after normalisation, the square's rows are
    ``[cy - length // 2, cy - length // 2 + length)`` (same for columns), in all
    channels. (DARTS ends at ``cy + length // 2``: the same for even lengths.)

    Args:
      images: [B, H, W, C] float.
      centers: [B, 2] int32, (row, column) of each square's centre, any pixel.
      length: side of the square in pixels.

    Returns:
      [B, H, W, C].
    """
    height, width = images.shape[1], images.shape[2]
    top_left = centers - length // 2  # [B, 2]
    rows = tf.range(height)[tf.newaxis]
    cols = tf.range(width)[tf.newaxis]
    in_rows = (rows >= top_left[:, :1]) & (rows < top_left[:, :1] + length)  # [B, H]
    in_cols = (cols >= top_left[:, 1:]) & (cols < top_left[:, 1:] + length)  # [B, W]
    inside = in_rows[:, :, tf.newaxis] & in_cols[:, tf.newaxis, :]  # [B, H, W]
    return images * tf.cast(~inside, images.dtype)[..., tf.newaxis]


def _key(seed: int, salt: int) -> tf.Tensor:
    return tf.constant([seed, salt], tf.int64)


def _fold(key: tf.Tensor, value) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))


def _random_resized_crop(encoded: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Decodes a random crop of 8-100 % of the area, aspect 3/4-4/3: [h, w, 3] uint8.

    As torchvision's RandomResizedCrop, except that after 10 failed draws TF falls
    back to the whole image rather than a centre crop. JPEGs decode only the window.
    """

    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=key, min_object_covered=0.0,
            aspect_ratio_range=IMAGENET_RATIO_RANGE, area_range=IMAGENET_AREA_RANGE,
            max_attempts=10, use_image_if_no_bounding_boxes=True)
        return begin, size

    def jpeg():
        begin, size = window(tf.image.extract_jpeg_shape(encoded))
        return tf.image.decode_and_crop_jpeg(
            encoded, tf.stack([begin[0], begin[1], size[0], size[1]]), channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        begin, size = window(tf.shape(image))
        return tf.slice(image, begin, size)

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def color_jitter(image: tf.Tensor, key: tf.Tensor, strength: float = COLOR_JITTER,
                 hue: float = HUE_JITTER) -> tf.Tensor:
    """torchvision ``ColorJitter(strength, strength, strength, hue)``, stateless.

    Brightness scales the pixels, contrast blends with the mean grey level, saturation
    with the grey image (factors uniform in [1 - strength, 1 + strength]); hue shifts by
    up to ``hue`` of the colour circle; the four are applied in a random order.

    Args:
      image: [H, W, 3] float32 in [0, 1].
      key: [2] int64 stateless seed.

    Returns:
      [H, W, 3] float32 in [0, 1].
    """
    factor_key, hue_key, order_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 3))
    factors = tf.random.stateless_uniform([3], factor_key, 1 - strength, 1 + strength)
    shift = tf.random.stateless_uniform([], hue_key, -hue, hue)
    order = tf.argsort(tf.random.stateless_uniform([4], order_key))

    def brightness(x):
        return x * factors[0]

    def contrast(x):
        grey = tf.reduce_mean(tf.image.rgb_to_grayscale(x))
        return factors[1] * x + (1 - factors[1]) * grey

    def saturation(x):
        return factors[2] * x + (1 - factors[2]) * tf.image.rgb_to_grayscale(x)

    def hue_shift(x):
        return tf.image.adjust_hue(x, shift)

    def clipped(adjust, x):
        return tf.clip_by_value(adjust(x), 0.0, 1.0)

    for position in range(4):
        image = tf.switch_case(order[position], [
            functools.partial(clipped, adjust, image)
            for adjust in (brightness, contrast, saturation, hue_shift)])
    return image


def _imagenet_train_image(encoded: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Random resized crop to 224, flip, colour jitter: [224, 224, 3] float in [0, 1]."""
    crop_key, flip_key, jitter_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 3))
    image = _random_resized_crop(encoded, crop_key)
    # PIL's bilinear resize (torchvision) filters when shrinking: antialias matches it.
    image = tf.image.resize(image, [IMAGENET_CROP, IMAGENET_CROP], antialias=True)
    image = tf.clip_by_value(image / 255.0, 0.0, 1.0)
    flip = tf.random.stateless_uniform([], flip_key) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return color_jitter(image, jitter_key)


def _imagenet_eval_image(encoded: tf.Tensor) -> tf.Tensor:
    """Shorter side to 256, centre crop 224: [224, 224, 3] float in [0, 1]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    # torchvision Resize(256): the longer side becomes int(256 * long / short).
    new_height = tf.where(height <= width, IMAGENET_RESIZE,
                          IMAGENET_RESIZE * height // short)
    new_width = tf.where(height <= width, IMAGENET_RESIZE * width // short,
                         IMAGENET_RESIZE)
    image = tf.image.resize(image, tf.stack([new_height, new_width]), antialias=True)
    top = tf.cast(tf.round((new_height - IMAGENET_CROP) / 2), tf.int32)
    left = tf.cast(tf.round((new_width - IMAGENET_CROP) / 2), tf.int32)
    image = tf.slice(image, tf.stack([top, left, 0]), [IMAGENET_CROP, IMAGENET_CROP, 3])
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


# ------------------------------------------------------------------------- pipelines


@dataclasses.dataclass(frozen=True)
class _Batching:
    """How one input pipeline's share of the global batch is cut.

    Attributes:
      per_replica: examples per batch this dataset yields (one replica's batch).
      pipeline: examples per step across this pipeline's replicas.
      pipelines: number of input pipelines (workers); ``index``: this one.
    """

    per_replica: int
    pipeline: int
    pipelines: int
    index: int


def _batching(batch_size: int, input_context) -> _Batching:
    if input_context is None:
        return _Batching(batch_size, batch_size, 1, 0)
    check_divisible(batch_size, input_context.num_replicas_in_sync)
    per_replica = input_context.get_per_replica_batch_size(batch_size)
    replicas_per_pipeline = (input_context.num_replicas_in_sync
                             // input_context.num_input_pipelines)
    return _Batching(per_replica, per_replica * replicas_per_pipeline,
                     input_context.num_input_pipelines, input_context.input_pipeline_id)


def check_divisible(global_batch_size: int, replicas: int) -> None:
    if global_batch_size % replicas:
        lower = max(replicas, global_batch_size // replicas * replicas)
        raise DataError(
            f"--batch_size={global_batch_size} is not divisible by the {replicas} "
            f"replicas in sync; use a multiple of {replicas}, e.g. {lower} or "
            f"{lower + replicas}")


def make_dataset(config: DataConfig, info: DatasetInfo, split: str, *, training: bool,
                 batch_size: int, cutout: bool = False, repeat: bool = False,
                 input_context: tf.distribute.InputContext | None = None,
                 epoch_seed: int = 0) -> tf.data.Dataset:
    """The input pipeline of one split.

    Training pipelines shuffle every epoch and augment (CIFAR: pad 4 + random crop,
    flip; ImageNet: random resized crop 224, flip, colour jitter), normalise, apply
    cutout when asked, and drop the remainder so every step has a full batch.
    Evaluation pipelines only normalise (ImageNet: resize 256, centre crop 224), keep
    the order and the last partial batch.

    Args:
      config: the data flags (seed, cutout length, determinism).
      info: from :func:`get_dataset_info` with the same config.
      split: one of :data:`SPLITS`.
      training: augmented and shuffled (True) or evaluation order (False).
      batch_size: the global batch size. Without ``input_context`` the dataset yields
        batches of this size; with it, each replica's batch
        ``batch_size / num_replicas_in_sync``.
      cutout: apply cutout of ``config.cutout_length`` (0: none). Training only; the
        caller decides (evaluation and one-stage search use it, two-stage search not).
      repeat: loop over epochs forever; else one epoch.
      input_context: from ``strategy.distribute_datasets_from_function``: this dataset
        reads only its input pipeline's share of the examples (taken before shuffling).
      epoch_seed: the epoch the stream starts at. Epoch e's shuffle and augmentation
        depend only on (config.seed, e), so a run resumed at epoch e passes e here.
        (Streamed ImageNet training uses a seeded tf.data shuffle buffer keyed on
        (seed, epoch_seed) instead: reproducible from a given start, not across resumes.)

    Returns:
      ``tf.data.Dataset`` of ``(images [b, H, W, 3] float32, labels [b] int32)``.
    """
    source = info._source
    if source is None:
        raise DataError("make_dataset needs a DatasetInfo made by get_dataset_info")
    base_split, start, stop = info.split_range(split)
    if cutout and not training:
        raise DataError("cutout applies to training pipelines only (training=True)")
    batching = _batching(batch_size, input_context)
    if training:
        steps = (stop - start) // batching.pipelines // batching.pipeline
        if steps == 0:
            raise DataError(
                f"--batch_size={batch_size} is larger than the "
                f"{(stop - start) // batching.pipelines} examples of split {split!r} "
                f"per input pipeline ({batching.pipelines}); use at most "
                f"{(stop - start) // batching.pipelines * batching.pipelines}")
        epoch_size = steps * batching.pipeline  # per pipeline, whole steps only
    else:
        epoch_size = None
    cutout_length = config.cutout_length if cutout else 0

    if source.kind == "tfds":
        dataset = _tfds_pipeline(config, info, source, base_split, start, stop,
                                 training=training, batching=batching,
                                 epoch_size=epoch_size, repeat=repeat,
                                 epoch_seed=epoch_seed, cutout_length=cutout_length)
    else:
        dataset = _indexed_pipeline(config, info, source, base_split, start, stop,
                                    training=training, batching=batching,
                                    epoch_size=epoch_size, repeat=repeat,
                                    epoch_seed=epoch_seed, cutout_length=cutout_length)
    options = tf.data.Options()
    # Out-of-order parallel maps only speed up training; evaluation keeps its order.
    options.deterministic = bool(config.deterministic) or not training
    if input_context is not None:
        # The shards are cut above; tf.data's auto-sharding would cut them again.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF)
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _epochs(indices: np.ndarray, one_epoch, *, epoch_size: int, repeat: bool, seed: int,
            pipeline: int, epoch_seed: int) -> tf.data.Dataset:
    """Concatenates ``one_epoch(epoch, order)`` over the epochs from ``epoch_seed``.

    ``order`` [epoch_size] int64 is epoch e's permutation of ``indices``, cut to whole
    steps; it depends only on (seed, pipeline, e).
    """
    indices_t = tf.constant(indices, tf.int64)
    shuffle_key = _fold(_key(seed, _SHUFFLE_SALT), pipeline)

    def epoch_fn(epoch):
        order = tf.random.experimental.stateless_shuffle(indices_t, _fold(shuffle_key, epoch))
        return one_epoch(epoch, order[:epoch_size])

    epochs = (tf.data.Dataset.counter(start=epoch_seed) if repeat
              else tf.data.Dataset.range(epoch_seed, epoch_seed + 1))
    return epochs.flat_map(epoch_fn)


def _cifar_draws(uniforms: tf.Tensor, height: int, width: int):
    """Crop offsets [B, 2], flips [B] and cutout centres [B, 2] from uniforms [B, 5]."""
    offsets = tf.floor(uniforms[:, :2] * float(2 * CIFAR_PADDING + 1))
    centers = tf.floor(uniforms[:, 3:] * tf.constant([height, width], tf.float32))
    return tf.cast(offsets, tf.int32), uniforms[:, 2] < 0.5, tf.cast(centers, tf.int32)


def _indexed_pipeline(config, info, source, base_split, start, stop, *, training,
                      batching, epoch_size, repeat, epoch_seed, cutout_length):
    """Memory and file sources: every example has an index into the split's tensors."""
    data, labels = source.examples[base_split]
    # Strided shards: each worker sees every class even if the order were sorted.
    indices = np.arange(start, stop, dtype=np.int64)[batching.index::batching.pipelines]
    epochs = functools.partial(_epochs, indices, epoch_size=epoch_size, repeat=repeat,
                               seed=config.seed, pipeline=batching.index,
                               epoch_seed=epoch_seed)
    augment_key = _key(config.seed, _AUGMENT_SALT)
    num_base = int(labels.shape[0])
    height, width = info.image_size

    if source.kind == "memory":
        # Whole batches of indices flow through the pipeline; the image work runs on
        # batches, which costs far less per image than per-example maps.
        def one_epoch(epoch, order):
            # Row i holds example i's random draws for this epoch.
            uniforms = tf.random.stateless_uniform([num_base, 5], _fold(augment_key, epoch))
            order = tf.reshape(order, [-1, batching.per_replica])
            return tf.data.Dataset.from_tensor_slices((order, tf.gather(uniforms, order)))

        def train_batch(index, uniforms):
            offsets, flips, centers = _cifar_draws(uniforms, height, width)
            images = pad_and_crop(tf.gather(data, index), offsets, CIFAR_PADDING)
            images = normalize(flip_left_right(images, flips), info.mean, info.std)
            if cutout_length:
                images = cutout(images, centers, cutout_length)
            return images, tf.gather(labels, index)

        def eval_batch(index):
            return normalize(tf.gather(data, index), info.mean, info.std), tf.gather(
                labels, index)

        if training:
            dataset = epochs(one_epoch).map(train_batch, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            dataset = tf.data.Dataset.from_tensor_slices(indices).batch(
                batching.per_replica).map(eval_batch, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        def example_fn(epoch, index):
            encoded = tf.io.read_file(tf.gather(data, index))
            key = _fold(_fold(augment_key, epoch), index)
            return _imagenet_example(encoded, tf.gather(labels, index), key, info,
                                     training=training, cutout_length=cutout_length)

        if training:
            dataset = epochs(lambda epoch, order: tf.data.Dataset.from_tensor_slices(
                (tf.fill(tf.shape(order), epoch), order)))
        else:
            dataset = tf.data.Dataset.from_tensor_slices(indices).map(
                lambda index: (tf.constant(0, tf.int64), index))
        dataset = dataset.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = _batch_with_cutout(dataset, batching.per_replica, training,
                                     cutout_length)
    if repeat and not training:
        dataset = dataset.repeat()
    return dataset


def _imagenet_example(encoded, label, key, info, *, training, cutout_length):
    """One ImageNet-style example: (image [224, 224, 3] normalised, label, cutout centre)."""
    if training:
        image_key, center_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        image = _imagenet_train_image(encoded, image_key)
    else:
        image, center_key = _imagenet_eval_image(encoded), key
    image = normalize(image, info.mean, info.std)
    center = tf.cast(tf.floor(tf.random.stateless_uniform([2], center_key)
                              * float(IMAGENET_CROP)), tf.int32)
    return image, tf.cast(label, tf.int32), center


def _batch_with_cutout(dataset, batch_size, training, cutout_length):
    dataset = dataset.batch(batch_size, drop_remainder=training)
    if cutout_length:
        return dataset.map(lambda images, labels, centers: (
            cutout(images, centers, cutout_length), labels),
            num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.map(lambda images, labels, centers: (images, labels))


def _tfds_pipeline(config, info, source, base_split, start, stop, *, training, batching,
                   epoch_size, repeat, epoch_seed, cutout_length):
    """Streamed tfds data (ImageNet): each pipeline reads a contiguous slice.

    tfds already shuffled the examples when it prepared them, so contiguous slices
    are fair shards, and slicing reads only the records a worker needs.
    """
    # Slice k is [start + floor(k N / P), start + floor((k + 1) N / P)): at least
    # floor(N / P) examples each, as steps_per_epoch assumes.
    begin, end = (start + (stop - start) * k // batching.pipelines
                  for k in (batching.index, batching.index + 1))
    tfds_split = f"{source.tfds_splits[base_split]}[{begin}:{end}]"
    stream_key = (config.seed * 1_000_003 + epoch_seed) % (2 ** 31)
    dataset = source.builder.as_dataset(
        split=tfds_split, shuffle_files=training, as_supervised=True,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=stream_key))
    if training:
        dataset = dataset.shuffle(_STREAM_SHUFFLE_BUFFER, seed=stream_key,
                                  reshuffle_each_iteration=True).take(epoch_size)
    if repeat and training:
        dataset = dataset.repeat()
    augment_key = _fold(_fold(_key(config.seed, _AUGMENT_SALT), epoch_seed),
                        batching.index)
    dataset = dataset.enumerate().map(
        lambda position, example: _imagenet_example(
            example[0], example[1], _fold(augment_key, position), info,
            training=training, cutout_length=cutout_length),
        num_parallel_calls=tf.data.AUTOTUNE)
    dataset = _batch_with_cutout(dataset, batching.per_replica, training, cutout_length)
    return dataset.repeat() if repeat and not training else dataset


def distributed_dataset(strategy: tf.distribute.Strategy, config: DataConfig,
                        info: DatasetInfo, split: str, *, training: bool,
                        global_batch_size: int, **kwargs):
    """``make_dataset`` per input pipeline through ``distribute_datasets_from_function``.

    Each replica gets ``global_batch_size / num_replicas_in_sync`` examples per step.

    Args:
      strategy: any tf.distribute strategy.
      global_batch_size: examples per step over all replicas (``--batch_size``).
      **kwargs: ``cutout``, ``repeat``, ``epoch_seed`` as in :func:`make_dataset`.

    Raises:
      DataError: ``global_batch_size`` is not a multiple of the replica count.
    """
    check_divisible(global_batch_size, strategy.num_replicas_in_sync)
    return strategy.distribute_datasets_from_function(
        lambda input_context: make_dataset(
            config, info, split, training=training, batch_size=global_batch_size,
            input_context=input_context, **kwargs))
