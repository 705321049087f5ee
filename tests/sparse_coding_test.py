"""Tests for istanas_tf.sparse_coding: the exact LASSO, supports, alpha and the encoding.

Oracles are independent of the solver under test: the closed-form soft threshold, the
KKT conditions evaluated here in numpy, and scipy's Lawson-Hanson NNLS applied to the
LASSO's dual (a least-distance problem), which is an exact active-set method.
"""

import numpy as np
import pytest
import tensorflow as tf

from istanas_tf import genotypes
from istanas_tf import sparse_coding as sc
from lasso_oracle import kkt_violation, objective, scipy_lasso

LAM = 1e-5
NODE_WIDTHS = (14, 21, 28, 35)  # n_j = 7 (j + 2)
REGIMES = {"small_b": 1e-3, "unit_b": 1.0}  # b ~ scale * N(0, 1)


def our_problems(count: int, scale: float, seed: int):
    """count problems shaped like the search's, zero-padded to 35 columns.

    Returns A: [count, 7, 35], b: [count, 7], widths: [count] (the real n of each).
    """
    rng = np.random.default_rng(seed)
    widths = np.array([NODE_WIDTHS[i % 4] for i in range(count)])
    A = np.zeros((count, 7, 35))
    for i, n in enumerate(widths):
        A[i, :, :n] = rng.uniform(size=(7, n))
    b = scale * rng.standard_normal((count, 7))
    return A, b, widths




@pytest.fixture(scope="module")
def solved():
    """Both regimes, 160 problems each, solved in batches of 8 (one recovery's shape,
    which most tests share so that the solver compiles for few shapes)."""
    results = {}
    for index, (name, scale) in enumerate(REGIMES.items()):
        A, b, widths = our_problems(160, scale, seed=100 + index)
        z = np.concatenate([sc.solve_lasso(A[i:i + 8], b[i:i + 8], LAM).numpy()
                            for i in range(0, len(b), 8)])
        results[name] = (A, b, widths, z)
    return results


def test_orthonormal_A_gives_soft_threshold():
    rng = np.random.default_rng(0)
    Q = np.stack([np.linalg.qr(rng.standard_normal((7, 7)))[0] for _ in range(8)])
    A = np.concatenate([Q, np.zeros((8, 7, 28))], axis=2)  # padded like a recovery
    b = rng.standard_normal((8, 7))
    for lam in (LAM, 0.4):  # 0.4 zeroes some entries
        z = sc.solve_lasso(A, b, lam).numpy()
        c = np.einsum("kmn,km->kn", Q, b)
        expected = np.sign(c) * np.maximum(np.abs(c) - lam, 0.0)
        np.testing.assert_allclose(z[:, :7], expected, rtol=0, atol=1e-13)
        assert np.array_equal(z[:, :7] == 0, expected == 0)
        assert np.all(z[:, 7:] == 0.0)


@pytest.mark.parametrize("regime", REGIMES)
def test_kkt_conditions_hold(solved, regime):
    A, b, widths, z = solved[regime]
    assert z.dtype == np.float64
    for i, n in enumerate(widths):
        assert kkt_violation(A[i, :, :n], b[i], z[i, :n]) < 1e-7, i
        assert np.count_nonzero(z[i]) <= 7  # at most m nonzeros at the optimum


@pytest.mark.parametrize("regime", REGIMES)
def test_padded_columns_are_exact_zeros(solved, regime):
    A, b, widths, z = solved[regime]
    for i, n in enumerate(widths):
        assert np.all(z[i, n:] == 0.0)


@pytest.mark.parametrize("regime", REGIMES)
def test_agrees_with_scipy_oracle(solved, regime):
    A, b, widths, z = solved[regime]
    compared = 0
    for i, n in enumerate(widths):
        A_i, z_i = A[i, :, :n], z[i, :n]
        z_ref = scipy_lasso(A_i, b[i])
        assert kkt_violation(A_i, b[i], z_ref) < 1e-6, "oracle did not converge"
        ours, ref = objective(A_i, b[i], z_i), objective(A_i, b[i], z_ref)
        assert abs(ours - ref) <= 1e-9 * ref, (i, ours, ref)
        magnitude = np.sort(np.abs(z_i))[::-1]
        if magnitude[1] - magnitude[2] > 1e-6 * magnitude[1]:
            compared += 1
            assert set(np.argsort(-np.abs(z_i))[:2]) == set(np.argsort(-np.abs(z_ref))[:2])
    assert compared > len(widths) // 2


def test_padded_problem_equals_unpadded():
    A, b, widths = our_problems(4, 1.0, seed=7)
    n = 14
    z_padded = sc.solve_lasso(A[0], b[0]).numpy()
    z_plain = sc.solve_lasso(A[0, :, :n], b[0]).numpy()
    assert z_plain.shape == (n,)
    np.testing.assert_allclose(z_padded[:n], z_plain, rtol=1e-10, atol=1e-14)
    assert np.all(z_padded[n:] == 0.0)


def test_batch_equals_single_problems():
    A, b, _ = our_problems(8, 1.0, seed=3)
    batch = sc.solve_lasso(A, b).numpy()
    for i in range(8):
        single = sc.solve_lasso(A[i], b[i]).numpy()
        np.testing.assert_allclose(single, batch[i], rtol=1e-10, atol=1e-14)
        assert np.array_equal(single != 0, batch[i] != 0)


def test_warm_start_gives_the_same_optimum():
    A, b, _ = our_problems(8, 1.0, seed=4)
    cold = sc.solve_lasso(A, b).numpy()
    rng = np.random.default_rng(4)
    starts = {
        "optimum": cold,
        "optimum_of_a_nearby_b": sc.solve_lasso(A, b + 1e-3 * rng.standard_normal(b.shape)),
        "dense_random": rng.standard_normal(cold.shape),
        "wrong_signs": -cold,
    }
    for name, z0 in starts.items():
        warm = sc.solve_lasso(A, b, z0=z0).numpy()
        np.testing.assert_allclose(warm, cold, rtol=1e-10, atol=1e-13, err_msg=name)
        assert np.array_equal(warm != 0, cold != 0), name


def test_zero_b_gives_zero_z():
    A, _, _ = our_problems(8, 1.0, seed=5)
    z = sc.solve_lasso(A, np.zeros((8, 7))).numpy()
    assert np.all(z == 0.0)


def test_step_cap_and_non_finite_inputs_raise():
    A, b, _ = our_problems(8, 1.0, seed=6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="no verified KKT point"):
        sc.solve_lasso(A, b, max_steps=2)
    with pytest.raises(ValueError, match="lam=0.0 out of range"):
        sc.solve_lasso(A, b, lam=0.0)
    b[3, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not finite .* problems \[3\]"):
        sc.solve_lasso(A, b)
    # Inside a tf.function the same checks are assertion ops.
    in_graph = tf.function(lambda A, b: sc.solve_lasso(A, b))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not finite"):
        in_graph(tf.constant(A), tf.constant(b))
    b[3, 1] = 0.0
    np.testing.assert_allclose(in_graph(tf.constant(A), tf.constant(b)).numpy(),
                               sc.solve_lasso(A, b).numpy(), rtol=1e-12, atol=1e-15)


def test_alpha_equals_z_when_b_is_in_the_support_span():
    rng = np.random.default_rng(8)
    A_S = rng.uniform(size=(7, 2))
    z_S = np.array([0.7, -1.3])
    alpha = sc.alpha_from_b(A_S, z_S, A_S @ z_S).numpy()
    np.testing.assert_allclose(alpha, z_S, rtol=1e-14)
    # Off the span, alpha is the ISTA step z - A_S^T (A_S z - b).
    b = rng.standard_normal(7)
    np.testing.assert_allclose(sc.alpha_from_b(A_S, z_S, b).numpy(),
                               z_S - A_S.T @ (A_S @ z_S - b), rtol=1e-13)


def test_encoding_alphas_equal_z_when_b_is_in_the_support_span():
    encoding = sc.ArchitectureEncoding(seed=11, name="normal")
    support = encoding.support_tuple()
    for j, indices in enumerate(support):
        A_S = tf.gather(encoding.A[j], indices, axis=1)
        z_S = tf.gather(encoding.z[j], indices)
        encoding.b[j].assign(tf.linalg.matvec(A_S, z_S))
    for j, alpha in enumerate(encoding.alphas(support)):
        z_S = tf.gather(encoding.z[j], support[j])
        np.testing.assert_allclose(alpha.numpy(), z_S.numpy(), rtol=1e-5, atol=1e-9)


def test_gradient_wrt_b_is_A_S_times_gradient_wrt_alpha():
    encoding = sc.ArchitectureEncoding(seed=12, name="normal")
    support = encoding.support_tuple()
    weights = [tf.constant([1.5, -2.0]), tf.constant([0.5, 3.0]),
               tf.constant([-1.0, 1.0]), tf.constant([2.0, 0.25])]
    with tf.GradientTape(persistent=True) as tape:
        alphas = encoding.alphas(support)
        # Nonlinear in alpha, so dL/dalpha depends on alpha's value.
        loss = tf.add_n([tf.reduce_sum(w * tf.sin(1e3 * a)) for w, a in zip(weights, alphas)])
    grad_b = tape.gradient(loss, encoding.b)
    grad_alpha = tape.gradient(loss, alphas)
    for j, indices in enumerate(support):
        A_S = tf.gather(encoding.A[j], indices, axis=1)
        expected = tf.linalg.matvec(A_S, grad_alpha[j])
        np.testing.assert_allclose(grad_b[j].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        assert np.any(grad_b[j].numpy() != 0)


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
    genotype = sc.genotype_from_supports(sc.supports_from_z(normal), sc.supports_from_z(reduce))
    expected = genotypes.Genotype(
        normal=(("dil_conv_3x3", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
                ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("skip_connect", 3),
                ("avg_pool_3x3", 4), ("sep_conv_3x3", 4)),
        normal_concat=(2, 3, 4, 5),
        reduce=(("max_pool_3x3", 0), ("avg_pool_3x3", 0), ("max_pool_3x3", 1),
                ("skip_connect", 2), ("sep_conv_5x5", 0), ("dil_conv_5x5", 3),
                ("sep_conv_3x3", 1), ("skip_connect", 4)),
        reduce_concat=(2, 3, 4, 5))
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


def test_encoding_distinct_inputs_never_repeats_a_predecessor():
    for seed in range(4):
        encoding = sc.ArchitectureEncoding(seed=seed, distinct_inputs=True)
        for node in encoding.support_tuple():
            assert len({i // 7 for i in node}) == len(node)


def test_non_finite_b_is_refused():
    encoding = sc.ArchitectureEncoding(seed=13, name="reduce")
    z_before = encoding.z.numpy().copy()
    encoding.b[2].assign([0.0, np.nan, 0.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"reduce: b of node 2 contains NaN or inf"):
        encoding.recover()
    encoding.b[2].assign([0.0, 0.0, np.inf, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"reduce: b of node 2"):
        encoding.solve()
    with pytest.raises(ValueError, match=r"node 2"):
        sc.solve_jointly([sc.ArchitectureEncoding(seed=14), encoding])
    np.testing.assert_array_equal(encoding.z.numpy(), z_before)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparseness=0), r"sparseness=0 .*\[1, 14\]"),
    (dict(sparseness=15), r"sparseness=15 .*\[1, 14\]"),
    (dict(sparseness=3, distinct_inputs=True), r"sparseness=3 .*\[1, 2\]"),
    (dict(proj_dims=0), r"proj_dims=0 .*>= 1"),
    (dict(steps=0), r"steps=0 .*>= 1"),
    (dict(lam=0.0), r"lam=0.0 .*> 0"),
])
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sc.ArchitectureEncoding(**kwargs)


def test_encoding_state_and_recovery():
    encoding = sc.ArchitectureEncoding(seed=21, name="normal")
    assert [tuple(a.shape) for a in encoding.A] == [(7, n) for n in NODE_WIDTHS]
    assert [tuple(b.shape) for b in encoding.b] == [(7,)] * 4
    assert [v.name for v in encoding.trainable_variables] == ["b_0", "b_1", "b_2", "b_3"]
    A0 = encoding.A[0].numpy()
    assert A0.min() >= 0.0 and A0.max() < 1.0
    assert 1e-4 < np.abs(encoding.b[0].numpy()).mean() < 1e-2
    # The constructor's recovery: z is the LASSO optimum of (A_j, b_j), support its top-2.
    for j, n in enumerate(NODE_WIDTHS):
        A_j = encoding.A[j].numpy().astype(np.float64)
        b_j = encoding.b[j].numpy().astype(np.float64)
        z_j = encoding.z[j].numpy().astype(np.float64)
        assert np.all(z_j[n:] == 0.0)
        assert kkt_violation(A_j, b_j, z_j[:n]) < 1e-3  # z is stored in float32
        z_ref = scipy_lasso(A_j, b_j)
        np.testing.assert_allclose(z_j[:n], z_ref, rtol=1e-6, atol=1e-7 * np.abs(z_ref).max())
        assert set(encoding.support_tuple()[j]) == set(np.argsort(-np.abs(z_j[:n]))[:2])

    # solve() does not change the state; commit() with a node mask updates only those.
    z_last = encoding.z.numpy().copy()
    support_last = encoding.support.numpy().copy()
    encoding.b[1].assign(encoding.b[1] * -3.0)
    encoding.b[3].assign(encoding.b[3] * 2.0 + 1e-3)
    candidate = encoding.solve()
    np.testing.assert_array_equal(encoding.z.numpy(), z_last)
    assert candidate.z.shape == (4, 35) and candidate.support.shape == (4, 2)
    np.testing.assert_allclose(
        candidate.distances.numpy(),
        np.linalg.norm(candidate.z.numpy() - z_last.astype(np.float64), axis=-1), rtol=1e-12)
    encoding.commit(candidate, nodes=[False, True, False, False])
    np.testing.assert_array_equal(encoding.z.numpy()[[0, 2, 3]], z_last[[0, 2, 3]])
    np.testing.assert_array_equal(encoding.support.numpy()[[0, 2, 3]], support_last[[0, 2, 3]])
    np.testing.assert_allclose(encoding.z.numpy()[1], candidate.z.numpy()[1], rtol=1e-7)
    distances = encoding.recover(frozen=[True, False, True, False])
    assert distances.shape == (4,)
    assert distances.numpy()[0] < 1e-6  # b_0 unchanged: same optimum up to float32 storage
    assert distances.numpy()[3] > 1e-3  # b_3 changed
    np.testing.assert_array_equal(encoding.z.numpy()[2], z_last[2])
    np.testing.assert_allclose(encoding.z.numpy()[3], candidate.z.numpy()[3], rtol=1e-7)


def test_joint_recovery_equals_separate_recoveries():
    normal = sc.ArchitectureEncoding(seed=31, name="normal")
    reduce = sc.ArchitectureEncoding(seed=32, name="reduce")
    joint = sc.solve_jointly([normal, reduce])
    for encoding, recovery in zip((normal, reduce), joint):
        alone = encoding.solve()
        np.testing.assert_allclose(recovery.z.numpy(), alone.z.numpy(), rtol=1e-10, atol=1e-15)
        np.testing.assert_array_equal(recovery.support.numpy(), alone.support.numpy())
    assert normal.support_tuple() != reduce.support_tuple() or \
        not np.array_equal(normal.A[0].numpy(), reduce.A[0].numpy())


def test_genotype_from_encodings_and_sparseness():
    normal = sc.ArchitectureEncoding(seed=41, name="normal")
    reduce = sc.ArchitectureEncoding(seed=42, name="reduce")
    genotype = sc.genotype_from_encodings(normal, reduce)
    assert genotype.normal == normal.picks()
    expected = tuple((genotypes.PRIMITIVES[i % 7], i // 7)
                     for node in reduce.support_tuple() for i in node)
    assert genotype.reduce == expected
    wide = sc.ArchitectureEncoding(seed=43, sparseness=3)
    assert [a.shape for a in wide.alphas()] == [(3,)] * 4
    with pytest.raises(ValueError, match="2 picks each"):
        sc.genotype_from_encodings(wide, reduce)


def test_checkpoint_round_trip(tmp_path):
    source = sc.ArchitectureEncoding(seed=51, name="normal")
    source.b[0].assign(source.b[0] + 0.01)
    source.recover()
    path = tf.train.Checkpoint(encoding=source).save(str(tmp_path / "ckpt"))
    target = sc.ArchitectureEncoding(seed=52, name="normal")
    assert not np.array_equal(target.A[0].numpy(), source.A[0].numpy())
    tf.train.Checkpoint(encoding=target).restore(path).assert_consumed()
    for a, b in zip(source.A + source.b + [source.z, source.support],
                    target.A + target.b + [target.z, target.support]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert target.support_tuple() == source.support_tuple()


def test_config_round_trip():
    encoding = sc.ArchitectureEncoding(seed=61, sparseness=3, distinct_inputs=False,
                                       lam=2e-5, name="reduce")
    config = encoding.get_config()
    for key, value in dict(steps=4, num_ops=7, proj_dims=7, sparseness=3, lam=2e-5,
                           distinct_inputs=False, seed=61).items():
        assert config[key] == value
    clone = sc.ArchitectureEncoding.from_config(config)
    assert clone.name == "reduce"
    np.testing.assert_array_equal(clone.A[2].numpy(), encoding.A[2].numpy())
    np.testing.assert_array_equal(clone.b[2].numpy(), encoding.b[2].numpy())
    assert clone.support_tuple() == encoding.support_tuple()
