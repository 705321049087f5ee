"""ISTA and FISTA for the LASSO of ISTA-NAS recovery, batched, float64, XLA-compiled.

    z = argmin_z 1/2 ||A z - b||^2 + lam ||z||_1

Both are proximal gradient methods: a gradient step on the smooth part with step 1/L,
L the largest eigenvalue of A^T A (the Lipschitz constant of its gradient), then the
proximal map of the l1 term, soft-thresholding at lam / L. ISTA takes the step from the
last iterate; FISTA (Beck & Teboulle 2009, "A fast iterative shrinkage-thresholding
algorithm") takes it from an extrapolated point with the momentum (t_k - 1) / t_{k+1},
t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2, which improves the worst-case objective error
after k steps from O(1/k) to O(1/k^2).

Unlike the homotopy (:mod:`istanas_tf.homotopy`) neither reaches the optimum in a
finite number of steps: with m = 7 rows and up to 35 columns, A^T A is singular and
the columns are coherent, so after the support is found the error falls only as fast
as the conditioning of the support's columns allows. How close a run came is measured
by :mod:`istanas_tf.optimality` (the KKT report and the support certificate).

The iteration count is a tensor, so one compiled program per problem shape serves
every count. Zero (padding) columns stay exactly zero: their gradient is zero and the
warm start has zeros there. ``lasso.solve_lasso_iterative`` is the entry point.
"""

from __future__ import annotations

import tensorflow as tf

METHODS = ("fista", "ista")


def _matvec(A: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """A x for A: [k, m, n], x: [k, n] -> [k, m] (multiply-and-sum: XLA fuses it)."""
    return tf.reduce_sum(A * x[:, None, :], axis=2)


def _rmatvec(A: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """A^T y for A: [k, m, n], y: [k, m] -> [k, n]."""
    return tf.reduce_sum(A * y[:, :, None], axis=1)


def lipschitz_constants(A: tf.Tensor) -> tf.Tensor:
    """L = the largest eigenvalue of A^T A per problem, A: [k, m, n] -> [k] (float64).

    Computed from A A^T ([k, m, m], the same nonzero eigenvalues as the n x n A^T A,
    and m = 7 << n).
    """
    return tf.reduce_max(tf.linalg.eigvalsh(tf.matmul(A, A, transpose_b=True)), axis=-1)


def soft_threshold(x: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """sign(x) max(|x| - threshold, 0), the proximal map of threshold * ||.||_1."""
    return tf.sign(x) * tf.maximum(tf.abs(x) - threshold, 0.0)


def _iterate(A, b, lam, z0, iterations, accelerated: bool):
    # An all-zero A (L = 0) would divide by zero; with L at the smallest normal float
    # the threshold lam / L zeroes every entry, which is that problem's optimum.
    lipschitz = tf.maximum(lipschitz_constants(A), tf.constant(1e-300, tf.float64))
    step = (1.0 / lipschitz)[:, None]
    threshold = lam * step

    def body(i, z, y, t):
        z_next = soft_threshold(y + step * _rmatvec(A, b - _matvec(A, y)), threshold)
        if not accelerated:
            return i + 1, z_next, z_next, t
        t_next = 0.5 * (1.0 + tf.sqrt(1.0 + 4.0 * t * t))
        y_next = z_next + ((t - 1.0) / t_next) * (z_next - z)
        return i + 1, z_next, y_next, t_next

    _, z, _, _ = tf.while_loop(
        lambda i, z, y, t: i < iterations,
        body,
        (tf.constant(0, tf.int32), z0, z0, tf.constant(1.0, tf.float64)),
    )
    return z


# autograph=False: explicit tf.while_loop, Python branches only on static values.
@tf.function(jit_compile=True, autograph=False)
def fista(A, b, lam, z0, iterations):
    """FISTA (Beck & Teboulle 2009) from z0, ``iterations`` steps.

    Args:
      A: [k, m, n] float64. b: [k, m]. lam: scalar float64 > 0. z0: [k, n] warm start.
      iterations: int32 scalar, >= 0.

    Returns:
      z: [k, n] float64.
    """
    return _iterate(A, b, lam, z0, iterations, accelerated=True)


@tf.function(jit_compile=True, autograph=False)
def ista(A, b, lam, z0, iterations):
    """ISTA (proximal gradient with step 1/L) from z0; arguments as :func:`fista`."""
    return _iterate(A, b, lam, z0, iterations, accelerated=False)
