"""Tests for istanas_tf.proximal (ISTA / FISTA) and istanas_tf.optimality (the KKT report
and the top-k certificate of every recovery).

Oracles: the exact homotopy (``lasso.solve_lasso``, itself checked against scipy in
lasso_test.py), the closed-form soft threshold for orthonormal A, and the numpy KKT
check of lasso_oracle.py.
"""

import numpy as np
import pytest
import tensorflow as tf
from lasso_oracle import kkt_violation, objective

from istanas_tf import lasso, optimality, sparse_coding

LAM = 1e-5
WIDTHS = (14, 21, 28, 35) * 2  # one recovery: 4 normal + 4 reduce nodes


def recovery_problems(scale: float, seed: int):
    """8 problems shaped like a recovery: A [8, 7, 35] Uniform[0, 1) zero-padded, b [8, 7]."""
    rng = np.random.default_rng(seed)
    A = np.zeros((8, 7, 35))
    for i, n in enumerate(WIDTHS):
        A[i, :, :n] = rng.uniform(size=(7, n))
    return A, scale * rng.standard_normal((8, 7))


def well_conditioned_problems(seed: int):
    """8 problems with 3-6 Gaussian columns of 7 rows (full column rank, condition
    number a few units), zero-padded to 35 columns: ISTA converges linearly and fast."""
    rng = np.random.default_rng(seed)
    widths = (3, 4, 5, 6) * 2
    A = np.zeros((8, 7, 35))
    for i, n in enumerate(widths):
        A[i, :, :n] = rng.standard_normal((7, n))
    return A, rng.standard_normal((8, 7)), widths


def certified(A, b, z, lam=LAM, k=2, num_ops=7, distinct_inputs=False):
    lower, upper = optimality.magnitude_bounds(A, b, z, lam)
    flags = []
    for i, row in enumerate(z):
        support = sparse_coding.select_support(tf.constant(row), k, num_ops, distinct_inputs)
        flags.append(
            bool(
                optimality.support_certified(lower[i], upper[i], support, num_ops, distinct_inputs)
            )
        )
    return flags


@pytest.mark.parametrize("method", ["ista", "fista"])
def test_reaches_the_homotopy_objective_on_well_conditioned_problems(method):
    A, b, widths = well_conditioned_problems(seed=0)
    exact = lasso.solve_lasso(A, b, 0.1).numpy()  # lam 0.1 zeroes some entries
    z = lasso.solve_lasso_iterative(A, b, 0.1, method=method, iterations=2000).numpy()
    for i, n in enumerate(widths):
        assert np.all(z[i, n:] == 0.0)  # padding columns stay exactly zero
        f_exact = objective(A[i], b[i], exact[i], 0.1)
        # Stated tolerance: 1e-12 relative. With condition numbers of a few units the
        # error contracts by a fixed factor < 1 per step, far below it after 2000 steps.
        assert objective(A[i], b[i], z[i], 0.1) - f_exact <= 1e-12 * f_exact
        np.testing.assert_allclose(z[i], exact[i], rtol=0, atol=1e-9)
    # The batch computes what eight separate calls compute.
    alone = [
        lasso.solve_lasso_iterative(A[i], b[i], 0.1, method=method, iterations=2000).numpy()
        for i in range(8)
    ]
    np.testing.assert_allclose(z, np.stack(alone), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["ista", "fista"])
def test_orthonormal_columns_give_the_soft_threshold_and_a_warm_optimum_stays(method):
    rng = np.random.default_rng(1)
    Q = np.stack([np.linalg.qr(rng.standard_normal((7, 7)))[0] for _ in range(8)])
    A = np.concatenate([Q, np.zeros((8, 7, 28))], axis=2)
    b = rng.standard_normal((8, 7))
    c = np.einsum("kmn,km->kn", Q, b)
    expected = np.sign(c) * np.maximum(np.abs(c) - 0.4, 0.0)
    z = lasso.solve_lasso_iterative(A, b, 0.4, method=method, iterations=50).numpy()
    np.testing.assert_allclose(z[:, :7], expected, rtol=0, atol=1e-12)
    assert np.all(z[:, 7:] == 0.0)

    # On the search's problems, the homotopy's optimum is a fixed point of both methods.
    A, b = recovery_problems(1e-3, seed=2)
    exact = lasso.solve_lasso(A, b, LAM).numpy()
    z = lasso.solve_lasso_iterative(A, b, LAM, exact, method=method, iterations=200).numpy()
    for i, n in enumerate(WIDTHS):
        f_exact = objective(A[i, :, :n], b[i], exact[i, :n])
        assert abs(objective(A[i, :, :n], b[i], z[i, :n]) - f_exact) <= 1e-12 * f_exact
        assert np.all(z[i, n:] == 0.0)


def test_iterative_solver_rejects_bad_arguments():
    A, b = recovery_problems(1e-3, seed=0)
    with pytest.raises(ValueError, match="method='lars'.*valid: fista, ista"):
        lasso.solve_lasso_iterative(A, b, method="lars")
    with pytest.raises(ValueError, match="iterations=0"):
        lasso.solve_lasso_iterative(A, b, iterations=0)


@pytest.mark.parametrize("scale", [1e-3, 1.0])
def test_kkt_report_is_zero_on_optima_and_flags_other_points(scale):
    A, b = recovery_problems(scale, seed=3)
    exact = lasso.solve_lasso(A, b, LAM).numpy()
    report = optimality.kkt_violation(A, b, exact, LAM).numpy()
    oracle = [kkt_violation(A[i], b[i], exact[i]) for i in range(8)]
    assert np.all(report <= 1e-6)  # the homotopy: rounding level
    np.testing.assert_allclose(report, oracle, rtol=1e-6, atol=1e-9)

    # Closed form: orthonormal A, z* = soft(A^T b, lam).
    rng = np.random.default_rng(4)
    Q = np.linalg.qr(rng.standard_normal((7, 7)))[0]
    b_q = rng.standard_normal(7)
    c = Q.T @ b_q
    z_star = np.sign(c) * np.maximum(np.abs(c) - 0.4, 0.0)
    assert optimality.kkt_violation(Q[None], b_q[None], z_star[None], 0.4).numpy()[0] < 1e-9

    # A perturbed optimum (10 %), and ISTA after 10 steps, are far from optimal.
    perturbed = exact * 1.1
    report = optimality.kkt_violation(A, b, perturbed, LAM).numpy()
    np.testing.assert_allclose(
        report, [kkt_violation(A[i], b[i], perturbed[i]) for i in range(8)], rtol=1e-9
    )
    assert np.all(report > 10.0)
    early = lasso.solve_lasso_iterative(A, b, LAM, method="ista", iterations=10)
    assert np.all(optimality.kkt_violation(A, b, early, LAM).numpy() > 1.0)


def test_certificate_on_closed_form_optima_a_tie_and_a_far_point():
    rng = np.random.default_rng(5)
    Q = np.linalg.qr(rng.standard_normal((7, 7)))[0]
    A = np.concatenate([Q, np.zeros((7, 7))], axis=1)[None]  # 14 columns: node 0
    clear = np.array([3.0, -2.0, 1.0, 0.5, 0.1, 0.0, 0.0])
    tie = np.array([3.0, -2.0, 2.0, 0.5, 0.1, 0.0, 0.0])  # 2nd and 3rd equal
    for c, expected in ((clear, True), (tie, False)):
        b = (Q @ c)[None]
        z = np.concatenate([np.sign(c) * np.maximum(np.abs(c) - LAM, 0.0), np.zeros(7)])[None]
        assert certified(A, b, z) == [expected]
    # A point far from the optimum (the right picks, but nothing proves them).
    b = (Q @ clear)[None]
    assert certified(A, b, 0.5 * np.concatenate([clear, np.zeros(7)])[None]) == [False]

    # distinct_inputs, on given bounds (+-1e-3 around |z|): predecessor 0 (columns 0-6)
    # has a clear best op; predecessor 1's best op is clear, then tied with another.
    for second, expected in ((np.array([0, 2.5, 0, 0, 0, 0, 0]), True), (np.full(7, 2.5), False)):
        z = np.concatenate([clear, second])
        lower, upper = np.abs(z) - 1e-3, np.abs(z) + 1e-3
        picks = sparse_coding.select_support(tf.constant(z), 2, 7, distinct_inputs=True)
        assert bool(optimality.support_certified(lower, upper, picks, 7, True)) == expected


@pytest.mark.parametrize("scale", [1e-3, 3e-2])
def test_certificate_is_sound_and_holds_for_most_exact_optima(scale):
    """Whatever the point, the bounds hold |z*| and a certified pick is the exact one."""
    parts = [recovery_problems(scale, seed) for seed in range(10, 15)]  # 40 problems
    A, b = np.concatenate([A for A, _ in parts]), np.concatenate([b for _, b in parts])
    exact = np.concatenate(
        [lasso.solve_lasso(A[i : i + 8], b[i : i + 8], LAM).numpy() for i in range(0, len(b), 8)]
    )
    exact_picks = [set(sparse_coding.select_support(row, 2, 7).numpy()) for row in exact]
    flags = certified(A, b, exact)
    assert np.mean(flags) >= 0.9, np.mean(flags)
    for method, iterations in (("ista", 300), ("fista", 300), ("fista", 5000)):
        z = np.concatenate(
            [
                lasso.solve_lasso_iterative(
                    A[i : i + 8], b[i : i + 8], LAM, None, method, iterations
                )
                for i in range(0, len(b), 8)
            ]
        )
        lower, upper = (t.numpy() for t in optimality.magnitude_bounds(A, b, z, LAM))
        slack = 1e-12 * np.abs(exact).max(axis=1, keepdims=True)
        assert np.all(lower <= np.abs(exact) + slack) and np.all(np.abs(exact) <= upper + slack)
        for i, ok in enumerate(certified(A, b, z)):
            if ok:
                assert set(sparse_coding.select_support(z[i], 2, 7).numpy()) == exact_picks[i]
