"""The homotopy (LARS-lasso) path of the LASSO, as one batched loop.

For 1/2 ||A z - b||^2 + lam ||z||_1 the solution is piecewise affine in lam (Osborne,
Presnell & Turlach 2000; Efron et al. 2004): starting from lam_max = ||A^T b||_inf, where
z = 0, each breakpoint adds a column to the active set or drops one. :func:`solve_path`
follows the path of k problems at once in a ``tf.while_loop`` (float64), each step one
small Cholesky solve of the active columns, until each reaches the target lam and its
KKT conditions verify with a rounding-error-aware tolerance. It runs as a plain graph
(:data:`solve_path`) or XLA-compiled (:data:`solve_path_xla`). ``lasso.solve_lasso``
is the public entry point; this module is the algorithm.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# KKT tolerance: a relative slack on lam plus a multiple of the rounding error bound of
# the correlations A^T (b - A z) (see _kkt_ok).
_KKT_LAM_RTOL = 1e-9
_KKT_ROUNDING_FACTOR = 64.0 * np.finfo(np.float64).eps

# Per-problem outcome codes of solve_path.
STATUS_OK, STATUS_NOT_FINITE, STATUS_NO_KKT_POINT = 0, 1, 2

# An event of the path computed a hair above the current lam (rounding on a nearly
# simultaneous breakpoint) is still taken, at the current lam.
_EVENT_RTOL = 1e-12


def _matvec(A: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """A x for A: [k, m, n], x: [k, n]; returns [k, m].

    Multiply-and-sum rather than a dot: XLA fuses it with its neighbours, where a batched
    dot is a library call; at these sizes that made a homotopy step ~30% faster.
    """
    return tf.reduce_sum(A * x[:, None, :], axis=2)


def _rmatvec(A: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """A^T y for A: [k, m, n], y: [k, m]; returns [k, n]."""
    return tf.reduce_sum(A * y[:, :, None], axis=1)


def _correlations(A: tf.Tensor, b: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """c = A^T (b - A z) for A: [k, m, n], b: [k, m], z: [k, n]; returns [k, n]."""
    return _rmatvec(A, b - _matvec(A, z))


def _cholesky_solver(G: tf.Tensor):
    """Factorises SPD matrices G: [k, p, p]; returns a function rhs [k, p, r] -> G^-1 rhs.

    Cholesky, because XLA's general solve lost about three digits on these coherent
    matrices. The factorisation and the inversion of the triangular factor are unrolled
    over the static p into column operations on the whole batch, which XLA fuses: its
    generic Cholesky and triangular-solve loops made each homotopy step ~8x slower at
    p = 7, and solving through the explicit inverse of L (two small products per solve)
    is another ~25% faster than substitution. The caller's iterative refinement step
    keeps the KKT residual at rounding level (checked on 10^6 problems shaped like the
    search's, in both regimes of b, and on nearly collinear columns).
    """
    p = G.shape[-1]
    rows = tf.range(p)
    # Outer-product form: take column j of the Schur complement, then remove it.
    columns = []
    for j in range(p):
        column = G[:, :, j] / tf.sqrt(G[:, j, j])[:, None]
        column = tf.where(rows >= j, column, tf.zeros_like(column))  # [k, p]
        columns.append(column)
        G = G - column[:, :, None] * column[:, None, :]
    L = tf.stack(columns, axis=2)  # [k, p, p] lower triangular
    diagonal = tf.linalg.diag_part(L)  # [k, p]

    # L^-1 by forward substitution on the identity (p sequential column steps, once);
    # each solve is then two small matrix products instead of 2p sequential steps.
    rhs = tf.broadcast_to(tf.eye(p, dtype=L.dtype), tf.shape(L))
    rows_of_inverse = []
    for i in range(p):
        row = rhs[:, i] / diagonal[:, i, None]  # [k, p]
        # columns[i] is L[:, :, i]; sliced from the stacked L with a new axis, grappler's
        # arithmetic optimizer dropped that axis (TF 2.21: [k, p] * [k, 1, p] broke the
        # plain graph; XLA skips grappler).
        rhs = rhs - columns[i][:, :, None] * row[:, None, :]
        rows_of_inverse.append(row)
    L_inv = tf.stack(rows_of_inverse, axis=1)  # [k, p, p] lower triangular

    def solve(rhs):
        y = tf.reduce_sum(L_inv[:, :, :, None] * rhs[:, None, :, :], axis=2)
        return tf.reduce_sum(L_inv[:, :, :, None] * y[:, :, None, :], axis=1)

    return solve


def _path_point(A, b, slot_col, slot_on, slot_sign):
    """Affine pieces of the LASSO path for a fixed active set and sign pattern.

    On a segment of the path with active set S and signs s, the optimality conditions
    A_S^T (b - A_S z_S) = lam s give z_S(lam) = u - lam d with
    u = (A_S^T A_S)^-1 A_S^T b and d = (A_S^T A_S)^-1 s.

    The active set is held in p = min(m, n) slots (a column index per slot, and whether
    the slot is used), so the system is p x p whatever the width n.

    Args:
      A: [k, m, n]. b: [k, m].
      slot_col: [k, p] int32 column of each slot. slot_on: [k, p] bool.
      slot_sign: [k, p] float, +-1 on used slots, 0 on empty ones.

    Returns:
      A_S: [k, m, p] active columns (0 in empty slots); u, d: [k, p], 0 in empty slots.
    """
    A_S = tf.gather(A, slot_col, axis=2, batch_dims=1)
    A_S = tf.where(slot_on[:, None, :], A_S, tf.zeros_like(A_S))
    G = tf.reduce_sum(A_S[:, :, :, None] * A_S[:, :, None, :], axis=1)
    # Empty slots get an identity row/column, which decouples them from the used ones.
    both = tf.logical_and(slot_on[:, :, None], slot_on[:, None, :])
    eye = tf.broadcast_to(tf.eye(G.shape[-1], dtype=G.dtype), tf.shape(G))
    G = tf.where(both, G, eye)
    rhs = tf.stack([_rmatvec(A_S, b), slot_sign], axis=-1)
    rhs = tf.where(slot_on[:, :, None], rhs, tf.zeros_like(rhs))
    # One step of iterative refinement with the same factor keeps the KKT residual at
    # rounding level even when cond(A_S^T A_S) is large.
    solve = _cholesky_solver(G)
    x = solve(rhs)
    x = x + solve(rhs - tf.reduce_sum(G[:, :, :, None] * x[:, None, :, :], axis=2))
    x = tf.where(slot_on[:, :, None], x, tf.zeros_like(x))
    return A_S, x[..., 0], x[..., 1]


def _neg_inf_like(x: tf.Tensor) -> tf.Tensor:
    return tf.fill(tf.shape(x), tf.constant(-np.inf, x.dtype))


def _scatter_slots(values, slot_col, slot_on, n):
    """[k, p] slot values -> [k, n] columns; exact zeros outside the active set."""
    placed = tf.logical_and(
        tf.one_hot(slot_col, n, on_value=True, off_value=False), slot_on[:, :, None]
    )  # [k, p, n]
    return tf.reduce_sum(
        tf.where(placed, values[:, :, None], tf.zeros_like(values[:, :, None])), axis=1
    )


def _kkt_ok(A, b, z, signs, lam):
    """Per-problem KKT check of the LASSO at z (float64).

    z is optimal for 1/2 ||A z - b||^2 + lam ||z||_1 iff, with c = A^T (b - A z):
    c_j = lam sign(z_j) where z_j != 0, and |c_j| <= lam where z_j = 0. The tolerance on
    c_j is _KKT_LAM_RTOL * lam plus a bound on the rounding error of c_j,
    64 eps (|A|^T (|b| + |A| |z|))_j. The sign pattern must match the one the path
    assumed (signs), so a solution whose sign flipped in rounding is rejected.

    Args:
      A: [k, m, n]. b: [k, m]. z: [k, n]. signs: [k, n] (+-1 on the support, 0 off it).
      lam: scalar.

    Returns:
      [k] bool.
    """
    c = _correlations(A, b, z)
    abs_A = tf.abs(A)
    scale = _rmatvec(abs_A, tf.abs(b) + _matvec(abs_A, tf.abs(z)))
    tol = _KKT_LAM_RTOL * lam + _KKT_ROUNDING_FACTOR * scale
    on_support = tf.logical_and(signs * z > 0, tf.abs(c - lam * signs) <= tol)
    off_support = tf.logical_and(tf.equal(z, 0.0), tf.abs(c) <= lam + tol)
    ok = tf.where(tf.not_equal(signs, 0.0), on_support, off_support)
    finite = tf.reduce_all(tf.math.is_finite(z), axis=-1)
    return tf.logical_and(tf.reduce_all(ok, axis=-1), finite)


def _solve_path(A, b, settings, z0):
    """Batched LASSO homotopy (see the module docstring); all tensors float64.

    Each loop iteration solves the current segment's system once and, per problem,
    either moves to the next breakpoint or, where none is left above lam, evaluates z at
    lam and checks the KKT conditions (done). A warm start spends its first iteration
    checking the guessed support; if that fails the problem restarts from z = 0.

    The scalars travel packed in one tensor and the status in one output: every argument
    and result of a compiled call adds ~10 us of dispatch, several homotopy steps' worth.

    Args:
      A: [k, m, n]. b: [k, m]. z0: [k, n] warm start (ignored unless use_z0).
      settings: [3] = (lam, use_z0 (0 or 1), max_steps).

    Returns:
      z: [k, n].
      status: int32 [k + 1]; status[i] is STATUS_OK, STATUS_NOT_FINITE (A_i, b_i or lam
        not finite, or lam <= 0) or STATUS_NO_KKT_POINT (lam not reached or the KKT check
        failed); status[k] is the number of loop iterations.
    """
    lam = settings[0]
    use_z0 = settings[1] > 0
    max_steps = tf.cast(settings[2], tf.int32)
    k = tf.shape(A)[0]
    m, n = A.shape[1], A.shape[2]  # static: one trace per problem shape
    # At most rank(A) <= min(m, n) columns are active: with m active columns the residual
    # is zero on their span, so no other correlation can reach lam (a join there would
    # only be rounding noise and make the system singular).
    p = min(m, n)
    has_column = tf.reduce_any(tf.not_equal(A, 0.0), axis=1)  # [k, n]
    finite = tf.logical_and(
        tf.logical_and(
            tf.reduce_all(tf.math.is_finite(A), axis=[1, 2]),
            tf.reduce_all(tf.math.is_finite(b), axis=1),
        ),
        tf.logical_and(tf.math.is_finite(lam), lam > 0),
    )

    # Warm start: the support and signs of z0 (if they fit in p slots) as a guess.
    support0 = tf.logical_and(tf.logical_and(tf.not_equal(z0, 0.0), has_column), use_z0)
    warm = tf.logical_and(tf.reduce_sum(tf.cast(support0, tf.int32), axis=-1) <= p, use_z0)
    # top_k on the 0/1 mask lists the support's columns first (lowest index first on ties).
    col0 = tf.math.top_k(tf.cast(support0, tf.int32), k=p).indices
    on0 = tf.logical_and(tf.gather(support0, col0, batch_dims=1), warm[:, None])
    sign0 = tf.where(
        on0, tf.sign(tf.gather(z0, col0, batch_dims=1)), tf.zeros(tf.shape(on0), A.dtype)
    )
    state = (
        tf.constant(0, tf.int32),
        col0,  # slot -> column
        on0,  # slot used
        sign0,  # sign of the slot's z
        tf.fill([k], tf.constant(np.inf, A.dtype)),  # current lam of the path
        tf.zeros([k, p + 2 * n], tf.bool),  # events excluded at the next step
        warm,  # the slots hold a warm-start guess to verify
        tf.zeros([k], tf.bool),  # done
        tf.zeros([k], tf.bool),  # KKT verified
        tf.zeros([k, n], A.dtype),  # z once done
    )

    def cond(step, slot_col, slot_on, slot_sign, lam_c, blocked, warm, done, ok, z):
        return tf.logical_and(step < max_steps, tf.logical_not(tf.reduce_all(done)))

    def body(step, slot_col, slot_on, slot_sign, lam_c, blocked, warm, done, ok, z):
        A_S, u, d = _path_point(A, b, slot_col, slot_on, slot_sign)
        # c(lam) = r + lam q on this segment, for every column.
        r = _rmatvec(A, b - _matvec(A_S, u))
        q = _rmatvec(A, _matvec(A_S, d))
        active = tf.reduce_any(
            tf.logical_and(
                tf.one_hot(slot_col, n, on_value=True, off_value=False), slot_on[:, :, None]
            ),
            axis=1,
        )  # [k, n]
        can_join = tf.reduce_sum(tf.cast(slot_on, tf.int32), axis=-1) < p
        join_ok = tf.logical_and(tf.logical_not(active), can_join[:, None])

        def ratio(num, den, mask):
            mask = tf.logical_and(mask, tf.not_equal(den, 0.0))
            safe = tf.where(mask, den, tf.ones_like(den))
            return tf.where(mask, num / safe, _neg_inf_like(num))

        # Breakpoints: an active z(lam) = u - lam d reaches 0 (drop, per slot); an
        # inactive c_j(lam) = r_j + lam q_j reaches +lam or -lam (join with that sign).
        events = tf.concat(
            [ratio(u, d, slot_on), ratio(r, 1.0 - q, join_ok), ratio(-r, 1.0 + q, join_ok)], axis=-1
        )  # [k, p + 2n]
        upper = lam_c * (1.0 + _EVENT_RTOL)
        valid = (events > lam) & (events <= upper[:, None]) & tf.logical_not(blocked)
        events = tf.where(valid, events, _neg_inf_like(events))
        event = tf.argmax(events, axis=-1, output_type=tf.int32)  # [k]
        lam_event = tf.reduce_max(events, axis=-1)
        on_path = tf.logical_not(tf.logical_or(done, warm))
        has_event = tf.logical_and(tf.reduce_any(valid, axis=-1), on_path)

        # The solution at lam for this active set, and its KKT check: final for a path
        # with no breakpoint left above lam, and for a warm guess that verifies.
        z_lam = _scatter_slots(u - lam * d, slot_col, slot_on, n)
        kkt = _kkt_ok(A, b, z_lam, _scatter_slots(slot_sign, slot_col, slot_on, n), lam)
        path_end = tf.logical_and(on_path, tf.logical_not(has_event))
        warm_hit = tf.logical_and(warm, kkt)
        finishing = tf.logical_or(path_end, warm_hit)
        z = tf.where(finishing[:, None], z_lam, z)
        ok = tf.where(finishing, kkt, ok)
        # A failed warm guess restarts from z = 0 (all slots empty, lam = +inf).
        restart = tf.logical_and(warm, tf.logical_not(kkt))

        dropping = event < p
        join_col = (event - p) % n
        join_sign = tf.where(event < p + n, tf.constant(1.0, A.dtype), -1.0)
        # A join takes the first empty slot; a drop empties its slot.
        free_slot = tf.argmax(
            tf.cast(tf.logical_not(slot_on), tf.int32), axis=-1, output_type=tf.int32
        )
        slot = tf.where(dropping, event, free_slot)
        hit = tf.logical_and(
            tf.one_hot(slot, p, on_value=True, off_value=False), has_event[:, None]
        )
        new_on = tf.where(hit, tf.logical_not(dropping)[:, None], slot_on)
        new_on = tf.logical_and(new_on, tf.logical_not(restart)[:, None])
        new_col = tf.where(
            tf.logical_and(hit, tf.logical_not(dropping)[:, None]), join_col[:, None], slot_col
        )
        new_sign = tf.where(
            hit, tf.where(dropping, tf.zeros_like(join_sign), join_sign)[:, None], slot_sign
        )
        new_sign = tf.where(new_on, new_sign, tf.zeros_like(new_sign))
        # The linear piece that just crossed cannot cross again on the next segment: a
        # joined z_j starts at 0 (no drop at the same lam), a dropped c_j sits on the
        # bound it left (no re-join on that side). Excluding these avoids 0-length cycles.
        dropped_col = tf.gather(slot_col, slot, batch_dims=1)
        dropped_sign = tf.gather(slot_sign, slot, batch_dims=1)
        blocked_slot = tf.where(
            dropping, tf.where(dropped_sign > 0, p + dropped_col, p + n + dropped_col), slot
        )
        new_blocked = tf.logical_and(
            tf.one_hot(blocked_slot, p + 2 * n, on_value=True, off_value=False), has_event[:, None]
        )
        new_lam = tf.where(has_event, tf.minimum(lam_event, lam_c), lam_c)
        return (
            step + 1,
            new_col,
            new_on,
            new_sign,
            new_lam,
            new_blocked,
            tf.logical_and(warm, tf.logical_not(kkt | restart)),
            tf.logical_or(done, finishing),
            ok,
            z,
        )

    steps, _, _, _, _, _, _, done, ok, z = tf.while_loop(cond, body, state)
    status = tf.where(
        finite,
        tf.where(tf.logical_and(ok, done), STATUS_OK, STATUS_NO_KKT_POINT),
        STATUS_NOT_FINITE,
    )
    return z, tf.concat([status, steps[None]], axis=0)


# autograph=False: the loop is an explicit tf.while_loop and every Python branch is on
# static values; converting the body cost seconds of each process's first recovery.
solve_path = tf.function(_solve_path, autograph=False)
# The same loop compiled by XLA: each call ~10x faster (~1 ms for a recovery's 8
# problems), but the first call per problem shape compiles for 2-4 s, and LLVM keeps
# ~200 MB of the process's memory. A search solves once per epoch, so it runs the plain
# graph (~10 ms a recovery); many solves in a row (benchmarks) are worth compiling.
solve_path_xla = tf.function(_solve_path, jit_compile=True, autograph=False)
