"""Candidate operations and cell building blocks of the DARTS search space (NHWC).

Numerics follow the published PyTorch code (METHOD.md section 1), not Keras defaults:

- Padding is symmetric, ``(k - 1) * d / 2`` pixels on every side. At stride 1 Keras'
  ``'same'`` is exactly that for odd kernels; at stride 2 it pads only the bottom/right,
  which samples different pixels, so strided ops pad explicitly.
- avg-pool divides by the number of valid (non-pad) pixels; max-pool never returns a pad.
- FactorizedReduce's second 1x1 conv reads the input shifted by one pixel.
- BatchNorm uses eps 1e-5 and moving-average momentum 0.9 (PyTorch's 0.1).

``OPS`` maps each primitive name to a factory ``(channels, stride, options) -> Layer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable

import keras
import tensorflow as tf

from istanas_tf import genotypes

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

_register = keras.saving.register_keras_serializable(package="istanas_tf")


_SYNCHRONIZED = threading.local()


@contextlib.contextmanager
def synchronized_batch_norm(enabled: bool = True):
    """Within this scope, new BN layers use global-batch statistics under tf.distribute.

    With it, N replicas compute the same BN statistics as one device on the whole batch
    (the super-net's search then does not depend on the replica count); without it,
    each replica normalises with its own share of the batch (cheaper on many GPUs).
    """
    previous = getattr(_SYNCHRONIZED, "enabled", False)
    _SYNCHRONIZED.enabled = enabled
    try:
        yield
    finally:
        _SYNCHRONIZED.enabled = previous


def batch_norm(affine: bool = True, name: str | None = None) -> keras.layers.Layer:
    """BatchNorm with PyTorch's eps and momentum; ``affine=False`` drops gamma and beta."""
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, center=affine, scale=affine, name=name,
        synchronized=getattr(_SYNCHRONIZED, "enabled", False))


def _pad_symmetric(x: tf.Tensor, pad: int, value: float = 0.0) -> tf.Tensor:
    """Pads the two spatial axes of an NHWC tensor by ``pad`` on every side."""
    if pad == 0:
        return x
    return tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], constant_values=value)


@_register
class SymmetricConv(keras.layers.Layer):
    """Conv2D or DepthwiseConv2D (no bias) with PyTorch's symmetric padding.

    Args:
      filters: output channels (ignored when ``depthwise``: a depthwise conv keeps them).
      kernel_size: odd spatial kernel size k.
      stride: 1 or 2.
      dilation: dilation d; the padding is ``(k - 1) * d / 2``.
      depthwise: a depthwise (per-channel) conv instead of a full one.
      padding: explicit symmetric padding; ``None`` means ``(k - 1) * d / 2`` (same size).
    """

    def __init__(self, filters: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 depthwise: bool = False, padding: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.depthwise = depthwise
        self.padding = (kernel_size - 1) * dilation // 2 if padding is None else padding
        # A dilated strided conv with an even padding reads only even pixels: it equals
        # an undilated stride-1 conv on the subsampled input (same kernel, padding / d).
        # TF has no dilated strided depthwise kernel, and this is also 4x cheaper.
        self._subsample_first = (stride > 1 and dilation == stride
                                 and self.padding % dilation == 0)
        conv_dilation = 1 if self._subsample_first else dilation
        conv_stride = 1 if self._subsample_first else stride
        self._conv_padding = (self.padding // dilation if self._subsample_first
                              else self.padding)
        # 'same' at stride 1 pads (k_eff - 1) / 2 on each side, which is symmetric.
        effective = (kernel_size - 1) * conv_dilation + 1
        self._use_same = conv_stride == 1 and self._conv_padding * 2 == effective - 1
        common = dict(kernel_size=kernel_size, strides=conv_stride, dilation_rate=conv_dilation,
                      padding="same" if self._use_same else "valid", use_bias=False,
                      name="depthwise" if depthwise else "conv")
        if depthwise:
            self.conv = keras.layers.DepthwiseConv2D(**common)
        else:
            self.conv = keras.layers.Conv2D(filters, **common)

    def build(self, input_shape):
        # The kernel depends only on the channel count; the padded size is known at call.
        self.conv.build((None, None, None, input_shape[-1]))

    def call(self, x):
        if self._subsample_first:
            x = x[:, ::self.stride, ::self.stride, :]
        if not self._use_same:
            x = _pad_symmetric(x, self._conv_padding)
        return self.conv(x)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "stride": self.stride,
                "dilation": self.dilation, "depthwise": self.depthwise,
                "padding": self.padding}


@_register
class ReLUConvBN(keras.layers.Layer):
    """ReLU -> Conv kxk (symmetric padding, no bias) -> BN. Used for cell preprocessing."""

    def __init__(self, channels_out: int, kernel_size: int = 1, stride: int = 1,
                 affine: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.channels_out = channels_out
        self.kernel_size = kernel_size
        self.stride = stride
        self.affine = affine
        self.conv = SymmetricConv(channels_out, kernel_size, stride, name="conv")
        self.bn = batch_norm(affine, name="bn")

    @property
    def batch_norms(self) -> list[keras.layers.BatchNormalization]:
        """The BNs inside the op."""
        return [self.bn]

    def call(self, x, training=None):
        return self.bn(self.conv(tf.nn.relu(x)), training=training)

    def get_config(self):
        return {**super().get_config(), "channels_out": self.channels_out,
                "kernel_size": self.kernel_size, "stride": self.stride, "affine": self.affine}


@_register
class SepConv(keras.layers.Layer):
    """DARTS separable conv: (ReLU, depthwise kxk, pointwise 1x1, BN) applied twice.

    The stride applies to the first depthwise conv only.
    Parameters with affine BN: 2 * (k*k*C + C*C + 2*C).
    """

    def __init__(self, channels_out: int, kernel_size: int, stride: int = 1,
                 affine: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.channels_out = channels_out
        self.kernel_size = kernel_size
        self.stride = stride
        self.affine = affine
        self.depthwise1 = SymmetricConv(0, kernel_size, stride, depthwise=True,
                                        name="depthwise1")
        self.pointwise1 = keras.layers.Conv2D(channels_out, 1, use_bias=False,
                                              name="pointwise1")
        self.bn1 = batch_norm(affine, name="bn1")
        self.depthwise2 = SymmetricConv(0, kernel_size, 1, depthwise=True, name="depthwise2")
        self.pointwise2 = keras.layers.Conv2D(channels_out, 1, use_bias=False,
                                              name="pointwise2")
        self.bn2 = batch_norm(affine, name="bn2")

    @property
    def last_bn(self) -> keras.layers.BatchNormalization:
        """The BN the op ends in (where BN absorption folds the architecture weight)."""
        return self.bn2

    @property
    def batch_norms(self) -> list[keras.layers.BatchNormalization]:
        """The BNs inside the op, in order (the one-stage search freezes their gamma/beta)."""
        return [self.bn1, self.bn2]

    def call(self, x, training=None):
        x = self.bn1(self.pointwise1(self.depthwise1(tf.nn.relu(x))), training=training)
        return self.bn2(self.pointwise2(self.depthwise2(tf.nn.relu(x))), training=training)

    def get_config(self):
        return {**super().get_config(), "channels_out": self.channels_out,
                "kernel_size": self.kernel_size, "stride": self.stride, "affine": self.affine}


@_register
class DilConv(keras.layers.Layer):
    """ReLU -> depthwise kxk with dilation -> pointwise 1x1 -> BN.

    Parameters with affine BN: k*k*C + C*C + 2*C.
    """

    def __init__(self, channels_out: int, kernel_size: int, stride: int = 1,
                 dilation: int = 2, affine: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.channels_out = channels_out
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.affine = affine
        self.depthwise = SymmetricConv(0, kernel_size, stride, dilation, depthwise=True,
                                       name="depthwise")
        self.pointwise = keras.layers.Conv2D(channels_out, 1, use_bias=False,
                                             name="pointwise")
        self.bn = batch_norm(affine, name="bn")

    @property
    def last_bn(self) -> keras.layers.BatchNormalization:
        return self.bn

    @property
    def batch_norms(self) -> list[keras.layers.BatchNormalization]:
        return [self.bn]

    def call(self, x, training=None):
        return self.bn(self.pointwise(self.depthwise(tf.nn.relu(x))), training=training)

    def get_config(self):
        return {**super().get_config(), "channels_out": self.channels_out,
                "kernel_size": self.kernel_size, "stride": self.stride,
                "dilation": self.dilation, "affine": self.affine}


@_register
class FactorizedReduce(keras.layers.Layer):
    """Halves the resolution: ReLU, two 1x1 stride-2 convs to C/2 each, concat, BN.

    The second conv reads the input shifted by one pixel (``x[:, 1:, 1:]``), so the two
    halves see complementary pixels. Parameters with affine BN: 2 * (C_in * C/2) + 2*C.
    """

    def __init__(self, channels_out: int, affine: bool = True, **kwargs):
        if channels_out % 2:
            raise ValueError(
                f"FactorizedReduce needs an even output channel count to split it into "
                f"two halves, got {channels_out}")
        super().__init__(**kwargs)
        self.channels_out = channels_out
        self.affine = affine
        # 1x1 convs on the subsampled pixels: the same as PyTorch's stride-2 1x1 convs,
        # cheaper, and it avoids a oneDNN fault in the gradient of strided 1x1 convs on
        # odd-sized inputs seen with TF 2.21 (heap corruption on 55x55 / 63x63 inputs).
        self.conv1 = keras.layers.Conv2D(channels_out // 2, 1, use_bias=False, name="conv1")
        self.conv2 = keras.layers.Conv2D(channels_out // 2, 1, use_bias=False, name="conv2")
        self.bn = batch_norm(affine, name="bn")

    @property
    def last_bn(self) -> keras.layers.BatchNormalization:
        return self.bn

    @property
    def batch_norms(self) -> list[keras.layers.BatchNormalization]:
        return [self.bn]

    def call(self, x, training=None):
        x = tf.nn.relu(x)
        even = x[:, ::2, ::2, :]  # the pixels a stride-2 1x1 conv reads
        shifted = x[:, 1::2, 1::2, :]  # ... and those it reads on x[:, 1:, 1:]
        # PyTorch only defines this for even sizes; for odd sizes pad the shifted view at
        # the bottom/right so both halves have ceil(H/2) rows instead of failing.
        height, width = tf.shape(x)[1], tf.shape(x)[2]
        shifted = tf.pad(shifted, [[0, 0], [0, height % 2], [0, width % 2], [0, 0]])
        out = tf.concat([self.conv1(even), self.conv2(shifted)], axis=-1)
        return self.bn(out, training=training)

    def get_config(self):
        return {**super().get_config(), "channels_out": self.channels_out,
                "affine": self.affine}


@_register
class Pool(keras.layers.Layer):
    """3x3 max or average pooling with PyTorch's padding 1, optionally followed by BN.

    Average pooling divides by the number of valid pixels (``count_include_pad=False``);
    max pooling ignores the padding (pads with -inf). At stride 1 both equal TF's
    ``'SAME'`` pooling, which is symmetric for a 3x3 window; at stride 2 the input is
    padded by 1 on every side and pooled ``'VALID'``, the windows PyTorch produces.
    """

    def __init__(self, kind: str, stride: int = 1, bn: bool = False, affine: bool = True,
                 **kwargs):
        if kind not in ("max", "avg"):
            raise ValueError(f"Pool kind must be 'max' or 'avg', got {kind!r}")
        super().__init__(**kwargs)
        self.kind = kind
        self.stride = stride
        self.bn = bn
        self.affine = affine
        self.batch_norm = batch_norm(affine, name="bn") if bn else None

    @property
    def last_bn(self) -> keras.layers.BatchNormalization | None:
        return self.batch_norm

    @property
    def batch_norms(self) -> list[keras.layers.BatchNormalization]:
        return [] if self.batch_norm is None else [self.batch_norm]

    def call(self, x, training=None):
        if self.stride == 1:
            pool = tf.nn.max_pool2d if self.kind == "max" else tf.nn.avg_pool2d
            y = pool(x, ksize=3, strides=1, padding="SAME")
        elif self.kind == "max":
            y = tf.nn.max_pool2d(_pad_symmetric(x, 1, float("-inf")), 3, self.stride, "VALID")
        else:
            # Window sums over the zero-padded input, divided by each window's count of
            # valid pixels (pooling a padded ones mask gives count / 9).
            sums = tf.nn.avg_pool2d(_pad_symmetric(x, 1), 3, self.stride, "VALID")
            ones = _pad_symmetric(tf.ones_like(x[:1, :, :, :1]), 1)
            valid = tf.nn.avg_pool2d(ones, 3, self.stride, "VALID")
            y = sums / valid
        if self.batch_norm is not None:
            y = self.batch_norm(y, training=training)
        return y

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "stride": self.stride,
                "bn": self.bn, "affine": self.affine}


@_register
class Identity(keras.layers.Layer):
    """The stride-1 skip connection, optionally followed by BN (one-stage cells)."""

    def __init__(self, bn: bool = False, affine: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.bn = bn
        self.affine = affine
        self.batch_norm = batch_norm(affine, name="bn") if bn else None

    @property
    def last_bn(self) -> keras.layers.BatchNormalization | None:
        return self.batch_norm

    @property
    def batch_norms(self) -> list[keras.layers.BatchNormalization]:
        return [] if self.batch_norm is None else [self.batch_norm]

    @property
    def is_identity(self) -> bool:
        """True when the op is a bare identity (drop path exempts it in DARTS cells)."""
        return self.batch_norm is None

    def call(self, x, training=None):
        if self.batch_norm is None:
            return x
        return self.batch_norm(x, training=training)

    def get_config(self):
        return {**super().get_config(), "bn": self.bn, "affine": self.affine}


@_register
class DropPath(keras.layers.Layer):
    """Drops a whole sample's path with probability ``rate`` (training only).

    Keeps the expectation: kept samples are scaled by ``1 / (1 - rate)``. ``rate`` is
    passed to ``call`` (a float or a scalar tensor, e.g. a variable ramped per epoch).
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, rate=0.0, training=None):
        if not training:
            return x
        keep = 1.0 - tf.cast(rate, x.dtype)
        noise = keras.random.uniform([tf.shape(x)[0], 1, 1, 1], seed=self.seed_generator,
                                     dtype=x.dtype)
        # floor(keep + U[0,1)) is 1 with probability keep; rate 0 keeps everything.
        mask = tf.floor(keep + noise)
        return x / keep * mask

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


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
        "max", stride, bn=o.bn_after_pool, affine=o.affine, name=name),
    "avg_pool_3x3": lambda c, stride, o, name: Pool(
        "avg", stride, bn=o.bn_after_pool, affine=o.affine, name=name),
    "skip_connect": lambda c, stride, o, name: (
        Identity(bn=o.bn_after_identity, affine=o.affine, name=name) if stride == 1
        else FactorizedReduce(c, affine=o.affine, name=name)),
    "sep_conv_3x3": lambda c, stride, o, name: SepConv(c, 3, stride, o.affine, name=name),
    "sep_conv_5x5": lambda c, stride, o, name: SepConv(c, 5, stride, o.affine, name=name),
    "dil_conv_3x3": lambda c, stride, o, name: DilConv(c, 3, stride, 2, o.affine, name=name),
    "dil_conv_5x5": lambda c, stride, o, name: DilConv(c, 5, stride, 2, o.affine, name=name),
}
assert tuple(OPS) == genotypes.PRIMITIVES, "OPS must list the primitives in METHOD.md order"


def make_op(name: str, channels: int, stride: int, options: OpOptions = OpOptions(),
            layer_name: str | None = None) -> keras.layers.Layer:
    """Builds the candidate op ``name`` mapping ``channels`` to ``channels`` channels."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(OPS)}")
    return OPS[name](channels, stride, options, layer_name or name)


def is_bare_identity(op: keras.layers.Layer) -> bool:
    """True for an identity skip without BN: the op drop path leaves alone in DARTS."""
    return isinstance(op, Identity) and op.is_identity
