"""The sparse super-net: only supported ops run, alpha weighting, steps, DARTS baseline."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from testing import OPS_WITH_BUILD, build_by_run, record_symbolic_builds, variables_by_creation

from istanas_tf import cells, genotypes, networks, optimizers, search_model

TINY = dict(num_classes=10, channels=4, layers=3, seed=0)


def _network(**overrides):
    config = search_model.SearchNetworkConfig(**{**TINY, **overrides})
    network = search_model.SearchNetwork(config)
    network.build_all(8)
    return network


def _compile(network):
    network.compile(
        optimizers.TorchSGD(0.05, momentum=0.9, l2=3e-4, clip_global_norm=5.0),
        optimizers.TorchAdam(6e-4, beta_1=0.5, l2=1e-3),
    )


def test_compile_releases_cached_kernels_once_every_variable_exists(monkeypatch):
    """Creating variables caches kernels nothing runs again (initializers; the
    VarHandleOp of any variable with its own TF name); compile releases them after the
    last variable (slots, metrics)."""
    network = _network()
    weights = optimizers.TorchSGD(0.05, momentum=0.9)
    arch = optimizers.TorchAdam(6e-4, beta_1=0.5)
    count = lambda: len(network.variables) + len(weights.variables) + len(arch.variables)
    released_at = []
    monkeypatch.setattr(networks, "release_cached_kernels", lambda: released_at.append(count()))
    network.compile(weights, arch)
    assert released_at == [count()] and len(weights.variables) > len(network.weight_variables)


def test_weights_and_slots_share_one_tf_name_so_one_eager_kernel():
    """A TF-level name per variable would cost a kernel per variable (its VarHandleOp's
    debug_name) and ~1 ms to make it: the super-net's weights, made in its constructor
    and build_all, and both optimizers' slots all carry the same one. Keras paths, the
    checkpoint keys, stay distinct."""
    network = _network()
    weights, arch = optimizers.TorchSGD(0.05, momentum=0.9), optimizers.TorchAdam(6e-4)
    network.compile(weights, arch)
    slots = weights.momentums + arch.first_moments + arch.second_moments
    assert {v.value.name for v in network.weights + slots} == {"Variable:0"}
    assert len({v.path for v in network.weights}) == len(network.weights) > 100
    # The scope ends with the build: a variable made afterwards keeps its name.
    assert tf.Variable(1.0, name="after").name == "after:0"


def test_every_candidate_op_has_weights_but_only_the_support_gets_gradients():
    network = _network()
    cell = network.cells[0]
    # Node j holds 7 * (j + 2) candidates: 14 + 21 + 28 + 35 = 98 ops per cell.
    assert sum(len(node_ops) for node_ops in cell.candidates) == 98
    assert all(op.built for node_ops in cell.candidates for op in node_ops)
    images = tf.random.normal([2, 8, 8, 3])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(network(images, training=True))
    grads = tape.gradient(loss, network.weight_variables)
    with_grad = {id(v) for v, g in zip(network.weight_variables, grads) if g is not None}
    active = {id(v) for v in network.active_weight_variables()}
    assert with_grad <= active
    # Two ops per node: far fewer variables than the whole super-net.
    assert len(active) < 0.3 * len(network.weight_variables)
    # And exactly the ops of the support: each supported conv op contributes.
    for c in network.cells:
        cell_type = "reduce" if c.reduction else "normal"
        assert len(c.active_ops(network.supports[cell_type])) == 4 * 2


def test_build_all_creates_what_a_dense_forward_did_without_running_any_op(monkeypatch):
    """build_all creates every weight from the cells' channel schedule: the same paths,
    creation order and seeded values as the dense forward pass through every candidate
    op it replaced (with the auxiliary head), and the same first architecture; it runs
    no cell and traces no layer's call. The one-stage net: affine BNs, BNs after pools
    and identities, the auxiliary head (which needs 8x8 inputs, so 32x32 images)."""
    config = search_model.SearchNetworkConfig(**{**TINY, "channels": 2, "one_stage": True})
    image_size = 32
    every_candidate = {
        t: tuple(tuple(range(genotypes.num_candidates(j))) for j in range(genotypes.STEPS))
        for t in genotypes.CELL_TYPES
    }
    ones = {
        t: [tf.ones([genotypes.num_candidates(j)]) for j in range(genotypes.STEPS)]
        for t in genotypes.CELL_TYPES
    }
    images = tf.zeros([1, image_size, image_size, 3])
    with monkeypatch.context() as patch:
        # The old build_all: cells and ops without build, one forward through them all.
        patch.setattr(cells.SearchCell, "build", lambda cell, *args, **kwargs: None)
        build_by_run(patch, networks.AuxiliaryHead, *OPS_WITH_BUILD)
        keras.utils.set_random_seed(0)
        dense = search_model.SearchNetwork(config, name="network")
        dense._forward(images, every_candidate, ones, training=False, auxiliary=True)
    dense.commit(dense.recover())

    keras.utils.set_random_seed(0)
    network = search_model.SearchNetwork(config, name="network")
    traced = record_symbolic_builds(monkeypatch)
    calls = []
    original_call = cells.SearchCell.call
    monkeypatch.setattr(cells.SearchCell, "call", lambda cell, *a, **k: calls.append(cell.name))
    network.build_all(image_size)
    assert traced == [] and calls == []
    monkeypatch.setattr(cells.SearchCell, "call", original_call)

    built, expected = variables_by_creation(network), variables_by_creation(dense)
    # Keras numbers the drop path seed generators of the second network on.
    unnumbered = lambda path: re.sub(r"seed_generator_\d+", "seed_generator", path)
    assert [unnumbered(path) for path, _ in built] == [unnumbered(path) for path, _ in expected]
    for (path, value), (_, dense_value) in zip(built, expected):
        np.testing.assert_array_equal(value, dense_value, err_msg=path)
    assert network.supports == dense.supports
    assert network(images).shape == (1, 10)


def test_train_step_updates_b_and_supported_weights_only():
    network = _network()
    _compile(network)
    b_before = [v.numpy().copy() for v in network.architecture_variables]
    all_before = {id(v): v.numpy().copy() for v in network.weight_variables}
    active = {id(v) for v in network.active_weight_variables()}
    batch = (
        (tf.random.normal([4, 8, 8, 3], seed=4), tf.constant([0, 1, 2, 3])),
        (tf.random.normal([4, 8, 8, 3], seed=5), tf.constant([4, 5, 6, 7])),
    )
    logs = network.train_step(batch)
    assert np.isfinite(float(logs["loss"])) and np.isfinite(float(logs["arch_loss"]))
    assert any(
        not np.array_equal(v.numpy(), b) for v, b in zip(network.architecture_variables, b_before)
    )
    for v in network.weight_variables:
        changed = not np.array_equal(v.numpy(), all_before[id(v)])
        if id(v) not in active:
            assert not changed, v.path
    assert any(
        not np.array_equal(v.numpy(), all_before[id(v)])
        for v in network.weight_variables
        if id(v) in active
    )


@pytest.mark.parametrize("method", ["ista", "darts"])
def test_each_step_traces_gradients_only_toward_what_it_trains(method):
    """The architecture step's tape watches only the architecture variables, the weight
    step's only the active weights. Watching every variable read, each step also traced
    the other's gradients (grappler pruned them only at the first call): the
    architecture step the 1x1 kernels' (a MatMul with ``transpose_a``), the weight step
    the node weights' (each Unpack's gradient, a Pack)."""
    network = _network(method=method)
    _compile(network)
    batch = (
        (tf.random.normal([4, 8, 8, 3], seed=4), tf.constant([0, 1, 2, 3])),
        (tf.random.normal([4, 8, 8, 3], seed=5), tf.constant([4, 5, 6, 7])),
    )
    graph = tf.function(network.train_step).get_concrete_function(batch).graph
    operations = graph.get_operations()
    # Gradient ops are named after their forward op's scope: the network's call in the
    # architecture step, then its call in the weight step (each splits the node weights).
    forward_scopes = list(
        dict.fromkeys(op.name.split("/")[0] for op in operations if op.type == "Unpack")
    )
    assert len(forward_scopes) == 2
    arch_backward, weight_backward = (f"gradient_tape/{scope}/" for scope in forward_scopes)

    def kernel_gradients(scope):
        return [
            op.name
            for op in operations
            if op.type == "MatMul" and op.get_attr("transpose_a") and op.name.startswith(scope)
        ]

    def node_weight_gradients(scope):
        pattern = re.compile(re.escape(scope) + r"stack(_\d+)?$")
        return [op.name for op in operations if op.type == "Pack" and pattern.match(op.name)]

    assert kernel_gradients(weight_backward) and not kernel_gradients(arch_backward)
    assert len(node_weight_gradients(arch_backward)) == 2 * genotypes.STEPS
    assert not node_weight_gradients(weight_backward)


def test_recover_changes_support_when_b_moves_and_genotype_has_two_picks_per_node():
    network = _network()
    genotype = network.genotype()
    assert len(genotype.normal) == len(genotype.reduce) == 8
    encoding = network.architectures["normal"]
    target = 5  # node 0, predecessor 0, op sep_conv_5x5
    encoding.b[0].assign(encoding.A[0].numpy()[:, target] * 0.5)
    network.commit(network.recover())
    assert target in network.supports["normal"][0]


def test_fista_recovery_gives_a_genotype_and_reports_how_close_it_came():
    network = _network(recovery_solver="fista", recovery_iterations=5000)
    recoveries = network.recover()
    for recovery in recoveries.values():
        assert recovery.kkt_violation.shape == (4,) and recovery.certified.shape == (4,)
        # Far from exact (a KKT miss of a few percent of lam), but never reported as
        # certified unless the picks are provably the exact ones.
        assert np.all(recovery.kkt_violation.numpy() < 1.0)
    network.commit(recoveries)
    genotype = network.genotype()
    assert len(genotype.normal) == len(genotype.reduce) == 8
    exact = network.architectures["normal"].solve()
    for node, flag in enumerate(recoveries["normal"].certified.numpy()):
        if flag:
            assert set(recoveries["normal"].support[node].numpy()) == set(
                exact.support[node].numpy()
            )


def test_darts_top2_rule_on_hand_set_logits():
    network = _network(method="darts")
    arch = network.architectures["normal"]
    logits = [np.zeros((j + 2, 7), np.float32) for j in range(4)]
    logits[0][1, 3] = 5.0  # edge s1: sep_conv_3x3 strongest overall
    logits[0][0, 6] = 2.0  # edge s0: dil_conv_5x5
    for j in range(1, 4):
        logits[j][j + 1, 0] = 4.0  # previous node, max_pool_3x3
        logits[j][0, 2] = 3.0  # s0, skip_connect
    for variable, value in zip(arch.logits, logits):
        variable.assign(value)
    picks = network.genotype().normal
    assert picks[:2] == (("sep_conv_3x3", 1), ("dil_conv_5x5", 0))
    assert picks[2:4] == (("max_pool_3x3", 2), ("skip_connect", 0))
    # DARTS weights every candidate: the whole super-net is active.
    assert len(network.active_weight_variables()) == len(network.weight_variables)


def test_bad_config_names_the_flag():
    with pytest.raises(ValueError, match="--method='enas' is not valid"):
        search_model.SearchNetworkConfig(method="enas").validate()
    with pytest.raises(ValueError, match="--init_channels must be an even number"):
        search_model.SearchNetworkConfig(channels=5).validate()
    with pytest.raises(ValueError, match="--layers must be at least 3"):
        search_model.SearchNetworkConfig(layers=2).validate()
    with pytest.raises(ValueError, match="--recovery_solver='lars' is not valid"):
        search_model.SearchNetworkConfig(recovery_solver="lars").validate()


@pytest.mark.parametrize("method", ["ista", "darts"])
def test_node_weights_are_split_once_for_all_cells_of_their_type(method):
    """Each node's weights become scalars once per cell type (an Unpack, whose gradient
    is one Pack), not sliced per op and cell (a strided slice and ~8 gradient ops each:
    10 % of the sparse step's graph). The traced forward and gradient slice no weight in
    any cell, and every architecture variable still gets a gradient."""
    network = _network(method=method)
    images = tf.random.stateless_normal([2, 8, 8, 3], [1, 2])
    # Not the logits' plain sum: its gradient nearly cancels (softmax-free, ~1e-7 noise).
    projection = tf.random.stateless_normal([2, 10], [3, 4])
    variables = network.architecture_variables

    @tf.function
    def gradients(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(network(images, training=True) * projection)
        return tape.gradient(loss, variables)

    graph = gradients.get_concrete_function(tf.TensorSpec(images.shape)).graph
    # Ops of the cells themselves (not of their candidate ops' layers).
    cell_level = re.compile(r"/cell\d+(_\d+)?/[^/]+$")
    in_cells = [op for op in graph.get_operations() if cell_level.search(op.name)]
    assert in_cells and not [op.name for op in in_cells if op.type.startswith("StridedSlice")]
    unpacks = [op for op in graph.get_operations() if op.type == "Unpack"]
    assert len(unpacks) == 2 * genotypes.STEPS  # per node of each cell type
    for gradient in gradients(images):  # every node weight still reaches the loss
        assert np.all(np.isfinite(gradient)) and np.any(gradient != 0)
