"""Tests for istanas_tf.lasso: the exact LASSO solver (the paper's Eq. 9).

Oracles are independent of the solver under test: the closed-form soft threshold, the
KKT conditions evaluated here in numpy, and scipy's Lawson-Hanson NNLS applied to the
LASSO's dual (a least-distance problem), which is an exact active-set method.
"""

import numpy as np
import pytest
import tensorflow as tf
from lasso_oracle import kkt_violation, objective, scipy_lasso

from istanas_tf import lasso

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


@pytest.fixture(scope="module", params=[False, True], ids=["graph", "xla"])
def solved(request):
    """Both regimes, 160 problems each, solved in batches of 8 (one recovery's shape,
    which most tests share so that the solver is traced for few shapes), by the plain
    graph (what a search runs) and by the XLA-compiled loop."""
    results = {}
    for index, (name, scale) in enumerate(REGIMES.items()):
        A, b, widths = our_problems(160, scale, seed=100 + index)
        z = np.concatenate(
            [
                lasso.solve_lasso(A[i : i + 8], b[i : i + 8], LAM, xla=request.param).numpy()
                for i in range(0, len(b), 8)
            ]
        )
        results[name] = (A, b, widths, z)
    return results


def test_orthonormal_A_gives_soft_threshold():
    rng = np.random.default_rng(0)
    Q = np.stack([np.linalg.qr(rng.standard_normal((7, 7)))[0] for _ in range(8)])
    A = np.concatenate([Q, np.zeros((8, 7, 28))], axis=2)  # padded like a recovery
    b = rng.standard_normal((8, 7))
    for lam in (LAM, 0.4):  # 0.4 zeroes some entries
        z = lasso.solve_lasso(A, b, lam).numpy()
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


@pytest.mark.parametrize("scale", REGIMES.values(), ids=REGIMES)
def test_graph_and_xla_loops_reach_the_same_optimum(scale):
    # The optimum is unique (columns in general position): the two programs may round
    # differently on the way, not arrive elsewhere.
    A, b, _ = our_problems(16, scale, seed=8)
    for batch in (slice(0, 8), slice(8, 16)):
        graph = lasso.solve_lasso(A[batch], b[batch]).numpy()
        xla = lasso.solve_lasso(A[batch], b[batch], xla=True).numpy()
        assert np.array_equal(graph != 0, xla != 0)
        np.testing.assert_allclose(graph, xla, rtol=1e-10, atol=1e-14 * scale)


def test_padded_problem_equals_unpadded():
    A, b, widths = our_problems(4, 1.0, seed=7)
    n = 14
    z_padded = lasso.solve_lasso(A[0], b[0]).numpy()
    z_plain = lasso.solve_lasso(A[0, :, :n], b[0]).numpy()
    assert z_plain.shape == (n,)
    np.testing.assert_allclose(z_padded[:n], z_plain, rtol=1e-10, atol=1e-14)
    assert np.all(z_padded[n:] == 0.0)


def test_batch_equals_single_problems():
    A, b, _ = our_problems(8, 1.0, seed=3)
    batch = lasso.solve_lasso(A, b).numpy()
    for i in range(8):
        single = lasso.solve_lasso(A[i], b[i]).numpy()
        np.testing.assert_allclose(single, batch[i], rtol=1e-10, atol=1e-14)
        assert np.array_equal(single != 0, batch[i] != 0)


def test_warm_start_gives_the_same_optimum():
    A, b, _ = our_problems(8, 1.0, seed=4)
    cold = lasso.solve_lasso(A, b).numpy()
    rng = np.random.default_rng(4)
    starts = {
        "optimum": cold,
        "optimum_of_a_nearby_b": lasso.solve_lasso(A, b + 1e-3 * rng.standard_normal(b.shape)),
        "dense_random": rng.standard_normal(cold.shape),
        "wrong_signs": -cold,
    }
    for name, z0 in starts.items():
        warm = lasso.solve_lasso(A, b, z0=z0).numpy()
        np.testing.assert_allclose(warm, cold, rtol=1e-10, atol=1e-13, err_msg=name)
        assert np.array_equal(warm != 0, cold != 0), name


def test_zero_b_gives_zero_z():
    A, _, _ = our_problems(8, 1.0, seed=5)
    z = lasso.solve_lasso(A, np.zeros((8, 7))).numpy()
    assert np.all(z == 0.0)


def test_step_cap_and_non_finite_inputs_raise():
    A, b, _ = our_problems(8, 1.0, seed=6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="no verified KKT point"):
        lasso.solve_lasso(A, b, max_steps=2)
    with pytest.raises(ValueError, match="lam=0.0 out of range"):
        lasso.solve_lasso(A, b, lam=0.0)
    b[3, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not finite .* problems \[3\]"):
        lasso.solve_lasso(A, b)
    # Inside a tf.function the same checks are assertion ops.
    in_graph = tf.function(lambda A, b: lasso.solve_lasso(A, b))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not finite"):
        in_graph(tf.constant(A), tf.constant(b))
    b[3, 1] = 0.0
    np.testing.assert_allclose(
        in_graph(tf.constant(A), tf.constant(b)).numpy(),
        lasso.solve_lasso(A, b).numpy(),
        rtol=1e-12,
        atol=1e-15,
    )
