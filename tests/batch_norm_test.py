"""istanas_tf.batch_norm.BatchNorm against independent oracles.

- A float64 numpy reference of the formula (PyTorch's BatchNorm2d): outputs in training
  (biased batch variance) and inference (running statistics), the analytic backward
  (input, gamma, beta), and the running statistics after several training steps on
  different batches from the initial 0 / 1, with the unbiased variance ``var n/(n-1)``.
  Every path: fused (float32 4-D), formula (float64; float32 2-D), affine or not.
- Keras' ``BatchNormalization(momentum=0.9, epsilon=1e-5)``, the layer this replaced:
  the same outputs and gradients, the same running mean, and a running variance that
  differs by exactly the Bessel factor.
- Mixed precision (float16, bfloat16): output in the compute dtype, float32 variables
  and statistics, values as the float32 layer's to the dtype's precision.
- Which path runs, also read from a traced graph.
- Synchronized statistics under MirroredStrategy on 2 logical CPUs (a subprocess:
  logical devices must be configured before TensorFlow initialises).
- Config and weights files round trip, also to and from Keras' layer.

Tolerances. float64 results are compared to 1e-12 relative to the array's scale: the
layer and the reference compute the same sums in another order (~1e-16 each). float32
results to 2e-5 relative to the scale: a sum of n = 60 float32 values is within
n * 2^-24 ~ 4e-6 of the exact one in the worst case, and a BN output or gradient is a
few such sums (mean, variance, sum(dy), sum(dy * xhat)) combined with O(1) factors.
Measured (TF 2.21, CPU): at most 8.4e-7 in float32 and 8.7e-16 in float64.
"""

import gc
import json
import subprocess
import sys
import textwrap
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from testing import this_checkout_env

from istanas_tf.batch_norm import BatchNorm

EPS, MOMENTUM = 1e-5, 0.9
SHAPE_4D, SHAPE_2D = (3, 4, 5, 6), (60, 6)  # n = 60 values per channel either way
F64_RTOL, F32_RTOL = 1e-12, 2e-5


# ---------------------------------------------------------------------- oracle
def reference_forward(x, gamma, beta, running_mean, running_var, training):
    """Float64 BN of ``x`` (channels last): output and, in training, the new running
    statistics (PyTorch: the unbiased batch variance in the running average)."""
    x = x.astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    if training:
        n = x.size // x.shape[-1]
        mean, var = x.mean(axes), x.var(axes)
        running_mean = MOMENTUM * running_mean + (1 - MOMENTUM) * mean
        running_var = MOMENTUM * running_var + (1 - MOMENTUM) * var * n / (n - 1)
    else:
        mean, var = running_mean, running_var
    y = gamma * (x - mean) / np.sqrt(var + EPS) + beta
    return y, running_mean, running_var


def reference_gradients(x, gamma, running_mean, running_var, dy, training):
    """Analytic float64 gradients (dx, dgamma, dbeta) of sum(y * dy).

    Training: with xhat = (x - mean) / sqrt(var + eps) (batch statistics) and sums over
    the n values of a channel, dx = gamma / (n sqrt(var + eps)) * (n dy - sum(dy) -
    xhat sum(dy xhat)). Inference: the running statistics are constants, dx = gamma dy
    / sqrt(running_var + eps). Both: dgamma = sum(dy xhat), dbeta = sum(dy).
    """
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    if training:
        mean, var = x.mean(axes), x.var(axes)
    else:
        mean, var = running_mean, running_var
    inv = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean) * inv
    if training:
        dx = gamma * inv / n * (n * dy - dy.sum(axes) - xhat * (dy * xhat).sum(axes))
    else:
        dx = gamma * inv * dy
    return dx, (dy * xhat).sum(axes), dy.sum(axes)


def assert_close(actual, expected, rtol, what=""):
    """Elementwise within ``rtol`` times the expected array's largest magnitude."""
    expected = np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    error = np.max(np.abs(np.asarray(actual, np.float64) - expected)) / scale
    assert error <= rtol, f"{what}: relative difference {error:.3g} > {rtol:.3g}"


# ---------------------------------------------------------------------- helpers
def make_layer(shape, dtype, affine=True, seed=0, cls=BatchNorm, **kwargs):
    """A built layer with random gamma and beta (the initial 0 / 1 would hide them)."""
    layer = cls(momentum=MOMENTUM, epsilon=EPS, center=affine, scale=affine, dtype=dtype, **kwargs)
    layer.build(shape)
    rng = np.random.default_rng(seed)
    if affine:
        layer.gamma.assign(rng.uniform(0.5, 1.5, shape[-1]))
        layer.beta.assign(rng.normal(0.0, 0.5, shape[-1]))
    return layer


def batch(shape, seed, dtype):
    """Values with a mean far from 0 (as after a ReLU and conv): exposes E[x^2]-E[x]^2
    cancellation and a missing mean subtraction."""
    rng = np.random.default_rng(seed)
    return (2.0 + 3.0 * rng.normal(size=shape)).astype(dtype)


def run(layer, x, dy, training):
    """Output and gradients (x, then gamma and beta if any) of sum(y * dy)."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
    gradients = tape.gradient(
        y, [x] + layer.trainable_variables, output_gradients=tf.cast(dy, y.dtype)
    )
    return y, [g.numpy() for g in gradients]


def gamma_beta(layer, channels):
    """The layer's gamma and beta as float64, 1 and 0 without them."""
    if not layer.scale:
        return np.ones(channels), np.zeros(channels)
    return layer.gamma.numpy().astype(np.float64), layer.beta.numpy().astype(np.float64)


# ---------------------------------------------------------------------- the formula
PATH_CASES = [
    # (dtype, shape, path, rtol)
    pytest.param("float32", SHAPE_4D, "fused", F32_RTOL, id="fused-float32-4d"),
    pytest.param("float64", SHAPE_4D, "formula", F64_RTOL, id="formula-float64-4d"),
    pytest.param("float64", SHAPE_2D, "formula", F64_RTOL, id="formula-float64-2d"),
    pytest.param("float32", SHAPE_2D, "formula", F32_RTOL, id="formula-float32-2d"),
]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype,shape,path,rtol", PATH_CASES)
def test_matches_float64_reference(dtype, shape, path, rtol, affine):
    """Three training steps on different batches, then inference, each step's output
    and gradients and the running statistics after it against the numpy reference."""
    layer = make_layer(shape, dtype, affine)
    channels = shape[-1]
    gamma, beta = gamma_beta(layer, channels)
    running_mean, running_var = np.zeros(channels), np.ones(channels)
    for step, training in enumerate([True, True, True, False]):
        x = batch(shape, seed=step, dtype=dtype)
        dy = np.random.default_rng(100 + step).normal(size=shape).astype(dtype)
        assert layer.path(tf.constant(x), training) == path
        y, gradients = run(layer, x, dy, training)
        assert y.dtype == dtype
        # Before reference_forward updates the running statistics (inference reads
        # them; training steps do not).
        expected_gradients = reference_gradients(
            x, gamma, running_mean, running_var, dy.astype(np.float64), training
        )
        expected_y, running_mean, running_var = reference_forward(
            x, gamma, beta, running_mean, running_var, training
        )
        assert_close(y, expected_y, rtol, f"output at step {step}")
        names = ["dx", "dgamma", "dbeta"] if affine else ["dx"]
        assert len(gradients) == len(names)
        for name, g, e in zip(names, gradients, expected_gradients, strict=False):
            assert_close(g, e, rtol, f"{name} at step {step}")
        assert_close(layer.moving_mean.numpy(), running_mean, rtol, f"mean after {step}")
        assert_close(layer.moving_variance.numpy(), running_var, rtol, f"var after {step}")


def test_running_variance_is_unbiased():
    """The reference's n/(n-1) is visible at this n: the biased update is far off."""
    x = batch(SHAPE_4D, seed=0, dtype="float64")
    layer = make_layer(SHAPE_4D, "float64")
    layer(tf.constant(x), training=True)
    biased = MOMENTUM + (1 - MOMENTUM) * x.var(axis=(0, 1, 2))
    unbiased = MOMENTUM + (1 - MOMENTUM) * x.var(axis=(0, 1, 2), ddof=1)
    assert np.min(np.abs(unbiased - biased)) > 1e-6
    np.testing.assert_allclose(layer.moving_variance.numpy(), unbiased, rtol=1e-13)


def test_one_value_per_channel():
    """n = 1 (a 1x1 map of batch 1, e.g. the auxiliary head's last BN): the variance
    is 0 and the running variance decays towards it on every path, without the NaN of
    0 * n / (n - 1). (PyTorch raises here; the fused kernel reports 0.)"""
    x = np.arange(3.0).reshape(1, 1, 1, 3)
    for dtype, shape in [("float32", x.shape), ("float64", x.shape), ("float64", (1, 3))]:
        layer = make_layer(shape, dtype)
        y = layer(tf.constant(x.reshape(shape), dtype), training=True)
        # x * inv + (beta - mean * inv): beta up to the rounding of inv ~ 316 times x.
        np.testing.assert_allclose(y.numpy().ravel(), layer.beta.numpy(), atol=1e-4)
        np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * x.ravel(), rtol=1e-7)
        np.testing.assert_allclose(layer.moving_variance.numpy(), [0.9] * 3, rtol=1e-7)


def test_jit_compiled_fused_path():
    """Under XLA (``--jit_compile``) FusedBatchNormV3 is XLA's lowering, not TF's
    kernel: its variance output must still be the unbiased one."""
    layer = make_layer(SHAPE_4D, "float32")
    x = batch(SHAPE_4D, seed=0, dtype="float32")
    step = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    y = step(tf.constant(x))
    gamma, beta = gamma_beta(layer, SHAPE_4D[-1])
    expected, mean, var = reference_forward(x, gamma, beta, 0.0, 1.0, training=True)
    assert_close(y, expected, F32_RTOL, "output")
    assert_close(layer.moving_mean.numpy(), mean, F32_RTOL, "running mean")
    assert_close(layer.moving_variance.numpy(), var, F32_RTOL, "running variance")


# ---------------------------------------------------------------------- Keras' layer
def test_matches_keras_batch_normalization():
    """Keras' layer (today's, before this one): one training step from the same weights
    gives the same output and gradients (float32: the fused kernel sums in another
    order than tf.nn.moments), the same running mean and a running variance moved by
    the unbiased batch variance: (ours - 0.9) == (keras - 0.9) * n / (n - 1). Then,
    from the same running statistics, the same inference output."""
    n = int(np.prod(SHAPE_4D[:-1]))
    ours = make_layer(SHAPE_4D, "float32")
    theirs = make_layer(SHAPE_4D, "float32", cls=keras.layers.BatchNormalization)
    x = batch(SHAPE_4D, seed=0, dtype="float32")
    dy = np.random.default_rng(1).normal(size=SHAPE_4D).astype("float32")
    y, gradients = run(ours, x, dy, training=True)
    y_keras, gradients_keras = run(theirs, x, dy, training=True)
    assert_close(y, y_keras, F32_RTOL, "training output")
    for name, g, e in zip(["dx", "dgamma", "dbeta"], gradients, gradients_keras, strict=True):
        assert_close(g, e, F32_RTOL, name)
    assert_close(ours.moving_mean.numpy(), theirs.moving_mean.numpy(), F32_RTOL, "mean")
    moved = ours.moving_variance.numpy().astype(np.float64) - MOMENTUM
    moved_keras = theirs.moving_variance.numpy().astype(np.float64) - MOMENTUM
    # 0.1 * var is ~1 here, so subtracting 0.9 loses no float32 precision worth noting.
    assert_close(moved, moved_keras * n / (n - 1), F32_RTOL, "variance, Bessel")
    assert np.min(np.abs(moved - moved_keras)) > 1e-4  # the factor is visible

    theirs.set_weights(ours.get_weights())
    assert_close(
        ours(tf.constant(x), training=False),
        theirs(tf.constant(x), training=False),
        F32_RTOL,
        "inference output",
    )


# ---------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize(
    "policy,precision",
    # precision: 2^-(significand bits), one unit in the last place relative to a value
    # (float16: 10 stored bits, bfloat16: 7).
    [("mixed_float16", 2.0**-10), ("mixed_bfloat16", 2.0**-7)],
)
def test_mixed_precision(policy, precision):
    """Output in the compute dtype, float32 variables; the output is the float32
    layer's on the same (rounded) input, rounded once more (half an ulp, so one ulp
    of the largest value bounds it); the running statistics are float32 and the
    float32 layer's (the kernel computes them in float32 from the same values)."""
    mixed = make_layer(SHAPE_4D, policy)
    full = make_layer(SHAPE_4D, "float32")
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    assert mixed.compute_dtype == compute_dtype
    assert {v.dtype for v in mixed.weights} == {"float32"}
    x = tf.cast(batch(SHAPE_4D, seed=0, dtype="float32"), compute_dtype)
    for training in (True, False):
        assert mixed.path(x, training) == "fused"
        y = mixed(x, training=training)
        y_full = full(tf.cast(x, tf.float32), training=training)
        assert y.dtype == compute_dtype
        assert_close(tf.cast(y, tf.float32), y_full, precision, f"training={training}")
        for ours, reference in zip(mixed.weights, full.weights, strict=True):
            assert ours.dtype == "float32"
            assert_close(ours.numpy(), reference.numpy(), F32_RTOL, ours.name)
    # And the statistics are right, not only alike: the float64 reference.
    _, mean, var = reference_forward(
        tf.cast(x, tf.float64).numpy(), 1.0, 0.0, np.zeros(6), np.ones(6), training=True
    )
    assert_close(mixed.moving_mean.numpy(), mean, F32_RTOL, "running mean")
    assert_close(mixed.moving_variance.numpy(), var, F32_RTOL, "running variance")


# ---------------------------------------------------------------------- paths
def _graph_op_types(layer, shape, dtype, training):
    """Op types of the traced training or inference call."""
    function = tf.function(lambda x: layer(x, training=training))
    graph = function.get_concrete_function(tf.TensorSpec(shape, dtype)).graph
    return {op.type for op in graph.get_operations()}


MOMENT_OPS = {"Mean", "SquaredDifference", "Square", "Sum"}


def test_path_selection():
    x32 = tf.zeros(SHAPE_4D, tf.float32)
    x64 = tf.zeros(SHAPE_4D, tf.float64)
    layer = make_layer(SHAPE_4D, "float32")
    assert layer.path(x32, True) == layer.path(x32, False) == "fused"
    assert make_layer(SHAPE_4D, "float64").path(x64, True) == "formula"
    assert layer.path(tf.zeros(SHAPE_2D), True) == "formula"
    # Outside a multi-replica step one replica computes the statistics: fused.
    synchronized = make_layer(SHAPE_4D, "float32", synchronized=True)
    assert synchronized.path(x32, True) == "fused"
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert synchronized.path(x32, True) == "fused"


@pytest.mark.parametrize("training", [True, False])
def test_fused_graph_has_one_kernel_and_no_moments(training):
    """The traced float32 call is FusedBatchNormV3, with no separate moments ops (what
    the fused path is for); the synchronized layer outside a distributed step too."""
    for synchronized in (False, True):
        layer = make_layer(SHAPE_4D, "float32", synchronized=synchronized)
        types = _graph_op_types(layer, SHAPE_4D, tf.float32, training)
        assert "FusedBatchNormV3" in types
        assert not types & MOMENT_OPS, types & MOMENT_OPS
        assert "CollectiveReduceV2" not in types and "NcclAllReduce" not in types


def _tf_recorded_fused_batch_norm(layer, x, training):
    """The fused op as TF records it (every output on the tape): the oracle for the
    layer's gradient, which records only the output."""
    gamma = layer.gamma if layer.scale else tf.ones([x.shape[-1]])
    beta = layer.beta if layer.center else tf.zeros([x.shape[-1]])
    return tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=tf.convert_to_tensor(gamma),
        offset=tf.convert_to_tensor(beta),
        mean=tf.convert_to_tensor(layer.moving_mean),
        variance=tf.convert_to_tensor(layer.moving_variance),
        epsilon=EPS,
        exponential_avg_factor=1.0 - MOMENTUM,
        data_format="NHWC",
        is_training=training,
    )[0]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_fused_training_gradient_is_tfs_bit_for_bit_without_zeros_for_unused_outputs(affine):
    """Only the output is recorded for gradients: the traced backward has no zeros for
    the five outputs no gradient reaches (TF makes 4 ``Const`` + a ``ZerosLike`` per BN
    otherwise), and its values are those of TF's own gradient of the op, bit for bit,
    traced and eager; the running statistics move as before."""
    layer = make_layer(SHAPE_4D, "float32", affine=affine)
    oracle = make_layer(SHAPE_4D, "float32", affine=affine)
    x = tf.constant(batch(SHAPE_4D, 1, "float32"))
    dy = tf.constant(batch(SHAPE_4D, 2, "float32"))

    def gradients(call, bn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = call(bn, x)
        return [y, *tape.gradient(y, [x, *bn.trainable_variables], output_gradients=dy)]

    ours = lambda bn, x: bn(x, training=True)  # noqa: E731
    theirs = lambda bn, x: _tf_recorded_fused_batch_norm(bn, x, True)  # noqa: E731
    for wrap in (lambda f: f, tf.function):
        for a, b in zip(wrap(gradients)(ours, layer), wrap(gradients)(theirs, oracle)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    traced = tf.function(gradients).get_concrete_function(ours, layer).graph
    types = [op.type for op in traced.get_operations()]
    assert types.count("FusedBatchNormGradV3") == 1
    assert "ZerosLike" not in types
    zeros = [op.name for op in traced.get_operations() if op.type == "Const" and "zeros" in op.name]
    assert not zeros, zeros
    _, new_mean, new_var = reference_forward(
        x.numpy(), *gamma_beta(layer, SHAPE_4D[-1]), np.zeros(6), np.ones(6), training=True
    )
    _, new_mean, new_var = reference_forward(
        x.numpy(), *gamma_beta(layer, SHAPE_4D[-1]), new_mean, new_var, training=True
    )  # the eager and the traced call each moved them once
    assert_close(layer.moving_mean.numpy(), new_mean, F32_RTOL, "running mean")
    assert_close(layer.moving_variance.numpy(), new_var, F32_RTOL, "running variance")


def test_bns_without_affine_share_one_ones_and_one_zeros_per_graph():
    """gamma = 1 and beta = 0 are made once per traced graph, channel count and dtype,
    not per BN call; and the cache keeps no graph alive."""
    layers = [make_layer(SHAPE_4D, "float32", affine=False) for _ in range(3)]
    function = tf.function(lambda x: [bn(x, training=True) for bn in layers])
    graph = function.get_concrete_function(tf.TensorSpec(SHAPE_4D, tf.float32)).graph
    scales = {op.inputs[1].ref() for op in graph.get_operations() if op.type == "FusedBatchNormV3"}
    offsets = {op.inputs[2].ref() for op in graph.get_operations() if op.type == "FusedBatchNormV3"}
    assert len(scales) == len(offsets) == 1
    graph_ref = weakref.ref(graph)
    del function, graph, scales, offsets
    gc.collect()
    assert graph_ref() is None


def test_formula_graph_has_moments_and_no_fused_kernel():
    """The float64 call computes moments itself (FusedBatchNormV3 has no float64)."""
    types = _graph_op_types(make_layer(SHAPE_4D, "float64"), SHAPE_4D, tf.float64, True)
    assert "FusedBatchNormV3" not in types
    assert "Mean" in types


def test_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="axis"):
        BatchNorm(axis=1)
    with pytest.raises(ValueError, match="renorm"):
        BatchNorm(renorm=True)
    layer = make_layer(SHAPE_2D, "float32")
    with pytest.raises(ValueError, match="mask"):
        layer(tf.zeros(SHAPE_2D), mask=tf.ones(SHAPE_2D[:1], tf.bool))


# ---------------------------------------------------------------------- config, weights
def test_config_round_trip():
    layer = BatchNorm(momentum=MOMENTUM, epsilon=EPS, center=False, scale=False, name="bn")
    config = layer.get_config()
    clone = BatchNorm.from_config(json.loads(json.dumps(config)))
    assert type(clone) is BatchNorm and clone.get_config() == config
    # The config is Keras' layer's: nothing added, nothing renamed.
    assert config.keys() == keras.layers.BatchNormalization.from_config(config).get_config().keys()


def _in_a_model(layer, shape):
    """``layer`` in a model, as the networks hold their BNs: in a list attribute (Keras'
    weights files key a list's layers by their class name, not by attribute)."""

    class Holder(keras.Model):
        def __init__(self):
            super().__init__()
            self.norms = [layer]

        def call(self, x, training=None):
            return self.norms[0](x, training=training)

    model = Holder()
    model(tf.zeros(shape))
    return model


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_weights_file_is_keras_compatible(tmp_path, affine):
    """Keras' variable names and paths, in Keras' order; a weights file written with
    Keras' layer (every export before this layer) loads into ours and one of ours into
    Keras' layer, values unchanged."""
    names = ["gamma", "beta"] if affine else []
    names += ["moving_mean", "moving_variance"]
    ours = make_layer(SHAPE_4D, "float32", affine, name="bn")
    ours(tf.constant(batch(SHAPE_4D, 0, "float32")), training=True)  # moves the statistics
    theirs = make_layer(
        SHAPE_4D, "float32", affine, seed=1, cls=keras.layers.BatchNormalization, name="bn"
    )
    assert [v.name for v in ours.weights] == [v.name for v in theirs.weights] == names
    assert [v.path for v in ours.weights] == [v.path for v in theirs.weights]

    fresh = make_layer(SHAPE_4D, "float32", affine, seed=2)
    for source, target in ((ours, theirs), (theirs, fresh)):
        assert not all(
            np.array_equal(s.numpy(), t.numpy())
            for s, t in zip(source.weights, target.weights, strict=True)
        )
        path = str(tmp_path / f"{type(source).__module__}.weights.h5")
        _in_a_model(source, SHAPE_4D).save_weights(path)
        _in_a_model(target, SHAPE_4D).load_weights(path)
        for s, t in zip(source.weights, target.weights, strict=True):
            np.testing.assert_array_equal(t.numpy(), s.numpy())


# ---------------------------------------------------------------------- synchronized
SYNC_SHAPE = (4, 3, 3, 5)  # the global batch: 2 images per replica
SYNC_HELPER = textwrap.dedent('''
    """Runs BatchNorm under MirroredStrategy on 2 logical CPUs; argv[1]: the .npz out."""
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from istanas_tf.batch_norm import BatchNorm

    shape = %(shape)r
    rng = np.random.default_rng(0)
    x = (2.0 + 3.0 * rng.normal(size=shape)).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    beta = rng.normal(0.0, 0.5, shape[-1]).astype(np.float32)
    half = shape[0] // 2
    out = {"x": x, "dy": dy, "gamma": gamma, "beta": beta}
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for synchronized in (True, False):
        with strategy.scope():
            layer = BatchNorm(momentum=0.9, epsilon=1e-5, synchronized=synchronized)
            layer.build(shape)
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)
        paths = []

        def replica(xs, dys):
            paths.append(layer.path(xs, True))
            with tf.GradientTape() as tape:
                tape.watch(xs)
                y = layer(xs, training=True)
            return (y, *tape.gradient(y, [xs, layer.gamma, layer.beta], output_gradients=dys))

        def halves(context):
            i = context.replica_id_in_sync_group
            return tf.constant(x[i * half:(i + 1) * half]), tf.constant(dy[i * half:(i + 1) * half])

        inputs = strategy.experimental_distribute_values_from_function(halves)
        results = tf.function(lambda a, b: strategy.run(replica, args=(a, b)))(*inputs)
        key = "sync" if synchronized else "local"
        y, dx, dgamma, dbeta = (
            [r.numpy() for r in strategy.experimental_local_results(t)] for t in results
        )
        out[key + "_path"] = np.array(sorted(set(paths)))
        out[key + "_y"], out[key + "_dx"] = np.concatenate(y), np.concatenate(dx)
        # Each replica's gradient of the shared gamma and beta; the optimizer sums them.
        out[key + "_dgamma"], out[key + "_dbeta"] = sum(dgamma), sum(dbeta)
        for name in ("moving_mean", "moving_variance"):
            # Keras' variable wraps a MirroredVariable: one copy per replica.
            mirrored = getattr(layer, name).value
            out[key + "_" + name] = np.stack(
                [v.numpy() for v in strategy.experimental_local_results(mirrored)])
    np.savez(sys.argv[1], **out)
''') % dict(shape=SYNC_SHAPE)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """The helper's record: one subprocess, ~9 s of CPU (TensorFlow's start dominates;
    18-35 s wall on a busy 2-core machine)."""
    folder = tmp_path_factory.mktemp("mirrored")
    script, record = folder / "helper.py", folder / "record.npz"
    script.write_text(SYNC_HELPER)
    subprocess.run(
        [sys.executable, str(script), str(record)],
        check=True,
        cwd=folder,
        env=this_checkout_env(),
        timeout=300,
    )
    with np.load(record) as arrays:
        return dict(arrays)


def test_synchronized_is_one_device_on_the_whole_batch(mirrored):
    """synchronized=True on two halves: the outputs, input gradients (through the
    all-reduce: each replica's dx includes the other replica's loss), summed
    gamma/beta gradients and running statistics of the whole batch, with the global
    n = 36 in the Bessel factor (the per-replica n = 18 would differ by 3 %)."""
    m = dict(mirrored)
    assert m["sync_path"].tolist() == ["synchronized"]
    # Both replicas' copies of the running statistics got the same (global) update.
    for name in ("moving_mean", "moving_variance"):
        copies = m.pop("sync_" + name)
        np.testing.assert_array_equal(copies[0], copies[1])
        m["sync_" + name] = copies[0]
    gamma, beta = m["gamma"].astype(np.float64), m["beta"].astype(np.float64)
    channels = SYNC_SHAPE[-1]
    y, mean, var = reference_forward(
        m["x"], gamma, beta, np.zeros(channels), np.ones(channels), True
    )
    dx, dgamma, dbeta = reference_gradients(
        m["x"], gamma, None, None, m["dy"].astype(np.float64), True
    )
    for name, expected in [
        ("y", y),
        ("dx", dx),
        ("dgamma", dgamma),
        ("dbeta", dbeta),
        ("moving_mean", mean),
        ("moving_variance", var),
    ]:
        assert_close(m["sync_" + name], expected, F32_RTOL, name)
    # And the same as one device (the fused kernel) on the whole batch.
    layer = make_layer(SYNC_SHAPE, "float32")
    layer.gamma.assign(m["gamma"])
    layer.beta.assign(m["beta"])
    y1, (dx1, dgamma1, dbeta1) = run(layer, m["x"], m["dy"], training=True)
    for name, expected in [("y", y1), ("dx", dx1), ("dgamma", dgamma1), ("dbeta", dbeta1)]:
        assert_close(m["sync_" + name], expected, F32_RTOL, f"{name} vs one device")
    assert_close(m["sync_moving_variance"], layer.moving_variance.numpy(), F32_RTOL, "var")


def test_unsynchronized_uses_each_replicas_statistics(mirrored):
    """synchronized=False: each half normalised with its own statistics (fused, n = 18
    in the Bessel factor). Each replica's copy of the running statistics keeps its own
    update: the copies diverge (reading the variable gives the first replica's). Keras'
    own layer assigns the same way, so this is how the networks behaved before too."""
    m = dict(mirrored)
    assert m["local_path"].tolist() == ["fused"]
    gamma, beta = m["gamma"].astype(np.float64), m["beta"].astype(np.float64)
    channels, half = SYNC_SHAPE[-1], SYNC_SHAPE[0] // 2
    for i in range(2):
        part = slice(i * half, (i + 1) * half)
        y, mean, var = reference_forward(
            m["x"][part], gamma, beta, np.zeros(channels), np.ones(channels), True
        )
        assert_close(m["local_y"][part], y, F32_RTOL, f"y of replica {i}")
        dx, _, _ = reference_gradients(m["x"][part], gamma, None, None, m["dy"][part], True)
        assert_close(m["local_dx"][part], dx, F32_RTOL, f"dx of replica {i}")
        assert_close(m["local_moving_mean"][i], mean, F32_RTOL, f"mean of replica {i}")
        assert_close(m["local_moving_variance"][i], var, F32_RTOL, f"var of replica {i}")
    assert not np.allclose(m["local_moving_mean"][0], m["local_moving_mean"][1])
