"""Numeric tests of the candidate ops against hand computations and a numpy reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from testing import OPS_WITH_BUILD, build_by_run, record_symbolic_builds, variables_by_creation

from istanas_tf import blocks, genotypes
from istanas_tf import operations as ops


def reference_conv(x, kernel, stride, dilation, depthwise):
    """Direct NHWC convolution with PyTorch's symmetric padding (k - 1) * d / 2.

    x: [H, W, C_in]; kernel: [k, k, C_in, C_out] (depthwise: [k, k, C, 1]).
    """
    k = kernel.shape[0]
    pad = (k - 1) * dilation // 2
    xp = np.pad(x, [(pad, pad), (pad, pad), (0, 0)])
    height = (x.shape[0] + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    width = (x.shape[1] + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    channels_out = x.shape[2] if depthwise else kernel.shape[3]
    out = np.zeros([height, width, channels_out])
    for i in range(height):
        for j in range(width):
            for a in range(k):
                for b in range(k):
                    pixel = xp[i * stride + a * dilation, j * stride + b * dilation]
                    if depthwise:
                        out[i, j] += pixel * kernel[a, b, :, 0]
                    else:
                        out[i, j] += pixel @ kernel[a, b]
    return out


@pytest.mark.parametrize(
    "kernel_size,stride,dilation,depthwise,size",
    [
        (3, 1, 1, False, 6),
        (3, 2, 1, False, 6),
        (3, 2, 1, False, 7),
        (5, 2, 1, True, 8),
        (3, 2, 2, True, 8),
        (5, 2, 2, True, 7),
        (3, 1, 2, True, 7),
        (5, 1, 2, True, 6),
    ],
)
def test_symmetric_conv_matches_pytorch_padding(kernel_size, stride, dilation, depthwise, size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=[1, size, size, 3]).astype(np.float32)
    layer = blocks.SymmetricConv(4, kernel_size, stride, dilation, depthwise=depthwise)
    y = layer(x).numpy()[0]
    kernel = layer.conv.weights[0].numpy()
    expected = reference_conv(
        x[0].astype(np.float64), kernel.astype(np.float64), stride, dilation, depthwise
    )
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_stride2_samples_pytorch_positions_not_tf_same():
    # A 1x1-centred delta kernel at stride 2 must return the even pixels (0, 2, 4, ...),
    # the centres symmetric padding gives; TF 'same' would return the odd ones.
    x = np.arange(36, dtype=np.float32).reshape([1, 6, 6, 1])
    layer = blocks.SymmetricConv(1, 3, stride=2)
    layer(x)
    kernel = np.zeros([3, 3, 1, 1], np.float32)
    kernel[1, 1] = 1.0
    layer.conv.kernel.assign(kernel)
    np.testing.assert_array_equal(layer(x).numpy()[0, :, :, 0], x[0, ::2, ::2, 0])


def test_avg_pool_corner_averages_the_four_valid_values():
    x = np.arange(16, dtype=np.float32).reshape([1, 4, 4, 1])
    y = ops.Pool("avg", stride=1)(x).numpy()[0, :, :, 0]
    # Corner (0, 0) window covers pixels (0,0),(0,1),(1,0),(1,1) = 0, 1, 4, 5 -> 2.5;
    # counting the 5 pad zeros would give 10 / 9.
    assert y[0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)
    # An edge pixel (0, 1) averages 6 valid values: 0+1+2+4+5+6 = 18 -> 3.
    assert y[0, 1] == pytest.approx(18 / 6)
    # Interior (1, 1): all 9 values 0,1,2,4,5,6,8,9,10 -> 5.
    assert y[1, 1] == pytest.approx(5.0)


def test_avg_pool_stride2_windows():
    x = np.arange(16, dtype=np.float32).reshape([1, 4, 4, 1])
    y = ops.Pool("avg", stride=2)(x).numpy()[0, :, :, 0]
    # Windows centred at (0,0), (0,2), (2,0), (2,2) of the symmetric padding.
    assert y.shape == (2, 2)
    assert y[0, 0] == pytest.approx(2.5)
    assert y[0, 1] == pytest.approx((1 + 2 + 3 + 5 + 6 + 7) / 6)
    assert y[1, 1] == pytest.approx((5 + 6 + 7 + 9 + 10 + 11 + 13 + 14 + 15) / 9)


def test_max_pool_border_never_returns_pad():
    # All values negative: a zero pad would win the max at every border pixel.
    x = -1.0 - np.arange(25, dtype=np.float32).reshape([1, 5, 5, 1])
    for stride in (1, 2):
        y = ops.Pool("max", stride=stride)(x).numpy()
        assert np.all(y < 0)
    y = ops.Pool("max", stride=1)(x).numpy()[0, :, :, 0]
    assert y[0, 0] == -1.0  # max of -1, -2, -6, -7
    assert y[4, 4] == -19.0  # max of -19, -20, -24, -25


def test_factorized_reduce_reads_shifted_input():
    x = np.random.default_rng(1).uniform(0.1, 1.0, size=[1, 6, 6, 2]).astype(np.float32)
    layer = ops.FactorizedReduce(4, affine=False)
    layer(x, training=False)
    identity = np.eye(2, dtype=np.float32).reshape([1, 1, 2, 2])
    layer.conv1.kernel.assign(identity)
    layer.conv2.kernel.assign(identity)
    y = layer(x, training=False).numpy()[0]
    scale = 1.0 / np.sqrt(1.0 + blocks.BN_EPSILON)  # fresh BN: mean 0, variance 1
    np.testing.assert_allclose(y[..., :2], x[0, ::2, ::2] * scale, rtol=1e-6)
    np.testing.assert_allclose(y[..., 2:], x[0, 1::2, 1::2] * scale, rtol=1e-6)


def test_batch_norm_uses_pytorch_eps_and_momentum():
    bn = blocks.batch_norm()
    assert bn.epsilon == 1e-5 and bn.momentum == 0.9
    bn_free = blocks.batch_norm(affine=False)
    bn_free.build((None, 4, 4, 3))
    assert bn_free.trainable_weights == []


C = 8


@pytest.mark.parametrize(
    "name,stride,options,expected",
    [
        # sep_conv kxk: 2 * (depthwise k*k*C + pointwise C*C + BN 2*C).
        ("sep_conv_3x3", 1, ops.OpOptions(), 2 * (9 * C + C * C + 2 * C)),
        ("sep_conv_5x5", 2, ops.OpOptions(), 2 * (25 * C + C * C + 2 * C)),
        # dil_conv kxk: depthwise k*k*C + pointwise C*C + BN 2*C.
        ("dil_conv_3x3", 1, ops.OpOptions(), 9 * C + C * C + 2 * C),
        ("dil_conv_5x5", 2, ops.OpOptions(), 25 * C + C * C + 2 * C),
        # skip at stride 2 = FactorizedReduce: two 1x1 convs C -> C/2, BN 2*C.
        ("skip_connect", 2, ops.OpOptions(), 2 * C * (C // 2) + 2 * C),
        ("skip_connect", 1, ops.OpOptions(), 0),
        ("skip_connect", 1, ops.OpOptions(bn_after_identity=True), 2 * C),
        ("max_pool_3x3", 2, ops.OpOptions(), 0),
        ("avg_pool_3x3", 1, ops.OpOptions(bn_after_pool=True), 2 * C),
        # Affine-free BN (two-stage super-net): only the conv kernels remain.
        ("sep_conv_3x3", 1, ops.OpOptions(affine=False), 2 * (9 * C + C * C)),
        ("max_pool_3x3", 1, ops.OpOptions(affine=False, bn_after_pool=True), 0),
    ],
)
def test_op_parameter_counts(name, stride, options, expected):
    layer = ops.make_op(name, C, stride, options)
    y = layer(tf.zeros([2, 8, 8, C]), training=True)
    assert y.shape == (2, 8 // stride, 8 // stride, C)
    assert sum(int(np.prod(w.shape)) for w in layer.trainable_weights) == expected


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", genotypes.PRIMITIVES)
def test_ops_build_by_channels_the_weights_keras_built_by_tracing(name, stride, monkeypatch):
    """``build`` creates every weight from the channel count: the same paths, creation
    order and seeded values as Keras' build by tracing ``call`` on symbolic inputs (what
    it did before the ops had a ``build``, and why a super-net took a minute to build),
    and no op is built that way any more."""
    options = ops.OpOptions(bn_after_pool=True, bn_after_identity=True)
    with monkeypatch.context() as patch:
        build_by_run(patch, *OPS_WITH_BUILD)
        keras.utils.set_random_seed(0)
        by_run = ops.make_op(name, C, stride, options)
        by_run(tf.zeros([1, 8, 8, C]))
    traced = record_symbolic_builds(monkeypatch)
    keras.utils.set_random_seed(0)
    by_shape = ops.make_op(name, C, stride, options)
    by_shape.build(ops.channels_shape(C))
    by_shape(tf.zeros([1, 8, 8, C]))
    assert traced == []
    built, expected = variables_by_creation(by_shape), variables_by_creation(by_run)
    assert built, "every op here has weights (BNs after pools and identity)"
    assert [path for path, _ in built] == [path for path, _ in expected]
    for (path, value), (_, expected_value) in zip(built, expected):
        np.testing.assert_array_equal(value, expected_value, err_msg=path)


@pytest.fixture
def float64_layers():
    """Layers made during the test compute and keep their variables in float64."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_dtype_policy(before)


class _SlicingFactorizedReduce(ops.FactorizedReduce):
    """FactorizedReduce as PyTorch writes it (and as it was here): two 1x1 convs on the
    stride-2 pixels and on those of ``x[:, 1:, 1:]``, concatenated; an odd size pads the
    shifted half with zeros at the bottom/right."""

    def call(self, x, training=None):
        x = tf.nn.relu(x)
        even, shifted = x[:, ::2, ::2, :], x[:, 1::2, 1::2, :]
        rows, columns = even.shape[1] - shifted.shape[1], even.shape[2] - shifted.shape[2]
        shifted = tf.pad(shifted, [[0, 0], [0, rows], [0, columns], [0, 0]])
        return self.bn(tf.concat([self.conv1(even), self.conv2(shifted)], -1), training=training)


@pytest.mark.parametrize("height, width", [(8, 8), (7, 9), (5, 4)])
def test_factorized_reduce_is_pytorchs_two_convs_in_one(height, width, monkeypatch, float64_layers):
    """One 2x2 stride-2 conv holding the two 1x1 convs' kernels: the same weights (paths,
    creation order, seeded values) as the version that called the convs and was built by
    running, and in float64 the same outputs, input and weight gradients, and BN
    statistics, even and odd sizes."""
    x = tf.random.stateless_normal([2, height, width, 3], seed=[1, 2], dtype=tf.float64)
    layers = []
    for cls in (ops.FactorizedReduce, _SlicingFactorizedReduce):
        with monkeypatch.context() as patch:
            if cls is _SlicingFactorizedReduce:
                build_by_run(patch, cls)
            keras.utils.set_random_seed(0)
            layer = cls(6, name="reduce")
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * tf.sin(y))
        weights = [layer.conv1.kernel, layer.conv2.kernel, layer.bn.gamma]
        layers.append((layer, [y, *tape.gradient(loss, [x, *weights])]))
    (layer, results), (oracle, expected) = layers
    built, reference = variables_by_creation(layer), variables_by_creation(oracle)
    assert [path for path, _ in built] == [path for path, _ in reference]
    assert results[0].shape == (2, (height + 1) // 2, (width + 1) // 2, 6)
    for value, oracle_value in zip(results, expected):
        np.testing.assert_allclose(value, oracle_value, rtol=1e-12, atol=1e-12)
    for (path, value), (_, oracle_value) in zip(built, reference):
        np.testing.assert_allclose(value, oracle_value, rtol=1e-12, atol=1e-14, err_msg=path)


def test_preprocessing_ops_build_without_tracing(monkeypatch):
    traced = record_symbolic_builds(monkeypatch)
    for layer in (ops.ReLUConvBN(C, affine=False), ops.FactorizedReduce(C)):
        layer(tf.zeros([1, 8, 8, 3]))
        assert layer.built and layer.last_bn.built
    assert traced == []


ALL_LAYERS = [
    blocks.SymmetricConv(4, 3, 2, 1, depthwise=False),
    ops.ReLUConvBN(4, 1, 1, affine=False),
    ops.SepConv(4, 5, 2, affine=True),
    ops.DilConv(4, 3, 1, 2, affine=False),
    ops.FactorizedReduce(4),
    ops.Pool("avg", 2, bn=True, affine=False),
    ops.Identity(bn=True),
    blocks.DropPath(seed=3),
]


@pytest.mark.parametrize("layer", ALL_LAYERS, ids=lambda layer: type(layer).__name__)
def test_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    x = np.random.default_rng(0).normal(size=[2, 8, 8, 4]).astype(np.float32)
    if not isinstance(layer, blocks.DropPath):
        y = layer(x)
        restored(x)
        restored.set_weights(layer.get_weights())
        np.testing.assert_allclose(restored(x), y, rtol=1e-6)


def test_drop_path_identity_at_inference_and_unbiased_in_training():
    x = tf.ones([20000, 1, 1, 1])
    layer = blocks.DropPath(seed=0)
    np.testing.assert_array_equal(layer(x, rate=0.3, training=False), x)
    y = layer(x, rate=0.3, training=True).numpy().ravel()
    # Each sample is either dropped (0) or scaled by 1 / 0.7.
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs(np.mean(y == 0) - 0.3) < 0.02
    assert abs(y.mean() - 1.0) < 0.03
    np.testing.assert_array_equal(layer(x, rate=0.0, training=True), x)


def test_ops_registry_matches_primitives_and_rejects_unknown():
    assert tuple(ops.OPS) == genotypes.PRIMITIVES
    with pytest.raises(ValueError, match="valid ops: max_pool_3x3"):
        ops.make_op("conv_7x1_1x7", 4, 1)


def test_factorized_reduce_rejects_odd_channels():
    with pytest.raises(ValueError, match="even output channel count.*got 5"):
        ops.FactorizedReduce(5)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("size", [7, 8])
def test_strided_pools_match_pytorch_reference(kind, size):
    # PyTorch MaxPool2d(3, 2, padding=1) / AvgPool2d(3, 2, 1, count_include_pad=False).
    x = np.random.default_rng(5).normal(size=[2, size, size, 3]).astype(np.float32)
    out = (size - 1) // 2 + 1
    expected = np.zeros([2, out, out, 3])
    for i in range(out):
        for j in range(out):
            rows = slice(max(2 * i - 1, 0), min(2 * i + 2, size))
            cols = slice(max(2 * j - 1, 0), min(2 * j + 2, size))
            window = x[:, rows, cols, :]
            expected[:, i, j] = (
                window.max(axis=(1, 2)) if kind == "max" else window.mean(axis=(1, 2))
            )
    np.testing.assert_allclose(ops.Pool(kind, stride=2)(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pointwise_conv_is_the_1x1_conv(dtype):
    """PointwiseConv's matrix product computes Conv2D's 1x1 conv with the same kernel
    (and gradients), on any batch and image size."""
    x = tf.random.stateless_normal([3, 5, 7, 6], [1, 2], dtype=dtype)
    pointwise = blocks.PointwiseConv(4, use_bias=False, dtype=dtype)
    conv = keras.layers.Conv2D(4, 1, use_bias=False, dtype=dtype)
    pointwise.build(x.shape)
    conv.build(x.shape)
    assert pointwise.kernel.shape == conv.kernel.shape == (1, 1, 6, 4)
    conv.kernel.assign(pointwise.kernel)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, reference = pointwise(x), conv(x)
    # Both sum 6 products per output; only the summation order may differ.
    tolerance = 1e-5 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(ours, reference, rtol=tolerance, atol=tolerance)
    for source in (x, pointwise.kernel):
        np.testing.assert_allclose(
            tape.gradient(ours, source),
            tape.gradient(reference, source if source is x else conv.kernel),
            rtol=tolerance,
            atol=tolerance,
        )


def test_drop_path_reads_a_variable_rate_without_a_cond():
    """A variable rate (the ramp) is read in the trace with no tf.cond around the work
    (the networks leave drop path out of the trace at rate 0 instead): at 0 the input
    passes bit for bit (x / 1), at 0.5 each sample is dropped or doubled. A Python 0
    does no work at all."""
    layer = blocks.DropPath(seed=5)
    x = tf.random.stateless_normal([4, 3, 3, 2], [3, 4])
    rate = tf.Variable(0.0)

    @tf.function
    def step(x):
        return layer(x, rate=rate, training=True)

    state = layer.seed_generator.state.numpy().copy()
    np.testing.assert_array_equal(layer(x, rate=0.0, training=True), x)
    np.testing.assert_array_equal(layer.seed_generator.state.numpy(), state)
    np.testing.assert_array_equal(step(x), x)
    graph_ops = {op.type for op in step.get_concrete_function(x).graph.get_operations()}
    assert not graph_ops & {"If", "StatelessIf"}, graph_ops
    rate.assign(0.5)
    dropped = step(x).numpy()
    # Each sample is either dropped (0) or kept and scaled by 1 / (1 - 0.5).
    for sample, original in zip(dropped, x.numpy()):
        assert np.array_equal(sample, 0 * original) or np.allclose(sample, 2 * original)


def test_drop_path_is_pytorchs_division_then_mask_bit_for_bit_in_one_pass():
    """Kept samples are x / keep and dropped ones the signed zeros of x / keep * 0, as
    PyTorch's ``x.div_(keep); x.mul_(mask)``, values and gradient bit for bit; traced,
    one op makes an x-sized result (not a division and a product)."""
    layer = blocks.DropPath(seed=7)
    x = tf.random.stateless_normal([64, 3, 3, 2], [5, 6])  # no exact zeros
    upstream = tf.random.stateless_normal(x.shape, [7, 8])

    @tf.function
    def forward_and_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, rate=0.3, training=True)
        return y, tape.gradient(y, x, output_gradients=upstream)

    y, dx = (t.numpy() for t in forward_and_gradient(x))
    kept = np.any(y != 0, axis=(1, 2, 3)).astype(np.float32)[:, None, None, None]
    assert 0 < kept.sum() < len(kept)
    keep = np.float32(1.0) - np.float32(0.3)
    expected = x.numpy() / keep * kept
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(expected))
    expected_dx = upstream.numpy() * kept / keep
    np.testing.assert_array_equal(dx, expected_dx)
    np.testing.assert_array_equal(np.signbit(dx), np.signbit(expected_dx))

    graph = (
        tf.function(lambda x: layer(x, rate=0.3, training=True))
        .get_concrete_function(tf.TensorSpec(x.shape))
        .graph
    )
    full_size = [
        op.type
        for op in graph.get_operations()
        if op.outputs
        and op.outputs[0].shape == x.shape
        and op.type not in ("Placeholder", "Identity")
    ]
    assert full_size == ["RealDiv"]
