"""Evaluation networks built from a genotype: NetworkCIFAR and NetworkImageNet.

The structure, channel counts and parameter conventions follow the DARTS evaluation
networks (docs/method.md sections 1 and 5). With ``bn_after_param_free_ops`` the cells carry
the one-stage method's extra BNs after pooling and identity ops, which is the network
that BN absorption produces (docs/method.md section 4).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from tensorflow.python.eager import context as tf_context

from istanas_tf import blocks, genotypes
from istanas_tf import cells as cell_lib
from istanas_tf import operations as ops

_register = keras.saving.register_keras_serializable(package="istanas_tf")


@_register
class AuxiliaryHead(keras.layers.Layer):
    """Auxiliary classifier after cell ``2 * num_cells // 3`` (training only).

    CIFAR (8x8 input): ReLU, avg-pool 5 stride 3 (valid), Conv1x1 128, BN, ReLU,
    Conv2x2 768, BN, ReLU, Dense. ImageNet (7x7 input): avg-pool stride 2 and no BN after
    the 2x2 conv, as in the DARTS code.
    """

    def __init__(self, num_classes: int, imagenet: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.imagenet = imagenet
        self.conv1 = blocks.PointwiseConv(128, use_bias=False, name="conv1")
        self.bn1 = blocks.batch_norm(name="bn1")
        self.conv2 = keras.layers.Conv2D(768, 2, use_bias=False, name="conv2")
        self.bn2 = None if imagenet else blocks.batch_norm(name="bn2")
        self.classifier = keras.layers.Dense(num_classes, name="classifier")

    def build(self, input_shape):
        self.conv1.build(input_shape)
        self.bn1.build(ops.channels_shape(self.conv1.filters))
        self.conv2.build(ops.channels_shape(self.conv1.filters))
        if self.bn2 is not None:
            self.bn2.build(ops.channels_shape(self.conv2.filters))
        self.classifier.build((input_shape[0], self._features(input_shape)))

    def _features(self, input_shape) -> int:
        """The classifier's inputs: the 2x2 conv's output, flattened (768 at 8x8 / 7x7)."""
        height, width = input_shape[1:3]
        if height is None or width is None:
            raise ValueError(
                f"{self.name} needs its input's height and width to size its classifier, "
                f"got shape {input_shape}"
            )
        stride = 2 if self.imagenet else 3
        pooled = [(size - 5) // stride + 1 for size in (height, width)]
        return (pooled[0] - 1) * (pooled[1] - 1) * self.conv2.filters

    def call(self, x, training=None):
        x = tf.nn.relu(x)
        # VALID pooling never touches padding, so count_include_pad does not matter here.
        x = tf.nn.avg_pool2d(x, 5, 2 if self.imagenet else 3, "VALID")
        x = tf.nn.relu(self.bn1(self.conv1(x), training=training))
        x = self.conv2(x)
        if self.bn2 is not None:
            x = self.bn2(x, training=training)
        x = tf.nn.relu(x)
        return self.classifier(tf.reshape(x, [tf.shape(x)[0], -1]))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "imagenet": self.imagenet}


def cross_entropy(labels, logits, num_classes: int, label_smoothing: float = 0.0):
    """Per-example cross-entropy in float32 (with label smoothing when it is > 0) and
    its mean over the global batch (so that gradients summed over replicas are exact).

    The loss of every step: the evaluation networks' and the super-net's.
    """
    logits = tf.cast(logits, tf.float32)
    if label_smoothing:
        per_example = keras.losses.categorical_crossentropy(
            tf.one_hot(labels, num_classes),
            logits,
            from_logits=True,
            label_smoothing=label_smoothing,
        )
    else:
        per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return per_example, tf.nn.compute_average_loss(per_example)


CIFAR_STEM_MULTIPLIER = 3  # the CIFAR stem's conv outputs 3C channels


def stem_layers(channels: int, imagenet: bool) -> list[keras.layers.Layer]:
    """The stem of a network (and of the super-net of the same shape).

    CIFAR: Conv3x3 to 3C + BN. ImageNet, two stems of total stride 8: stem0 (Conv3x3/2 to
    C/2, BN, ReLU, Conv3x3/2 to C, BN) and stem1 (ReLU, Conv3x3/2 to C, BN).
    """
    if not imagenet:
        return [
            blocks.SymmetricConv(CIFAR_STEM_MULTIPLIER * channels, 3, name="stem_conv"),
            blocks.batch_norm(name="stem_bn"),
        ]
    return [
        blocks.SymmetricConv(channels // 2, 3, 2, name="stem0_conv1"),
        blocks.batch_norm(name="stem0_bn1"),
        blocks.SymmetricConv(channels, 3, 2, name="stem0_conv2"),
        blocks.batch_norm(name="stem0_bn2"),
        blocks.SymmetricConv(channels, 3, 2, name="stem1_conv"),
        blocks.batch_norm(name="stem1_bn"),
    ]


def run_stem(layers: list[keras.layers.Layer], images, training=None):
    """``(s0, s1)``, the first cell's inputs, from the layers of :func:`stem_layers`
    (the ImageNet stem's s0 has twice the resolution of its s1)."""
    if len(layers) == 2:
        conv, bn = layers
        x = bn(conv(images), training=training)
        return x, x
    conv1, bn1, conv2, bn2, conv3, bn3 = layers
    x = tf.nn.relu(bn1(conv1(images), training=training))
    s0 = bn2(conv2(x), training=training)
    s1 = bn3(conv3(tf.nn.relu(s0)), training=training)
    return s0, s1


def build_stem(layers: list[keras.layers.Layer], images_shape) -> tuple[tuple, tuple]:
    """Builds the layers of :func:`stem_layers` (in :func:`run_stem`'s order) for images
    of ``images_shape`` (NHWC) and returns the shapes of ``(s0, s1)``."""
    shape = tuple(images_shape)
    shapes = []
    for conv, bn in zip(layers[::2], layers[1::2]):
        conv.build(shape)
        batch, height, width = shape[:3]
        height, width = (ops.output_size(size, conv.stride) for size in (height, width))
        shape = (batch, height, width, conv.filters)
        bn.build(shape)
        shapes.append(shape)
    # CIFAR: s0 = s1 = the one conv's output. ImageNet: stem0's output and stem1's.
    return shapes[-2] if len(shapes) > 1 else shapes[0], shapes[-1]


def release_cached_kernels() -> None:
    """Frees the kernels TensorFlow cached while the weights were being created.

    Eager TensorFlow caches one kernel per distinct set of op attributes: the
    initializers' ops, and a ``VarHandleOp`` per variable made with its own TF name
    (its ``debug_name``; ~36 KB each, which nothing runs again). Variables made under
    ``unnamed_tf_variables`` share one; metrics, and anything a user adds, do not.
    Keras' ``clear_session`` empties the same cache; variables, traced functions and
    datasets are untouched, and a kernel still in use is made again on its next call.
    """
    tf_context.context().clear_kernel_cache()


@contextlib.contextmanager
def unnamed_tf_variables():
    """Creates the TensorFlow variables under it all with one TF-level name.

    Eager TensorFlow makes a new kernel for each distinct set of op attributes, and a
    variable's ``VarHandleOp`` carries its TF name as ``debug_name``: a named variable
    costs a kernel of its own (4,000 variables of 16x16 in name scopes: 6.9 s and
    +160 MB named, 2.9 s and +20 MB all named alike; the C = 16 super-net has ~4,700).
    Keras' names and paths (``variable.path``: checkpoints, ``.keras`` and
    ``.weights.h5`` files) are Keras' own and unchanged; only ``variable.value.name``
    reads ``Variable:0``, and TensorFlow's errors about a variable no longer name it.
    """

    def creator(next_creator, **kwargs):
        # The trailing "/" makes the name absolute: the Keras layers' name scopes would
        # otherwise still make every name, and so every kernel, distinct.
        return next_creator(**{**kwargs, "name": "Variable/"})

    with tf.variable_creator_scope(creator):
        yield


def build_by_shape(network: keras.Model, images_shape) -> None:
    """Creates every weight of ``network`` (an evaluation network or the super-net: its
    ``stem_layers``, ``cells``, ``auxiliary_head`` after cell ``aux_position``, and
    ``classifier``) for images of ``images_shape``, without running it, in the order
    a forward pass with the auxiliary head creates them."""
    with unnamed_tf_variables():
        _build_by_shape(network, images_shape)


def _build_by_shape(network: keras.Model, images_shape) -> None:
    s0, s1 = build_stem(network.stem_layers, images_shape)
    for i, cell in enumerate(network.cells):
        cell.build(s0, s1)
        s0, s1 = s1, cell.compute_output_shape(s0, s1)
        if i == network.aux_position and network.auxiliary_head is not None:
            network.auxiliary_head.build(s1)
    network.classifier.build((s1[0], s1[-1]))


class _Network(blocks.DropPathSchedule, keras.Model):
    """Shared body of the evaluation networks: cells, auxiliary head and classifier.

    Subclasses set ``imagenet``, which picks the stem (:func:`stem_layers`), the first
    cell's preprocessing and the auxiliary head.
    """

    imagenet = False

    def __init__(
        self,
        genotype,
        channels: int,
        num_cells: int,
        num_classes: int,
        auxiliary: bool = False,
        drop_path_rate: float = 0.0,
        bn_after_param_free_ops: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(genotype, dict):
            genotype = genotypes.from_json_dict(genotype)
        elif isinstance(genotype, str):
            genotype = genotypes.get_genotype(genotype)
        self.genotype = genotype
        self.channels = channels
        self.num_cells = num_cells
        self.num_classes = num_classes
        self.auxiliary = auxiliary
        self.bn_after_param_free_ops = bn_after_param_free_ops
        self.seed = seed
        schedule = cell_lib.cell_schedule(num_cells, channels, self.imagenet)
        self.stem_layers = stem_layers(channels, self.imagenet)
        # Drop path probability, ramped by the training loop between epochs; a variable
        # so that traced steps read the current value and checkpoints keep it.
        self.drop_path_rate = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(drop_path_rate),
            trainable=False,
            name="drop_path_rate",
        )
        self.aux_position = 2 * num_cells // 3
        self.cells = [
            cell_lib.Cell(
                genotype.reduce if spec.reduction else genotype.normal,
                genotype.reduce_concat if spec.reduction else genotype.normal_concat,
                spec.channels,
                spec.reduction,
                spec.reduction_prev,
                bn_after_param_free_ops,
                seed=None if seed is None else seed + 100 * i,
                name=f"cell{i}",
            )
            for i, spec in enumerate(schedule)
        ]
        self.auxiliary_head = (
            AuxiliaryHead(num_classes, self.imagenet, name="auxiliary_head") if auxiliary else None
        )
        self.classifier = keras.layers.Dense(num_classes, name="classifier")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.top1 = keras.metrics.SparseCategoricalAccuracy(name="top1")
        self.top5 = keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")

    def build(self, images_shape):
        """Creates every weight, the auxiliary head's too, for images of ``images_shape``
        without running anything (see build_network)."""
        build_by_shape(self, images_shape)

    def call(self, images, training=None):
        """Returns logits, or ``(logits, aux_logits)`` in training with the auxiliary head."""
        s0, s1 = run_stem(self.stem_layers, images, training)
        aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_path_rate=self.traced_drop_path_rate, training=training)
            if i == self.aux_position and self.auxiliary_head is not None and training:
                aux_logits = self.auxiliary_head(s1, training=training)
        logits = self.classifier(tf.reduce_mean(s1, axis=[1, 2]))
        if aux_logits is not None:
            return logits, aux_logits
        return logits

    # ------------------------------------------------------------------ training
    def compile(
        self, optimizer, auxiliary_weight: float = 0.4, label_smoothing: float = 0.0, **kwargs
    ):
        """Sets the optimizer and the loss recipe (docs/method.md section 5), builds the slots.

        Args:
          optimizer: e.g. ``optimizers.TorchSGD``; under mixed precision wrap it in
            ``keras.optimizers.LossScaleOptimizer``.
          auxiliary_weight: weight of the auxiliary head's cross-entropy (0.4).
          label_smoothing: ImageNet uses 0.1.
        """
        super().compile(optimizer=optimizer, **kwargs)
        self.auxiliary_weight = auxiliary_weight
        self.label_smoothing = label_smoothing
        with unnamed_tf_variables():
            optimizer.build(self.trainable_variables)
        release_cached_kernels()  # every variable of the run exists now

    def get_compile_config(self):
        """Keras' compile config (the optimizer, serialized) and the loss recipe: a
        ``.keras`` file of a compiled network loads compiled, its optimizer's slots too."""
        config = super().get_compile_config()
        if not config:  # not compiled: Keras' empty config
            return config
        return {
            **config,
            "auxiliary_weight": self.auxiliary_weight,
            "label_smoothing": self.label_smoothing,
        }

    def compile_from_config(self, config):
        """Compiles from :meth:`get_compile_config`'s config (``keras.models.load_model``)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def metrics(self):
        return [self.loss_tracker, self.top1, self.top5]

    def _cross_entropy(self, labels, logits):
        return cross_entropy(labels, logits, self.num_classes, self.label_smoothing)

    def train_step(self, data):
        """Cross-entropy (+ auxiliary_weight * auxiliary cross-entropy), one optimizer step."""
        images, labels = data
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            outputs = self(images, training=True)
            # float32 for the loss and metrics under mixed precision.
            logits = tf.cast(outputs[0] if isinstance(outputs, tuple) else outputs, tf.float32)
            per_example, loss = self._cross_entropy(labels, logits)
            if isinstance(outputs, tuple):
                loss = loss + self.auxiliary_weight * self._cross_entropy(labels, outputs[1])[1]
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)
        self.loss_tracker.update_state(per_example)
        self.top1.update_state(labels, logits)
        self.top5.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        images, labels = data
        logits = tf.cast(self(images, training=False), tf.float32)
        per_example, _ = self._cross_entropy(labels, logits)
        self.loss_tracker.update_state(per_example)
        self.top1.update_state(labels, logits)
        self.top5.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def get_config(self):
        return {
            **super().get_config(),
            "genotype": genotypes.to_json_dict(self.genotype),
            "channels": self.channels,
            "num_cells": self.num_cells,
            "num_classes": self.num_classes,
            "auxiliary": self.auxiliary,
            "drop_path_rate": float(keras.ops.convert_to_numpy(self.drop_path_rate)),
            "bn_after_param_free_ops": self.bn_after_param_free_ops,
            "seed": self.seed,
        }


@_register
class NetworkCIFAR(_Network):
    """The CIFAR evaluation network (32x32 inputs; defaults C = 36, 20 cells).

    Stem: Conv3x3 to 3C + BN. Reductions at cells ``num_cells // 3`` and
    ``2 * num_cells // 3``.
    """


@_register
class NetworkImageNet(_Network):
    """The ImageNet evaluation network (224x224 inputs; defaults C = 48, 14 cells).

    Two stems of total stride 8: (Conv3x3/2 to C/2, BN, ReLU, Conv3x3/2 to C, BN) and
    (ReLU, Conv3x3/2 to C, BN). The first cell sees a reduced s0, so it preprocesses s0
    with FactorizedReduce.
    """

    imagenet = True


NETWORKS = {"cifar": NetworkCIFAR, "imagenet": NetworkImageNet}

# Per dataset family: network kind, default (channels, layers), image size.
FAMILIES = {
    "cifar": dict(kind="cifar", channels=36, layers=20, image_size=32),
    "imagenet": dict(kind="imagenet", channels=48, layers=14, image_size=224),
}


def build_network(
    kind: str, genotype, channels: int, num_cells: int, num_classes: int, image_size: int, **kwargs
) -> _Network:
    """Builds an evaluation network: every weight created from the input shape (the
    auxiliary head's too), nothing run.

    Building by shape rather than by a forward pass keeps PyTorch's initial state: a
    training-mode pass (the only way to reach the head) would move every BN's running
    variance from 1 to 0.9 and advance the drop-path noise. The weights keep the paths
    and the order a forward pass gives them (Keras opens the model's name scope around
    ``build`` as around a call), so checkpoints are unaffected.

    Args:
      kind: ``"cifar"`` or ``"imagenet"``.
      genotype: a Genotype, a genotype name or path, or its JSON dict.
      channels, num_cells: C and the number of cells (``--init_channels``, ``--layers``).
      num_classes: classifier outputs.
      image_size: input height and width, used to create the weights.
      **kwargs: the network's other arguments (auxiliary, drop_path_rate, ...).
    """
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; valid: {', '.join(NETWORKS)}")
    network = NETWORKS[kind](genotype, channels, num_cells, num_classes, **kwargs)
    network.build((None, image_size, image_size, 3))
    return network
