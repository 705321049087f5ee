"""Evaluation networks: auxiliary head, config round trip, refused settings."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from testing import record_symbolic_builds

from istanas_tf import genotypes, networks, optimizers


def test_auxiliary_logits_only_in_training():
    network = networks.build_network("cifar", "DARTS_V1", 8, 5, 10, 32, auxiliary=True)
    x = tf.random.normal([2, 32, 32, 3])
    logits, aux_logits = network(x, training=True)
    assert logits.shape == (2, 10) and aux_logits.shape == (2, 10)
    inference = network(x, training=False)
    assert isinstance(inference, tf.Tensor) and inference.shape == (2, 10)
    without_head = networks.build_network("cifar", "DARTS_V1", 8, 5, 10, 32)
    assert isinstance(without_head(x, training=True), tf.Tensor)


def test_evaluation_networks_build_without_tracing_any_layer(monkeypatch):
    """Every layer with sublayers (ops, cells, auxiliary head) has a ``build``: Keras
    never traces a call on symbolic inputs to build one."""
    traced = record_symbolic_builds(monkeypatch)
    networks.build_network(
        "cifar", "DARTS_V2", 4, 5, 10, 32, auxiliary=True, bn_after_param_free_ops=True
    )
    networks.build_network("imagenet", "ISTA_onestage", 4, 3, 10, 224, auxiliary=True)
    assert traced == []


def _built_by_forward_passes(kind, genotype, channels, cells, classes, size, **kwargs):
    """The oracle: weights created by running the network, the head by a training pass."""
    network = networks.NETWORKS[kind](genotype, channels, cells, classes, **kwargs)
    network(tf.zeros([1, size, size, 3]), training=False)
    network(tf.zeros([2, size, size, 3]), training=True)
    return network


@pytest.mark.parametrize(
    "args",
    [("cifar", "ISTA_twostage", 4, 5, 10, 32), ("imagenet", "ISTA_onestage", 4, 3, 10, 224)],
    ids=["cifar", "imagenet"],
)
def test_built_network_starts_from_pytorchs_state(args):
    """build_network runs nothing: every BN's running mean is 0 and variance 1 (a
    training pass would leave 0.9), the drop-path noise is where it started, and the
    weights have the paths, order and initial values of a network built by running
    it (paths are checkpoint keys)."""
    kwargs = dict(auxiliary=True, drop_path_rate=0.2, seed=3)
    keras.utils.set_random_seed(7)
    built = networks.build_network(*args, **kwargs)
    keras.utils.set_random_seed(7)
    oracle = _built_by_forward_passes(*args, **kwargs)

    def by_path(network):
        return {v.path.replace(network.name + "/", "", 1): v for v in network.weights}

    built_paths, oracle_paths = by_path(built), by_path(oracle)
    assert list(built_paths) == list(oracle_paths)
    running = [p for p in built_paths if p.endswith(("moving_mean", "moving_variance"))]
    assert len(running) > 20
    for path in running:
        expected = 0.0 if path.endswith("moving_mean") else 1.0
        np.testing.assert_array_equal(built_paths[path].numpy(), expected, err_msg=path)
    assert np.any(oracle_paths[running[1]].numpy() != 1.0)  # the oracle's pass moved it
    for path, variable in built_paths.items():
        if path not in running:
            np.testing.assert_array_equal(variable.numpy(), oracle_paths[path].numpy(), path)
    fresh = networks.NETWORKS[args[0]](*args[1:5], **kwargs)
    for drop_path, unused in zip(_drop_paths(built), _drop_paths(fresh), strict=True):
        np.testing.assert_array_equal(
            drop_path.seed_generator.state.numpy(), unused.seed_generator.state.numpy()
        )


def _drop_paths(network):
    return [layer for cell in network.cells for layer in cell.drop_paths]


def test_compile_releases_cached_kernels_after_the_slots(monkeypatch):
    network = networks.build_network("cifar", "DARTS_V2", 4, 3, 10, 32, auxiliary=True)
    optimizer = optimizers.TorchSGD(0.05, momentum=0.9)
    count = lambda: len(network.variables) + len(optimizer.variables)
    released_at = []
    monkeypatch.setattr(networks, "release_cached_kernels", lambda: released_at.append(count()))
    network.compile(optimizer)
    assert released_at == [count()] and len(optimizer.variables) > len(network.trainable_weights)


def test_evaluation_weights_and_slots_share_one_tf_name():
    """See search_model_test: one VarHandleOp kernel for all of them; paths distinct."""
    network = networks.build_network("cifar", "DARTS_V2", 4, 3, 10, 32, auxiliary=True)
    optimizer = optimizers.TorchSGD(0.05, momentum=0.9)
    network.compile(optimizer)
    built = [v for v in network.weights if v.path != f"{network.name}/drop_path_rate"]
    assert {v.value.name for v in built + optimizer.momentums} == {"Variable:0"}
    assert len({v.path for v in network.weights}) == len(network.weights)


def test_cached_kernels_are_released_without_touching_variables_or_traces():
    """The real release: a built network's weights, and a step traced before it, are
    the same after it."""
    network = networks.build_network("cifar", "DARTS_V2", 4, 3, 10, 32)
    images = tf.random.stateless_normal([2, 32, 32, 3], seed=[1, 2])
    forward = tf.function(lambda x: network(x, training=False))
    traced, eager = forward(images).numpy(), network(images, training=False).numpy()
    weights = [w.numpy() for w in network.weights]
    networks.release_cached_kernels()
    np.testing.assert_array_equal(forward(images).numpy(), traced)
    np.testing.assert_array_equal(network(images, training=False).numpy(), eager)
    for variable, value in zip(network.weights, weights, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_network_config_round_trip():
    network = networks.build_network(
        "cifar", "ISTA_twostage", 8, 5, 10, 32, auxiliary=True, drop_path_rate=0.1
    )
    clone = networks.NetworkCIFAR.from_config(network.get_config())
    clone(tf.zeros([1, 32, 32, 3]))
    clone(tf.zeros([2, 32, 32, 3]), training=True)
    clone.set_weights(network.get_weights())
    x = tf.random.normal([2, 32, 32, 3])
    np.testing.assert_allclose(
        clone(x, training=False), network(x, training=False), rtol=1e-5, atol=1e-5
    )
    assert clone.genotype == network.genotype


def test_fewer_than_three_layers_is_refused():
    with pytest.raises(ValueError, match="layers must be at least 3.*got 2"):
        networks.NetworkCIFAR("DARTS_V2", 16, 2, 10)


def test_unknown_genotype_name_lists_valid_names():
    with pytest.raises(genotypes.GenotypeError, match="valid names: ISTA_twostage"):
        networks.NetworkCIFAR("ISTA_threestage", 16, 8, 10)


def test_a_saved_keras_file_loads_the_network_compiled_and_training_goes_on_alike(tmp_path):
    """``model.save("x.keras")`` and ``keras.models.load_model``: the same outputs, and a
    compiled network comes back compiled (Keras only warns and drops the optimizer of a
    model whose ``compile`` is its own unless it says how to recompile): the PyTorch-rule
    optimizer with its settings, step count and momentum slots, the loss recipe, and a
    next step that moves every weight exactly as the original's next step does."""
    images = tf.random.stateless_normal([2, 32, 32, 3], [1, 2])
    labels = tf.constant([1, 3])
    uncompiled = networks.build_network("cifar", "ISTA_twostage", 4, 3, 10, 32, seed=0)
    uncompiled.save(tmp_path / "uncompiled.keras")
    loaded = keras.models.load_model(tmp_path / "uncompiled.keras")
    np.testing.assert_array_equal(loaded(images), uncompiled(images))
    assert not loaded.compiled

    network = networks.build_network("cifar", "ISTA_twostage", 4, 3, 10, 32, auxiliary=True, seed=0)
    network.compile(
        optimizers.TorchSGD(0.1, momentum=0.9, l2=3e-4, clip_global_norm=5.0),
        auxiliary_weight=0.3,
        label_smoothing=0.1,
    )
    network.train_step((images, labels))
    network.save(tmp_path / "compiled.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "compile() was not called ..."
        loaded = keras.models.load_model(tmp_path / "compiled.keras")
    np.testing.assert_array_equal(loaded(images), network(images))
    assert isinstance(loaded.optimizer, optimizers.TorchSGD)
    assert loaded.optimizer.get_config() == network.optimizer.get_config()
    assert (loaded.auxiliary_weight, loaded.label_smoothing) == (0.3, 0.1)
    assert int(loaded.optimizer.iterations.numpy()) == 1
    assert np.abs(network.optimizer.momentums[0].numpy()).max() > 0
    for saved, restored in zip(
        network.optimizer.variables, loaded.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(restored, saved)
    network.train_step((images, labels))
    loaded.train_step((images, labels))
    for saved, restored in zip(network.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(restored, saved)


def _drop_path_divisions(network, x):
    """The divisions drop path makes in the traced training forward pass (named by its
    layers), and the values the pass returns."""
    forward = tf.function(lambda images: network(images, training=True))
    graph = forward.get_concrete_function(x).graph
    divisions = [
        op for op in graph.get_operations() if op.type == "RealDiv" and "drop_path" in op.name
    ]
    return divisions, forward(x)


def test_a_rate_crossing_zero_says_the_traced_steps_are_stale():
    """At rate 0 the trace holds no drop path at all (no division, no mask drawn); above
    0 one division per dropped path reads the variable, so the ramp needs no new
    trace; set_drop_path_rate says when the rate crossed 0."""
    network = networks.build_network("cifar", "DARTS_V1", 4, 3, 10, 8)
    x = tf.random.stateless_normal([2, 8, 8, 3], [0, 1])
    assert network.drop_path_traced  # until told, the trace reads the variable
    divisions = len(_drop_path_divisions(network, x)[0])
    assert divisions > 0

    assert network.set_drop_path_rate(0.0)  # stale: the drop path leaves the trace
    states = [p.seed_generator.state.numpy().copy() for p in _drop_paths(network)]
    assert _drop_path_divisions(network, x)[0] == []
    for path, state in zip(_drop_paths(network), states):
        np.testing.assert_array_equal(path.seed_generator.state.numpy(), state)

    assert network.set_drop_path_rate(0.2)  # stale again: back in
    assert not network.set_drop_path_rate(0.3)  # the ramp: same trace
    assert float(network.drop_path_rate.numpy()) == pytest.approx(0.3)
    assert len(_drop_path_divisions(network, x)[0]) == divisions
