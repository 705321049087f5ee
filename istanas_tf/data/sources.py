"""Loading a dataset: ``get_dataset_info``, and the tensorflow-datasets sources
(held in memory or streamed). Image folders are in ``folders``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import urllib.parse
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from istanas_tf.data.config import DECODE_BATCH, IMAGENET_CROP, TFDS_DATASETS, DataConfig, DataError
from istanas_tf.data.folders import folder_info
from istanas_tf.data.info import DatasetInfo, Source, to_cpu


def get_dataset_info(config: DataConfig) -> DatasetInfo:
    """Loads and checks ``config.dataset`` once; the result feeds :func:`make_dataset`.

    Memory datasets (CIFAR, small-image folders) are decoded here; folders are listed,
    validated (every image decoded once) and their statistics computed or read from
    the cache. Raises DataError for anything unusable, naming the flag or file.
    """
    config.validate()
    if config.folder:
        info = folder_info(config, config.folder)
    else:
        info = _tfds_info(config)
    if config.mean is not None:
        info = dataclasses.replace(info, mean=config.mean, std=config.std)
    logging.info(
        "Dataset %s: %d classes, %dx%d images, %d train / %d test, mean %s std %s, %s augmentation",
        info.name,
        info.num_classes,
        *info.image_size,
        info.num_train,
        info.num_test,
        _fmt(info.mean),
        _fmt(info.std),
        info.augmentation,
    )
    return info


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _tfds_info(config: DataConfig) -> DatasetInfo:
    name = config.dataset
    spec = TFDS_DATASETS[name]
    builder = _prepared_builder(config)
    class_names = tuple(builder.info.features["label"].names)
    splits = {"train": "train", "test": spec["test_split"]}
    if spec["streamed"]:
        sizes = {
            split: _tfds_split_size(builder, tfds_split) for split, tfds_split in splits.items()
        }
        source = Source("tfds", builder=builder, tfds_splits=splits)
        image_size = (IMAGENET_CROP, IMAGENET_CROP)
    else:
        examples = {
            split: _load_tfds_split(config, builder, tfds_split)
            for split, tfds_split in splits.items()
        }
        sizes = {split: int(labels.shape[0]) for split, (_, labels) in examples.items()}
        source = Source("memory", examples=examples)
        image_size = tuple(int(d) for d in examples["train"][0].shape[1:3])
    return DatasetInfo(
        name=name,
        num_classes=len(class_names),
        image_size=image_size,
        class_names=class_names,
        mean=spec["mean"],
        std=spec["std"],
        num_train=sizes["train"],
        num_test=sizes["test"],
        train_portion=config.train_portion,
        augmentation="imagenet" if spec["streamed"] else "cifar",
        source=source,
    )


def _prepared_builder(config: DataConfig):
    """The tfds builder of ``config.dataset``, downloaded and prepared if need be."""
    name = config.dataset
    builder = tfds.builder(name, data_dir=config.data_dir)
    if builder.is_prepared():
        return builder
    data_dir = config.data_dir or tfds.core.constants.DATA_DIR
    leftovers = _PartialDownloads(data_dir, name)
    try:
        # ImageNet is prepared from local tars; under tfds.testing.mock_data nothing is
        # downloaded at all.
        if name != "imagenet2012" and not _tfds_mocked():
            check_reachable(builder.url_infos or {})
        if name == "imagenet2012":
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=config.manual_dir)
            )
        else:
            builder.download_and_prepare()
    except Exception as error:  # tfds raises many types; all mean "no usable copy"
        leftovers.remove()
        if name == "imagenet2012":
            manual_dir = config.manual_dir or os.path.join(data_dir, "downloads", "manual")
            how = (
                f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                f"--manual_dir={manual_dir} (tfds prepares them once), pass "
                "--data_dir with an already prepared copy, or use "
                "--dataset=folder:PATH with PATH/train/<class>/*.JPEG and "
                "PATH/val/<class>/*.JPEG"
            )
        else:
            how = (
                f"pass --data_dir=DIR with a prepared tfds copy (DIR/{name}/...), run "
                "once on a machine with internet access, or use "
                "--dataset=folder:PATH with PATH/train/<class>/*.png and "
                "PATH/test/<class>/*.png"
            )
        raise DataError(
            f"--dataset={name}: no prepared copy under --data_dir={data_dir} "
            f"and preparing one failed ({type(error).__name__}: {error}). "
            f"To supply the data, {how}."
        ) from error
    return builder


# Seconds to wait for a download source's TCP handshake before calling it unreachable.
REACHABLE_TIMEOUT_S = 5.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


def check_reachable(urls) -> None:
    """Raises ConnectionError unless one of ``urls``' hosts accepts a TCP connection.

    tfds retries an unreachable download for minutes before it gives up; this check
    answers in seconds. Behind a proxy (``HTTPS_PROXY`` / ``HTTP_PROXY`` set) a direct
    connection proves nothing, so the check is skipped and tfds decides.
    """
    if not urls or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return
    errors = []
    for url in urls:
        parsed = urllib.parse.urlparse(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=REACHABLE_TIMEOUT_S).close()
            return
        except OSError as error:
            errors.append(f"{parsed.hostname}: {error}")
    raise ConnectionError(f"the download source is unreachable ({'; '.join(errors)})")


def _tfds_mocked() -> bool:
    """True inside ``tfds.testing.mock_data``, whose download is a no-op."""
    method = tfds.core.DatasetBuilder.download_and_prepare
    return getattr(method, "__module__", "").startswith("tensorflow_datasets.testing")


class _PartialDownloads:
    """What a failed tfds download leaves: ``downloads/*.tmp.*`` files and
    ``<name>/<version>.incomplete*`` folders that were not there before it."""

    def __init__(self, data_dir: str, name: str):
        self.folders = [os.path.join(data_dir, "downloads"), os.path.join(data_dir, name)]
        self.before = {folder: set(_listing(folder)) for folder in self.folders}

    def remove(self) -> None:
        for folder in self.folders:
            for entry in set(_listing(folder)) - self.before[folder]:
                if ".tmp." in entry or "incomplete" in entry:
                    target = os.path.join(folder, entry)
                    if os.path.isdir(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        os.remove(target)


def _listing(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


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
    for image_batch, label_batch in dataset.batch(DECODE_BATCH).as_numpy_iterator():
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
            keep[np.flatnonzero(labels == label)[: config.max_examples_per_class]] = True
        images, labels = images[keep], labels[keep]
    return to_cpu(images), to_cpu(labels)
