"""Image folders: listing (round-robin class order), one decode pass for validation
and statistics, corrupt-file handling, and the JSON statistics cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from istanas_tf.data.config import DECODE_BATCH, IMAGENET_CROP, DataConfig, DataError
from istanas_tf.data.info import DatasetInfo, Source, to_cpu

# Folder images at most this many pixels a side are "CIFAR-like": held in memory,
# padded-crop augmentation at native size. Larger ones are ImageNet-like.
SMALL_IMAGE_MAX_SIDE = 64

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_FOLDER_TEST_SPLITS = ("test", "val", "validation")
_SHOWN_FILES = 5  # corrupt files named in an error before "and N more"
_CACHE_FORMAT = 1  # version of the folder statistics JSON


def folder_info(config: DataConfig, path: str) -> DatasetInfo:
    """Lists, checks and describes the image folder ``path`` (``--dataset=folder:PATH``).

    Small images are decoded into memory; the statistics come from the cache or one
    decode pass, which also finds the corrupt files.
    """
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
                    f"to {SMALL_IMAGE_MAX_SIDE} pixels a side must all have one size."
                )
            corrupt[split] = [paths[i] for i in np.flatnonzero(~scan.ok)]
            if split == "train":
                stats = scan.mean_std()
            if small:
                examples[split] = (scan.images[scan.ok], labels[scan.ok])
        if cached is None:
            _write_stats_cache(
                cache_path,
                {
                    "format": _CACHE_FORMAT,
                    "folder": root,
                    "fingerprint": fingerprint,
                    "max_examples_per_class": config.max_examples_per_class,
                    "image_size": [height, width],
                    "mean": stats[0],
                    "std": stats[1],
                    "corrupt": {
                        split: [os.path.relpath(p, root) for p in files]
                        for split, files in corrupt.items()
                    },
                },
            )
        else:  # small images are decoded again, but the statistics are the cached ones
            stats = (cached["mean"], cached["std"])
    else:
        stats = (cached["mean"], cached["std"])
        corrupt = {
            split: [os.path.join(root, p) for p in files]
            for split, files in cached["corrupt"].items()
        }

    sizes = {}
    for split, (paths, labels) in split_files.items():
        bad = corrupt.get(split, [])
        _check_corrupt(config, flag, split, bad)
        if small:
            images, labels = examples[split]
            examples[split] = (to_cpu(images), to_cpu(labels))
        else:
            keep = ~np.isin(paths, bad)
            examples[split] = (to_cpu(paths[keep]), to_cpu(labels[keep]))
        sizes[split] = int(examples[split][1].shape[0])
        if sizes[split] == 0:
            raise DataError(f"{flag}: every image of split {split!r} is unreadable")
    return DatasetInfo(
        name=config.dataset,
        num_classes=len(class_names),
        image_size=(height, width) if small else (IMAGENET_CROP, IMAGENET_CROP),
        class_names=class_names,
        mean=tuple(stats[0]),
        std=tuple(stats[1]),
        num_train=sizes["train"],
        num_test=sizes["test"],
        train_portion=config.train_portion,
        augmentation="cifar" if small else "imagenet",
        source=Source("memory" if small else "files", examples=examples),
    )


def _list_folder(flag: str, root: str, max_per_class: int):
    """Class names and, per split, (paths [N] str, labels [N] int32) in dataset order."""
    layout = f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
    if not os.path.isdir(root):
        raise DataError(f"{flag}: {root} is not a directory; expected an image folder {layout}")
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    test_dirs = [name for name in _FOLDER_TEST_SPLITS if name in subdirs]
    if "train" not in subdirs or not test_dirs:
        raise DataError(
            f"{flag}: {root} needs a 'train' and a 'test' (or 'val') "
            f"subfolder, found {subdirs}; expected {layout}"
        )
    split_dirs = {"train": "train", "test": test_dirs[0]}
    classes = {}
    for split, name in split_dirs.items():
        classes[split] = sorted(
            e.name
            for e in os.scandir(os.path.join(root, name))
            if e.is_dir() and not e.name.startswith(".")
        )
        if not classes[split]:
            raise DataError(
                f"{flag}: split {split!r} ({os.path.join(root, name)}) is "
                "empty: it has no class folders; expected " + layout
            )
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataError(
            f"{flag}: the class folders of train and {split_dirs['test']} differ, so "
            f"labels would not match; only in train: {only_train}, only in "
            f"{split_dirs['test']}: {only_test}"
        )
    class_names = tuple(classes["train"])
    split_files = {}
    for split, name in split_dirs.items():
        per_class = []
        for class_name in class_names:
            class_dir = os.path.join(root, name, class_name)
            files = sorted(
                e.path
                for e in os.scandir(class_dir)
                if e.is_file() and e.name.lower().endswith(_IMAGE_EXTENSIONS)
            )
            if not files:
                raise DataError(
                    f"{flag}: class folder {class_dir} of split {split!r} is "
                    f"empty: no {'/'.join(_IMAGE_EXTENSIONS)} files"
                )
            if max_per_class:
                files = files[:max_per_class]
            per_class.append(files)
        # Round-robin over the classes (see the package docstring).
        columns = [[(path, label) for path in files] for label, files in enumerate(per_class)]
        ordered = [
            item for row in itertools.zip_longest(*columns) for item in row if item is not None
        ]
        split_files[split] = (
            np.array([p for p, _ in ordered]),
            np.array([label for _, label in ordered], dtype=np.int32),
        )
    return class_names, split_files


def _first_image_size(flag: str, paths: np.ndarray) -> tuple[int, int]:
    """Height and width of the first decodable training image."""
    for path in paths:
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
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
        var = np.maximum(self.squares / max(self.pixels, 1) - mean**2, 0.0)
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
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        shape = tf.shape(image)[:2]
        if size is not None:
            # Wrong-size images are dropped below; zeros give the element a static shape.
            right = tf.reduce_all(tf.equal(shape, size))
            image = tf.cond(
                right, lambda: tf.reshape(image, [*size, 3]), lambda: tf.zeros([*size, 3], tf.uint8)
            )
            return dict(index=index, shape=shape, image=image)
        pixels = tf.cast(image, tf.float32) / 255.0
        return dict(
            index=index,
            shape=shape,
            sums=tf.reduce_sum(pixels, axis=[0, 1]),
            squares=tf.reduce_sum(tf.square(pixels), axis=[0, 1]),
        )

    dataset = tf.data.Dataset.from_tensor_slices((np.arange(num), paths))
    # A read or decode error drops the element; the missing indices are the corrupt files.
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    dataset = dataset.ignore_errors().batch(DECODE_BATCH).prefetch(2)
    ok = np.zeros(num, dtype=bool)
    images = np.zeros((num, *size, 3), np.uint8) if size is not None else None
    # Per-image sums, added up in index order at the end: the batches arrive in any
    # order, and a different summation order would change the statistics' last digits.
    sums, squares, pixels = np.zeros((num, 3)), np.zeros((num, 3)), np.zeros(num)
    wrong_size = []
    for batch in dataset.as_numpy_iterator():
        index, shape = batch["index"], batch["shape"]
        right = (
            np.all(shape == np.array(size), axis=1)
            if size is not None
            else np.ones(len(index), dtype=bool)
        )
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
    return _Scan(
        ok=ok,
        images=images,
        wrong_size=wrong_size,
        sums=sums.sum(axis=0),
        squares=squares.sum(axis=0),
        pixels=int(pixels.sum()),
    )


def _check_corrupt(config: DataConfig, flag: str, split: str, bad: list[str]) -> None:
    if not bad:
        return
    shown = ", ".join(bad[:_SHOWN_FILES])
    more = f" and {len(bad) - _SHOWN_FILES} more" if len(bad) > _SHOWN_FILES else ""
    if not config.skip_corrupt_images:
        raise DataError(
            f"{flag}: {len(bad)} unreadable or corrupt image(s) in split "
            f"{split!r}: {shown}{more}. Repair or remove them, or pass "
            "--skip_corrupt_images to leave them out."
        )
    logging.warning(
        "Skipping %d unreadable or corrupt image(s) in split %r of %s "
        "(--skip_corrupt_images): %s%s",
        len(bad),
        split,
        config.dataset,
        shown,
        more,
    )


def _stats_cache_path(config: DataConfig, root: str) -> str:
    """The JSON file caching a folder's statistics, outside the (maybe read-only) folder."""
    if config.data_dir:
        cache_dir = os.path.join(config.data_dir, "istanas_tf")
    else:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
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
