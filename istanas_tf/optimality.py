"""How good a LASSO solution is: its KKT violation, and whether its top-k is certain.

For P(z) = 1/2 ||A z - b||^2 + lam ||z||_1 every recovery, whatever the solver, gets

* the **KKT violation** in units of lam (:func:`kkt_violation`): with the correlations
  g = A^T (b - A z), optimality means g_i = lam sign(z_i) where z_i != 0 and
  |g_i| <= lam where z_i = 0; the report is the largest miss over the coordinates,
  divided by lam. The exact homotopy stays at rounding level (~1e-13 to 1e-10 here);
  an unconverged iterate scores far above 1.
* **bounds on |z*_i|** for the exact optimum z* (:func:`magnitude_bounds`), from which
  ``support_certified`` decides whether the support picked from z (the top-k rule of
  ``sparse_coding.select_support``) is provably the support picked from z*.

The bounds, step by step (all from convex duality; nothing assumes the solver worked):

1. A dual point: with r = b - A z, theta = s r, s = min(1, lam / ||A^T r||_inf), is
   feasible for the dual max_theta 1/2 ||b||^2 - 1/2 ||b - theta||^2 subject to
   ||A^T theta||_inf <= lam. The duality gap is G = P(z) - D(theta) >= P(z) - P(z*);
   we evaluate it as 1/2 (1 - s)^2 ||r||^2 + sum_i (lam |z_i| - s g_i z_i), a sum of
   non-negative terms with no cancellation of large numbers.
2. Safe screening (Fercoq, Gramfort & Salmon 2015, "Mind the duality gap"): the dual
   is 1-strongly concave, so the dual optimum theta* = b - A z* lies within sqrt(2 G)
   of theta. A column with |A_i^T theta| + ||A_i|| sqrt(2 G) < lam therefore has
   |A_i^T theta*| < lam, so z*_i = 0. Call the columns that survive S.
3. A distance bound: z* is supported on S, so it also minimises the problem restricted
   to S. If S has at most m columns and they are linearly independent (smallest
   singular value sigma > 0), that restricted problem is sigma^2-strongly convex and
   ||z_S - z*_S||_2 <= delta = sqrt(2 G_S) / sigma, where G_S is the duality gap of
   z_S (z with the entries outside S set to zero) in the restricted problem.
4. So |z*_i| lies in [max(0, |z_i| - delta), |z_i| + delta] for i in S and is exactly
   0 outside S. The pick of z is certain when these intervals cannot reorder it: for
   the paper's rule, the smallest lower bound of the k picks exceeds the largest upper
   bound of the rest; with ``distinct_inputs``, each picked predecessor's op beats its
   other ops the same way, and the picked predecessors' lower bounds beat every other
   predecessor's upper bounds. Strict inequalities also exclude ties in z*.

A failure of step 3 (more than m survivors, or dependent columns) leaves no bound on
the survivors and the node uncertified: the certificate is sufficient, not necessary.
The gaps and eigenvalues get a slack for the float64 rounding of their evaluation
(see ``_GAP_ROUNDING``), so that it cannot make a bound too tight.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# Slack on a duality gap, in units of float64 rounding (eps) times the problem's scale
# ||b||^2 + || |A| |z| ||^2: the error of evaluating r = b - A z, g = A^T r and the gap
# was at most 0.22 of that unit on 120 problems shaped like the search's (b from 1e-3
# to 1, against an 80-bit evaluation). The slack enters the bounds through sqrt(2 G),
# so a generous factor costs certificates: at 256 units it screened too little to
# certify a fifth of the exact optima with b ~ 3e-2 N(0, 1).
_GAP_ROUNDING = 4.0 * np.finfo(np.float64).eps
# Slack on an eigenvalue of A_S A_S^T, in units of eps times the largest one.
_EIGENVALUE_ROUNDING = 256.0 * np.finfo(np.float64).eps
# NumPy scalars, which tf.where takes as float64: a TF constant made at import would
# start TensorFlow's runtime, after which no multi-worker strategy or logical device
# can be configured.
_ZERO, _INF = np.float64(0.0), np.float64(np.inf)


def _float64(*values):
    """Tensors in float64; Python numbers go straight there (a float32 lam = 1e-5 would
    be off by 2.5e-13)."""
    return [
        tf.cast(v, tf.float64) if isinstance(v, tf.Tensor) else tf.constant(v, tf.float64)
        for v in values
    ]


def _matvec(A, x):
    return tf.reduce_sum(A * x[:, None, :], axis=2)


def _rmatvec(A, y):
    return tf.reduce_sum(A * y[:, :, None], axis=1)


def kkt_violation(A, b, z, lam) -> tf.Tensor:
    """The largest violation of the LASSO optimality conditions, in units of lam.

    Args:
      A: [k, m, n] float64. b: [k, m]. z: [k, n]. lam: scalar > 0.

    Returns:
      [k] float64: max_i of |g_i - lam sign(z_i)| (z_i != 0) or max(0, |g_i| - lam)
      (z_i = 0), over lam, with g = A^T (b - A z). Zero at an exact optimum.
    """
    A, b, z, lam = _float64(A, b, z, lam)
    g = _rmatvec(A, b - _matvec(A, z))
    on = tf.not_equal(z, 0.0)
    residual = tf.where(on, tf.abs(g - lam * tf.sign(z)), tf.maximum(tf.abs(g) - lam, 0.0))
    return tf.reduce_max(residual, axis=-1) / lam


def _duality_gap(A, b, z, lam, columns):
    """Duality gap of z for the problem restricted to ``columns`` ([k, n] bools; z is
    zero outside them), with the dual point of step 1 and the rounding slack; [k]."""
    r = b - _matvec(A, z)
    g = tf.where(columns, _rmatvec(A, r), _ZERO)
    largest = tf.reduce_max(tf.abs(g), axis=-1)
    s = tf.where(largest > lam, lam / tf.maximum(largest, lam), tf.ones_like(largest))
    terms = lam * tf.abs(z) - s[:, None] * g * z
    gap = 0.5 * tf.square(1.0 - s) * tf.reduce_sum(r * r, -1) + tf.reduce_sum(terms, -1)
    scale = tf.reduce_sum(b * b, -1) + tf.reduce_sum(tf.square(_matvec(tf.abs(A), tf.abs(z))), -1)
    return tf.maximum(gap, 0.0) + _GAP_ROUNDING * scale, s[:, None] * r


def magnitude_bounds(A, b, z, lam) -> tuple[tf.Tensor, tf.Tensor]:
    """Intervals certain to hold |z*_i| of the exact optimum z* (module docstring).

    Args:
      A: [k, m, n] float64 (zero padding columns allowed). b: [k, m]. z: [k, n], any
        point (not necessarily optimal). lam: scalar > 0.

    Returns:
      (lower, upper): [k, n] float64 each, lower <= |z*_i| <= upper; upper is +inf for
      the surviving columns of a problem where no distance bound holds.
    """
    A, b, z, lam = _float64(A, b, z, lam)
    m = A.shape[1]
    everything = tf.ones_like(z, tf.bool)
    gap, theta = _duality_gap(A, b, z, lam, everything)
    radius = tf.sqrt(2.0 * gap)[:, None]
    column_norms = tf.norm(A, axis=1)  # [k, n]
    survives = tf.abs(_rmatvec(A, theta)) + column_norms * radius >= lam
    survivors = tf.reduce_sum(tf.cast(survives, tf.int32), -1)  # [k]

    # sigma_min(A_S)^2: the |S| nonzero eigenvalues of A_S A_S^T (m x m) are those of
    # A_S^T A_S; in ascending order the smallest of them is at index m - |S|.
    A_S = A * tf.cast(survives, A.dtype)[:, None, :]
    eigenvalues = tf.linalg.eigvalsh(tf.matmul(A_S, A_S, transpose_b=True))  # [k, m]
    index = tf.clip_by_value(m - survivors, 0, m - 1)
    smallest = tf.gather(eigenvalues, index[:, None], batch_dims=1)[:, 0]
    sigma_squared = smallest - _EIGENVALUE_ROUNDING * m * eigenvalues[:, -1]
    bounded = (survivors <= m) & ((sigma_squared > 0.0) | (survivors == 0))

    z_S = tf.where(survives, z, _ZERO)
    gap_S, _ = _duality_gap(A, b, z_S, lam, survives)
    delta = tf.sqrt(2.0 * gap_S / tf.where(sigma_squared > 0.0, sigma_squared, 1.0))
    delta = tf.where(bounded, delta, _INF)[:, None]
    magnitude = tf.abs(z)
    lower = tf.where(survives, tf.maximum(magnitude - delta, 0.0), _ZERO)
    upper = tf.where(survives, magnitude + delta, _ZERO)
    return lower, upper


def support_certified(lower, upper, support, num_ops: int, distinct_inputs: bool) -> tf.Tensor:
    """Whether a node's picks are those of every z with lower <= |z| <= upper.

    Args:
      lower, upper: [n] bounds on |z*| of one node (flat index predecessor * num_ops + op).
      support: [k] int32, the picks ``sparse_coding.select_support`` made from z.
      num_ops: candidate ops per predecessor.
      distinct_inputs: the rule that picks k different predecessors.

    Returns:
      A bool scalar tensor; True only if the picks provably equal those of z*.
    """
    lower, upper = _float64(lower, upper)
    support = tf.convert_to_tensor(support, tf.int32)
    n = lower.shape[-1]
    if not distinct_inputs:
        picked = tf.reduce_any(tf.equal(tf.range(n)[:, None], support[None, :]), axis=1)
        weakest_pick = tf.reduce_min(tf.where(picked, lower, _INF))
        strongest_rest = tf.reduce_max(tf.where(picked, -_INF, upper))
        return weakest_pick > strongest_rest
    lower = tf.reshape(lower, [n // num_ops, num_ops])
    upper = tf.reshape(upper, [n // num_ops, num_ops])
    inputs, ops = support // num_ops, support % num_ops
    own = tf.gather_nd(lower, tf.stack([inputs, ops], axis=1))  # [k]
    # Each picked predecessor's op must beat the predecessor's other ops ...
    other_ops = tf.not_equal(tf.range(num_ops)[None, :], ops[:, None])
    rival_ops = tf.reduce_max(tf.where(other_ops, tf.gather(upper, inputs), -_INF), axis=1)
    # ... and the picked predecessors must beat the best op of every other one.
    picked = tf.reduce_any(tf.equal(tf.range(n // num_ops)[:, None], inputs[None, :]), axis=1)
    rival_inputs = tf.reduce_max(tf.where(picked, -_INF, tf.reduce_max(upper, axis=1)))
    return tf.reduce_all(own > rival_ops) & (tf.reduce_min(own) > rival_inputs)
