"""Tests for istanas_tf.architecture: the ISTA-NAS encoding and its recovery.

The recovered z is checked against the KKT conditions and scipy's exact LASSO
(tests/lasso_oracle.py), alpha and its gradient against their closed forms.
"""

import numpy as np
import pytest
import tensorflow as tf
from lasso_oracle import kkt_violation, scipy_lasso

from istanas_tf import architecture as arch
from istanas_tf import genotypes
from istanas_tf import sparse_coding as sc

NODE_WIDTHS = (14, 21, 28, 35)  # n_j = 7 (j + 2)


def _recovered(**kwargs):
    """A new encoding with its first recovery committed (Algorithm 1's start)."""
    encoding = arch.ArchitectureEncoding(**kwargs)
    encoding.commit(encoding.solve())
    return encoding


def test_encoding_alphas_equal_z_when_b_is_in_the_support_span():
    encoding = _recovered(seed=11, name="normal")
    support = encoding.support_tuple()
    for j, indices in enumerate(support):
        A_S = tf.gather(encoding.A[j], indices, axis=1)
        z_S = tf.gather(encoding.z[j], indices)
        encoding.b[j].assign(tf.linalg.matvec(A_S, z_S))
    for j, alpha in enumerate(encoding.alphas(support)):
        z_S = tf.gather(encoding.z[j], support[j])
        np.testing.assert_allclose(alpha.numpy(), z_S.numpy(), rtol=1e-5, atol=1e-9)


def test_gradient_wrt_b_is_A_S_times_gradient_wrt_alpha():
    encoding = _recovered(seed=12, name="normal")
    support = encoding.support_tuple()
    weights = [
        tf.constant([1.5, -2.0]),
        tf.constant([0.5, 3.0]),
        tf.constant([-1.0, 1.0]),
        tf.constant([2.0, 0.25]),
    ]
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


def test_encoding_distinct_inputs_never_repeats_a_predecessor():
    for seed in range(4):
        encoding = _recovered(seed=seed, distinct_inputs=True)
        for node in encoding.support_tuple():
            assert len({i // 7 for i in node}) == len(node)


def test_non_finite_b_is_refused():
    encoding = _recovered(seed=13, name="reduce")
    z_before = encoding.z.numpy().copy()
    encoding.b[2].assign([0.0, np.nan, 0.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"reduce: b of node 2 contains NaN or inf"):
        encoding.commit(encoding.solve())
    encoding.b[2].assign([0.0, 0.0, np.inf, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"reduce: b of node 2"):
        encoding.solve()
    with pytest.raises(ValueError, match=r"node 2"):
        arch.solve_jointly([_recovered(seed=14), encoding])
    np.testing.assert_array_equal(encoding.z.numpy(), z_before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparseness=0), r"sparseness=0 .*\[1, 14\]"),
        (dict(sparseness=15), r"sparseness=15 .*\[1, 14\]"),
        (dict(sparseness=3, distinct_inputs=True), r"sparseness=3 .*\[1, 2\]"),
        (dict(proj_dims=0), r"proj_dims=0 .*>= 1"),
        (dict(steps=0), r"steps=0 .*>= 1"),
        (dict(lam=0.0), r"lam=0.0 .*> 0"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _recovered(**kwargs)


def test_encoding_state_and_recovery():
    encoding = _recovered(seed=21, name="normal")
    assert [tuple(a.shape) for a in encoding.A] == [(7, n) for n in NODE_WIDTHS]
    assert [tuple(b.shape) for b in encoding.b] == [(7,)] * 4
    assert [v.name for v in encoding.trainable_variables] == ["b_0", "b_1", "b_2", "b_3"]
    A0 = encoding.A[0].numpy()
    assert A0.min() >= 0.0 and A0.max() < 1.0
    assert 1e-4 < np.abs(encoding.b[0].numpy()).mean() < 1e-2
    # The first recovery: z is the LASSO optimum of (A_j, b_j), support its top-2.
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
        np.linalg.norm(candidate.z.numpy() - z_last.astype(np.float64), axis=-1),
        rtol=1e-12,
    )
    encoding.commit(candidate, nodes=[False, True, False, False])
    np.testing.assert_array_equal(encoding.z.numpy()[[0, 2, 3]], z_last[[0, 2, 3]])
    np.testing.assert_array_equal(encoding.support.numpy()[[0, 2, 3]], support_last[[0, 2, 3]])
    np.testing.assert_allclose(encoding.z.numpy()[1], candidate.z.numpy()[1], rtol=1e-7)
    again = encoding.solve()
    encoding.commit(again, nodes=[False, True, False, True])
    distances = again.distances
    assert distances.shape == (4,)
    assert distances.numpy()[0] < 1e-6  # b_0 unchanged: same optimum up to float32 storage
    assert distances.numpy()[3] > 1e-3  # b_3 changed
    np.testing.assert_array_equal(encoding.z.numpy()[2], z_last[2])
    np.testing.assert_allclose(encoding.z.numpy()[3], candidate.z.numpy()[3], rtol=1e-7)


def test_joint_recovery_equals_separate_recoveries():
    normal = _recovered(seed=31, name="normal")
    reduce = _recovered(seed=32, name="reduce")
    joint = arch.solve_jointly([normal, reduce])
    for encoding, recovery in zip((normal, reduce), joint):
        alone = encoding.solve()
        np.testing.assert_allclose(recovery.z.numpy(), alone.z.numpy(), rtol=1e-10, atol=1e-15)
        np.testing.assert_array_equal(recovery.support.numpy(), alone.support.numpy())
    assert normal.support_tuple() != reduce.support_tuple() or not np.array_equal(
        normal.A[0].numpy(), reduce.A[0].numpy()
    )


def test_genotype_of_encodings_and_sparseness():
    normal = _recovered(seed=41, name="normal")
    reduce = _recovered(seed=42, name="reduce")
    genotype = sc.genotype_from_supports(normal.selected_support(), reduce.selected_support())
    assert genotype.normal == tuple(
        (genotypes.PRIMITIVES[i % 7], i // 7) for node in normal.support_tuple() for i in node
    )
    expected = tuple(
        (genotypes.PRIMITIVES[i % 7], i // 7) for node in reduce.support_tuple() for i in node
    )
    assert genotype.reduce == expected
    wide = _recovered(seed=43, sparseness=3)
    assert [a.shape for a in wide.alphas()] == [(3,)] * 4
    with pytest.raises(ValueError, match="2 picks each"):
        sc.genotype_from_supports(wide.selected_support(), reduce.selected_support())


def test_checkpoint_round_trip(tmp_path):
    source = _recovered(seed=51, name="normal")
    source.b[0].assign(source.b[0] + 0.01)
    source.commit(source.solve())
    path = tf.train.Checkpoint(encoding=source).save(str(tmp_path / "ckpt"))
    target = _recovered(seed=52, name="normal")
    assert not np.array_equal(target.A[0].numpy(), source.A[0].numpy())
    tf.train.Checkpoint(encoding=target).restore(path).assert_consumed()
    for a, b in zip(
        source.A + source.b + [source.z, source.support],
        target.A + target.b + [target.z, target.support],
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert target.support_tuple() == source.support_tuple()


def test_config_round_trip():
    encoding = _recovered(seed=61, sparseness=3, distinct_inputs=False, lam=2e-5, name="reduce")
    config = encoding.get_config()
    for key, value in dict(
        steps=4, num_ops=7, proj_dims=7, sparseness=3, lam=2e-5, distinct_inputs=False, seed=61
    ).items():
        assert config[key] == value
    clone = arch.ArchitectureEncoding.from_config(config)
    with pytest.raises(ValueError, match="no architecture recovered yet"):
        clone.support_tuple()  # a new encoding has drawn A and b, recovered nothing
    clone.commit(clone.solve())
    assert clone.name == "reduce"
    np.testing.assert_array_equal(clone.A[2].numpy(), encoding.A[2].numpy())
    np.testing.assert_array_equal(clone.b[2].numpy(), encoding.b[2].numpy())
    assert clone.support_tuple() == encoding.support_tuple()


def test_recovery_report_rows_and_the_report_of_a_scripted_z():
    normal = _recovered(seed=21, name="normal")
    reduce = _recovered(seed=22, name="reduce")
    recoveries = dict(zip(("normal", "reduce"), arch.solve_jointly([normal, reduce])))
    report = arch.recovery_report(recoveries, {"normal": [True] * 4, "reduce": [False] * 4})
    assert report["z_distance"]["reduce"] == [0.0] * 4  # not searching: reported as 0
    assert report["z_distance"]["normal"] == [float(d) for d in recoveries["normal"].distances]
    assert all(v < 1e-6 for v in report["kkt_violation"]["normal"])  # the exact solver
    assert report["kkt_violation_max"] == max(max(v) for v in report["kkt_violation"].values())
    assert report["certified_nodes"] == sum(sum(c) for c in report["certified"].values())
    assert arch.recovery_report({}) == {}
    # recovery_of reports on any z: the exact one is certified, a far one is not.
    exact = recoveries["normal"].z
    assert np.all(normal.recovery_of(exact).certified.numpy() == recoveries["normal"].certified)
    far = normal.recovery_of(exact.numpy() * 0.5)
    assert not np.any(far.certified.numpy()) and np.all(far.kkt_violation.numpy() > 1.0)
    with pytest.raises(ValueError, match="--recovery_solver='lars'"):
        arch.solve_jointly([normal], solver="lars")
    with pytest.raises(ValueError, match="--recovery_iterations=0"):
        arch.solve_jointly([normal], solver="fista", iterations=0)
