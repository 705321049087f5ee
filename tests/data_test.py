"""Tests for istanas_tf.data: folders, tfds (mocked), splits, augmentation, sharding, errors.

The real CIFAR-10 folder (../shared/data/cifar10) is read through fixed subsets: the
first N files of each class in sorted order (``max_examples_per_class``); nothing is
copied. Broken folders are synthesised in tmp_path.
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from testing import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD

from istanas_tf import data
from istanas_tf.data import augment, sources

PER_CLASS = 20  # train and test examples per class in the default subset


def _batches(dataset, count=None):
    """The first ``count`` batches (all if None) as numpy (images, labels) pairs."""
    if count is not None:
        dataset = dataset.take(count)
    return [(images.numpy(), labels.numpy()) for images, labels in dataset]


def _all(dataset):
    batches = _batches(dataset)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _search_splits(config, info, batch_size):
    """(images, labels) of ``train``, ``search_weights`` and ``search_arch`` in order."""
    return [
        _all(data.make_dataset(config, info, split, training=False, batch_size=batch_size))
        for split in ("train", "search_weights", "search_arch")
    ]


def _digests(images):
    return [hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images]


def _pil_normalised(path, mean, std):
    """Independent oracle: PIL decode, then (x / 255 - mean) / std."""
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float64) / 255.0
    return (pixels - np.array(mean)) / np.array(std)


def _write_folder(root, layout, size=(8, 8), ext="png", seed=0):
    """Writes random images: layout = {split: {class: count}}."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for name, count in classes.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i:03d}.{ext}"))
    return root


@pytest.fixture(scope="module")
def subset_config(cifar10_folder, tmp_path_factory):
    return data.DataConfig(
        dataset=f"folder:{cifar10_folder}",
        data_dir=str(tmp_path_factory.mktemp("cache")),
        max_examples_per_class=PER_CLASS,
        seed=7,
        cutout_length=16,
        deterministic=True,
    )


@pytest.fixture(scope="module")
def subset_info(subset_config):
    return data.get_dataset_info(subset_config)


# ------------------------------------------------------------------ folder dataset


def test_folder_labels_follow_canonical_cifar10_order(cifar10_folder, subset_config, subset_info):
    info = subset_info
    assert info.class_names == CIFAR10_CLASSES
    assert (info.num_classes, info.image_size, info.augmentation) == (10, (32, 32), "cifar")
    assert (info.num_train, info.num_test) == (10 * PER_CLASS, 10 * PER_CLASS)
    images, labels = _batches(
        data.make_dataset(subset_config, info, "test", training=False, batch_size=25), 1
    )[0]
    # Dataset order is round-robin over the classes: class k's j-th sorted file sits at
    # position j * 10 + k.
    np.testing.assert_array_equal(labels, np.arange(25) % 10)
    for position in (0, 3, 19):
        label, rank = position % 10, position // 10
        class_dir = cifar10_folder / "test" / CIFAR10_CLASSES[label]
        path = sorted(class_dir.iterdir())[rank]
        # PIL and TF decode JPEG with different IDCT/upsampling: a few levels apart.
        error = (images[position] - _pil_normalised(path, info.mean, info.std)) * info.std
        assert np.abs(error).mean() < 1.5 / 255 and np.abs(error).max() < 12 / 255


def test_folder_statistics_match_numpy_and_are_cached(cifar10_folder, subset_config, subset_info):
    # Same decoder as the pipeline (PIL's JPEG colour conversion differs by ~1 level),
    # numpy's mean and std over every pixel of the subset.
    pixels = np.stack(
        [
            tf.io.decode_jpeg(tf.io.read_file(str(path))).numpy() / 255.0
            for name in CIFAR10_CLASSES
            for path in sorted((cifar10_folder / "train" / name).iterdir())[:PER_CLASS]
        ]
    )
    np.testing.assert_allclose(subset_info.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(subset_info.std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    # 200 images already land near the full training set's published statistics.
    np.testing.assert_allclose(subset_info.mean, CIFAR10_MEAN, atol=0.04)
    np.testing.assert_allclose(subset_info.std, CIFAR10_STD, atol=0.04)

    cache_files = list(pathlib.Path(subset_config.data_dir, "istanas_tf").glob("*.json"))
    assert len(cache_files) == 1
    cached = json.loads(cache_files[0].read_text())
    np.testing.assert_allclose(cached["mean"], subset_info.mean)
    # The cache records the folder it describes (symlinks may be resolved or not).
    assert os.path.realpath(cached["folder"]) == os.path.realpath(cifar10_folder)
    assert data.get_dataset_info(subset_config) == subset_info


def test_normalised_train_images_have_zero_mean_unit_std(cifar10_folder, tmp_path):
    config = data.DataConfig(
        dataset=f"folder:{cifar10_folder}",
        data_dir=str(tmp_path),
        max_examples_per_class=100,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )
    info = data.get_dataset_info(config)
    assert (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)
    images, _ = _all(data.make_dataset(config, info, "train", training=False, batch_size=500))
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=0.05)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=0.05)


@pytest.mark.parametrize("portion", [0.5, 0.3])
def test_search_halves_are_disjoint_cover_train_and_keep_classes(cifar10_folder, tmp_path, portion):
    config = data.DataConfig(
        dataset=f"folder:{cifar10_folder}",
        data_dir=str(tmp_path),
        max_examples_per_class=PER_CLASS,
        train_portion=portion,
    )
    info = data.get_dataset_info(config)
    n = info.num_train
    assert data.num_examples(info, "search_weights") == int(np.floor(portion * n))
    assert (data.num_examples(info, "search_weights") + data.num_examples(info, "search_arch")) == n
    (train, train_labels), (weights, weight_labels), (arch, _) = _search_splits(
        config, info, batch_size=64
    )
    assert len(set(_digests(train))) == n  # the subset has no duplicate images
    assert set(_digests(weights)).isdisjoint(_digests(arch))
    # The weight half is the first floor(portion * N) examples, the rest the other half.
    assert _digests(weights) + _digests(arch) == _digests(train)
    np.testing.assert_array_equal(weight_labels, train_labels[: len(weights)])
    counts = np.bincount(weight_labels, minlength=10)
    assert counts.max() - counts.min() <= 1  # every class in proportion


# ------------------------------------------------------------------- augmentation


def test_pad_and_crop_and_flip_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
    offsets = np.array([[0, 0], [8, 8], [0, 8], [8, 0], [3, 5], [4, 4]], np.int32)
    cropped = data.pad_and_crop(tf.constant(images), tf.constant(offsets), 4).numpy()
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
    for b, (row, col) in enumerate(offsets):
        np.testing.assert_array_equal(cropped[b], padded[b, row : row + 32, col : col + 32])
    flips = np.array([True, False, True, False, False, True])
    flipped = data.flip_left_right(tf.constant(images), tf.constant(flips)).numpy()
    for b in range(6):
        np.testing.assert_array_equal(flipped[b], images[b, :, ::-1] if flips[b] else images[b])


@pytest.mark.parametrize("length", [16, 5])
def test_cutout_zeroes_one_clipped_square(length):
    images = np.ones((5, 32, 32, 3), np.float32)
    centers = np.array([[16, 16], [0, 0], [31, 31], [0, 20], [10, 31]], np.int32)
    out = data.cutout(tf.constant(images), tf.constant(centers), length).numpy()
    for b, (cy, cx) in enumerate(centers):
        expected = np.ones((32, 32, 3), np.float32)
        top, left = cy - length // 2, cx - length // 2
        expected[max(top, 0) : max(top + length, 0), max(left, 0) : max(left + length, 0)] = 0
        np.testing.assert_array_equal(out[b], expected)
    assert (out[0] == 0).all(axis=-1).sum() == length * length  # unclipped: full square


def test_training_crops_come_from_the_padded_image(subset_config, subset_info):
    info = subset_info
    originals, labels = _all(
        data.make_dataset(subset_config, info, "train", training=False, batch_size=200)
    )
    # Zero padding happens on uint8 pixels, before normalisation.
    pad_value = -np.array(info.mean, np.float32) / np.array(info.std, np.float32)
    padded = np.pad(originals, [(0, 0), (4, 4), (4, 4), (0, 0)])
    padded[:, :4], padded[:, -4:], padded[:, :, :4], padded[:, :, -4:] = (pad_value,) * 4
    images, batch_labels = _batches(
        data.make_dataset(subset_config, info, "train", training=True, batch_size=16), 1
    )[0]
    assert images.shape == (16, 32, 32, 3)
    for image, label in zip(images, batch_labels):
        found = False
        for candidate in np.flatnonzero(labels == label):
            for row in range(9):
                for col in range(9):
                    window = padded[candidate, row : row + 32, col : col + 32]
                    if np.allclose(image, window, atol=1e-5) or np.allclose(
                        image, window[:, ::-1], atol=1e-5
                    ):
                        found = True
        assert found, "a training crop is not a window of its padded original"


def test_cutout_in_the_pipeline_zeroes_a_square(subset_config, subset_info):
    images, _ = _batches(
        data.make_dataset(
            subset_config, subset_info, "train", training=True, batch_size=32, cutout=True
        ),
        1,
    )[0]
    zeroed = (images == 0).all(axis=-1).sum(axis=(1, 2))
    # A 16x16 square centred anywhere keeps at least its 8x8 quarter inside.
    assert ((zeroed >= 64) & (zeroed <= 256)).all(), zeroed
    plain, _ = _batches(
        data.make_dataset(subset_config, subset_info, "train", training=True, batch_size=32), 1
    )[0]
    assert (plain == 0).all(axis=-1).sum() == 0


def test_imagenet_transforms_shapes_range_and_keys():
    pixels = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    for encoded in (tf.io.encode_jpeg(pixels), tf.io.encode_png(pixels)):
        key = tf.constant([1, 2], tf.int64)
        train = augment.imagenet_train_image(encoded, key).numpy()
        assert train.shape == (224, 224, 3)
        assert 0.0 <= train.min() and train.max() <= 1.0
        np.testing.assert_array_equal(train, augment.imagenet_train_image(encoded, key))
        other = augment.imagenet_train_image(encoded, tf.constant([1, 3], tf.int64))
        assert not np.array_equal(train, other)
        assert augment.imagenet_eval_image(encoded).shape == (224, 224, 3)
    # Evaluation: a column-coded image; the shorter side goes 90 -> 256, the longer
    # 150 -> int(256 * 150 / 90) = 426, the centre crop keeps columns 101..324 of 426.
    ramp = np.tile(np.arange(150, dtype=np.uint8)[None, :, None], (90, 1, 3))
    out = augment.imagenet_eval_image(tf.io.encode_png(ramp)).numpy() * 255
    centre_cols = (np.arange(101, 325) + 0.5) * 150 / 426 - 0.5
    np.testing.assert_allclose(out[112, 10:-10, 0], centre_cols[10:-10], atol=0.6)
    # Colour jitter leaves a grey image grey-ish and in range.
    grey = tf.fill([8, 8, 3], 0.5)
    jittered = data.color_jitter(grey, tf.constant([4, 5], tf.int64)).numpy()
    assert 0.0 <= jittered.min() and jittered.max() <= 1.0
    np.testing.assert_allclose(jittered[..., 0], jittered[..., 1], atol=1e-5)


# ------------------------------------------------------------------ determinism


def test_same_seed_same_batches_and_epochs_resume(subset_config, subset_info):
    def first(config, **kwargs):
        return _batches(
            data.make_dataset(
                config, subset_info, "train", training=True, batch_size=32, cutout=True, **kwargs
            ),
            3,
        )

    a, b = first(subset_config), first(subset_config)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other = first(dataclasses.replace(subset_config, seed=8))
    assert not np.array_equal(a[0][0], other[0][0])
    # A repeated stream's second epoch is what a run resumed at epoch 1 sees.
    steps = data.steps_per_epoch(subset_info, "train", 32)
    assert steps == 200 // 32
    stream = _batches(
        data.make_dataset(
            subset_config, subset_info, "train", training=True, batch_size=32, repeat=True
        ),
        2 * steps,
    )
    resumed = _batches(
        data.make_dataset(
            subset_config, subset_info, "train", training=True, batch_size=32, epoch_seed=1
        )
    )
    assert len(resumed) == steps
    for (xs, ys), (xr, yr) in zip(stream[steps:], resumed):
        np.testing.assert_array_equal(xs, xr)
        np.testing.assert_array_equal(ys, yr)
    assert not np.array_equal(stream[0][1], stream[steps][1])  # reshuffled per epoch


def test_input_pipelines_shard_disjointly_and_step_together(subset_config, subset_info):
    contexts = [
        tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=4
        )
        for i in range(2)
    ]
    shards = [
        _all(
            data.make_dataset(
                subset_config, subset_info, "train", training=False, batch_size=16, input_context=c
            )
        )[0]
        for c in contexts
    ]
    assert set(_digests(shards[0])).isdisjoint(_digests(shards[1]))
    assert len(shards[0]) + len(shards[1]) == subset_info.num_train
    # 200 examples, 2 pipelines of 2 replicas, global batch 24: each pipeline keeps
    # 100 // 12 = 8 steps of 2 replica batches of 6.
    steps = data.steps_per_epoch(subset_info, "search_weights", 24, num_input_pipelines=2)
    assert steps == (100 // 2) // 12
    for context in contexts:
        batches = _batches(
            data.make_dataset(
                subset_config,
                subset_info,
                "search_weights",
                training=True,
                batch_size=24,
                input_context=context,
            )
        )
        assert [b[0].shape[0] for b in batches] == [6] * (2 * steps)


_MIRRORED_SCRIPT = textwrap.dedent(
    f"""
    import hashlib, json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from istanas_tf import data
    config = data.DataConfig(dataset="folder:" + sys.argv[1], data_dir=sys.argv[2],
                             max_examples_per_class={PER_CLASS}, seed=7, cutout_length=16,
                             deterministic=True)
    info = data.get_dataset_info(config)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dataset = data.distributed_dataset(strategy, config, info, "train", training=True,
                                       global_batch_size=8, cutout=True)
    images, labels = next(iter(dataset))
    sizes = [int(t.shape[0]) for t in strategy.experimental_local_results(images)]
    try:
        data.distributed_dataset(strategy, config, info, "train", training=True,
                                 global_batch_size=7)
        error = ""
    except data.DataError as e:
        error = str(e)
    first, _ = next(iter(data.make_dataset(config, info, "train", training=True,
                                           batch_size=32, cutout=True)))
    print(json.dumps(dict(replicas=strategy.num_replicas_in_sync, sizes=sizes,
                          error=error,
                          digest=hashlib.sha1(first.numpy().tobytes()).hexdigest())))
"""
)


def test_mirrored_strategy_splits_the_global_batch_in_a_fresh_process(
    cifar10_folder, subset_config, subset_info, tmp_path
):
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, str(cifar10_folder), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["sizes"] == [4, 4] and sum(report["sizes"]) == 8
    assert "--batch_size=7" in report["error"] and "multiple of 2" in report["error"]
    # The same seed gives the same first batch in another process.
    first, _ = _batches(
        data.make_dataset(
            subset_config, subset_info, "train", training=True, batch_size=32, cutout=True
        ),
        1,
    )[0]
    assert report["digest"] == hashlib.sha1(first.tobytes()).hexdigest()


# ------------------------------------------------------------------ tfds (mocked)


def test_tfds_cifar10_mock(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        config = data.DataConfig(
            dataset="cifar10", data_dir=str(tmp_path), train_portion=0.25, cutout_length=8
        )
        info = data.get_dataset_info(config)
        assert (info.num_classes, info.image_size, info.augmentation) == (10, (32, 32), "cifar")
        assert (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)
        assert (info.num_train, data.num_examples(info, "search_weights")) == (40, 10)
        (train, labels), (weights, _), (arch, _) = _search_splits(config, info, batch_size=16)
        assert _digests(weights) + _digests(arch) == _digests(train)
        assert set(_digests(weights)).isdisjoint(_digests(arch))
        assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < 10
        # Normalised with the CIFAR-10 constants: undoing it gives pixels in [0, 1].
        pixels = train * np.array(CIFAR10_STD) + np.array(CIFAR10_MEAN)
        assert -1e-5 <= pixels.min() and pixels.max() <= 1 + 1e-5
        batch = _batches(
            data.make_dataset(
                config, info, "search_arch", training=True, batch_size=8, cutout=True
            ),
            1,
        )[0]
        assert batch[0].shape == (8, 32, 32, 3) and batch[1].shape == (8,)


def test_tfds_imagenet2012_mock(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        config = data.DataConfig(
            dataset="imagenet2012", data_dir=str(tmp_path), manual_dir=str(tmp_path / "manual")
        )
        info = data.get_dataset_info(config)
        assert (info.num_classes, info.image_size, info.augmentation) == (
            1000,
            (224, 224),
            "imagenet",
        )
        assert info.class_names[0] == "n01440764"
        assert info.mean == (0.485, 0.456, 0.406)
        images, labels = _batches(
            data.make_dataset(config, info, "train", training=True, batch_size=4, cutout=True), 1
        )[0]
        assert images.shape == (4, 224, 224, 3) and labels.shape == (4,)
        assert np.isfinite(images).all() and labels.dtype == np.int32
        images, _ = _batches(
            data.make_dataset(config, info, "test", training=False, batch_size=4), 1
        )[0]
        assert images.shape == (4, 224, 224, 3)


# ------------------------------------------------------- large-image folder (files)


def test_large_image_folder_streams_with_imagenet_augmentation(tmp_path):
    root = _write_folder(
        str(tmp_path / "big"),
        {"train": {"b": 3, "a": 3}, "val": {"a": 2, "b": 2}},
        size=(80, 100),
        ext="jpg",
    )
    config = data.DataConfig(
        dataset=f"folder:{root}", data_dir=str(tmp_path / "cache"), cutout_length=50
    )
    info = data.get_dataset_info(config)
    assert (info.class_names, info.image_size, info.augmentation) == (
        ("a", "b"),
        (224, 224),
        "imagenet",
    )
    assert (info.num_train, info.num_test) == (6, 4)
    images, labels = _batches(
        data.make_dataset(config, info, "train", training=True, batch_size=4, cutout=True), 1
    )[0]
    assert images.shape == (4, 224, 224, 3) and np.isfinite(images).all()
    assert ((images == 0).all(axis=-1).sum(axis=(1, 2)) >= 25 * 25).all()
    images, labels = _all(data.make_dataset(config, info, "test", training=False, batch_size=3))
    assert images.shape == (4, 224, 224, 3)
    np.testing.assert_array_equal(labels, [0, 1, 0, 1])
    # The second load reads the statistics from the cache instead of decoding.
    assert data.get_dataset_info(config) == info


# ----------------------------------------------------------------- bad input


def test_missing_folder_names_flag_and_layout(tmp_path):
    config = data.DataConfig(dataset=f"folder:{tmp_path}/nowhere")
    with pytest.raises(data.DataError, match=r"--dataset=folder:.*nowhere.*not a directory"):
        data.get_dataset_info(config)
    _write_folder(str(tmp_path / "no_test"), {"train": {"a": 1}})
    with pytest.raises(data.DataError, match=r"'test' \(or 'val'\)"):
        data.get_dataset_info(data.DataConfig(dataset=f"folder:{tmp_path}/no_test"))


def test_empty_split_and_empty_class_folder(tmp_path):
    root = _write_folder(str(tmp_path / "empty_split"), {"train": {"a": 2}})
    os.makedirs(os.path.join(root, "test"))
    with pytest.raises(data.DataError, match=r"split 'test' .* is empty"):
        data.get_dataset_info(data.DataConfig(dataset=f"folder:{root}", data_dir=str(tmp_path)))
    root = _write_folder(
        str(tmp_path / "empty_class"), {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 0}}
    )
    with pytest.raises(data.DataError, match=r"class folder .*test/b of split 'test'"):
        data.get_dataset_info(data.DataConfig(dataset=f"folder:{root}", data_dir=str(tmp_path)))


def test_class_folders_must_match_between_splits(tmp_path):
    root = _write_folder(str(tmp_path / "f"), {"train": {"a": 1, "b": 1}, "test": {"a": 1, "c": 1}})
    with pytest.raises(data.DataError, match=r"only in train: \['b'\], only in test: \['c'\]"):
        data.get_dataset_info(data.DataConfig(dataset=f"folder:{root}", data_dir=str(tmp_path)))


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, caplog):
    root = _write_folder(str(tmp_path / "f"), {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    bad = os.path.join(root, "train", "b", "001.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    config = data.DataConfig(dataset=f"folder:{root}", data_dir=str(tmp_path))
    with pytest.raises(
        data.DataError,
        match=r"1 unreadable or corrupt image.*b/001\.png"
        r".*--skip_corrupt_images",
    ):
        data.get_dataset_info(config)
    skip = data.DataConfig(
        dataset=f"folder:{root}", data_dir=str(tmp_path), skip_corrupt_images=True
    )
    with caplog.at_level(logging.WARNING):
        info = data.get_dataset_info(skip)
    assert info.num_train == 5
    assert "Skipping 1 unreadable or corrupt image" in caplog.text
    assert "001.png" in caplog.text
    _, labels = _all(data.make_dataset(skip, info, "train", training=False, batch_size=4))
    np.testing.assert_array_equal(labels, [0, 1, 0, 0, 1])


def test_corrupt_image_in_large_folder_is_named_even_from_cache(tmp_path):
    root = _write_folder(
        str(tmp_path / "f"), {"train": {"a": 2}, "test": {"a": 1}}, size=(70, 70), ext="jpg"
    )
    with open(os.path.join(root, "train", "a", "zz.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff garbage")
    skip = data.DataConfig(
        dataset=f"folder:{root}", data_dir=str(tmp_path), skip_corrupt_images=True
    )
    assert data.get_dataset_info(skip).num_train == 2  # scans and caches
    strict = data.DataConfig(dataset=f"folder:{root}", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match=r"zz\.jpg"):
        data.get_dataset_info(strict)  # the cached scan still names the file


def test_small_images_of_another_size_are_rejected(tmp_path):
    root = _write_folder(str(tmp_path / "f"), {"train": {"a": 2}, "test": {"a": 1}})
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(os.path.join(root, "train", "a", "x.png"))
    with pytest.raises(data.DataError, match=r"x\.png is 9x8 but the folder's images are 8x8"):
        data.get_dataset_info(data.DataConfig(dataset=f"folder:{root}", data_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "fields, pattern",
    [
        (
            dict(dataset="cifar11"),
            r"--dataset='cifar11'.*cifar10, cifar100, imagenet2012, "
            r"folder:PATH",
        ),
        (dict(dataset="folder:"), r"--dataset='folder:'"),
        (dict(train_portion=1.0), r"--train_portion=1.0"),
        (dict(train_portion=0), r"--train_portion=0"),
        (dict(cutout_length=-1), r"--cutout_length=-1"),
        (dict(seed=1.5), r"--seed=1.5"),
        (dict(max_examples_per_class=-2), r"--max_examples_per_class=-2"),
        (dict(dataset="imagenet2012", max_examples_per_class=5), r"--max_examples_per_class"),
        (dict(mean=(0.5, 0.5, 0.5)), r"--mean and --std must be given together"),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), r"--mean=\(0.5, 0.5\) must be 3"),
        (dict(mean=[0.5] * 3, std=[0.2, 0.0, 0.2]), r"--std=.*positive"),
    ],
)
def test_config_validation_names_the_flag(fields, pattern):
    with pytest.raises(data.DataError, match=pattern):
        data.DataConfig(**fields).validate()


def test_valid_config_and_flag_lists_become_tuples():
    config = data.DataConfig(dataset="folder:/x", mean=[0.1, 0.2, 0.3], std=["1", 2, 3])
    config.validate()
    assert config.mean == (0.1, 0.2, 0.3) and config.std == (1.0, 2.0, 3.0)
    assert config.folder == "/x" and data.DataConfig().folder is None


@pytest.mark.parametrize(
    "name, pattern",
    [
        (
            "cifar10",
            r"--dataset=cifar10: no prepared copy under --data_dir=.*network is "
            r"unreachable.*--data_dir=DIR.*--dataset=folder:PATH",
        ),
        (
            "imagenet2012",
            r"--dataset=imagenet2012: no prepared copy.*ILSVRC2012_img_train.tar"
            r".*--manual_dir=.*manual",
        ),
    ],
)
def test_no_local_copy_and_no_download_says_how_to_supply(tmp_path, monkeypatch, name, pattern):
    def offline(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(sources, "check_reachable", lambda urls: None)  # tfds decides
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    config = data.DataConfig(
        dataset=name, data_dir=str(tmp_path), manual_dir=str(tmp_path / "manual")
    )
    with pytest.raises(data.DataError, match=pattern):
        data.get_dataset_info(config)


def test_batch_errors_name_batch_size(subset_config, subset_info):
    strategy = types.SimpleNamespace(num_replicas_in_sync=4)
    with pytest.raises(
        data.DataError,
        match=r"--batch_size=10 is not divisible by the 4 "
        r"replicas.*e\.g\. 8 or 12",
    ):
        data.distributed_dataset(
            strategy, subset_config, subset_info, "train", training=True, global_batch_size=10
        )
    with pytest.raises(data.DataError, match=r"--batch_size=256 is larger than the 100"):
        data.make_dataset(subset_config, subset_info, "search_arch", training=True, batch_size=256)
    with pytest.raises(data.DataError, match=r"unknown split 'valid'.*search_arch"):
        data.make_dataset(subset_config, subset_info, "valid", training=False, batch_size=8)
    with pytest.raises(data.DataError, match=r"cutout applies to training"):
        data.make_dataset(
            subset_config, subset_info, "test", training=False, batch_size=8, cutout=True
        )


def test_unreachable_download_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    def refused(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    def download_and_prepare(self, *args, **kwargs):
        raise AssertionError("tfds would retry an unreachable download for minutes")

    monkeypatch.setattr(sources.socket, "create_connection", refused)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(data.DataError) as error:
        data.get_dataset_info(data.DataConfig(dataset="cifar100", data_dir=str(tmp_path)))
    message = str(error.value)
    assert "--dataset=cifar100: no prepared copy" in message
    assert "www.cs.toronto.edu: [Errno 101] Network is unreachable" in message
    assert "--dataset=folder:PATH" in message
    assert not [p for p in tmp_path.rglob("*") if ".tmp." in p.name or "incomplete" in p.name]


def test_a_failed_download_removes_its_partial_files(tmp_path, monkeypatch):
    old = tmp_path / "downloads" / "kept.tmp.older"  # not this attempt's: kept
    old.parent.mkdir()
    old.write_text("x")

    def download_and_prepare(self, *args, **kwargs):
        (tmp_path / "downloads" / "cifar-100.tar.gz.tmp.1a2b").write_bytes(b"half")
        (tmp_path / "cifar100" / "3.0.2.incompleteABC").mkdir(parents=True)
        raise ConnectionError("connection reset mid-download")

    monkeypatch.setattr(sources, "check_reachable", lambda urls: None)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
    with pytest.raises(data.DataError, match="connection reset mid-download"):
        data.get_dataset_info(data.DataConfig(dataset="cifar100", data_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cifar100", "downloads", old.name]
