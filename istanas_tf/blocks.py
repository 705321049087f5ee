"""The building blocks of every network here, with the published PyTorch numerics.

- BatchNorm with PyTorch's eps 1e-5 and moving-average momentum 0.9 (PyTorch's 0.1),
  synchronized across replicas only inside :func:`synchronized_batch_norm`.
- :class:`SymmetricConv`: padding ``(k - 1) * d / 2`` pixels on every side. At stride 1
  Keras' ``'same'`` is exactly that for odd kernels; at stride 2 it pads only the
  bottom/right, which samples different pixels, so strided convs pad explicitly.
- :class:`PointwiseConv`: a 1x1 conv computed as one matrix product (TF's CPU conv
  kernels take 2x longer than MatMul for 1x1 forward + backward; same weights).
- :class:`DropPath`: a whole sample's path dropped, the kept ones scaled by 1 / keep;
  no work at rate 0.

The candidate ops (:mod:`istanas_tf.operations`) and the networks' stems and heads are
made of these.
"""

from __future__ import annotations

import contextlib
import threading

import keras
import tensorflow as tf

from istanas_tf.batch_norm import BatchNorm

_register = keras.saving.register_keras_serializable(package="istanas_tf")

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
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


def batch_norm(affine: bool = True, name: str | None = None) -> BatchNorm:
    """BatchNorm with PyTorch's eps, momentum and running-variance update (fused on TF
    where one replica computes the statistics); ``affine=False`` drops gamma and beta."""
    return BatchNorm(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        center=affine,
        scale=affine,
        name=name,
        synchronized=getattr(_SYNCHRONIZED, "enabled", False),
    )


def pad_symmetric(x: tf.Tensor, pad: int, value: float = 0.0) -> tf.Tensor:
    """Pads the two spatial axes of an NHWC tensor by ``pad`` on every side."""
    if pad == 0:
        return x
    return tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], constant_values=value)


def subsample(x: tf.Tensor, stride: int) -> tf.Tensor:
    """``x[:, ::stride, ::stride, :]`` of an NHWC tensor, as a 1x1 average pool.

    The same values bit for bit (each output averages one pixel) and the same gradient,
    but on CPU much cheaper than the strided slice, whose gradient TF scatters element by
    element: forward + backward 2.4 vs 6.8 ms at 64x32x32x16 with oneDNN.
    """
    return tf.nn.avg_pool2d(x, ksize=1, strides=stride, padding="VALID")


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

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        depthwise: bool = False,
        padding: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.depthwise = depthwise
        # Stored as given, None included, so that the config records the argument
        # (not a value derived from kernel_size and dilation); pad is the one applied.
        self.padding = padding
        pad = (kernel_size - 1) * dilation // 2 if padding is None else padding
        # A dilated strided conv with an even padding reads only even pixels: it equals
        # an undilated stride-1 conv on the subsampled input (same kernel, padding / d).
        # TF has no dilated strided depthwise kernel, and this is also 4x cheaper.
        self._subsample_first = stride > 1 and dilation == stride and pad % dilation == 0
        conv_dilation = 1 if self._subsample_first else dilation
        conv_stride = 1 if self._subsample_first else stride
        self._conv_padding = pad // dilation if self._subsample_first else pad
        # 'same' at stride 1 pads (k_eff - 1) / 2 on each side, which is symmetric.
        effective = (kernel_size - 1) * conv_dilation + 1
        self._use_same = conv_stride == 1 and self._conv_padding * 2 == effective - 1
        common = dict(
            kernel_size=kernel_size,
            strides=conv_stride,
            dilation_rate=conv_dilation,
            padding="same" if self._use_same else "valid",
            use_bias=False,
            name="depthwise" if depthwise else "conv",
        )
        if depthwise:
            self.conv = keras.layers.DepthwiseConv2D(**common)
        elif kernel_size == 1 and conv_stride == 1 and self._conv_padding == 0:
            self.conv = PointwiseConv(filters, use_bias=False, name=common["name"])
        else:
            self.conv = keras.layers.Conv2D(filters, **common)

    def build(self, input_shape):
        # The kernel depends only on the channel count; the padded size is known at call.
        self.conv.build((None, None, None, input_shape[-1]))

    def call(self, x):
        if self._subsample_first:
            x = subsample(x, self.stride)
        if not self._use_same:
            x = pad_symmetric(x, self._conv_padding)
        return self.conv(x)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "dilation": self.dilation,
            "depthwise": self.depthwise,
            "padding": self.padding,
        }


@_register
class PointwiseConv(keras.layers.Layer):
    """A 1x1, stride-1 convolution (NHWC) computed as one matrix product over the pixels.

    Its weights are Conv2D's: ``kernel`` ``[1, 1, C_in, filters]`` (Glorot-uniform, as
    Conv2D's default) and an optional ``bias``, so checkpoints and weight copies treat it
    as a Conv2D. Forward + backward of TF's Conv2D kernels at 64x32x32x16 take about
    twice as long on CPU as the same product done by MatMul.

    Args:
      filters: output channels.
      use_bias: add a bias (zeros at first).
    """

    def __init__(self, filters: int, use_bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.use_bias = use_bias
        # Made here, as Conv2D makes its own: an unseeded Keras initializer takes its seed
        # from the global Python RNG when it is constructed, so constructing it at build
        # time would give every later layer of a seeded network other initial weights.
        self._kernel_initializer = keras.initializers.GlorotUniform()

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(1, 1, input_shape[-1], self.filters),
            initializer=self._kernel_initializer,
            name="kernel",
        )
        self.bias = (
            self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")
            if self.use_bias
            else None
        )

    def call(self, inputs):
        channels_in = self.kernel.shape[2]
        pixels = tf.reshape(inputs, [-1, channels_in])
        outputs = tf.matmul(pixels, tf.reshape(self.kernel, [channels_in, self.filters]))
        if self.bias is not None:
            outputs = tf.nn.bias_add(outputs, self.bias)
        if inputs.shape[1:-1].is_fully_defined():  # one Reshape op, no shape arithmetic
            return tf.reshape(outputs, [-1, *inputs.shape[1:-1], self.filters])
        return tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [self.filters]], axis=0))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "use_bias": self.use_bias}


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
        if not training or (isinstance(rate, (int, float)) and rate == 0):
            return x
        # A variable rate (ramped per epoch) is read in the traced step. No tf.cond to
        # skip the work at 0: 52 conds made 40 % of the evaluation step's trace; the
        # networks leave drop path out of the trace instead while the rate is 0
        # (DropPathSchedule). At a variable rate of 0 this is x / 1 = x.
        return self._drop(x, rate)

    def _drop(self, x, rate):
        keep = 1.0 - tf.cast(rate, x.dtype)
        noise = keras.random.uniform(
            [tf.shape(x)[0], 1, 1, 1], seed=self.seed_generator, dtype=x.dtype
        )
        # floor(keep + U[0,1)) is 1 with probability keep.
        mask = tf.floor(keep + noise)
        # PyTorch's x / keep * mask in one pass over x: keep / mask is keep or +inf per
        # sample, and x / inf is the signed zero x / keep * 0 is, so every value (and
        # gradient) is bit for bit the same with half the full-size ops.
        return x / (keep / mask)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


class DropPathSchedule:
    """For networks whose ``drop_path_rate`` variable the training loop ramps per epoch:
    whether their traced training steps hold drop path at all.

    While the rate is 0 (a retraining's first epoch, a one-stage search) the steps are
    traced without drop path: no mask is drawn, no pixel touched. Above 0 they read the
    variable, so the ramp needs no new trace. :meth:`set_drop_path_rate` says when the
    steps traced before it are stale. Until it is called the steps read the variable,
    so assigning ``drop_path_rate`` directly (e.g. in a Keras callback) keeps working.
    """

    drop_path_traced = True

    def set_drop_path_rate(self, rate: float) -> bool:
        """Assigns ``rate``; returns whether training steps traced before are now stale
        (the rate crossed 0 either way)."""
        self.drop_path_rate.assign(rate)
        traced = rate > 0
        stale = traced != self.drop_path_traced
        self.drop_path_traced = traced
        return stale

    @property
    def traced_drop_path_rate(self):
        """What the traced forward pass gets: the variable, or 0.0 (no drop path ops)."""
        return self.drop_path_rate if self.drop_path_traced else 0.0
