"""BN absorption (docs/method.md section 4) and the one-stage super-net's frozen BN affines."""

import numpy as np
import pytest
import tensorflow as tf
from testing import CIFAR10_MEAN, CIFAR10_STD, candidate_bn_affine

from istanas_tf import absorption, data, network_size, optimizers, search_model
from istanas_tf.training import state

# C = 4, 5 cells (reductions at cells 1 and 3, auxiliary head after cell 3), 32x32.
TINY = dict(num_classes=10, channels=4, layers=5, seed=0, one_stage=True)
IMAGE_SIZE = 32


def _network(**overrides):
    network = search_model.SearchNetwork(search_model.SearchNetworkConfig(**{**TINY, **overrides}))
    network.build_all(IMAGE_SIZE)
    return network


def _compile(network):
    network.compile(
        optimizers.TorchSGD(0.05, momentum=0.9, l2=3e-4, clip_global_norm=5.0),
        optimizers.TorchAdam(3e-4, beta_1=0.5, l2=1e-3),
    )


@pytest.fixture(scope="module")
def cifar_batch(cifar10_folder):
    """8 real CIFAR-10 test images (one per class for 8 classes), normalised, labels."""
    classes = sorted(p.name for p in (cifar10_folder / "test").iterdir())[:8]
    images = [
        tf.io.decode_jpeg(
            tf.io.read_file(str(cifar10_folder / "test" / name / "0000.jpg")), channels=3
        )
        for name in classes
    ]
    images = data.normalize(tf.stack(images), CIFAR10_MEAN, CIFAR10_STD)
    assert images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    return images, tf.range(8)


def _batch_norm_variables(model):
    """Every BN layer's variables, {"gamma": ..., "moving_mean": ...}, found by path."""
    by_layer = {}
    for variable in model.variables:
        layer, name = variable.path.rsplit("/", 1)
        by_layer.setdefault(layer, {})[name] = variable
    return [v for v in by_layer.values() if "moving_mean" in v]


def _randomize_batch_norms(network, rng):
    """Non-trivial BN state everywhere: random gamma, beta and moving statistics."""
    for bn in _batch_norm_variables(network):
        channels = bn["moving_mean"].shape
        if "gamma" in bn:
            bn["gamma"].assign(rng.uniform(0.5, 1.5, channels))
            bn["beta"].assign(rng.normal(0.0, 0.2, channels))
        bn["moving_mean"].assign(rng.normal(0.0, 0.2, channels))
        bn["moving_variance"].assign(rng.uniform(0.5, 2.0, channels))


def _set_support(encoding, rng):
    """A random support per node with random signed z, and b = A_S z_S (alpha = z_S).

    The picks are ordered by descending |z| as support_tuple() orders them.
    """
    z = np.zeros(encoding.z.shape, np.float32)
    support = np.zeros(encoding.support.shape, np.int32)
    for j, n in enumerate(encoding.num_candidates):
        picks = rng.choice(n, size=encoding.sparseness, replace=False)
        values = rng.uniform(0.3, 1.5, encoding.sparseness) * rng.choice(
            [-1, 1], encoding.sparseness
        )
        order = np.argsort(-np.abs(values))
        support[j], z[j, picks] = picks[order], values
        encoding.b[j].assign(encoding.A[j].numpy()[:, picks] @ values)
    encoding.z.assign(z)
    encoding.support.assign(support)


@pytest.fixture(scope="module")
def one_stage_net():
    """Shared by the tests that leave every candidate BN frozen (building takes ~15 s)."""
    return _network()


def test_absorbed_network_equals_super_net_in_inference(one_stage_net, cifar_batch):
    network = one_stage_net
    images, _ = cifar_batch
    rng = np.random.default_rng(0)
    _randomize_batch_norms(network, rng)
    # A few training-mode passes move the moving statistics of the supported ops.
    for _ in range(3):
        network(images, training=True)
    signs = []
    for trial in range(4):
        if trial == 0:
            # A recovered support: random b, exact LASSO recovery.
            for encoding in network.architectures.values():
                for b in encoding.b:
                    b.assign(rng.normal(0.0, 1.0, b.shape))
            network.commit(network.recover())
        else:
            for encoding in network.architectures.values():
                _set_support(encoding, rng)
            assert network.sync_supports()
            # Move the statistics of the newly supported ops too.
            network(images, training=True)
        signs += [
            np.sign(a.numpy())
            for cell_type, arch in network.architectures.items()
            for a in arch.alphas(network.supports[cell_type])
        ]
        expected = network(images, training=False).numpy()
        evaluation = absorption.absorb(network)
        assert evaluation.genotype == network.genotype()
        assert evaluation.auxiliary_head is not None
        actual = evaluation(images, training=False).numpy()
        scale = np.abs(expected).max()
        assert scale > 1e-2  # non-trivial logits
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)
    # The auxiliary head (training only) is copied too.
    for source, target in zip(network.auxiliary_head.weights, evaluation.auxiliary_head.weights):
        np.testing.assert_array_equal(target.numpy(), source.numpy())
    # No architecture state is left: no A, b, z or support variable.
    assert not [
        v.path
        for v in evaluation.variables
        if v.name.startswith(("A_", "b_")) or v.name in ("z", "support")
    ]
    signs = np.concatenate(signs)
    assert (signs < 0).any() and (signs > 0).any()  # negative alpha folds exactly too


def test_absorption_refuses_the_two_stage_net():
    network = search_model.SearchNetwork(
        search_model.SearchNetworkConfig(num_classes=10, channels=4, layers=3)
    )
    with pytest.raises(ValueError, match="one-stage"):
        absorption.absorb(network)
    with pytest.raises(ValueError, match="one-stage search needs --method=ista"):
        search_model.SearchNetworkConfig(method="darts", one_stage=True).validate()


def test_frozen_bn_affines_get_no_update_but_batch_statistics_are_used(one_stage_net, cifar_batch):
    network = one_stage_net
    _compile(network)
    images, labels = cifar_batch
    frozen = network.frozen_bn_affine_variables()
    # Every candidate BN is frozen at first: nothing trainable among them.
    assert network.trainable_bn_affine_variables() == []
    assert {id(v) for v in frozen} == set().union(
        *(candidate_bn_affine(network, t, j) for t in ("normal", "reduce") for j in range(4))
    )
    frozen_before = [v.numpy().copy() for v in frozen]
    active_ops = [
        op
        for cell in network.cells
        for op in cell.active_ops(network.supports["reduce" if cell.reduction else "normal"])
    ]
    stats_before = [op.last_bn.moving_mean.numpy().copy() for op in active_ops]
    preprocess_gamma = network.cells[0].preprocess1.bn.gamma.numpy().copy()
    b_before = [v.numpy().copy() for v in network.architecture_variables]

    logs = network.train_step((images, labels))
    assert np.isfinite(float(logs["loss"]))

    for v, before in zip(frozen, frozen_before):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    # The BNs outside candidate ops (preprocessing) train; b trains.
    assert not np.array_equal(network.cells[0].preprocess1.bn.gamma.numpy(), preprocess_gamma)
    assert all(
        not np.array_equal(v.numpy(), b) for v, b in zip(network.architecture_variables, b_before)
    )
    # Batch statistics are still used: moving statistics moved, and training-mode
    # outputs differ from inference-mode outputs.
    assert any(
        not np.array_equal(op.last_bn.moving_mean.numpy(), before)
        for op, before in zip(active_ops, stats_before)
    )
    train_logits, aux_logits = network(images, training=True)
    assert aux_logits.shape == (8, 10)
    infer_logits = network(images, training=False)
    assert np.abs(train_logits.numpy() - infer_logits.numpy()).max() > 1e-3


def test_unfreeze_node_and_freeze_node(cifar_batch):
    network = _network()
    _compile(network)
    images, labels = cifar_batch
    network.unfreeze_node("normal", 1)
    trainable = {id(v) for v in network.trainable_bn_affine_variables()}
    # Node 1 reads 3 states x 7 ops; in a normal cell these hold 9 BNs per state (pools 1
    # each, identity 1, sep convs 2 each, dil convs 1 each): 27 BNs, 54 variables per cell,
    # in the 3 normal cells (0, 2, 4) of 5: 162 variables.
    assert trainable == candidate_bn_affine(network, "normal", 1)
    assert len(trainable) == 162
    frozen = {id(v) for v in network.frozen_bn_affine_variables()}
    assert not trainable & frozen

    # Put a sep_conv_3x3 on s0 into node 1 of the normal cells, then train one step.
    encoding = network.architectures["normal"]
    support = encoding.support.numpy()
    support[1] = (3, 4)  # predecessor 0: sep_conv_3x3 and sep_conv_5x5
    support[0] = (3, 4)
    encoding.support.assign(support)
    assert network.sync_supports()
    node1 = [
        network.cells[0].candidates[1][3].bn2.gamma,
        network.cells[0].candidates[1][3].bn1.beta,
    ]
    node0 = [
        network.cells[0].candidates[0][3].bn2.gamma,
        network.cells[0].candidates[0][3].bn1.beta,
    ]
    before = [v.numpy().copy() for v in node1 + node0]
    network.train_step((images, labels))
    after = [v.numpy() for v in node1 + node0]
    assert all(not np.array_equal(a, b) for a, b in zip(after[:2], before[:2]))
    for a, b in zip(after[2:], before[2:]):
        np.testing.assert_array_equal(a, b)

    # freeze_node (docs/method.md section 4): b stops training, BN affines unfreeze.
    network.freeze_node("reduce", 2)
    assert network.frozen_nodes["reduce"] == (False, False, True, False)
    assert network.frozen_nodes["normal"] == (False,) * 4
    assert {id(v) for v in network.trainable_bn_affine_variables()} == candidate_bn_affine(
        network, "normal", 1
    ) | candidate_bn_affine(network, "reduce", 2)
    reduce_b = network.architectures["reduce"].b
    assert id(reduce_b[2]) not in {id(v) for v in network.active_architecture_variables()}
    before = [b.numpy().copy() for b in reduce_b]
    network.train_step((images, labels))
    np.testing.assert_array_equal(reduce_b[2].numpy(), before[2])
    assert not np.array_equal(reduce_b[0].numpy(), before[0])

    # The flags are checkpointed state (docs/design.md decision 3): a network restored from
    # the variables a checkpoint holds (by path) re-syncs to the same frozen nodes.
    saved = state.variables_by_path(network.variables)
    flags = ("normal_frozen", "normal_bn_trainable", "reduce_frozen", "reduce_bn_trainable")
    assert set(flags) <= {path.split("/")[-1] for path in saved}
    restored = search_model.SearchNetwork(network.config, name=network.name)
    for variable in restored.variables:  # built later: the architecture state and flags
        if "seed_generator" not in variable.path:  # drop path noise: numbered per process
            variable.assign(saved[variable.path])
    assert restored.sync_supports()
    assert restored.frozen_nodes == network.frozen_nodes
    assert restored.supports == network.supports
    with pytest.raises(ValueError, match="unknown cell type"):
        network.unfreeze_node("stem", 0)
    with pytest.raises(ValueError, match="one-stage"):
        search_model.SearchNetwork(
            search_model.SearchNetworkConfig(channels=4, layers=3)
        ).unfreeze_node("normal", 0)


def test_imagenet_super_net_trains_and_absorbs_into_network_imagenet():
    """The ImageNet-shaped super-net (NetworkImageNet's stems of stride 8, FactorizedReduce
    in the first cell, ImageNet auxiliary head) at C = 4, 3 cells and 224x224 images: one
    one-stage step with label smoothing, then the absorbed NetworkImageNet equals it in
    inference, and its sizes equal the super-net's per-support counts."""
    config = {**TINY, "family": "imagenet", "layers": 3, "num_classes": 5}
    network = search_model.SearchNetwork(search_model.SearchNetworkConfig(**config))
    network.build_all(224)
    network.compile(
        optimizers.TorchSGD(0.05, momentum=0.9, l2=3e-5, clip_global_norm=5.0),
        optimizers.TorchAdam(3e-4, beta_1=0.5, l2=1e-3),
        label_smoothing=0.1,
    )
    assert [layer.name for layer in network.stem_layers][::2] == [
        "stem0_conv1",
        "stem0_conv2",
        "stem1_conv",
    ]
    assert network.cells[0].reduction_prev  # s0 has twice s1's resolution
    images = tf.random.stateless_normal([2, 224, 224, 3], seed=(1, 2))
    labels = tf.constant([0, 3])
    logs = network.train_step((images, labels))
    assert np.isfinite(float(logs["loss"]))
    # The smoothed cross-entropy of the logits, by hand (label smoothing 0.1, 5 classes).
    logits = network(images, training=False).numpy().astype(np.float64)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    targets = np.full((2, 5), 0.1 / 5)
    targets[[0, 1], labels.numpy()] += 0.9
    network.reset_metrics()
    loss = float(network.test_step((images, labels))["loss"])
    assert loss == pytest.approx(-(targets * log_p).sum(axis=1).mean(), rel=1e-5)

    rng = np.random.default_rng(3)
    _randomize_batch_norms(network, rng)
    for encoding in network.architectures.values():
        _set_support(encoding, rng)
    network.sync_supports()
    network(images, training=True)  # moving statistics of the supported ops
    expected = network(images, training=False).numpy()
    evaluation = absorption.absorb(network, 224)
    assert type(evaluation).__name__ == "NetworkImageNet"
    assert evaluation.genotype == network.genotype()
    actual = evaluation(images, training=False).numpy()
    scale = np.abs(expected).max()
    assert scale > 1e-2
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)
    _, aux_logits = evaluation(images, training=True)  # the ImageNet head, copied
    assert aux_logits.shape == (2, 5) and evaluation.auxiliary_head.imagenet
    assert network.evaluation_parameter_count() == network_size.count_parameters(evaluation)
    assert network.evaluation_multiply_adds() == network_size.count_multiply_adds(evaluation, 224)
