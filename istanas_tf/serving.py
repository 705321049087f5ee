"""The serving signatures of an exported evaluation network (used by ``export``).

Three signatures take images in three encodings and return one output dict:

  ``serving_default``: ``images`` float32 ``[N, H, W, 3]``, raw 0-255 pixel values
  ``serving_uint8``: ``images`` uint8 ``[N, H, W, 3]``
  ``serving_bytes``: ``image_bytes`` string ``[N]``, encoded JPEG, PNG, GIF or BMP
    images of any size, prepared as the evaluation pipeline prepares its images:
    decoded to 3 channels, then for ImageNet-style networks the shorter side resized to
    256 and a centre crop of 224 taken (``data.augment.imagenet_eval_image``); for
    CIFAR-style networks resized to ``H x W`` only when the size differs (bilinear,
    antialiased; the aspect ratio is not kept).

  outputs ``logits`` float32 ``[N, classes]``, ``probabilities`` float32 ``[N, classes]``,
  ``classes`` int64 ``[N]`` and, when class names are given, ``class_names`` string ``[N]``.

The uint8 and bytes signatures convert their input to float32 pixels and call the
float32 signature's function, so the three agree exactly for the same pixels (PNG is
lossless) and the network is traced once. The bytes input is named ``image_bytes``:
TF Serving decodes ``{"b64": ...}`` JSON values for any string input, and Google's
hosted prediction services expect the ``_bytes`` suffix on binary inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from istanas_tf import data
from istanas_tf.data.augment import imagenet_eval_image
from istanas_tf.data.config import IMAGENET_CROP

DEFAULT = "serving_default"
UINT8 = "serving_uint8"
BYTES = "serving_bytes"
IMAGES = "images"  # the input of serving_default and serving_uint8
IMAGE_BYTES = "image_bytes"  # the input of serving_bytes
PREPROCESSING = ("cifar", "imagenet")  # how serving_bytes prepares a decoded image


def input_description(image_size: tuple[int, int], dtype: str = "float32") -> str:
    """The message a client gets when its images do not match the signature."""
    height, width = image_size
    if dtype == "string":
        return f"{IMAGE_BYTES} must be string [N], one encoded JPEG, PNG, GIF or BMP image each"
    pixels = "raw 0-255 pixels" if dtype == "float32" else "pixels"
    return f"{IMAGES} must be {dtype} [N, {height}, {width}, 3] {pixels}"


def _checked(tensor: tf.Tensor, tail: Sequence[int], message: str) -> tf.Tensor:
    """``tensor`` after a run-time check of its rank and trailing dims.

    A loaded signature does not enforce the placeholder's static shape, so the check
    runs in the graph, on a copy whose static shape is erased (``PlaceholderWithDefault``
    without a shape): else grappler folds the rank test to true from the placeholder's
    static rank. The tensor flows through the check (a ``tf.cond``): with a mere
    control dependency, ops that read only the shape (``tf.map_fn``'s) can run first
    and fail with their own message, and a wrong rank reaching the convolutions aborts
    the process (a oneDNN CHECK failure) instead of raising.
    """
    rank = 1 + len(tail)
    tensor = tf.raw_ops.PlaceholderWithDefault(input=tensor, shape=None)
    shape = tf.shape(tensor)
    # Padded to ``rank`` entries so that any rank compares without a shape error.
    head = tf.concat([shape, tf.zeros([rank], tf.int32)], axis=0)[:rank]
    shape_ok = tf.equal(tf.size(shape), rank)
    if tail:
        shape_ok = tf.logical_and(shape_ok, tf.reduce_all(tf.equal(head[1:], list(tail))))

    def fail():
        check = tf.debugging.Assert(False, [message + "; got shape", shape], summarize=8)
        with tf.control_dependencies([check]):
            return tf.zeros([0, *tail], tensor.dtype)

    return tf.cond(shape_ok, lambda: tf.reshape(tensor, [-1, *tail]), fail)


def make_serving_fn(
    model: keras.Model,
    *,
    image_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
):
    """The float32 serving function: raw pixels in, a dict of named outputs out.

    Args:
      model: a network whose ``call(images, training=False)`` returns logits
        ``[N, classes]`` for normalised images.
      image_size: ``(H, W)``, the spatial size the network was trained on.
      mean, std: 3 floats each, the normalisation statistics in [0, 1] pixel units.
      class_names: optional label names; ``class_names[i]`` names class ``i``.

    Returns:
      ``serve(images) -> dict``, with ``images`` float32 ``[N, H, W, 3]`` in [0, 255].
    """
    height, width = image_size
    message = input_description(image_size)

    def serve(images):
        images = _checked(images, [height, width, 3], message)
        # An empty batch gets empty outputs. The network itself cannot take one (the
        # inference BN's fused kernels fail on [0, H, W, C]), so it sees one zero image
        # whose row is then cut away.
        count = tf.shape(images)[0]
        images = tf.cond(
            count > 0, lambda: images, lambda: tf.zeros([1, height, width, 3], images.dtype)
        )
        logits = model(data.normalize(images / 255.0, mean, std), training=False)[:count]
        logits = tf.cast(logits, tf.float32)
        classes = tf.argmax(logits, axis=-1, output_type=tf.int64)
        outputs = {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "classes": classes,
        }
        if class_names is not None:
            if logits.shape[-1] != len(class_names):
                raise ValueError(
                    f"{len(class_names)} class names given for a model with "
                    f"{logits.shape[-1]} classes"
                )
            outputs["class_names"] = tf.gather(tf.constant(list(class_names), tf.string), classes)
        return outputs

    return serve


def decode_image(encoded: tf.Tensor, image_size: tuple[int, int], preprocessing: str):
    """One encoded image as ``serving_bytes`` prepares it: float32 ``[H, W, 3]`` in 0-255.

    Args:
      encoded: a scalar string, a JPEG, PNG, GIF (first frame) or BMP file's bytes.
      image_size: ``(H, W)`` of the network's input.
      preprocessing: ``"imagenet"`` (resize 256, centre crop 224, as evaluation) or
        ``"cifar"`` (resized to ``image_size`` only when it has another size).
    """
    height, width = image_size
    if preprocessing == "imagenet":
        # The evaluation pipeline's own function, in [0, 1]; the signature divides by 255.
        return imagenet_eval_image(encoded) * 255.0
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
    image = tf.cond(
        same,
        lambda: tf.cast(image, tf.float32),
        lambda: tf.clip_by_value(
            tf.image.resize(image, [height, width], antialias=True), 0.0, 255.0
        ),
    )
    return tf.ensure_shape(image, [height, width, 3])


def check_preprocessing(preprocessing: str, image_size: tuple[int, int]) -> None:
    """Raises ValueError for an unknown preprocessing or an ImageNet one not at 224."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    if preprocessing == "imagenet" and tuple(image_size) != (IMAGENET_CROP, IMAGENET_CROP):
        raise ValueError(
            f"ImageNet preprocessing crops {IMAGENET_CROP}x{IMAGENET_CROP} images; "
            f"the network takes {image_size}"
        )


def add_endpoints(
    archive: keras.export.ExportArchive,
    serve,
    *,
    endpoint: str,
    image_size: tuple[int, int],
    preprocessing: str,
) -> None:
    """Registers the three signatures on ``archive`` and traces them.

    Args:
      archive: an ``ExportArchive`` tracking the network.
      serve: the float32 function from :func:`make_serving_fn`.
      endpoint: the float32 endpoint's name, which Keras also exports as
        ``serving_default`` (it is registered first).
      image_size: ``(H, W)``.
      preprocessing: one of :data:`PREPROCESSING`, for ``serving_bytes``.
    """
    height, width = image_size
    core = archive.add_endpoint(
        endpoint,
        serve,
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name=IMAGES)],
    )
    uint8_message = input_description(image_size, "uint8")
    bytes_message = input_description(image_size, "string")

    def serve_uint8(images):
        return core(tf.cast(_checked(images, [height, width, 3], uint8_message), tf.float32))

    def serve_bytes(image_bytes):
        image_bytes = _checked(image_bytes, [], bytes_message)
        images = tf.map_fn(
            lambda encoded: decode_image(encoded, image_size, preprocessing),
            image_bytes,
            fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
        )
        return core(images)

    functions = [
        core,
        archive.add_endpoint(
            UINT8,
            serve_uint8,
            input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name=IMAGES)],
        ),
        archive.add_endpoint(
            BYTES, serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)]
        ),
    ]
    for function in functions:  # trace now: a mismatch raises before writing
        function.get_concrete_function()
