"""BatchNorm with PyTorch's numerics, fused on TensorFlow wherever it can be.

Keras' ``BatchNormalization`` on the TF backend computes the batch moments and the
normalisation as separate ops (and, when ``synchronized``, an all-reduce even on one
replica): several times the cost of TF's fused kernel, with dozens of BNs per step. It
also updates the running variance with the biased batch variance, where PyTorch (the
published code) uses the unbiased one, ``var * n / (n - 1)``.

:class:`BatchNorm` keeps Keras' layer (same variables, config, checkpoints) and replaces
its ``call``. Its class is named ``BatchNormalization``, as Keras' is: Keras' weights
files (``save_weights``, the export's ``network.weights.h5``) key the layers a list
holds by their class name, so under another name the weights files written before this
layer (with Keras' layer) would not load into the networks' BNs. ``BatchNorm`` is the
name the package uses for it. In training it normalises with the biased batch variance, as both
frameworks do, and updates the running statistics as PyTorch does::

    running_mean <- momentum * running_mean + (1 - momentum) * mean
    running_var  <- momentum * running_var  + (1 - momentum) * var * n / (n - 1)

with ``n`` the number of values per channel (batch x height x width, over every
replica when synchronized). Three paths compute the same thing:

- fused: ``FusedBatchNormV3`` (one kernel forward, one backward; its variance output is
  already the unbiased one) for 4-D float32 / float16 / bfloat16 inputs when one replica
  computes the statistics;
- synchronized: only inside a multi-replica ``tf.distribute`` step of a layer made with
  ``synchronized=True``: sums all-reduced over the replicas (the global batch's
  statistics, as one device would compute them);
- formula: the textbook formula in the input's precision (float64, or other ranks).

Inference uses the running statistics on every path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import keras
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.framework import ops as tf_ops

from istanas_tf import graph_constants

_register = keras.saving.register_keras_serializable(package="istanas_tf")

# FusedBatchNormV3's input types (its statistics are float32 for all of them).
FUSED_DTYPES = (tf.float32, tf.float16, tf.bfloat16)


@contextlib.contextmanager
def custom_gradients_released() -> Iterator[None]:
    """Forgets the gradient functions ``tf.custom_gradient`` registers while the block
    is traced, when the block ends.

    ``ReplicaContext.all_reduce`` (the synchronized path's, and Keras' all-reduce of the
    gradients) is a ``tf.custom_gradient``; traced, each call registers its gradient
    function in TF's global gradient registry for good, and the function holds the
    traced graph (tensorflow/tensorflow#97697): a step traced again after every support
    change kept every old trace, 200-300 MB per epoch for a tiny super-net on 2
    replicas (benchmarks/memory_benchmark.py --replicas 2). A tape never reads that
    registry (it records its own gradient function), so a block that takes its
    gradients with a tape (a train step) can forget the entries it made; nothing
    differentiates its graph afterwards. Entries made outside the block are left alone.
    """
    # The registry has no public API; its entries are a dict by name (TF 2.21).
    registry = tf_ops._gradient_registry._registry  # noqa: SLF001
    before = set(registry)
    try:
        yield
    finally:
        for name in set(registry) - before:
            if name.startswith("CustomGradient-"):
                del registry[name]


def _replicas_in_step() -> int:
    """Replicas computing this step together (1 outside a tf.distribute replica step)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def _record_output_only(normalize, x, scale, offset, epsilon: float) -> list[tf.Tensor]:
    """Runs the training-mode ``FusedBatchNormV3`` ``normalize()`` with only its output
    ``y`` recorded for gradients; returns all six outputs.

    Recorded as TF records it, every output a gradient does not reach gets a zeros
    tensor before TF's gradient function runs, which reads only ``y``'s: five per BN
    (4 ``Const`` and a ``ZerosLike``), 8 % of the sparse search step's traced ops.
    TF skips them only for the V1 op, which the remapper does not fuse with a following
    ReLU. The gradient here is TF's own for the op in training mode
    (``FusedBatchNormGradV3`` on the same reserve spaces): the same values, bit for bit.
    The op is the same as before, so grappler fuses it as before.
    """
    # tensorflow.python.eager.record: what tf.custom_gradient records with, without
    # its IdentityN (which would sit between the BN and its ReLU) or its global
    # gradient-registry entry.
    with record.stop_recording():
        outputs = normalize()

    def backward(output_gradient):
        dx, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=output_gradient,
            x=x,
            scale=scale,
            reserve_space_1=outputs[3],
            reserve_space_2=outputs[4],
            reserve_space_3=outputs[5],
            epsilon=epsilon,
            data_format="NHWC",
            is_training=True,
        )
        return [dx, dscale, doffset]

    record.record_operation("FusedBatchNormV3", [outputs[0]], [x, scale, offset], backward)
    return outputs


@_register
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization (channels last) with PyTorch's running-variance update,
    computed by TF's fused kernel when one replica computes the statistics.

    Args: those of ``keras.layers.BatchNormalization``; ``axis`` must be the last one,
    and ``renorm`` is not supported.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.axis != -1 or self.renorm:
            raise ValueError(
                f"BatchNorm normalises the last (channel) axis without renorm, got "
                f"axis={self.axis}, renorm={self.renorm}"
            )

    def path(self, inputs: tf.Tensor, training: bool) -> str:
        """Which computation ``call`` uses: ``fused``, ``synchronized`` or ``formula``."""
        if training and self.synchronized and _replicas_in_step() > 1:
            return "synchronized"
        if inputs.shape.rank == 4 and inputs.dtype in FUSED_DTYPES:
            return "fused"
        return "formula"

    def _scale_and_offset(self, dtype, device: str) -> tuple[tf.Tensor, tf.Tensor]:
        """gamma and beta in ``dtype``; without them, ones and zeros made once per traced
        graph and device (every BN of a search cell has none: ~300 constants a step)."""
        channels = self.moving_mean.shape[0]

        def constant(value: float) -> tf.Tensor:
            return graph_constants.once_per_graph(
                ("batch_norm", value, channels, dtype, device),
                lambda: tf.constant(value, dtype, shape=[channels]),
            )

        gamma = tf.cast(self.gamma, dtype) if self.scale else constant(1.0)
        beta = tf.cast(self.beta, dtype) if self.center else constant(0.0)
        return gamma, beta

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError("BatchNorm does not take a mask")
        training = bool(training) and self.trainable
        path = self.path(inputs, training)
        if path == "fused":
            return self._fused(inputs, training)
        # Statistics in at least float32 (float16 overflows), as Keras does.
        dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        x = tf.cast(inputs, dtype)
        if training:
            mean, variance, count = (
                self._synchronized_moments(x) if path == "synchronized" else self._moments(x)
            )
            # One value per channel: its variance is 0, and 0, not 0 * 1/0 = NaN, is
            # what the fused kernel reports too (PyTorch refuses to train then).
            bessel = count / tf.maximum(count - 1.0, 1.0)
            self._update_running_statistics(mean, variance * bessel)
        else:
            mean = tf.cast(self.moving_mean, dtype)
            variance = tf.cast(self.moving_variance, dtype)
        gamma, beta = self._scale_and_offset(dtype, x.device)
        outputs = tf.nn.batch_normalization(x, mean, variance, beta, gamma, self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def _fused(self, inputs: tf.Tensor, training: bool) -> tf.Tensor:
        """FusedBatchNormV3: float32 statistics, output in the input's dtype."""
        gamma, beta = self._scale_and_offset(tf.float32, inputs.device)
        normalize = functools.partial(
            tf.raw_ops.FusedBatchNormV3,
            x=inputs,
            scale=gamma,
            offset=beta,
            mean=tf.cast(self.moving_mean, tf.float32),
            variance=tf.cast(self.moving_variance, tf.float32),
            epsilon=self.epsilon,
            # In training the kernel also moves the running statistics:
            # (1 - f) * running + f * batch, with the batch's unbiased variance (the
            # normalisation uses the biased one): PyTorch's update, in one op where
            # written out it traced ~16 (reads, constants, products, assignments).
            exponential_avg_factor=1.0 - self.momentum if training else 1.0,
            data_format="NHWC",
            is_training=training,
        )
        if not training:
            return tf.cast(normalize()[0], self.compute_dtype)
        outputs = _record_output_only(normalize, inputs, gamma, beta, self.epsilon)
        mean, variance = outputs[1:3]
        self.moving_mean.assign(tf.cast(mean, self.moving_mean.dtype))
        self.moving_variance.assign(tf.cast(variance, self.moving_variance.dtype))
        return tf.cast(outputs[0], self.compute_dtype)

    def _moments(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Mean, biased variance and value count per channel of this replica's batch."""
        axes = list(range(x.shape.rank - 1))
        mean, variance = tf.nn.moments(x, axes)
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
        return mean, variance, count

    def _synchronized_moments(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The global batch's mean, biased variance and count, over every replica.

        Two all-reduces (sums and count, then squared deviations from the global mean):
        no ``E[x^2] - E[x]^2`` cancellation. ``all_reduce`` is differentiable.
        """
        context = tf.distribute.get_replica_context()
        axes = list(range(x.shape.rank - 1))
        local_count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
        sums = context.all_reduce(
            tf.distribute.ReduceOp.SUM,
            tf.concat([tf.reduce_sum(x, axes), local_count[None]], axis=0),
        )
        count = sums[-1]
        mean = sums[:-1] / count
        squares = context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.square(x - mean), axes)
        )
        return mean, squares / count, count

    def _update_running_statistics(self, mean: tf.Tensor, unbiased_variance: tf.Tensor) -> None:
        """Moves the running statistics toward this batch's (no gradient flows here)."""
        momentum = self.momentum
        for variable, value in (
            (self.moving_mean, mean),
            (self.moving_variance, unbiased_variance),
        ):
            value = tf.cast(tf.stop_gradient(value), variable.dtype)
            variable.assign(variable * momentum + value * (1.0 - momentum))


# The package's name for it; the class keeps Keras' name (see the module docstring).
BatchNorm = BatchNormalization
