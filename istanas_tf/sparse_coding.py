"""Sparse recovery (the LASSO of ISTA-NAS) and the per-node architecture encoding.

ISTA-NAS (Yang et al., NeurIPS 2020) encodes each intermediate node ``j`` of a cell type
by a trainable code ``b_j`` in R^m and a fixed random matrix ``A_j`` (m x n_j,
Uniform[0, 1)). The architecture ``z_j`` is recovered from ``b_j`` by the paper's Eq. 9,

    z_j = argmin_z 1/2 ||A_j z - b_j||^2 + lam ||z||_1,

its k largest entries in magnitude are the node's support, and between two recoveries the
network weighs the support's ops with ``alpha_j[S] = z_j[S] - A_j[:, S]^T (A_j[:, S]
z_j[S] - b_j)`` (METHOD.md section 2).

The LASSO is solved exactly (DESIGN.md decision 2) by the homotopy / LARS-lasso path
(Osborne, Presnell & Turlach 2000; Efron et al. 2004): starting from lam_max =
||A^T b||_inf, where z = 0, the solution is piecewise affine in lam, and each breakpoint
adds a column to the active set or drops one. With m = 7 rows the active set never holds
more than 7 columns, so a path has a few dozen breakpoints; each costs one small linear
solve. The loop stops when the path reaches the target lam *and* the KKT conditions hold
there, checked with a rounding-error-aware tolerance; a problem that fails the check
raises instead of returning a wrong support.

Everything runs in float64 inside one XLA-compiled ``tf.while_loop`` batched over the
nodes, so the 8 problems of a recovery (4 normal + 4 reduce nodes, zero-padded to the
widest node) cost one call: about 0.3-0.4 ms on a 2-core CPU (benchmarks/
lasso_benchmark.py) after the first call per problem shape, which compiles the program
(2-3 seconds).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

from istanas_tf import genotypes

NUM_OPS = len(genotypes.PRIMITIVES)
NUM_CELL_INPUTS = 2  # s0 and s1: node j has NUM_CELL_INPUTS + j predecessors

# Homotopy steps allowed before the solver gives up and raises. A path on a 7-row
# problem has at most a few dozen breakpoints; the cap only stops a cycling path
# (possible only for degenerate data, e.g. duplicated columns).
MAX_HOMOTOPY_STEPS = 500

# KKT tolerance: a relative slack on lam plus a multiple of the rounding error bound of
# the correlations A^T (b - A z) (see _kkt_ok).
_KKT_LAM_RTOL = 1e-9
_KKT_ROUNDING_FACTOR = 64.0 * np.finfo(np.float64).eps

# Per-problem outcome codes of _homotopy.
_STATUS_OK, _STATUS_NOT_FINITE, _STATUS_NO_KKT_POINT = 0, 1, 2

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
    rhs = tf.eye(p, batch_shape=tf.shape(L)[:1], dtype=L.dtype)
    rows_of_inverse = []
    for i in range(p):
        row = rhs[:, i] / diagonal[:, i, None]  # [k, p]
        rhs = rhs - L[:, :, i, None] * row[:, None, :]
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
    eye = tf.eye(G.shape[-1], batch_shape=tf.shape(G)[:1], dtype=G.dtype)
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
    placed = tf.logical_and(tf.one_hot(slot_col, n, on_value=True, off_value=False),
                            slot_on[:, :, None])  # [k, p, n]
    return tf.reduce_sum(
        tf.where(placed, values[:, :, None], tf.zeros_like(values[:, :, None])), axis=1)


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


@tf.function(jit_compile=True)
def _homotopy(A, b, settings, z0):
    """Batched LASSO homotopy; see solve_lasso. All tensors float64.

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
      status: int32 [k + 1]; status[i] is _STATUS_OK, _STATUS_NOT_FINITE (A_i, b_i or lam
        not finite, or lam <= 0) or _STATUS_NO_KKT_POINT (lam not reached or the KKT check
        failed); status[k] is the number of loop iterations.
    """
    lam = settings[0]
    use_z0 = settings[1] > 0
    max_steps = tf.cast(settings[2], tf.int32)
    k = tf.shape(A)[0]
    m, n = A.shape[1], A.shape[2]  # static: one XLA program per problem shape
    # At most rank(A) <= min(m, n) columns are active: with m active columns the residual
    # is zero on their span, so no other correlation can reach lam (a join there would
    # only be rounding noise and make the system singular).
    p = min(m, n)
    has_column = tf.reduce_any(tf.not_equal(A, 0.0), axis=1)  # [k, n]
    finite = tf.logical_and(
        tf.logical_and(tf.reduce_all(tf.math.is_finite(A), axis=[1, 2]),
                       tf.reduce_all(tf.math.is_finite(b), axis=1)),
        tf.logical_and(tf.math.is_finite(lam), lam > 0))

    # Warm start: the support and signs of z0 (if they fit in p slots) as a guess.
    support0 = tf.logical_and(tf.logical_and(tf.not_equal(z0, 0.0), has_column), use_z0)
    warm = tf.logical_and(tf.reduce_sum(tf.cast(support0, tf.int32), axis=-1) <= p, use_z0)
    # top_k on the 0/1 mask lists the support's columns first (lowest index first on ties).
    col0 = tf.math.top_k(tf.cast(support0, tf.int32), k=p).indices
    on0 = tf.logical_and(tf.gather(support0, col0, batch_dims=1), warm[:, None])
    sign0 = tf.where(on0, tf.sign(tf.gather(z0, col0, batch_dims=1)),
                     tf.zeros(tf.shape(on0), A.dtype))
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
        active = tf.reduce_any(tf.logical_and(
            tf.one_hot(slot_col, n, on_value=True, off_value=False),
            slot_on[:, :, None]), axis=1)  # [k, n]
        can_join = tf.reduce_sum(tf.cast(slot_on, tf.int32), axis=-1) < p
        join_ok = tf.logical_and(tf.logical_not(active), can_join[:, None])

        def ratio(num, den, mask):
            mask = tf.logical_and(mask, tf.not_equal(den, 0.0))
            safe = tf.where(mask, den, tf.ones_like(den))
            return tf.where(mask, num / safe, _neg_inf_like(num))

        # Breakpoints: an active z(lam) = u - lam d reaches 0 (drop, per slot); an
        # inactive c_j(lam) = r_j + lam q_j reaches +lam or -lam (join with that sign).
        events = tf.concat([
            ratio(u, d, slot_on),
            ratio(r, 1.0 - q, join_ok),
            ratio(-r, 1.0 + q, join_ok),
        ], axis=-1)  # [k, p + 2n]
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
        free_slot = tf.argmax(tf.cast(tf.logical_not(slot_on), tf.int32), axis=-1,
                              output_type=tf.int32)
        slot = tf.where(dropping, event, free_slot)
        hit = tf.logical_and(tf.one_hot(slot, p, on_value=True, off_value=False),
                             has_event[:, None])
        new_on = tf.where(hit, tf.logical_not(dropping)[:, None], slot_on)
        new_on = tf.logical_and(new_on, tf.logical_not(restart)[:, None])
        new_col = tf.where(tf.logical_and(hit, tf.logical_not(dropping)[:, None]),
                           join_col[:, None], slot_col)
        new_sign = tf.where(
            hit, tf.where(dropping, tf.zeros_like(join_sign), join_sign)[:, None], slot_sign)
        new_sign = tf.where(new_on, new_sign, tf.zeros_like(new_sign))
        # The linear piece that just crossed cannot cross again on the next segment: a
        # joined z_j starts at 0 (no drop at the same lam), a dropped c_j sits on the
        # bound it left (no re-join on that side). Excluding these avoids 0-length cycles.
        dropped_col = tf.gather(slot_col, slot, batch_dims=1)
        dropped_sign = tf.gather(slot_sign, slot, batch_dims=1)
        blocked_slot = tf.where(
            dropping,
            tf.where(dropped_sign > 0, p + dropped_col, p + n + dropped_col),
            slot)
        new_blocked = tf.logical_and(
            tf.one_hot(blocked_slot, p + 2 * n, on_value=True, off_value=False),
            has_event[:, None])
        new_lam = tf.where(has_event, tf.minimum(lam_event, lam_c), lam_c)
        return (step + 1, new_col, new_on, new_sign, new_lam, new_blocked,
                tf.logical_and(warm, tf.logical_not(kkt | restart)),
                tf.logical_or(done, finishing), ok, z)

    steps, _, _, _, _, _, _, done, ok, z = tf.while_loop(cond, body, state)
    status = tf.where(finite, tf.where(tf.logical_and(ok, done), _STATUS_OK,
                                       _STATUS_NO_KKT_POINT), _STATUS_NOT_FINITE)
    return z, tf.concat([status, steps[None]], axis=0)


# Eager tensors for the small per-call arguments, created once: creating them (or passing
# numpy) on every call cost a quarter of a whole 8-problem solve.
@functools.lru_cache(maxsize=32)
def _zeros(k: int, n: int) -> tf.Tensor:
    return tf.zeros([k, n], tf.float64)


def _as_float64(x) -> tf.Tensor:
    if isinstance(x, tf.Tensor) and x.dtype == tf.float64:
        return x
    return tf.cast(tf.convert_to_tensor(x, dtype_hint=tf.float64), tf.float64)


@functools.lru_cache(maxsize=32)
def _compiled_homotopy(k: int, m: int, n: int):
    """_homotopy's concrete function for one problem shape. Calling it directly skips
    tf.function's argument binding and signature matching, ~90 us per eager call."""
    return _homotopy.get_concrete_function(
        tf.TensorSpec([k, m, n], tf.float64), tf.TensorSpec([k, m], tf.float64),
        tf.TensorSpec([3], tf.float64), tf.TensorSpec([k, n], tf.float64))


@functools.lru_cache(maxsize=32)
def _settings(lam: float, use_z0: bool, max_steps: int) -> tf.Tensor:
    return tf.constant([lam, float(use_z0), float(max_steps)], tf.float64)


def solve_lasso(A, b, lam=1e-5, z0=None, max_steps=MAX_HOMOTOPY_STEPS) -> tf.Tensor:
    """Exact LASSO solution z = argmin_z 1/2 ||A z - b||^2 + lam ||z||_1 (paper Eq. 9).

    Homotopy (LARS-lasso) from lam_max = ||A^T b||_inf down to lam, stopped when lam is
    reached and the KKT conditions verify there; see the module docstring. The work is
    one XLA-compiled tf.function (float64, on the CPU: the path is a sequential loop of
    tiny solves, which on a GPU would be bound by launch latency). This wrapper converts
    the inputs and turns a failed check into an error; it works eagerly and inside a
    tf.function (where the check becomes an assertion op).

    Args:
      A: [m, n] or a batch [k, m, n]. Zero (padding) columns are allowed: their entries
        of z come back as exact zeros.
      b: [m] or [k, m].
      lam: the l1 weight, > 0 (the paper's lambda = 1e-5); a number or a scalar tensor.
      z0: optional warm start, shaped like the result. Its support and signs are tried
        first; if they do not give a KKT point the path starts from z = 0. Any z0 gives
        the same optimum.
      max_steps: cap on homotopy loop iterations (one per breakpoint, plus one to check
        a warm start); reaching it raises.

    Returns:
      z: float64, [n] or [k, n].

    Raises:
      ValueError: badly shaped inputs, or a lam that is not > 0.
      tf.errors.InvalidArgumentError: A or b not finite, or a problem that did not reach a
        verified KKT point within max_steps (only degenerate data, e.g. duplicated
        columns, has been seen to do that).
    """
    # dtype_hint: Python numbers and lists must not pass through float32 on the way (a
    # float32 lam = 1e-5 is off by 2.5e-13, which shifts every nonzero of z by as much).
    A, b = _as_float64(A), _as_float64(b)
    if A.shape.rank not in (2, 3) or b.shape.rank != A.shape.rank - 1:
        raise ValueError(f"A must be [m, n] with b [m], or [k, m, n] with b [k, m]; got "
                         f"A {A.shape}, b {b.shape}")
    if isinstance(lam, (int, float)) and not lam > 0:
        raise ValueError(f"lam={lam!r} out of range: must be > 0")
    single = A.shape.rank == 2
    if single:
        A, b = A[None], b[None]
    eager = tf.executing_eagerly()
    use_z0 = z0 is not None
    if eager and isinstance(lam, (int, float)):
        settings = _settings(float(lam), use_z0, int(max_steps))
    else:
        lam = tf.cast(tf.convert_to_tensor(lam, dtype_hint=tf.float64), tf.float64)
        settings = tf.stack([lam, tf.constant(float(use_z0), tf.float64),
                             tf.constant(float(max_steps), tf.float64)])
    # Static sizes where known: each eager shape op costs more than a homotopy step.
    k = A.shape[0] if A.shape[0] is not None else tf.shape(A)[0]
    if z0 is None:
        z0 = _zeros(k, A.shape[2]) if eager and isinstance(k, int) else \
            tf.zeros([k, A.shape[2]], tf.float64)
    else:
        z0 = _as_float64(z0)
        if z0.shape.rank != 2:
            z0 = tf.reshape(z0, [k, A.shape[2]])
    with tf.device("/CPU:0"):
        if eager and isinstance(k, int):
            z, status = _compiled_homotopy(k, A.shape[1], A.shape[2])(A, b, settings, z0)
        else:
            z, status = _homotopy(A, b, settings, z0)
    if eager:
        status = status.numpy()
        problems, steps = status[:-1], int(status[-1])
        if np.any(problems == _STATUS_NOT_FINITE):
            raise tf.errors.InvalidArgumentError(
                None, None, "solve_lasso: A, b or lam is not finite (or lam <= 0) in "
                f"problems {np.flatnonzero(problems == _STATUS_NOT_FINITE).tolist()}")
        if np.any(problems != _STATUS_OK):
            raise tf.errors.InvalidArgumentError(
                None, None, "solve_lasso: no verified KKT point for problems "
                f"{np.flatnonzero(problems != _STATUS_OK).tolist()} after {steps} homotopy "
                f"steps (max_steps={max_steps})")
    else:
        problems = status[:-1]
        check_finite = tf.debugging.Assert(
            tf.reduce_all(tf.not_equal(problems, _STATUS_NOT_FINITE)),
            ["solve_lasso: A, b or lam is not finite (or lam <= 0) in problems",
             tf.where(tf.equal(problems, _STATUS_NOT_FINITE))[:, 0]])
        with tf.control_dependencies([check_finite]):
            check_ok = tf.debugging.Assert(
                tf.reduce_all(tf.equal(problems, _STATUS_OK)),
                ["solve_lasso: no verified KKT point for problems",
                 tf.where(tf.not_equal(problems, _STATUS_OK))[:, 0], "after homotopy steps",
                 status[-1], "max_steps", max_steps])
        with tf.control_dependencies([check_ok]):
            z = tf.identity(z)
    return z[0] if single else z


def select_support(z, k: int, num_ops: int = NUM_OPS,
                   distinct_inputs: bool = False) -> tf.Tensor:
    """The support S_j of one node: its k entries of largest |z| (METHOD.md section 2).

    Args:
      z: [n] recovered code of the node, n = num_inputs * num_ops, flat index
        predecessor * num_ops + op.
      k: the sparseness (picks per node).
      num_ops: candidate ops per predecessor.
      distinct_inputs: if True, the k picks come from k different predecessors: the
        largest |z| of each predecessor competes, and the k best predecessors each give
        their best op. The published rule (False) lets two picks share a predecessor.

    Returns:
      int32 [k] flat indices, by descending |z| (ties: lower index first).
    """
    z = tf.convert_to_tensor(z)
    n = z.shape[-1]
    if z.shape.rank != 1 or n % num_ops:
        raise ValueError(f"z must be [num_inputs * num_ops] with num_ops={num_ops}, "
                         f"got shape {z.shape}")
    magnitude = tf.abs(z)
    if not distinct_inputs:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} out of range: must be in [1, {n}] ({n} candidates)")
        return tf.math.top_k(magnitude, k=k).indices
    num_inputs = n // num_ops
    if not 1 <= k <= num_inputs:
        raise ValueError(f"k={k} out of range with distinct_inputs: must be in "
                         f"[1, {num_inputs}] ({num_inputs} predecessors)")
    per_input = tf.reshape(magnitude, [num_inputs, num_ops])
    # top_k rather than argmax: it guarantees the lower index on ties (argmax does not).
    best = tf.math.top_k(per_input, k=1)
    inputs = tf.math.top_k(best.values[:, 0], k=k).indices
    return inputs * num_ops + tf.gather(best.indices[:, 0], inputs)


def alpha_from_b(A_S, z_S, b) -> tf.Tensor:
    """Architecture weights of a node's support (METHOD.md section 2).

    alpha[S] = z[S] - A[:, S]^T (A[:, S] z[S] - b): one ISTA step (step size 1, no
    shrinkage) from the recovered sparse z. Affine in b, so gradients of a loss reach b
    as dL/db = A[:, S] dL/dalpha. Raw values: no softmax, may be negative.

    Args:
      A_S: [..., m, k] the support's columns of A. z_S: [..., k]. b: [..., m].

    Returns:
      [..., k] alpha on the support.
    """
    residual = tf.linalg.matvec(A_S, z_S) - b
    return z_S - tf.linalg.matvec(A_S, residual, transpose_a=True)


def picks_from_support(support: Sequence[Sequence[int]],
                       num_ops: int = NUM_OPS) -> tuple[genotypes.Pick, ...]:
    """Genotype picks ``(op_name, predecessor)`` node by node, from flat support indices.

    Args:
      support: per node, its flat candidate indices (predecessor * num_ops + op), in the
        order the picks should take (by descending |z|).
      num_ops: must equal len(genotypes.PRIMITIVES) to name the ops.
    """
    if num_ops != len(genotypes.PRIMITIVES):
        raise ValueError(f"picks need num_ops == {len(genotypes.PRIMITIVES)} (the "
                         f"PRIMITIVES of the search space), got num_ops={num_ops}")
    return tuple((genotypes.PRIMITIVES[int(i) % num_ops], int(i) // num_ops)
                 for node in support for i in node)


def supports_from_z(zs: Sequence, k: int = genotypes.PICKS_PER_NODE,
                    num_ops: int = NUM_OPS,
                    distinct_inputs: bool = False) -> tuple[tuple[int, ...], ...]:
    """Per-node supports (select_support) of a sequence of node codes zs[j]: [n_j]."""
    return tuple(
        tuple(int(i) for i in select_support(z, k, num_ops, distinct_inputs).numpy())
        for z in zs)


def genotype_from_supports(normal: Sequence[Sequence[int]],
                           reduce: Sequence[Sequence[int]],
                           num_ops: int = NUM_OPS) -> genotypes.Genotype:
    """The Genotype of a normal and a reduction cell's supports (flat indices per node)."""
    for name, support in (("normal", normal), ("reduce", reduce)):
        sizes = [len(node) for node in support]
        if len(sizes) != genotypes.STEPS or any(
                size != genotypes.PICKS_PER_NODE for size in sizes):
            raise ValueError(
                f"{name}: a genotype needs {genotypes.STEPS} nodes with "
                f"{genotypes.PICKS_PER_NODE} picks each (sparseness "
                f"{genotypes.PICKS_PER_NODE}); got picks per node {sizes}")
    return genotypes.genotype_from_picks(picks_from_support(normal, num_ops),
                                         picks_from_support(reduce, num_ops))


class Recovery(NamedTuple):
    """A recovery of one cell type's nodes, not yet committed to its encoding.

    Attributes:
      z: float64 [steps, n_max]; node j's code in z[j, :n_j], exact zeros after.
      support: int32 [steps, sparseness] flat indices per node, by descending |z|.
      distances: float64 [steps], ||z_new - z_last||_2 per node (the one-stage method's
        freezing criterion, METHOD.md section 4).
    """

    z: tf.Tensor
    support: tf.Tensor
    distances: tf.Tensor


def _array_initializer(value: np.ndarray):
    """A Keras initializer returning a fixed array (drawn once from the layer's seed)."""
    def initializer(shape, dtype=None):
        return tf.constant(value.reshape(shape), dtype=dtype)
    return initializer


@keras.saving.register_keras_serializable(package="istanas_tf")
class ArchitectureEncoding(keras.layers.Layer):
    """The sparse-coding architecture state of one cell type (METHOD.md section 2).

    For each intermediate node j (n_j = num_ops * (j + 2) candidates):
      A_j: [proj_dims, n_j] float32, Uniform[0, 1) from ``seed``, never changed.
      b_j: [proj_dims] float32, trainable, 1e-3 * N(0, 1) from ``seed``; one variable per
        node so the one-stage method can stop training nodes one by one.
    and for all nodes together:
      z: [steps, n_max] float32, the last committed recovery (zero-padded rows).
      support: [steps, sparseness] int32, flat indices predecessor * num_ops + op.

    All of them are Keras variables, tracked by tf.train.Checkpoint. The constructor
    runs a first recovery, so z and support match A and b from the start (Algorithm 1:
    draw A, initialise b, recover z, take the support). The layer has no ``call``: the
    super-net reads ``alphas(support)`` and ``support_tuple()``.

    Args:
      steps: intermediate nodes per cell.
      num_ops: candidate ops per edge (len(genotypes.PRIMITIVES) for genotypes).
      proj_dims: m, the rows of A_j and the size of b_j.
      sparseness: k, ops kept per node.
      lam: the LASSO's l1 weight (paper: 1e-5).
      distinct_inputs: pick the k ops of a node from k different predecessors (a rule
        users of the published code asked for); the paper's rule is False.
      seed: seeds A and b. Give the normal and the reduction encodings different seeds.
      **kwargs: Keras layer arguments (name, dtype, ...). The name appears in errors;
        naming the layers after their cell type ("normal", "reduce") keeps them clear.
    """

    def __init__(self, steps=genotypes.STEPS, num_ops=NUM_OPS, proj_dims=7,
                 sparseness=genotypes.PICKS_PER_NODE, lam=1e-5, distinct_inputs=False,
                 seed=0, **kwargs):
        super().__init__(**kwargs)
        _check_int_at_least("steps", steps, 1)
        _check_int_at_least("num_ops", num_ops, 1)
        _check_int_at_least("proj_dims", proj_dims, 1)
        if distinct_inputs:
            limit, why = NUM_CELL_INPUTS, f"node 0 has {NUM_CELL_INPUTS} predecessors"
        else:
            limit = NUM_CELL_INPUTS * num_ops
            why = f"node 0 has {NUM_CELL_INPUTS} inputs x {num_ops} ops = {limit} candidates"
        if isinstance(sparseness, bool) or not isinstance(sparseness, (int, np.integer)) \
                or not 1 <= sparseness <= limit:
            raise ValueError(
                f"sparseness={sparseness!r} out of range: must be an integer in "
                f"[1, {limit}] with distinct_inputs={distinct_inputs} ({why})")
        if not (isinstance(lam, (int, float)) and np.isfinite(lam) and lam > 0):
            raise ValueError(f"lam={lam!r} out of range: must be a finite number > 0")
        self.steps = int(steps)
        self.num_ops = int(num_ops)
        self.proj_dims = int(proj_dims)
        self.sparseness = int(sparseness)
        self.lam = float(lam)
        self.distinct_inputs = bool(distinct_inputs)
        self.seed = int(seed)
        self.num_candidates = tuple(
            self.num_ops * (NUM_CELL_INPUTS + j) for j in range(self.steps))
        n_max = self.num_candidates[-1]

        # Separate streams, so A does not depend on how b is drawn and vice versa.
        rng_A = np.random.default_rng([self.seed, 0])
        rng_b = np.random.default_rng([self.seed, 1])
        # One attribute per variable (not a list): tf.train.Checkpoint does not follow
        # Keras' tracked lists, and per-node names keep checkpoint keys readable.
        for j, n in enumerate(self.num_candidates):
            setattr(self, f"A_{j}", self.add_weight(
                name=f"A_{j}", shape=(self.proj_dims, n), dtype="float32", trainable=False,
                initializer=_array_initializer(rng_A.uniform(size=(self.proj_dims, n)))))
        for j in range(self.steps):
            setattr(self, f"b_{j}", self.add_weight(
                name=f"b_{j}", shape=(self.proj_dims,), dtype="float32", trainable=True,
                initializer=_array_initializer(1e-3 * rng_b.standard_normal(self.proj_dims))))
        self.z = self.add_weight(name="z", shape=(self.steps, n_max), dtype="float32",
                                 trainable=False, initializer="zeros")
        self.support = self.add_weight(
            name="support", shape=(self.steps, self.sparseness), dtype="int32",
            trainable=False, initializer="zeros")
        self.built = True
        self.recover()

    @property
    def A(self) -> list[keras.Variable]:
        """The fixed matrices A_j, [proj_dims, n_j] each."""
        return [getattr(self, f"A_{j}") for j in range(self.steps)]

    @property
    def b(self) -> list[keras.Variable]:
        """The trainable codes b_j, [proj_dims] each (the architecture optimizer's list)."""
        return [getattr(self, f"b_{j}") for j in range(self.steps)]

    def get_config(self):
        config = super().get_config()
        config.update(steps=self.steps, num_ops=self.num_ops, proj_dims=self.proj_dims,
                      sparseness=self.sparseness, lam=self.lam,
                      distinct_inputs=self.distinct_inputs, seed=self.seed)
        return config

    def _check_finite_b(self) -> None:
        """Refuses NaN/inf codes: they would give an arbitrary, silently wrong genotype."""
        for j, b in enumerate(self.b):
            if tf.executing_eagerly():
                values = b.numpy()
                if not np.all(np.isfinite(values)):
                    raise ValueError(
                        f"{self.name}: b of node {j} contains NaN or inf ({values}); "
                        "the architecture code diverged, no genotype can be recovered")
            else:
                tf.debugging.assert_all_finite(
                    b.value, f"{self.name}: b of node {j} contains NaN or inf")

    def _layout(self) -> tuple:
        """The static description of this encoding's problems (a tracing key)."""
        return (self.num_candidates, self.sparseness, self.num_ops, self.distinct_inputs)

    def _recovery(self, z: tf.Tensor) -> Recovery:
        """Support and distances of a new z: [steps, >= n_max] float64."""
        return _recovery_of(z, self.z, self._layout())

    def solve(self, warm_start: bool = True) -> Recovery:
        """Recovers every node from the current b without changing the state.

        Args:
          warm_start: try the last committed z's support and signs first (same optimum).
        """
        return solve_jointly([self], warm_start=warm_start)[0]

    def commit(self, recovery: Recovery, nodes=None) -> None:
        """Makes a recovery the current z and support.

        Args:
          recovery: from solve() or solve_jointly().
          nodes: optional [steps] bools, True for the nodes to update; others keep their
            z_last and support (frozen nodes of the one-stage method). Default: all.
        """
        update = np.ones(self.steps, bool) if nodes is None else nodes
        self._assign(recovery.z, recovery.support, tf.convert_to_tensor(update, tf.bool))

    @tf.function
    def _assign(self, z, support, update):
        # One graph for the masked update of both variables: eagerly, these few ops
        # cost more than a whole solve.
        self.z.assign(tf.where(update[:, None], tf.cast(z, tf.float32), self.z))
        self.support.assign(tf.where(update[:, None], support, self.support))

    def recover(self, frozen=None) -> tf.Tensor:
        """Solves and commits every node that is not frozen.

        Args:
          frozen: optional [steps] bools, True for nodes to leave unchanged.

        Returns:
          float64 [steps] distances ||z_new - z_last||_2 (for every node, frozen or not).
        """
        recovery = self.solve()
        nodes = None if frozen is None else \
            tf.logical_not(tf.convert_to_tensor(frozen, tf.bool))
        self.commit(recovery, nodes)
        return recovery.distances

    def support_tuple(self) -> tuple[tuple[int, ...], ...]:
        """The current support as static Python data, one tuple of flat indices per node."""
        return tuple(tuple(int(i) for i in row) for row in self.support.numpy())

    def alphas(self, support=None) -> list[tf.Tensor]:
        """Per-node alpha on a support, differentiable in b (see alpha_from_b).

        Args:
          support: static per-node flat indices (support_tuple()); default: current.

        Returns:
          steps float32 tensors of shape [len(support[j])].
        """
        support = self.support_tuple() if support is None else support
        alphas = []
        for j, indices in enumerate(support):
            indices = tf.constant(indices, tf.int32)
            A_S = tf.gather(self.A[j], indices, axis=1)
            z_S = tf.gather(self.z[j], indices)
            alphas.append(alpha_from_b(A_S, z_S, self.b[j]))
        return alphas

    def picks(self) -> tuple[genotypes.Pick, ...]:
        """The current support as (op_name, predecessor) picks, node by node."""
        return picks_from_support(self.support_tuple(), self.num_ops)


def _check_int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} out of range: must be an integer >= {low}")


def solve_jointly(encodings: Sequence[ArchitectureEncoding],
                  warm_start: bool = True) -> list[Recovery]:
    """Recovers all nodes of several encodings in one batched solve_lasso call.

    The normal and the reduction encoding together make the 8 problems of a recovery,
    zero-padded to the widest node. Nothing is committed.

    Args:
      encodings: with equal proj_dims and lam.
      warm_start: start from each encoding's last committed z (same optimum).

    Returns:
      One Recovery per encoding, in order.
    """
    if not encodings:
        return []
    for attr in ("proj_dims", "lam"):
        values = {getattr(e, attr) for e in encodings}
        if len(values) > 1:
            raise ValueError(f"solve_jointly needs encodings with one {attr}, got {values}")
    for encoding in encodings:
        encoding._check_finite_b()
    # Plain tensors and static layouts in, so the traced solve is shared by every
    # encoding of the same shape (tracing on the encoding objects would keep one graph,
    # of 100+ MB, per object).
    return list(_solve_stacked(
        tuple(tuple(a.value for a in e.A) for e in encodings),
        tuple(tuple(b.value for b in e.b) for e in encodings),
        tuple(e.z.value for e in encodings),
        tuple(e._layout() for e in encodings), encodings[0].lam, bool(warm_start)))


def _recovery_of(z, z_last, layout) -> Recovery:
    """The Recovery of a new z ([steps, >= n_max] float64) against z_last [steps, n_max]."""
    num_candidates, sparseness, num_ops, distinct_inputs = layout
    z = z[:, :z_last.shape[1]]
    support = tf.stack([select_support(z[j, :n], sparseness, num_ops, distinct_inputs)
                        for j, n in enumerate(num_candidates)])
    distances = tf.norm(z - tf.cast(z_last, tf.float64), axis=-1)
    return Recovery(z=z, support=support, distances=distances)


@tf.function
def _solve_stacked(A_parts, b_parts, z_parts, layouts, lam, warm_start):
    """Stacks, solves and selects in one graph: run eagerly, these few dozen small ops
    cost more than the solve itself.

    Args:
      A_parts, b_parts: per encoding, per node A_j [m, n_j] and b_j [m] (float32).
      z_parts: per encoding, the last z [steps, n_max_e].
      layouts: per encoding, ``ArchitectureEncoding._layout()`` (static).
    """
    n_max = max(layout[0][-1] for layout in layouts)
    A = tf.concat([tf.stack([tf.pad(tf.cast(a, tf.float64), [[0, 0], [0, n_max - a.shape[1]]])
                             for a in parts]) for parts in A_parts], axis=0)
    b = tf.concat([tf.stack([tf.cast(v, tf.float64) for v in parts]) for parts in b_parts],
                  axis=0)
    z0 = tf.concat([tf.pad(tf.cast(z, tf.float64), [[0, 0], [0, n_max - z.shape[1]]])
                    for z in z_parts], axis=0)
    z = solve_lasso(A, b, lam, z0 if warm_start else None)
    recoveries, start = [], 0
    for z_last, layout in zip(z_parts, layouts):
        steps = len(layout[0])
        recoveries.append(_recovery_of(z[start:start + steps], z_last, layout))
        start += steps
    return tuple(recoveries)


def genotype_from_encodings(normal: ArchitectureEncoding,
                            reduce: ArchitectureEncoding) -> genotypes.Genotype:
    """The Genotype of the current supports of a normal and a reduction encoding."""
    if normal.num_ops != reduce.num_ops:
        raise ValueError(f"encodings with different num_ops: {normal.num_ops} (normal), "
                         f"{reduce.num_ops} (reduce)")
    return genotype_from_supports(normal.support_tuple(), reduce.support_tuple(),
                                  normal.num_ops)
