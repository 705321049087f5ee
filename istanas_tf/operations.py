"""The candidate operations of the DARTS search space (NHWC), as Keras layers.

Numerics follow the published PyTorch code (docs/method.md section 1), not Keras defaults
(the convolutions and BNs are :mod:`istanas_tf.blocks`'):

- avg-pool divides by the number of valid (non-pad) pixels; max-pool never returns a pad.
- FactorizedReduce's second 1x1 conv reads the input shifted by one pixel.
- sep_conv and dil_conv pad symmetrically and end in a BN (eps 1e-5, momentum 0.9).

``OPS`` maps each primitive name to a factory ``(channels, stride, options) -> Layer``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from istanas_tf import genotypes
from istanas_tf.blocks import PointwiseConv, SymmetricConv, batch_norm, pad_symmetric

_register = keras.saving.register_keras_serializable(package="istanas_tf")


def channels_shape(channels: int) -> tuple:
    """An NHWC shape known only by its channels: all a sublayer's weights depend on."""
    return (None, None, None, channels)


def output_size(size: int | None, stride: int) -> int | None:
    """The height (or width) every candidate op, preprocessing and stem conv maps
    ``size`` to: ``ceil(size / stride)``, PyTorch's for their paddings; None if unknown."""
    return None if size is None else -(-size // stride)


class _OpWithBatchNorms(keras.layers.Layer):
    """A layer whose BNs are named by ``_BATCH_NORMS`` (attributes, None when absent).

    ``batch_norms`` lists them in order (the one-stage search freezes their gamma/beta);
    ``last_bn`` is the BN the op ends in, where BN absorption folds the architecture
    weight (None for an op without BN).

    Each op builds its sublayers in ``build`` from the input's channel count, in the
    order ``call`` runs them: otherwise Keras would build it by tracing ``call`` on
    symbolic inputs first, which made building a super-net take most of a minute.
    """

    _BATCH_NORMS: tuple[str, ...] = ()

    @property
    def batch_norms(self) -> list[keras.layers.BatchNormalization]:
        return [bn for bn in (getattr(self, name) for name in self._BATCH_NORMS) if bn is not None]

    @property
    def last_bn(self) -> keras.layers.BatchNormalization | None:
        return self.batch_norms[-1] if self.batch_norms else None


class _ConvOp(_OpWithBatchNorms):
    """A conv op of DARTS: its output channels, kernel size, stride and BN affinity.

    Holds the arguments every conv op takes (stored under their names, in the config);
    the subclasses build the layers and add their own arguments.
    """

    def __init__(self, channels_out: int, kernel_size: int, stride: int, affine: bool, **kwargs):
        super().__init__(**kwargs)
        self.channels_out = channels_out
        self.kernel_size = kernel_size
        self.stride = stride
        self.affine = affine

    def get_config(self):
        return {
            **super().get_config(),
            "channels_out": self.channels_out,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "affine": self.affine,
        }


@_register
class ReLUConvBN(_ConvOp):
    """ReLU -> Conv kxk (symmetric padding, no bias) -> BN. Used for cell preprocessing."""

    _BATCH_NORMS = ("bn",)

    def __init__(
        self,
        channels_out: int,
        kernel_size: int = 1,
        stride: int = 1,
        affine: bool = True,
        **kwargs,
    ):
        super().__init__(channels_out, kernel_size, stride, affine, **kwargs)
        self.conv = SymmetricConv(channels_out, kernel_size, stride, name="conv")
        self.bn = batch_norm(affine, name="bn")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.bn.build(channels_shape(self.channels_out))

    def call(self, x, training=None):
        return self.bn(self.conv(tf.nn.relu(x)), training=training)


@_register
class SepConv(_ConvOp):
    """DARTS separable conv: (ReLU, depthwise kxk, pointwise 1x1, BN) applied twice.

    The stride applies to the first depthwise conv only.
    Parameters with affine BN: 2 * (k*k*C + C*C + 2*C).
    """

    _BATCH_NORMS = ("bn1", "bn2")

    def __init__(
        self, channels_out: int, kernel_size: int, stride: int = 1, affine: bool = True, **kwargs
    ):
        super().__init__(channels_out, kernel_size, stride, affine, **kwargs)
        self.depthwise1 = SymmetricConv(0, kernel_size, stride, depthwise=True, name="depthwise1")
        self.pointwise1 = PointwiseConv(channels_out, use_bias=False, name="pointwise1")
        self.bn1 = batch_norm(affine, name="bn1")
        self.depthwise2 = SymmetricConv(0, kernel_size, 1, depthwise=True, name="depthwise2")
        self.pointwise2 = PointwiseConv(channels_out, use_bias=False, name="pointwise2")
        self.bn2 = batch_norm(affine, name="bn2")

    def build(self, input_shape):
        self.depthwise1.build(input_shape)
        self.pointwise1.build(channels_shape(input_shape[-1]))
        self.bn1.build(channels_shape(self.channels_out))
        self.depthwise2.build(channels_shape(self.channels_out))
        self.pointwise2.build(channels_shape(self.channels_out))
        self.bn2.build(channels_shape(self.channels_out))

    def call(self, x, training=None):
        x = self.bn1(self.pointwise1(self.depthwise1(tf.nn.relu(x))), training=training)
        return self.bn2(self.pointwise2(self.depthwise2(tf.nn.relu(x))), training=training)


@_register
class DilConv(_ConvOp):
    """ReLU -> depthwise kxk with dilation -> pointwise 1x1 -> BN.

    Parameters with affine BN: k*k*C + C*C + 2*C.
    """

    _BATCH_NORMS = ("bn",)

    def __init__(
        self,
        channels_out: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 2,
        affine: bool = True,
        **kwargs,
    ):
        super().__init__(channels_out, kernel_size, stride, affine, **kwargs)
        self.dilation = dilation
        self.depthwise = SymmetricConv(
            0, kernel_size, stride, dilation, depthwise=True, name="depthwise"
        )
        self.pointwise = PointwiseConv(channels_out, use_bias=False, name="pointwise")
        self.bn = batch_norm(affine, name="bn")

    def build(self, input_shape):
        self.depthwise.build(input_shape)
        self.pointwise.build(channels_shape(input_shape[-1]))
        self.bn.build(channels_shape(self.channels_out))

    def call(self, x, training=None):
        return self.bn(self.pointwise(self.depthwise(tf.nn.relu(x))), training=training)

    def get_config(self):
        return {**super().get_config(), "dilation": self.dilation}


# The name of FactorizedReduce's 2x2 conv op: each of its output channels reads one tap,
# which is how ``network_size`` counts its multiply-adds.
TWO_TAP_CONV = "two_tap_conv"


@_register
class FactorizedReduce(_OpWithBatchNorms):
    """Halves the resolution: ReLU, two 1x1 stride-2 convs to C/2 each, concat, BN.

    The second conv reads the input shifted by one pixel (``x[:, 1:, 1:]``), so the two
    halves see complementary pixels. Parameters with affine BN: 2 * (C_in * C/2) + 2*C.
    """

    _BATCH_NORMS = ("bn",)

    def __init__(self, channels_out: int, affine: bool = True, **kwargs):
        if channels_out % 2:
            raise ValueError(
                f"FactorizedReduce needs an even output channel count to split it into "
                f"two halves, got {channels_out}"
            )
        super().__init__(**kwargs)
        self.channels_out = channels_out
        self.affine = affine
        # The two halves' weights, as PyTorch's two 1x1 convs (checkpoints and weight
        # copies see them so); call runs them as one 2x2 stride-2 conv, below.
        self.conv1 = PointwiseConv(channels_out // 2, use_bias=False, name="conv1")
        self.conv2 = PointwiseConv(channels_out // 2, use_bias=False, name="conv2")
        self.bn = batch_norm(affine, name="bn")

    def build(self, input_shape):
        self.conv1.build(channels_shape(input_shape[-1]))
        self.conv2.build(channels_shape(input_shape[-1]))
        self.bn.build(channels_shape(self.channels_out))

    def _kernel_2x2(self, dtype) -> tf.Tensor:
        """``[2, 2, C_in, C_out]``: conv1 at the top-left tap into the first half of the
        outputs, conv2 at the bottom-right tap into the second half, zeros elsewhere."""
        first, second = (tf.cast(conv.kernel, dtype) for conv in (self.conv1, self.conv2))
        zeros = tf.zeros_like(first)
        top = tf.concat([tf.concat([first, zeros], 3), tf.concat([zeros, zeros], 3)], 1)
        bottom = tf.concat([tf.concat([zeros, zeros], 3), tf.concat([zeros, second], 3)], 1)
        return tf.concat([top, bottom], 0)

    def call(self, x, training=None):
        x = tf.nn.relu(x)
        # A 2x2 stride-2 conv reads each 2x2 block once: its top-left pixel is what the
        # stride-2 1x1 conv reads, its bottom-right what the same conv reads on
        # x[:, 1:, 1:]. The two convs' products (the other taps multiply by zero) in one
        # op, without strided slices, whose gradients are slow on CPU (forward +
        # backward 8.5 vs 14.0 ms at 64x32x32x16 -> 32 with oneDNN). PyTorch defines
        # FactorizedReduce for even sizes only; an odd size is padded by one zero row or
        # column at the bottom/right, so the shifted half reads zeros there and both
        # halves have ceil(H/2) rows. The conv thus never sees an odd size, where TF 2.21
        # with oneDNN corrupted the heap in strided 1x1 conv gradients (55x55, 63x63).
        height, width = x.shape[1], x.shape[2]
        if height is None or width is None or height % 2 or width % 2:
            height, width = tf.shape(x)[1], tf.shape(x)[2]
            x = tf.pad(x, [[0, 0], [0, height % 2], [0, width % 2], [0, 0]])
        out = tf.nn.conv2d(
            x, self._kernel_2x2(x.dtype), strides=2, padding="VALID", name=TWO_TAP_CONV
        )
        return self.bn(out, training=training)

    def get_config(self):
        return {**super().get_config(), "channels_out": self.channels_out, "affine": self.affine}


@_register
class Pool(_OpWithBatchNorms):
    """3x3 max or average pooling with PyTorch's padding 1, optionally followed by BN.

    Average pooling divides by the number of valid pixels (``count_include_pad=False``);
    max pooling ignores the padding (pads with -inf). At stride 1 both equal TF's
    ``'SAME'`` pooling, which is symmetric for a 3x3 window; at stride 2 the input is
    padded by 1 on every side and pooled ``'VALID'``, the windows PyTorch produces.
    """

    _BATCH_NORMS = ("batch_norm",)

    def __init__(self, kind: str, stride: int = 1, bn: bool = False, affine: bool = True, **kwargs):
        if kind not in ("max", "avg"):
            raise ValueError(f"Pool kind must be 'max' or 'avg', got {kind!r}")
        super().__init__(**kwargs)
        self.kind = kind
        self.stride = stride
        self.bn = bn
        self.affine = affine
        self.batch_norm = batch_norm(affine, name="bn") if bn else None

    def build(self, input_shape):
        if self.batch_norm is not None:
            self.batch_norm.build(channels_shape(input_shape[-1]))

    def call(self, x, training=None):
        if self.stride == 1:
            pool = tf.nn.max_pool2d if self.kind == "max" else tf.nn.avg_pool2d
            y = pool(x, ksize=3, strides=1, padding="SAME")
        elif self.kind == "max":
            y = tf.nn.max_pool2d(pad_symmetric(x, 1, float("-inf")), 3, self.stride, "VALID")
        else:
            # Window sums over the zero-padded input, divided by each window's count of
            # valid pixels (pooling a padded ones mask gives count / 9).
            sums = tf.nn.avg_pool2d(pad_symmetric(x, 1), 3, self.stride, "VALID")
            ones = pad_symmetric(tf.ones_like(x[:1, :, :, :1]), 1)
            valid = tf.nn.avg_pool2d(ones, 3, self.stride, "VALID")
            y = sums / valid
        if self.batch_norm is not None:
            y = self.batch_norm(y, training=training)
        return y

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "stride": self.stride,
            "bn": self.bn,
            "affine": self.affine,
        }


@_register
class Identity(_OpWithBatchNorms):
    """The stride-1 skip connection, optionally followed by BN (one-stage cells)."""

    _BATCH_NORMS = ("batch_norm",)

    def __init__(self, bn: bool = False, affine: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.bn = bn
        self.affine = affine
        self.batch_norm = batch_norm(affine, name="bn") if bn else None

    @property
    def is_identity(self) -> bool:
        """True when the op is a bare identity (drop path exempts it in DARTS cells)."""
        return self.batch_norm is None

    def build(self, input_shape):
        if self.batch_norm is not None:
            self.batch_norm.build(channels_shape(input_shape[-1]))

    def call(self, x, training=None):
        if self.batch_norm is None:
            return x
        return self.batch_norm(x, training=training)

    def get_config(self):
        return {**super().get_config(), "bn": self.bn, "affine": self.affine}


@dataclasses.dataclass(frozen=True)
class OpOptions:
    """Switches that differ between the super-nets and the evaluation networks.

    Attributes:
      affine: BN with gamma/beta (False in the two-stage super-net).
      bn_after_pool: a BN after each pooling op (both super-nets, one-stage eval nets).
      bn_after_identity: a BN after the stride-1 identity (one-stage cells).
    """

    affine: bool = True
    bn_after_pool: bool = False
    bn_after_identity: bool = False


OpFactory = Callable[[int, int, OpOptions, str], keras.layers.Layer]

OPS: dict[str, OpFactory] = {
    "max_pool_3x3": lambda c, stride, o, name: Pool(
        "max", stride, bn=o.bn_after_pool, affine=o.affine, name=name
    ),
    "avg_pool_3x3": lambda c, stride, o, name: Pool(
        "avg", stride, bn=o.bn_after_pool, affine=o.affine, name=name
    ),
    "skip_connect": lambda c, stride, o, name: (
        Identity(bn=o.bn_after_identity, affine=o.affine, name=name)
        if stride == 1
        else FactorizedReduce(c, affine=o.affine, name=name)
    ),
    "sep_conv_3x3": lambda c, stride, o, name: SepConv(c, 3, stride, o.affine, name=name),
    "sep_conv_5x5": lambda c, stride, o, name: SepConv(c, 5, stride, o.affine, name=name),
    "dil_conv_3x3": lambda c, stride, o, name: DilConv(c, 3, stride, 2, o.affine, name=name),
    "dil_conv_5x5": lambda c, stride, o, name: DilConv(c, 5, stride, 2, o.affine, name=name),
}
assert tuple(OPS) == genotypes.PRIMITIVES, "OPS must list genotypes.PRIMITIVES, in order"


def make_op(
    name: str,
    channels: int,
    stride: int,
    options: OpOptions = OpOptions(),
    layer_name: str | None = None,
) -> keras.layers.Layer:
    """Builds the candidate op ``name`` mapping ``channels`` to ``channels`` channels."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(OPS)}")
    return OPS[name](channels, stride, options, layer_name or name)


def is_bare_identity(op: keras.layers.Layer) -> bool:
    """True for an identity skip without BN: the op drop path leaves alone in DARTS."""
    return isinstance(op, Identity) and op.is_identity
