"""The size of an evaluation network: parameters and multiply-adds, by the paper's rules.

Parameters are the trainable variables without the auxiliary head (the head only
trains); multiply-adds count the convolutions and dense layers of one image in inference
mode, read off the traced graph. :func:`describe` reports both for any genotype
(``--mode=describe``); tests/networks_test.py checks them against an independent count.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from istanas_tf import genotypes, networks, operations


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

    Read off the traced graph (:func:`graph_multiply_adds`).
    """
    return traced_multiply_adds(
        lambda x: network(x, training=False), [1, image_size, image_size, 3]
    )[0]


def traced_multiply_adds(function, input_shape) -> tuple[int, object]:
    """Multiply-adds of ``function`` traced on one float32 input of ``input_shape``.

    Returns ``(multiply_adds, outputs)``: the outputs are the traced (symbolic) tensors,
    whose static shapes tell the next part of a network its input shape.
    """
    concrete = tf.function(function, autograph=False).get_concrete_function(
        tf.TensorSpec(input_shape, tf.float32)
    )
    return graph_multiply_adds(concrete.graph), concrete.structured_outputs


def graph_multiply_adds(graph: tf.Graph) -> int:
    """Every Conv2D, DepthwiseConv2dNative and MatMul op of ``graph`` with its static
    output shape: ``H_out * W_out * C_out * k_h * k_w * C_in / groups``.

    FactorizedReduce's 2x2 conv (op name ``operations.TWO_TAP_CONV``) counts one tap per
    output channel: its kernel holds PyTorch's two 1x1 convs, zeros elsewhere.
    """
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":
            kernel = op.inputs[1].shape  # [kh, kw, c_in, c_out]
            out = op.outputs[0].shape
            taps = kernel[0] * kernel[1]
            if op.name.rsplit("/", 1)[-1].startswith(operations.TWO_TAP_CONV):
                taps = 1
            total += out[1] * out[2] * out[3] * taps * kernel[2]
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


def describe(
    genotype,
    family: str,
    num_classes: int,
    channels: int | None = None,
    layers: int | None = None,
    auxiliary: bool = False,
    bn_after_param_free_ops: bool = False,
) -> dict:
    """Sizes of the evaluation network of ``genotype`` (the paper's conventions).

    Returns a JSON-ready dict with ``genotype``, ``params`` (trainable, auxiliary head
    excluded), ``params_with_auxiliary`` and ``multiply_adds`` (convs and dense layers,
    one image at the family's resolution: 32x32 CIFAR, 224x224 ImageNet).
    """
    if family not in networks.FAMILIES:
        raise ValueError(
            f"unknown network family {family!r}; valid: {', '.join(networks.FAMILIES)}"
        )
    settings = networks.FAMILIES[family]
    channels = settings["channels"] if channels is None else channels
    layers = settings["layers"] if layers is None else layers
    if isinstance(genotype, str):
        genotype = genotypes.get_genotype(genotype)
    # Build with the head so that params_with_auxiliary is exact even when the run
    # itself trains without it.
    network = networks.build_network(
        settings["kind"],
        genotype,
        channels,
        layers,
        num_classes,
        settings["image_size"],
        auxiliary=True,
        bn_after_param_free_ops=bn_after_param_free_ops,
    )
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
