"""Evaluation networks built from a genotype: NetworkCIFAR and NetworkImageNet.

The structure, channel counts and parameter conventions follow the DARTS evaluation
networks (METHOD.md sections 1 and 5). With ``bn_after_param_free_ops`` the cells carry
the one-stage method's extra BNs after pooling and identity ops, which is the network
that BN absorption produces (METHOD.md section 4).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from istanas_tf import genotypes
from istanas_tf import operations as ops

_register = keras.saving.register_keras_serializable(package="istanas_tf")


def reduction_layers(layers: int) -> tuple[int, int]:
    """Indices of the two reduction cells: ``layers // 3`` and ``2 * layers // 3``."""
    return layers // 3, 2 * layers // 3


def check_layers(layers: int) -> None:
    """A network needs at least 3 cells so that its two reductions are distinct cells."""
    if layers < 3:
        raise ValueError(
            f"layers must be at least 3 (the reductions sit at cells layers//3 and "
            f"2*layers//3 and must be distinct), got {layers}")


@_register
class Cell(keras.layers.Layer):
    """One cell of an evaluation network: two preprocessed inputs, 4 nodes, concat.

    Args:
      picks: the cell's genotype picks, ``(op_name, input_index)``, two per node.
      concat: state indices concatenated into the output (channels = len(concat) * C).
      channels: C, the channel count of every op in the cell.
      reduction: whether ops reading the cell inputs use stride 2.
      reduction_prev: whether the previous cell reduced (s0 then needs FactorizedReduce).
      bn_after_param_free_ops: one-stage cells (BN after pooling and identity ops); the
        one-stage cell also drops identity paths, the DARTS cell exempts them.
    """

    def __init__(self, picks: Sequence[Sequence], concat: Sequence[int], channels: int,
                 reduction: bool, reduction_prev: bool, bn_after_param_free_ops: bool = False,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.picks = [tuple(p) for p in picks]
        self.concat = list(concat)
        self.channels = channels
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.bn_after_param_free_ops = bn_after_param_free_ops
        self.seed = seed
        if reduction_prev:
            self.preprocess0 = ops.FactorizedReduce(channels, name="preprocess0")
        else:
            self.preprocess0 = ops.ReLUConvBN(channels, name="preprocess0")
        self.preprocess1 = ops.ReLUConvBN(channels, name="preprocess1")
        options = ops.OpOptions(bn_after_pool=bn_after_param_free_ops,
                                bn_after_identity=bn_after_param_free_ops)
        self.ops = []
        self.drop_paths = []
        for position, (op_name, index) in enumerate(self.picks):
            stride = 2 if reduction and index < 2 else 1
            self.ops.append(ops.make_op(op_name, channels, stride, options,
                                        layer_name=f"op{position}_{op_name}"))
            self.drop_paths.append(ops.DropPath(
                seed=None if seed is None else seed + position, name=f"drop_path{position}"))

    def build(self, *args, **kwargs):
        """Sublayers create their weights on their first call (shapes vary by input)."""

    def call(self, s0, s1, drop_path_rate=0.0, training=None):
        states = [self.preprocess0(s0, training=training),
                  self.preprocess1(s1, training=training)]
        for node in range(len(self.picks) // 2):
            total = 0.0
            for position in (2 * node, 2 * node + 1):
                op = self.ops[position]
                h = op(states[self.picks[position][1]], training=training)
                if not ops.is_bare_identity(op):
                    h = self.drop_paths[position](h, rate=drop_path_rate, training=training)
                total = total + h
            states.append(total)
        return tf.concat([states[i] for i in self.concat], axis=-1)

    def get_config(self):
        return {**super().get_config(), "picks": [list(p) for p in self.picks],
                "concat": self.concat, "channels": self.channels,
                "reduction": self.reduction, "reduction_prev": self.reduction_prev,
                "bn_after_param_free_ops": self.bn_after_param_free_ops, "seed": self.seed}


@_register
class AuxiliaryHead(keras.layers.Layer):
    """Auxiliary classifier after cell ``2 * layers // 3`` (training only).

    CIFAR (8x8 input): ReLU, avg-pool 5 stride 3 (valid), Conv1x1 128, BN, ReLU,
    Conv2x2 768, BN, ReLU, Dense. ImageNet (7x7 input): avg-pool stride 2 and no BN after
    the 2x2 conv, as in the DARTS code.
    """

    def __init__(self, num_classes: int, imagenet: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.imagenet = imagenet
        self.conv1 = keras.layers.Conv2D(128, 1, use_bias=False, name="conv1")
        self.bn1 = ops.batch_norm(name="bn1")
        self.conv2 = keras.layers.Conv2D(768, 2, use_bias=False, name="conv2")
        self.bn2 = None if imagenet else ops.batch_norm(name="bn2")
        self.classifier = keras.layers.Dense(num_classes, name="classifier")

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
        return {**super().get_config(), "num_classes": self.num_classes,
                "imagenet": self.imagenet}


class _Network(keras.Model):
    """Shared body of the evaluation networks: cells, auxiliary head and classifier.

    Subclasses define ``_build_stem(channels) -> list of layers`` and
    ``_stem(images, training) -> (s0, s1)``.
    """

    imagenet = False

    def __init__(self, genotype, channels: int, layers: int, num_classes: int,
                 auxiliary: bool = False, drop_path_rate: float = 0.0,
                 bn_after_param_free_ops: bool = False, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(genotype, dict):
            genotype = genotypes.from_json_dict(genotype)
        elif isinstance(genotype, str):
            genotype = genotypes.get_genotype(genotype)
        check_layers(layers)
        self.genotype = genotype
        self.channels = channels
        self.layers_count = layers
        self.num_classes = num_classes
        self.auxiliary = auxiliary
        self.bn_after_param_free_ops = bn_after_param_free_ops
        self.seed = seed
        self.stem_layers = self._build_stem(channels)
        # Drop path probability, ramped by the training loop between epochs; a variable
        # so that traced steps read the current value and checkpoints keep it.
        self.drop_path_rate = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(drop_path_rate),
            trainable=False, name="drop_path_rate")
        self.aux_position = 2 * layers // 3
        cells = []
        channels_curr = channels
        reduction_prev = self.imagenet
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                channels_curr *= 2
            cell_genotype = genotype.reduce if reduction else genotype.normal
            cell_concat = genotype.reduce_concat if reduction else genotype.normal_concat
            cells.append(Cell(cell_genotype, cell_concat, channels_curr, reduction,
                              reduction_prev, bn_after_param_free_ops,
                              seed=None if seed is None else seed + 100 * i,
                              name=f"cell{i}"))
            reduction_prev = reduction
        self.cells = cells
        self.auxiliary_head = (AuxiliaryHead(num_classes, self.imagenet, name="auxiliary_head")
                               if auxiliary else None)
        self.classifier = keras.layers.Dense(num_classes, name="classifier")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.top1 = keras.metrics.SparseCategoricalAccuracy(name="top1")
        self.top5 = keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")

    def build(self, *args, **kwargs):
        """Sublayers create their weights on their first call (shapes vary by input)."""

    def call(self, images, training=None):
        """Returns logits, or ``(logits, aux_logits)`` in training with the auxiliary head."""
        s0, s1 = self._stem(images, training)
        aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_path_rate=self.drop_path_rate, training=training)
            if i == self.aux_position and self.auxiliary_head is not None and training:
                aux_logits = self.auxiliary_head(s1, training=training)
        logits = self.classifier(tf.reduce_mean(s1, axis=[1, 2]))
        if aux_logits is not None:
            return logits, aux_logits
        return logits

    # ------------------------------------------------------------------ training
    def compile(self, optimizer, auxiliary_weight: float = 0.4, label_smoothing: float = 0.0,
                **kwargs):
        """Sets the optimizer and the loss recipe (METHOD.md section 5), builds the slots.

        Args:
          optimizer: e.g. ``optimizers.TorchSGD``; under mixed precision wrap it in
            ``keras.optimizers.LossScaleOptimizer``.
          auxiliary_weight: weight of the auxiliary head's cross-entropy (0.4).
          label_smoothing: ImageNet uses 0.1.
        """
        super().compile(optimizer=optimizer, **kwargs)
        self.auxiliary_weight = auxiliary_weight
        self.label_smoothing = label_smoothing
        optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        return [self.loss_tracker, self.top1, self.top5]

    def _cross_entropy(self, labels, logits):
        """Per-example cross-entropy (with label smoothing) in float32, and its global mean."""
        logits = tf.cast(logits, tf.float32)
        if self.label_smoothing:
            targets = tf.one_hot(labels, self.num_classes)
            per_example = keras.losses.categorical_crossentropy(
                targets, logits, from_logits=True, label_smoothing=self.label_smoothing)
        else:
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                                       from_logits=True)
        # Mean over the global batch: gradients summed over replicas are exact.
        return per_example, tf.nn.compute_average_loss(per_example)

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
        return {"genotype": genotypes.to_json_dict(self.genotype), "channels": self.channels,
                "layers": self.layers_count, "num_classes": self.num_classes,
                "auxiliary": self.auxiliary,
                "drop_path_rate": float(keras.ops.convert_to_numpy(self.drop_path_rate)),
                "bn_after_param_free_ops": self.bn_after_param_free_ops, "seed": self.seed,
                "name": self.name}


@_register
class NetworkCIFAR(_Network):
    """The CIFAR evaluation network (32x32 inputs; defaults C = 36, 20 cells).

    Stem: Conv3x3 to 3C + BN. Reductions at cells ``layers // 3`` and ``2 * layers // 3``.
    """

    STEM_MULTIPLIER = 3

    def _build_stem(self, channels):
        return [ops.SymmetricConv(self.STEM_MULTIPLIER * channels, 3, name="stem_conv"),
                ops.batch_norm(name="stem_bn")]

    def _stem(self, images, training):
        conv, bn = self.stem_layers
        x = bn(conv(images), training=training)
        return x, x


@_register
class NetworkImageNet(_Network):
    """The ImageNet evaluation network (224x224 inputs; defaults C = 48, 14 cells).

    Two stems of total stride 8: (Conv3x3/2 to C/2, BN, ReLU, Conv3x3/2 to C, BN) and
    (ReLU, Conv3x3/2 to C, BN). The first cell sees a reduced s0, so it preprocesses s0
    with FactorizedReduce.
    """

    imagenet = True

    def _build_stem(self, channels):
        return [ops.SymmetricConv(channels // 2, 3, 2, name="stem0_conv1"),
                ops.batch_norm(name="stem0_bn1"),
                ops.SymmetricConv(channels, 3, 2, name="stem0_conv2"),
                ops.batch_norm(name="stem0_bn2"),
                ops.SymmetricConv(channels, 3, 2, name="stem1_conv"),
                ops.batch_norm(name="stem1_bn")]

    def _stem(self, images, training):
        conv1, bn1, conv2, bn2, conv3, bn3 = self.stem_layers
        x = tf.nn.relu(bn1(conv1(images), training=training))
        s0 = bn2(conv2(x), training=training)
        s1 = bn3(conv3(tf.nn.relu(s0)), training=training)
        return s0, s1


NETWORKS = {"cifar": NetworkCIFAR, "imagenet": NetworkImageNet}


def build_network(kind: str, genotype, channels: int, layers: int, num_classes: int,
                  image_size: int, **kwargs) -> _Network:
    """Builds and initialises (one forward pass) an evaluation network.

    Args:
      kind: ``"cifar"`` or ``"imagenet"``.
      image_size: input height and width, used to create the weights.
    """
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; valid: {', '.join(NETWORKS)}")
    network = NETWORKS[kind](genotype, channels, layers, num_classes, **kwargs)
    network(tf.zeros([1, image_size, image_size, 3]), training=False)
    if network.auxiliary_head is not None:
        # The head only runs in training; build its weights now so they can be counted,
        # restored and exported like the rest.
        network(tf.zeros([2, image_size, image_size, 3]), training=True)
    return network


def count_parameters(network: keras.Model, include_auxiliary: bool = False) -> int:
    """Trainable parameters; the paper's convention leaves out the auxiliary head."""
    total = 0
    head = network.auxiliary_head
    head_ids = {id(v) for v in head.trainable_variables} if head is not None else set()
    for variable in network.trainable_variables:
        if include_auxiliary or id(variable) not in head_ids:
            total += int(tf.size(variable))
    return total


def count_multiply_adds(network: keras.Model, image_size: int) -> int:
    """Convolution and dense multiply-adds for one image in inference mode.

    Read off the traced graph: every Conv2D, DepthwiseConv2dNative and MatMul op with its
    static output shape, ``H_out * W_out * C_out * k_h * k_w * C_in / groups``.
    """
    function = tf.function(lambda x: network(x, training=False))
    graph = function.get_concrete_function(
        tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":
            kernel = op.inputs[1].shape  # [kh, kw, c_in, c_out]
            out = op.outputs[0].shape
            total += out[1] * out[2] * out[3] * kernel[0] * kernel[1] * kernel[2]
        elif op.type == "DepthwiseConv2dNative":
            kernel = op.inputs[1].shape  # [kh, kw, c_in, multiplier]
            out = op.outputs[0].shape
            # A dilated depthwise conv runs on space-to-batch blocks that may include
            # padding; the cropped BatchToSpaceND output holds the real output pixels.
            for consumer in op.outputs[0].consumers():
                if consumer.type == "BatchToSpaceND":
                    out = consumer.outputs[0].shape
            total += out[0] * out[1] * out[2] * out[3] * kernel[0] * kernel[1]
        elif op.type == "MatMul":
            a, b = op.inputs[0].shape, op.inputs[1].shape
            total += a[0] * a[1] * b[1]
    return int(total)


# Per dataset family: network kind, default (channels, layers), image size.
FAMILIES = {
    "cifar": dict(kind="cifar", channels=36, layers=20, image_size=32),
    "imagenet": dict(kind="imagenet", channels=48, layers=14, image_size=224),
}


def describe(genotype, family: str, num_classes: int, channels: int | None = None,
             layers: int | None = None, auxiliary: bool = False,
             bn_after_param_free_ops: bool = False) -> dict:
    """Sizes of the evaluation network of ``genotype`` (the paper's conventions).

    Returns a JSON-ready dict with ``genotype``, ``params`` (trainable, auxiliary head
    excluded), ``params_with_auxiliary`` and ``multiply_adds`` (convs and dense layers,
    one image at the family's resolution: 32x32 CIFAR, 224x224 ImageNet).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown network family {family!r}; valid: {', '.join(FAMILIES)}")
    settings = FAMILIES[family]
    channels = settings["channels"] if channels is None else channels
    layers = settings["layers"] if layers is None else layers
    if isinstance(genotype, str):
        genotype = genotypes.get_genotype(genotype)
    # Build with the head so that params_with_auxiliary is exact even when the run
    # itself trains without it.
    network = build_network(settings["kind"], genotype, channels, layers, num_classes,
                            settings["image_size"], auxiliary=True,
                            bn_after_param_free_ops=bn_after_param_free_ops)
    return {
        "genotype": genotypes.to_json_dict(genotype),
        "network": settings["kind"],
        "channels": channels,
        "layers": layers,
        "num_classes": num_classes,
        "image_size": settings["image_size"],
        "auxiliary": auxiliary,
        "bn_after_param_free_ops": bn_after_param_free_ops,
        "params": count_parameters(network),
        "params_with_auxiliary": count_parameters(network, include_auxiliary=True),
        "multiply_adds": count_multiply_adds(network, settings["image_size"]),
    }
