"""Every class registered under ``istanas_tf`` against the Keras layer contract.

Each registered class has at least one :class:`testing.LayerCase` here, run through
:func:`testing.run_layer_test` (config round trips, weight counts, a clone's outputs, one
training step). The registry is discovered, not listed: a new registered class without a
case fails ``test_every_registered_class_has_a_case``, and a new public Keras class that
is not registered fails ``test_every_keras_class_is_registered``. The last tests feed the
harness deliberately broken layers, to show that each of its checks can fail.
"""

import importlib
import inspect
import itertools
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from testing import LayerCase, run_layer_test

import istanas_tf
from istanas_tf import (
    architecture,
    batch_norm,
    blocks,
    cells,
    darts,
    genotypes,
    networks,
    optimizers,
    search_model,
)
from istanas_tf import operations as ops

NUM_OPS = genotypes.NUM_OPS
BATCH = 2


def _images(height, width, channels, seed=0):
    """A small batch of N(0, 1) inputs, NHWC float32."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(BATCH, height, width, channels)).astype(np.float32)


# ---------------------------------------------------------------------- search cells
# Flat candidate indices (predecessor * 7 + op) per node. In a reduction cell: node 0
# runs sep_conv_3x3(s0) and skip_connect(s1) (FactorizedReduce at stride 2), node 1
# max_pool(s0) and avg_pool(node 0), node 2 dil_conv_5x5 of nodes 0 and 1, node 3
# skip_connect(s0) and dil_conv_5x5(node 2).
SUPPORT = ((3, 9), (0, 15), (20, 27), (2, 34))
SUPPORT_WEIGHTS = [
    np.array(w, np.float32) for w in ((0.7, -0.2), (1.3, 0.4), (-0.5, 0.9), (0.25, 2.0))
]
DENSE_SUPPORT = tuple(
    tuple(range(genotypes.num_candidates(node))) for node in range(genotypes.STEPS)
)


def _dense_search_cell_build(s0, s1):
    """A build hook: one dense pass creates every candidate op's weights, as
    ``SearchNetwork.build_all`` does (the sparse call only builds the support)."""

    def build(cell):
        ones = [tf.ones([len(indices)]) for indices in DENSE_SUPPORT]
        cell(
            tf.zeros(s0.shape),
            tf.zeros(s1.shape),
            supports=DENSE_SUPPORT,
            weights=ones,
            training=False,
        )

    return build


def _off_support(support):
    """The trainable variables of a SearchCell's candidate ops that ``support`` skips."""

    def unused(cell):
        return [
            v
            for node, node_ops in enumerate(cell.candidates)
            for index, op in enumerate(node_ops)
            if index not in support[node]
            for v in op.trainable_variables
        ]

    return unused


# ---------------------------------------------------------------------- networks
def _build_with_auxiliary(image_size):
    """A build hook as ``networks.build_network``: the auxiliary head only runs in
    training, so a training pass creates its weights before they are counted."""

    def build(network):
        network(tf.zeros([1, image_size, image_size, 3]), training=False)
        network(tf.zeros([BATCH, image_size, image_size, 3]), training=True)

    return build


def _search_network_forward(network, inputs, training):
    """The super-net keeps its supports as Python data: re-read them from the
    architecture variables (as after a checkpoint restore) so that a clone given the
    original's weights runs the original's support."""
    network.sync_supports()
    return network(*inputs, training=training)


def _search_network_unused(network):
    """Trainable variables a pass with the current supports does not reach: candidate
    ops off the support, the preprocessing of a cell input no supported op reads, and
    whole cells whose output no later cell reads."""
    unused = []
    reaches_logits = [False] * len(network.cells)
    reaches_logits[-1] = True
    for i in reversed(range(len(network.cells))):
        cell = network.cells[i]
        support = network.supports[genotypes.cell_type(cell.reduction)]
        if not reaches_logits[i]:
            unused += cell.trainable_variables
            continue
        read = {index // NUM_OPS for node in support for index in node}
        # s0 is the output of cell i - 2, s1 that of cell i - 1 (negative: the stem).
        for state, preprocess, source in (
            (0, cell.preprocess0, i - 2),
            (1, cell.preprocess1, i - 1),
        ):
            if state not in read:
                unused += preprocess.trainable_variables
            elif source >= 0:
                reaches_logits[source] = True
        unused += _off_support(support)(cell)
    return unused


# ---------------------------------------------------------------------- architectures
def _commit_first_recovery(encoding):
    """A build hook: Algorithm 1's first recovery, so that the encoding has a support."""
    encoding.commit(encoding.solve())


def _alphas(architecture_state, inputs, training):
    """The architecture classes have no ``call``: their output is ``alphas()``."""
    del inputs, training
    return architecture_state.alphas(architecture_state.support_tuple())


# Picks covering every primitive in a reduction cell (index < 2: stride 2), including
# both skip_connect variants (FactorizedReduce at stride 2, identity at stride 1).
EVERY_OP_PICKS = [
    ["sep_conv_3x3", 0],
    ["skip_connect", 1],
    ["dil_conv_5x5", 2],
    ["max_pool_3x3", 0],
    ["avg_pool_3x3", 1],
    ["skip_connect", 3],
    ["sep_conv_5x5", 4],
    ["dil_conv_3x3", 1],
]

C = 8  # channels of the op and cell cases

CASES = [
    # ------------------------------------------------------------------ operations
    LayerCase(
        blocks.SymmetricConv,
        # padding=None: the config must record None, not the padding derived from it.
        dict(filters=5, kernel_size=3, stride=2, dilation=1, depthwise=False, padding=None),
        input_data=(_images(7, 7, 3),),
        expected_output_shape=(BATCH, 4, 4, 5),
        # The conv kernel; no bias.
        expected_num_trainable_weights=1,
        expected_num_non_trainable_weights=0,
        id="SymmetricConv-full-stride2",
    ),
    LayerCase(
        blocks.SymmetricConv,
        # Dilated strided depthwise: the subsample-first path.
        dict(filters=0, kernel_size=5, stride=2, dilation=2, depthwise=True, padding=4),
        input_data=(_images(8, 8, 3),),
        expected_output_shape=(BATCH, 4, 4, 3),
        expected_num_trainable_weights=1,
        expected_num_non_trainable_weights=0,
        id="SymmetricConv-depthwise-dilated",
    ),
    LayerCase(
        blocks.PointwiseConv,
        dict(filters=5, use_bias=True),
        input_data=(_images(4, 3, 3),),
        expected_output_shape=(BATCH, 4, 3, 5),
        # The kernel [1, 1, 3, 5] and the bias.
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=0,
    ),
    LayerCase(
        ops.ReLUConvBN,
        dict(channels_out=C, kernel_size=3, stride=2, affine=True),
        input_data=(_images(8, 8, 3),),
        expected_output_shape=(BATCH, 4, 4, C),
        # conv kernel + BN (gamma, beta); BN (mean, variance).
        expected_num_trainable_weights=3,
        expected_num_non_trainable_weights=2,
    ),
    LayerCase(
        ops.SepConv,
        dict(channels_out=C, kernel_size=3, stride=1, affine=True),
        input_data=(_images(8, 8, C),),
        expected_output_shape=(BATCH, 8, 8, C),
        # 2 depthwise + 2 pointwise kernels + 2 BN * (gamma, beta) = 8;
        # 2 BN * (mean, variance) = 4.
        expected_num_trainable_weights=8,
        expected_num_non_trainable_weights=4,
    ),
    LayerCase(
        ops.DilConv,
        dict(channels_out=C, kernel_size=5, stride=2, dilation=2, affine=False),
        input_data=(_images(8, 8, C),),
        expected_output_shape=(BATCH, 4, 4, C),
        # depthwise + pointwise kernels (affine-free BN: no gamma, beta); BN (mean, var).
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=2,
    ),
    LayerCase(
        ops.FactorizedReduce,
        dict(channels_out=C, affine=True),
        # An odd size: the shifted half is padded to ceil(7 / 2) = 4 rows.
        input_data=(_images(7, 7, 6),),
        expected_output_shape=(BATCH, 4, 4, C),
        # 2 1x1 conv kernels + BN (gamma, beta); BN (mean, variance).
        expected_num_trainable_weights=4,
        expected_num_non_trainable_weights=2,
    ),
    LayerCase(
        ops.Pool,
        dict(kind="avg", stride=1, bn=True, affine=True),
        input_data=(_images(6, 6, 3),),
        expected_output_shape=(BATCH, 6, 6, 3),
        # BN (gamma, beta); BN (mean, variance).
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=2,
        id="Pool-avg-bn",
    ),
    LayerCase(
        ops.Pool,
        dict(kind="max", stride=2, bn=False, affine=True),
        input_data=(_images(7, 7, 3),),
        expected_output_shape=(BATCH, 4, 4, 3),
        expected_num_trainable_weights=0,
        expected_num_non_trainable_weights=0,
        id="Pool-max-stride2",
    ),
    LayerCase(
        ops.Identity,
        dict(bn=True, affine=True),
        input_data=(_images(4, 4, 3),),
        expected_output_shape=(BATCH, 4, 4, 3),
        # BN (gamma, beta); BN (mean, variance).
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=2,
        id="Identity-bn",
    ),
    LayerCase(
        ops.Identity,
        dict(bn=False, affine=True),
        input_data=(_images(4, 4, 3),),
        expected_output_shape=(BATCH, 4, 4, 3),
        expected_num_trainable_weights=0,
        expected_num_non_trainable_weights=0,
        id="Identity-bare",
    ),
    LayerCase(
        blocks.DropPath,
        dict(seed=3),
        input_data=(_images(4, 4, 3),),
        call_kwargs=dict(rate=0.5),
        expected_output_shape=(BATCH, 4, 4, 3),
        # No weights: the seed generator's state is a variable but not a weight.
        expected_num_trainable_weights=0,
        expected_num_non_trainable_weights=0,
    ),
    LayerCase(
        batch_norm.BatchNorm,
        # blocks.batch_norm's settings; the fused path (float32, 4-D).
        dict(momentum=blocks.BN_MOMENTUM, epsilon=blocks.BN_EPSILON),
        input_data=(_images(4, 4, C),),
        expected_output_shape=(BATCH, 4, 4, C),
        # gamma, beta; moving mean and variance.
        expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=2,
        id="BatchNorm-affine",
    ),
    LayerCase(
        batch_norm.BatchNorm,
        # affine=False (the search cells' BNs); rank 2 takes the formula path.
        dict(momentum=0.9, epsilon=1e-5, center=False, scale=False, synchronized=True),
        input_data=(_images(4, 4, C).reshape(-1, C),),
        expected_output_shape=(BATCH * 16, C),
        expected_num_trainable_weights=0,
        expected_num_non_trainable_weights=2,
        id="BatchNorm-no-affine-2d",
    ),
    # ------------------------------------------------------------------ cells
    LayerCase(
        cells.Cell,
        dict(
            picks=EVERY_OP_PICKS,
            concat=[2, 3, 4, 5],
            channels=C,
            reduction=True,
            reduction_prev=True,
            bn_after_param_free_ops=True,
            seed=3,
        ),
        # s0 at twice s1's resolution (the previous cell reduced); any channel counts.
        input_data=(_images(16, 16, 6), _images(8, 8, 5, seed=1)),
        # Rate 0 keeps every path, so the training check is deterministic.
        call_kwargs=dict(drop_path_rate=0.0),
        expected_output_shape=(BATCH, 4, 4, 4 * C),
        # Preprocessing: FactorizedReduce (2 kernels + gamma, beta) + ReLUConvBN
        # (kernel + gamma, beta) = 7. Ops: sep_conv 2 * 8, dil_conv 2 * 4,
        # FactorizedReduce 4, max/avg pool and identity with BN 3 * 2 = 34. Total 41.
        # Non-trainable, BN (mean, variance): preprocessing 2 * 2 = 4; sep_conv 2 * 4,
        # dil_conv 2 * 2, FactorizedReduce 2, BN after pools and identity 3 * 2 = 20.
        expected_num_trainable_weights=41,
        expected_num_non_trainable_weights=24,
    ),
    LayerCase(
        cells.SearchCell,
        dict(
            channels=4,
            reduction=True,
            reduction_prev=True,
            affine=True,
            bn_after_pool=True,
            bn_after_identity=True,
            steps=genotypes.STEPS,
            drop_path=True,
            seed=7,
        ),
        input_data=(_images(16, 16, 3), _images(8, 8, 5, seed=1)),
        call_kwargs=dict(supports=SUPPORT, weights=SUPPORT_WEIGHTS),
        expected_output_shape=(BATCH, 4, 4, 4 * 4),
        build=_dense_search_cell_build(_images(16, 16, 3), _images(8, 8, 5)),
        unused_variables=_off_support(SUPPORT),
        # Per edge, trainable: pools and identity with affine BN 3 * 2, sep_convs
        # 2 * 8, dil_convs 2 * 4 = 30; non-trainable 3 * 2 + 2 * 4 + 2 * 2 = 18. At
        # stride 2 (the 8 edges from s0, s1) skip_connect is a FactorizedReduce instead
        # of the identity: + 2 kernels (32 trainable), BN the same (18).
        # 8 * 32 + 6 * 30 = 436 and 14 * 18 = 252, + preprocessing (FactorizedReduce
        # 4 / 2, ReLUConvBN 3 / 2): 443 trainable, 256 non-trainable.
        expected_num_trainable_weights=443,
        expected_num_non_trainable_weights=256,
    ),
    # ------------------------------------------------------------------ networks
    LayerCase(
        networks.AuxiliaryHead,
        dict(num_classes=10, imagenet=False),
        input_data=(_images(8, 8, 12),),
        expected_output_shape=(BATCH, 10),
        # conv1 + bn1 (gamma, beta) + conv2 + bn2 (gamma, beta) + Dense (kernel, bias)
        # = 8; 2 BN * (mean, variance) = 4.
        expected_num_trainable_weights=8,
        expected_num_non_trainable_weights=4,
        id="AuxiliaryHead-cifar",
    ),
    LayerCase(
        networks.AuxiliaryHead,
        dict(num_classes=10, imagenet=True),
        input_data=(_images(7, 7, 12),),
        expected_output_shape=(BATCH, 10),
        # No BN after conv2: 6 trainable, 2 non-trainable.
        expected_num_trainable_weights=6,
        expected_num_non_trainable_weights=2,
        id="AuxiliaryHead-imagenet",
    ),
    LayerCase(
        networks.NetworkCIFAR,
        dict(
            genotype=genotypes.to_json_dict(genotypes.ISTA_twostage),
            channels=C,
            num_cells=3,
            num_classes=10,
            auxiliary=True,
            drop_path_rate=0.0,
            bn_after_param_free_ops=False,
            seed=1,
        ),
        input_data=(_images(32, 32, 3),),
        expected_output_shape=(BATCH, 10),
        build=_build_with_auxiliary(32),
        # Cells 0 (normal), 1 (reduction), 2 (reduction after a reduction); 32 -> 8x8 at
        # the auxiliary head after cell 2. Trainable: stem conv + BN 2 = 3; cell 0:
        # ReLUConvBN 2 * 3 + sep_conv 3 * 8 + dil_conv 3 * 4 = 42; cell 1: 6 + sep_conv
        # 3 * 8 + dil_conv 3 * 4 = 42 (pools without BN); cell 2: FactorizedReduce 4 +
        # ReLUConvBN 3 + 36 = 43; auxiliary head 8; classifier 2. Total 140.
        # Non-trainable: stem BN 2; cells 3 * (4 + sep 3 * 4 + dil 3 * 2) = 66;
        # auxiliary head 4; drop_path_rate 1. Total 73.
        expected_num_trainable_weights=140,
        expected_num_non_trainable_weights=73,
    ),
    LayerCase(
        networks.NetworkImageNet,
        # 64x64: the stems (stride 8) give 8x8, the cells 8, 4, 2. The ImageNet
        # auxiliary head needs 7x7 after cell 2 (224x224 inputs): it has its own case.
        dict(
            genotype=genotypes.to_json_dict(genotypes.ISTA_ImageNet),
            channels=C,
            num_cells=3,
            num_classes=10,
            auxiliary=False,
            drop_path_rate=0.0,
            bn_after_param_free_ops=False,
            seed=None,
        ),
        input_data=(_images(64, 64, 3),),
        expected_output_shape=(BATCH, 10),
        # Trainable: stems 3 * (conv + BN 2) = 9; cell 0 (s0 reduced): FactorizedReduce
        # 4 + ReLUConvBN 3 + sep_conv 6 * 8 + dil_conv 4 = 59; cell 1: 6 + sep_conv
        # 4 * 8 + dil_conv 4 + FactorizedReduce (skip at stride 2) 4 = 46; cell 2: 7 +
        # 40 = 47; classifier 2. Total 163.
        # Non-trainable: stems 3 * 2 = 6; cell 0: 4 + 6 * 4 + 2 = 30; cells 1 and 2:
        # 4 + 4 * 4 + 2 + 2 = 24 each; drop_path_rate 1. Total 85.
        expected_num_trainable_weights=163,
        expected_num_non_trainable_weights=85,
    ),
    # ------------------------------------------------------------------ super-net
    LayerCase(
        search_model.SearchNetwork,
        dict(config=search_model.SearchNetworkConfig(num_classes=10, channels=4, layers=3, seed=0)),
        input_data=(_images(8, 8, 3),),
        expected_output_shape=(BATCH, 10),
        build=lambda network: network.build_all(8),
        forward=_search_network_forward,
        unused_variables=_search_network_unused,
        # Two-stage: affine-free BN in the cells, BN after pools. Per stride-1 edge,
        # trainable: sep_convs 2 * 4 kernels + dil_convs 2 * 2 = 12; non-trainable: BN
        # (mean, var) after 2 pools 4 + sep_convs 2 * 4 + dil_convs 2 * 2 = 16. A
        # stride-2 edge adds FactorizedReduce's 2 kernels and BN: 14 / 18.
        # Cell 0: preprocessing 2 / 4 + 14 edges * 12 / 16 = 170 / 228.
        # Cell 1: 2 / 4 + 8 * 14 / 18 + 6 * 12 / 16 = 186 / 244.
        # Cell 2 (FactorizedReduce preprocessing 2 / 2): 3 / 4 + 184 / 240 = 187 / 244.
        # Stem conv + affine BN 3 / 2, classifier 2 / 0, 2 encodings * (4 b / 4 A + z +
        # support) = 8 / 12. Total 556 trainable, 730 non-trainable.
        expected_num_trainable_weights=556,
        expected_num_non_trainable_weights=730,
        id="SearchNetwork-two-stage",
    ),
    LayerCase(
        search_model.SearchNetwork,
        dict(
            config=search_model.SearchNetworkConfig(
                num_classes=10, channels=4, layers=3, seed=1, one_stage=True
            )
        ),
        # 32x32: the auxiliary head after cell 2 needs 8x8.
        input_data=(_images(32, 32, 3),),
        expected_output_shape=(BATCH, 10),
        build=lambda network: network.build_all(32),
        forward=_search_network_forward,
        unused_variables=_search_network_unused,
        # One-stage: affine BN everywhere, BN after pools and the identity, drop path.
        # Per edge as in the SearchCell case: 30 / 18 at stride 1, 32 / 18 at stride 2.
        # Cell 0: ReLUConvBN 2 * 3 / 2 + 14 * 30 / 18 = 426 / 256. Cell 1: 6 / 4 +
        # 8 * 32 + 6 * 30 = 442 / 256. Cell 2: FactorizedReduce + ReLUConvBN 7 / 4 +
        # 436 / 252 = 443 / 256. Stem 3 / 2, classifier 2 / 0, auxiliary head 8 / 4,
        # encodings 8 / 12, drop_path_rate and 2 cell types * 2 freeze flags 0 / 5.
        # Total 1332 trainable, 791 non-trainable.
        expected_num_trainable_weights=1332,
        expected_num_non_trainable_weights=791,
        # alpha is ~1 / |b| sensitive to b (b ~ 1e-3): b's gradients are ~1e2-1e3, and
        # a step of 1e-3 would overshoot; the weights' gradients are tiny in comparison.
        learning_rate=1e-7,
        id="SearchNetwork-one-stage",
    ),
    # ------------------------------------------------------------------ architectures
    LayerCase(
        architecture.ArchitectureEncoding,
        dict(
            steps=3,
            num_ops=NUM_OPS,
            proj_dims=6,
            sparseness=2,
            lam=1e-4,
            distinct_inputs=True,
            seed=3,
        ),
        forward=_alphas,
        build=_commit_first_recovery,
        expected_output_shape=[(2,), (2,), (2,)],
        # b_j per node = 3; A_j per node + z + support = 5.
        expected_num_trainable_weights=3,
        expected_num_non_trainable_weights=5,
    ),
    LayerCase(
        darts.DartsArchitecture,
        dict(steps=3, seed=5),
        forward=_alphas,
        # Every candidate of node j: (2 + j) * 7.
        expected_output_shape=[(14,), (21,), (28,)],
        # One logit matrix per node; no other state.
        expected_num_trainable_weights=3,
        expected_num_non_trainable_weights=0,
        # Near-uniform softmaxes have small gradients; a larger step still moves them.
        learning_rate=1.0,
    ),
    # ------------------------------------------------------------------ optimizers
    # Optimizers are not layers: the config contract only.
    LayerCase(
        optimizers.TorchSGD, dict(learning_rate=0.05, momentum=0.8, l2=3e-4, clip_global_norm=5.0)
    ),
    LayerCase(
        optimizers.TorchSGD,
        dict(
            learning_rate=keras.optimizers.schedules.CosineDecay(0.1, 100),
            momentum=0.9,
            l2=0.0,
            clip_global_norm=None,
        ),
        id="TorchSGD-schedule",
    ),
    LayerCase(
        optimizers.TorchAdam,
        dict(
            learning_rate=6e-4, beta_1=0.5, beta_2=0.99, epsilon=1e-7, l2=1e-3, clip_global_norm=1.0
        ),
    ),
]


@pytest.fixture(autouse=True)
def _same_initial_weights():
    """Seeds Keras' initializers: every run checks the same weights, whatever the test
    order, so that the training check's outcome never rests on a random draw."""
    keras.utils.set_random_seed(0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer_contract(case):
    """The registered class of ``case`` meets the contract and computes, clones, trains."""
    run_layer_test(case)


# ---------------------------------------------------------------------- coverage
def _package_modules():
    """``istanas_tf`` and every submodule, imported (registration happens on import)."""
    modules = [istanas_tf]
    for info in pkgutil.walk_packages(istanas_tf.__path__, "istanas_tf."):
        modules.append(importlib.import_module(info.name))
    return modules


def test_every_registered_class_has_a_case():
    """A class registered under ``istanas_tf`` cannot be added without a LayerCase."""
    _package_modules()
    registered = {
        name for name in keras.saving.get_custom_objects() if name.startswith("istanas_tf>")
    }
    cased = {keras.saving.get_registered_name(case.cls) for case in CASES}
    assert sorted(registered - cased) == [], "registered classes without a LayerCase"
    # The other direction guards the discovery itself: were it to find nothing (a renamed
    # package, a registry keyed differently), the check above would pass vacuously.
    assert sorted(cased - registered) == [], "cases of classes the discovery missed"


KERAS_BASES = (
    keras.layers.Layer,
    keras.optimizers.Optimizer,
    keras.optimizers.schedules.LearningRateSchedule,
    keras.metrics.Metric,
    keras.losses.Loss,
)


def test_every_keras_class_is_registered():
    """Every public Keras layer, model, optimizer, ... of the package is registered.

    The case coverage above is discovered through the registry, which an unregistered
    class would escape.
    """
    unregistered = []
    for module in _package_modules():
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or name.startswith("_"):
                continue
            # Registered under the class's own name; a module-level alias of a class
            # (batch_norm.BatchNorm) is the same class under another name.
            if (
                issubclass(cls, KERAS_BASES)
                and keras.saving.get_registered_name(cls) != f"istanas_tf>{cls.__name__}"
            ):
                unregistered.append(f"{module.__name__}.{name}")
    assert unregistered == []


# ---------------------------------------------------------------------- the harness fails
# Toy layers registered under their own package (so that the coverage tests above do not
# see them), one per contract breach, to show that the harness catches each.
_register_toy = keras.saving.register_keras_serializable(package="harness_selftest")


@_register_toy
class GoodLayer(keras.layers.Layer):
    """``x @ kernel * scale``: follows the contract (the control case)."""

    def __init__(self, units=3, scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.scale = scale

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")

    def call(self, x):
        return tf.matmul(x, self.kernel) * self.scale

    def get_config(self):
        return {**super().get_config(), "units": self.units, "scale": self.scale}


@_register_toy
class MissingKeyLayer(GoodLayer):
    """get_config() leaves out a constructor argument."""

    def get_config(self):
        config = super().get_config()
        del config["scale"]
        return config


@_register_toy
class NoSuperLayer(GoodLayer):
    """get_config() does not call super().get_config()."""

    def get_config(self):
        return {"units": self.units, "scale": self.scale}


@_register_toy
class ExtraKeyLayer(GoodLayer):
    """get_config() adds a key that is no constructor argument."""

    def get_config(self):
        return {**super().get_config(), "kernel_rank": 2}


@_register_toy
class RenamedAttributeLayer(GoodLayer):
    """Stores the ``scale`` argument as ``factor``."""

    def __init__(self, units=3, scale=2.0, **kwargs):
        super().__init__(units, scale, **kwargs)
        self.factor = self.scale
        del self.scale

    def call(self, x):
        return tf.matmul(x, self.kernel) * self.factor

    def get_config(self):
        return {**keras.layers.Layer.get_config(self), "units": self.units, "scale": self.factor}


@_register_toy
class ForgetfulLayer(GoodLayer):
    """get_config() returns a constant instead of the argument given."""

    def get_config(self):
        return {**super().get_config(), "scale": 1.0}


@_register_toy
class DroppedKwargsLayer(GoodLayer):
    """Does not forward its kwargs to Keras."""

    def __init__(self, units=3, scale=2.0, **kwargs):
        del kwargs
        super().__init__(units, scale)


class UnregisteredLayer(GoodLayer):
    """Not registered."""


_instances = itertools.count()


@_register_toy
class HiddenStateLayer(GoodLayer):
    """Its output depends on a constant the config does not describe: a clone differs."""

    def __init__(self, units=3, scale=2.0, **kwargs):
        super().__init__(units, scale, **kwargs)
        self.offset = float(next(_instances))

    def call(self, x):
        return super().call(x) + self.offset


@_register_toy
class StopGradientLayer(GoodLayer):
    """Its kernel gets no gradient."""

    def call(self, x):
        return tf.matmul(x, tf.stop_gradient(self.kernel)) * self.scale


@_register_toy
class ZeroGradientLayer(GoodLayer):
    """Its kernel gets a zero gradient: one step neither moves it nor lowers the loss."""

    def call(self, x):
        return tf.matmul(x, self.kernel) * 0.0 + x[:, :1]


def _toy_case(cls, **changes):
    """A case of a toy layer on [2, 4] inputs, with ``changes`` to its fields."""
    fields = dict(
        init_kwargs=dict(units=3, scale=2.0),
        input_data=(_images(1, 1, 4)[:, 0, 0],),
        expected_output_shape=(BATCH, 3),
        expected_num_trainable_weights=1,
        expected_num_non_trainable_weights=0,
    )
    fields.update(changes)
    return LayerCase(cls, **fields)


def test_harness_passes_a_good_layer():
    """The control: the toy that keeps the contract passes every check."""
    run_layer_test(_toy_case(GoodLayer), package="harness_selftest")


BREACHES = [
    pytest.param(_toy_case(MissingKeyLayer), r"missing \['scale'\]", id="missing-key"),
    pytest.param(
        _toy_case(NoSuperLayer), r"missing \['dtype', 'name', 'trainable'\]", id="no-super"
    ),
    pytest.param(_toy_case(ExtraKeyLayer), r"extra \['kernel_rank'\]", id="extra-key"),
    pytest.param(
        _toy_case(RenamedAttributeLayer),
        r"under their own names: \['scale'\]",
        id="renamed-attribute",
    ),
    pytest.param(
        _toy_case(ForgetfulLayer), r"does not record the arguments given", id="forgets-argument"
    ),
    # A tuple argument kept as a tuple: JSON gives back a list.
    pytest.param(
        _toy_case(GoodLayer, init_kwargs=dict(units=(3,), scale=2.0)),
        r"JSON round trip",
        id="tuple-value",
    ),
    pytest.param(
        _toy_case(GoodLayer, init_kwargs=dict(units=3, scale=np.float32(2.0))),
        r"not JSON-serialisable",
        id="numpy-value",
    ),
    pytest.param(_toy_case(DroppedKwargsLayer), r"kwargs are not forwarded", id="dropped-kwargs"),
    pytest.param(_toy_case(UnregisteredLayer), r"not registered", id="unregistered"),
    pytest.param(
        _toy_case(GoodLayer, expected_num_trainable_weights=2),
        r"expected 2 trainable",
        id="weight-count",
    ),
    pytest.param(
        _toy_case(GoodLayer, expected_output_shape=(BATCH, 4)),
        r"expected output shape",
        id="output-shape",
    ),
    pytest.param(_toy_case(HiddenStateLayer), r"Not equal to tolerance", id="clone-differs"),
    pytest.param(_toy_case(StopGradientLayer), r"no gradient for", id="no-gradient"),
    pytest.param(
        _toy_case(GoodLayer, unused_variables=lambda layer: layer.trainable_variables),
        r"declared unused have gradients",
        id="used-declared-unused",
    ),
    pytest.param(_toy_case(ZeroGradientLayer), r"neither lowered the loss", id="no-progress"),
]


@pytest.mark.parametrize("case,message", BREACHES)
def test_harness_catches(case, message):
    """Each breach of the contract fails the harness, with a message naming it."""
    with pytest.raises(AssertionError, match=message):
        run_layer_test(case, package="harness_selftest")
