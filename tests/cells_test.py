"""The DARTS cells: the channel schedule, sparse search cells, drop path in eval cells."""

import numpy as np
import tensorflow as tf

from istanas_tf import cells, genotypes


def test_channel_schedule_doubles_at_the_two_reductions():
    schedule = cells.cell_schedule(8, 16)
    assert [s.channels for s in schedule] == [16, 16, 32, 32, 32, 64, 64, 64]
    assert [i for i, s in enumerate(schedule) if s.reduction] == [2, 5]
    assert [i for i, s in enumerate(schedule) if s.reduction_prev] == [3, 6]
    # The ImageNet stem hands the first cell a reduced s0.
    assert cells.cell_schedule(3, 48, first_input_reduced=True)[0].reduction_prev


def test_sparse_cell_equals_dense_cell_with_zero_weights_off_support():
    cell = cells.SearchCell(4, False, False, affine=False, bn_after_pool=True)
    x0, x1 = tf.random.normal([2, 8, 8, 4], seed=1), tf.random.normal([2, 8, 8, 4], seed=2)
    supports = ((3, 9), (0, 15), (20, 27), (2, 34))
    alphas = [
        tf.constant([0.7, -0.2]),
        tf.constant([1.3, 0.4]),
        tf.constant([-0.5, 0.9]),
        tf.constant([0.25, 2.0]),
    ]
    dense_supports = tuple(tuple(range(genotypes.num_candidates(j))) for j in range(4))
    dense_weights = []
    for j in range(4):
        w = np.zeros(genotypes.num_candidates(j), np.float32)
        w[list(supports[j])] = alphas[j].numpy()
        dense_weights.append(tf.constant(w))
    dense = cell(x0, x1, supports=dense_supports, weights=dense_weights, training=False)
    sparse = cell(x0, x1, supports=supports, weights=alphas, training=False)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)


def test_node_output_is_alpha_weighted_sum_of_supported_ops():
    cell = cells.SearchCell(4, False, False, affine=False, bn_after_pool=True)
    x = tf.random.normal([2, 8, 8, 4], seed=3)
    supports = ((2, 9),) + ((0, 7),) * 3  # node 0: skip_connect(s0), skip_connect(s1)
    alphas = [tf.constant([0.3, -1.5])] * 4
    out = cell(x, x, supports=supports, weights=alphas, training=False)
    s0 = cell.preprocess0(x, training=False)
    s1 = cell.preprocess1(x, training=False)
    node0 = 0.3 * s0 - 1.5 * s1  # identity ops: the weights alone decide
    np.testing.assert_allclose(out[..., :4], node0, rtol=1e-5, atol=1e-6)


def test_drop_path_exempts_identity_only_in_darts_cells():
    x = tf.random.normal([4, 8, 8, 16])
    picks = [("skip_connect", 0), ("skip_connect", 1)] * 4
    darts_cell = cells.Cell(picks, [2, 3, 4, 5], 16, False, False, seed=1)
    one_stage_cell = cells.Cell(
        picks, [2, 3, 4, 5], 16, False, False, bn_after_param_free_ops=True, seed=1
    )
    for cell in (darts_cell, one_stage_cell):
        cell(x, x, drop_path_rate=0.0, training=True)
    # With rate 0.999 almost every non-identity path is dropped: only the DARTS cell,
    # whose paths are bare identities, keeps its output unchanged.
    darts_out = darts_cell(x, x, drop_path_rate=0.0, training=True)
    np.testing.assert_allclose(
        darts_cell(x, x, drop_path_rate=0.999, training=True), darts_out, rtol=1e-5, atol=1e-5
    )
    dropped = one_stage_cell(x, x, drop_path_rate=0.999, training=True)
    assert np.mean(dropped.numpy() == 0.0) > 0.5
