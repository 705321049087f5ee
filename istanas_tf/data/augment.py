"""Augmentation and normalisation: CIFAR pad-crop, flip and cutout on batches;
ImageNet random resized crop, flip and colour jitter per image. Every random choice
comes from a stateless key the caller passes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import tensorflow as tf

from istanas_tf.data.config import IMAGENET_CROP

CIFAR_PADDING = 4  # zero padding before the random crop (RandomCrop(32, padding=4))
IMAGENET_RESIZE = 256  # evaluation: shorter side resized to this, then centre crop
IMAGENET_AREA_RANGE = (0.08, 1.0)  # random resized crop: fraction of the image area
IMAGENET_RATIO_RANGE = (3 / 4, 4 / 3)  # random resized crop: aspect ratio w/h
COLOR_JITTER = 0.4  # brightness, contrast and saturation factors in [0.6, 1.4]
HUE_JITTER = 0.2  # hue shift in [-0.2, 0.2] of the colour circle


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
    return tf.where(
        flip[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(images, axis=[2]), images
    )


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


def _random_resized_crop(encoded: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Decodes a random crop of 8-100 % of the area, aspect 3/4-4/3: [h, w, 3] uint8.

    As torchvision's RandomResizedCrop, except that after 10 failed draws TF falls
    back to the whole image rather than a centre crop. JPEGs decode only the window.
    """

    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.zeros([1, 0, 4]),
            seed=key,
            min_object_covered=0.0,
            aspect_ratio_range=IMAGENET_RATIO_RANGE,
            area_range=IMAGENET_AREA_RANGE,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return begin, size

    def jpeg():
        begin, size = window(tf.image.extract_jpeg_shape(encoded))
        return tf.image.decode_and_crop_jpeg(
            encoded, tf.stack([begin[0], begin[1], size[0], size[1]]), channels=3
        )

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        begin, size = window(tf.shape(image))
        return tf.slice(image, begin, size)

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def color_jitter(
    image: tf.Tensor, key: tf.Tensor, strength: float = COLOR_JITTER, hue: float = HUE_JITTER
) -> tf.Tensor:
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
    factor_key, hue_key, order_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
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
        image = tf.switch_case(
            order[position],
            [
                functools.partial(clipped, adjust, image)
                for adjust in (brightness, contrast, saturation, hue_shift)
            ],
        )
    return image


def imagenet_train_image(encoded: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Random resized crop to 224, flip, colour jitter: [224, 224, 3] float in [0, 1]."""
    crop_key, flip_key, jitter_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    image = _random_resized_crop(encoded, crop_key)
    # PIL's bilinear resize (torchvision) filters when shrinking: antialias matches it.
    image = tf.image.resize(image, [IMAGENET_CROP, IMAGENET_CROP], antialias=True)
    image = tf.clip_by_value(image / 255.0, 0.0, 1.0)
    flip = tf.random.stateless_uniform([], flip_key) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return color_jitter(image, jitter_key)


def imagenet_eval_image(encoded: tf.Tensor) -> tf.Tensor:
    """Shorter side to 256, centre crop 224: [224, 224, 3] float in [0, 1]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    # torchvision Resize(256): the longer side becomes int(256 * long / short).
    new_height = tf.where(height <= width, IMAGENET_RESIZE, IMAGENET_RESIZE * height // short)
    new_width = tf.where(height <= width, IMAGENET_RESIZE * width // short, IMAGENET_RESIZE)
    image = tf.image.resize(image, tf.stack([new_height, new_width]), antialias=True)
    top = tf.cast(tf.round((new_height - IMAGENET_CROP) / 2), tf.int32)
    left = tf.cast(tf.round((new_width - IMAGENET_CROP) / 2), tf.int32)
    image = tf.slice(image, tf.stack([top, left, 0]), [IMAGENET_CROP, IMAGENET_CROP, 3])
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)
