"""The ``tf.data`` pipelines: per-epoch stateless shuffles and augmentation draws,
batching per replica and input pipeline, and ``distributed_dataset``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from istanas_tf.data.augment import (
    CIFAR_PADDING,
    cutout,
    flip_left_right,
    imagenet_eval_image,
    imagenet_train_image,
    normalize,
    pad_and_crop,
)
from istanas_tf.data.config import IMAGENET_CROP, DataConfig, DataError
from istanas_tf.data.info import DatasetInfo

_STREAM_SHUFFLE_BUFFER = 10_000  # streamed tfds data: examples in the shuffle buffer
# Salts keep the shuffle and the augmentation random streams apart.
_SHUFFLE_SALT = 0x5F1
_AUGMENT_SALT = 0xA06


def _key(seed: int, salt: int) -> tf.Tensor:
    return tf.constant([seed, salt], tf.int64)


def _fold(key: tf.Tensor, value) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))


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


@dataclasses.dataclass(frozen=True)
class _Stream:
    """What one input pipeline of :func:`make_dataset` streams.

    Attributes:
      base_split: ``train`` or ``test``, the split holding the examples.
      start, stop: the examples ``[start, stop)`` of ``base_split``.
      training: augmented and shuffled, whole batches only.
      batching: how the global batch is cut for this pipeline.
      epoch_size: examples per epoch of this pipeline (training; None for evaluation).
      repeat: loop over epochs forever.
      epoch_seed: the epoch the stream starts at.
      cutout_length: cutout side (0: none).
    """

    base_split: str
    start: int
    stop: int
    training: bool
    batching: _Batching
    epoch_size: int | None
    repeat: bool
    epoch_seed: int
    cutout_length: int


def _batching(batch_size: int, input_context) -> _Batching:
    if input_context is None:
        return _Batching(batch_size, batch_size, 1, 0)
    check_divisible(batch_size, input_context.num_replicas_in_sync)
    per_replica = input_context.get_per_replica_batch_size(batch_size)
    replicas_per_pipeline = input_context.num_replicas_in_sync // input_context.num_input_pipelines
    return _Batching(
        per_replica,
        per_replica * replicas_per_pipeline,
        input_context.num_input_pipelines,
        input_context.input_pipeline_id,
    )


def check_divisible(global_batch_size: int, replicas: int) -> None:
    """Raises DataError unless ``global_batch_size`` splits evenly over ``replicas``."""
    if global_batch_size % replicas:
        lower = max(replicas, global_batch_size // replicas * replicas)
        raise DataError(
            f"--batch_size={global_batch_size} is not divisible by the {replicas} "
            f"replicas in sync; use a multiple of {replicas}, e.g. {lower} or "
            f"{lower + replicas}"
        )


def make_dataset(
    config: DataConfig,
    info: DatasetInfo,
    split: str,
    *,
    training: bool,
    batch_size: int,
    cutout: bool = False,
    repeat: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    epoch_seed: int = 0,
    steps_per_epoch: int | None = None,
) -> tf.data.Dataset:
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
      steps_per_epoch: training: each epoch holds at most this many batches, the first
        ones of its shuffle (None: every whole batch). A repeated stream cut this way
        gives ``model.fit(steps_per_epoch=...)`` epoch e's batches at its epoch e, as a
        loop that builds epoch e's pipeline and stops after that many steps.

    Returns:
      ``tf.data.Dataset`` of ``(images [b, H, W, 3] float32, labels [b] int32)``.
    """
    source = info.source
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
                f"{(stop - start) // batching.pipelines * batching.pipelines}"
            )
        if steps_per_epoch:
            steps = min(steps, steps_per_epoch)
        epoch_size = steps * batching.pipeline  # per pipeline, whole steps only
    else:
        epoch_size = None
    stream = _Stream(
        base_split,
        start,
        stop,
        training,
        batching,
        epoch_size,
        repeat,
        epoch_seed,
        config.cutout_length if cutout else 0,
    )
    if source.kind == "tfds":
        dataset = _tfds_pipeline(config, info, source, stream)
    else:
        dataset = _indexed_pipeline(config, info, source, stream)
    options = tf.data.Options()
    # Out-of-order parallel maps only speed up training; evaluation keeps its order.
    options.deterministic = bool(config.deterministic) or not training
    if input_context is not None:
        # The shards are cut above; tf.data's auto-sharding would cut them again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _epochs(
    indices: np.ndarray,
    one_epoch,
    *,
    epoch_size: int,
    repeat: bool,
    seed: int,
    pipeline: int,
    epoch_seed: int,
) -> tf.data.Dataset:
    """Concatenates ``one_epoch(epoch, order)`` over the epochs from ``epoch_seed``.

    ``order`` [epoch_size] int64 is epoch e's permutation of ``indices``, cut to whole
    steps; it depends only on (seed, pipeline, e).
    """
    indices_t = tf.constant(indices, tf.int64)
    shuffle_key = _fold(_key(seed, _SHUFFLE_SALT), pipeline)

    def epoch_fn(epoch):
        order = tf.random.experimental.stateless_shuffle(indices_t, _fold(shuffle_key, epoch))
        return one_epoch(epoch, order[:epoch_size])

    epochs = (
        tf.data.Dataset.counter(start=epoch_seed)
        if repeat
        else tf.data.Dataset.range(epoch_seed, epoch_seed + 1)
    )
    return epochs.flat_map(epoch_fn)


def _cifar_draws(uniforms: tf.Tensor, height: int, width: int):
    """Crop offsets [B, 2], flips [B] and cutout centres [B, 2] from uniforms [B, 5]."""
    offsets = tf.floor(uniforms[:, :2] * float(2 * CIFAR_PADDING + 1))
    centers = tf.floor(uniforms[:, 3:] * tf.constant([height, width], tf.float32))
    return tf.cast(offsets, tf.int32), uniforms[:, 2] < 0.5, tf.cast(centers, tf.int32)


def _indexed_pipeline(config, info, source, stream: _Stream):
    """Memory and file sources: every example has an index into the split's tensors."""
    base_split, start, stop = stream.base_split, stream.start, stream.stop
    training, batching, repeat = stream.training, stream.batching, stream.repeat
    epoch_size, epoch_seed = stream.epoch_size, stream.epoch_seed
    cutout_length = stream.cutout_length
    data, labels = source.examples[base_split]
    # Strided shards: each worker sees every class even if the order were sorted.
    indices = np.arange(start, stop, dtype=np.int64)[batching.index :: batching.pipelines]
    epochs = functools.partial(
        _epochs,
        indices,
        epoch_size=epoch_size,
        repeat=repeat,
        seed=config.seed,
        pipeline=batching.index,
        epoch_seed=epoch_seed,
    )
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
            return normalize(tf.gather(data, index), info.mean, info.std), tf.gather(labels, index)

        if training:
            dataset = epochs(one_epoch).map(train_batch, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            dataset = (
                tf.data.Dataset.from_tensor_slices(indices)
                .batch(batching.per_replica)
                .map(eval_batch, num_parallel_calls=tf.data.AUTOTUNE)
            )
    else:

        def example_fn(epoch, index):
            encoded = tf.io.read_file(tf.gather(data, index))
            key = _fold(_fold(augment_key, epoch), index)
            return _imagenet_example(
                encoded,
                tf.gather(labels, index),
                key,
                info,
                training=training,
                cutout_length=cutout_length,
            )

        if training:
            dataset = epochs(
                lambda epoch, order: tf.data.Dataset.from_tensor_slices(
                    (tf.fill(tf.shape(order), epoch), order)
                )
            )
        else:
            dataset = tf.data.Dataset.from_tensor_slices(indices).map(
                lambda index: (tf.constant(0, tf.int64), index)
            )
        dataset = dataset.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = _batch_with_cutout(dataset, batching.per_replica, training, cutout_length)
    if repeat and not training:
        dataset = dataset.repeat()
    return dataset


def _imagenet_example(encoded, label, key, info, *, training, cutout_length):
    """One ImageNet-style example: (image [224, 224, 3] normalised, label, cutout centre)."""
    if training:
        image_key, center_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        image = imagenet_train_image(encoded, image_key)
    else:
        image, center_key = imagenet_eval_image(encoded), key
    image = normalize(image, info.mean, info.std)
    center = tf.cast(
        tf.floor(tf.random.stateless_uniform([2], center_key) * float(IMAGENET_CROP)), tf.int32
    )
    return image, tf.cast(label, tf.int32), center


def _batch_with_cutout(dataset, batch_size, training, cutout_length):
    dataset = dataset.batch(batch_size, drop_remainder=training)
    if cutout_length:
        return dataset.map(
            lambda images, labels, centers: (cutout(images, centers, cutout_length), labels),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return dataset.map(lambda images, labels, centers: (images, labels))


def _tfds_pipeline(config, info, source, stream: _Stream):
    """Streamed tfds data (ImageNet): each pipeline reads a contiguous slice.

    tfds already shuffled the examples when it prepared them, so contiguous slices
    are fair shards, and slicing reads only the records a worker needs.
    """
    base_split, start, stop = stream.base_split, stream.start, stream.stop
    training, batching, repeat = stream.training, stream.batching, stream.repeat
    epoch_size, epoch_seed = stream.epoch_size, stream.epoch_seed
    cutout_length = stream.cutout_length
    # Slice k is [start + floor(k N / P), start + floor((k + 1) N / P)): at least
    # floor(N / P) examples each, as steps_per_epoch assumes.
    begin, end = (
        start + (stop - start) * k // batching.pipelines
        for k in (batching.index, batching.index + 1)
    )
    tfds_split = f"{source.tfds_splits[base_split]}[{begin}:{end}]"
    stream_key = (config.seed * 1_000_003 + epoch_seed) % (2**31)
    dataset = source.builder.as_dataset(
        split=tfds_split,
        shuffle_files=training,
        as_supervised=True,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=stream_key),
    )
    if training:
        dataset = dataset.shuffle(
            _STREAM_SHUFFLE_BUFFER, seed=stream_key, reshuffle_each_iteration=True
        ).take(epoch_size)
    if repeat and training:
        dataset = dataset.repeat()
    augment_key = _fold(_fold(_key(config.seed, _AUGMENT_SALT), epoch_seed), batching.index)
    dataset = dataset.enumerate().map(
        lambda position, example: _imagenet_example(
            example[0],
            example[1],
            _fold(augment_key, position),
            info,
            training=training,
            cutout_length=cutout_length,
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = _batch_with_cutout(dataset, batching.per_replica, training, cutout_length)
    return dataset.repeat() if repeat and not training else dataset


def distributed_dataset(
    strategy: tf.distribute.Strategy,
    config: DataConfig,
    info: DatasetInfo,
    split: str,
    *,
    training: bool,
    global_batch_size: int,
    **kwargs,
):
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
            config,
            info,
            split,
            training=training,
            batch_size=global_batch_size,
            input_context=input_context,
            **kwargs,
        )
    )
