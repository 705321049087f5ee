"""Tests for istanas_tf.sparse_coding: support selection, alpha and the genotype route."""

import numpy as np

from istanas_tf import genotypes
from istanas_tf import sparse_coding as sc

NODE_WIDTHS = (14, 21, 28, 35)  # n_j = 7 (j + 2)


def _supports(zs):
    """Per node, the top-2 support of a hand-made code, as Python data."""
    return tuple(tuple(int(i) for i in sc.select_support(z, 2).numpy()) for z in zs)


def test_alpha_equals_z_when_b_is_in_the_support_span():
    rng = np.random.default_rng(8)
    A_S = rng.uniform(size=(7, 2))
    z_S = np.array([0.7, -1.3])
    alpha = sc.alpha_from_b(A_S, z_S, A_S @ z_S).numpy()
    np.testing.assert_allclose(alpha, z_S, rtol=1e-14)
    # Off the span, alpha is the ISTA step z - A_S^T (A_S z - b).
    b = rng.standard_normal(7)
    np.testing.assert_allclose(
        sc.alpha_from_b(A_S, z_S, b).numpy(), z_S - A_S.T @ (A_S @ z_S - b), rtol=1e-13
    )


def test_genotype_of_a_hand_made_z():
    def node_z(width, entries):
        z = np.zeros(width)
        for index, value in entries.items():
            z[index] = value
        return z

    # Flat index = predecessor * 7 + op, op in PRIMITIVES order; picks by descending |z|.
    normal = [
        node_z(14, {3: 0.5, 7 + 5: -0.9, 2: 0.1}),  # dil_conv_3x3 from 1, sep_conv_3x3 from 0
        node_z(21, {14 + 6: 0.3, 0: 0.2}),  # dil_conv_5x5 from 2, max_pool from 0
        node_z(28, {21 + 2: -0.4, 7 + 4: 0.41}),  # sep_conv_5x5 from 1, skip from 3
        node_z(35, {28 + 1: 1.0, 28 + 3: 0.8}),  # avg_pool from 4, sep_conv_3x3 from 4
    ]
    reduce = [
        node_z(14, {0: 2.0, 1: 1.0}),
        node_z(21, {7 + 0: -1.0, 14 + 2: 0.5}),
        node_z(28, {4: 0.3, 21 + 6: -0.2}),
        node_z(35, {7 + 3: 0.9, 28 + 2: 0.7}),
    ]
    genotype = sc.genotype_from_supports(_supports(normal), _supports(reduce))
    expected = genotypes.Genotype(
        normal=(
            ("dil_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("dil_conv_5x5", 2),
            ("max_pool_3x3", 0),
            ("sep_conv_5x5", 1),
            ("skip_connect", 3),
            ("avg_pool_3x3", 4),
            ("sep_conv_3x3", 4),
        ),
        normal_concat=(2, 3, 4, 5),
        reduce=(
            ("max_pool_3x3", 0),
            ("avg_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("sep_conv_5x5", 0),
            ("dil_conv_5x5", 3),
            ("sep_conv_3x3", 1),
            ("skip_connect", 4),
        ),
        reduce_concat=(2, 3, 4, 5),
    )
    assert genotype == expected


def test_distinct_inputs_rule():
    # Both largest entries sit on predecessor 0.
    z = np.zeros(14)
    z[3], z[5], z[7 + 1] = 0.9, -0.8, 0.1
    assert tuple(sc.select_support(z, 2).numpy()) == (3, 5)
    assert tuple(sc.select_support(z, 2, distinct_inputs=True).numpy()) == (3, 8)
    # Against a brute-force greedy pick on random codes of every node width.
    rng = np.random.default_rng(9)
    for trial in range(200):
        width = NODE_WIDTHS[trial % 4]
        z = rng.standard_normal(width) * (rng.uniform(size=width) < 0.4)
        z[rng.integers(width)] = 0.0
        picked, used = [], set()
        for index in sorted(range(width), key=lambda i: (-abs(z[i]), i)):
            if index // 7 not in used:
                picked.append(index)
                used.add(index // 7)
            if len(picked) == 2:
                break
        got = tuple(int(i) for i in sc.select_support(z, 2, distinct_inputs=True).numpy())
        assert got == tuple(picked)
        assert len({i // 7 for i in got}) == 2
