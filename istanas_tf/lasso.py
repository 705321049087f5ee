"""The exact LASSO solver of ISTA-NAS recovery (the paper's Eq. 9), in float64.

    z = argmin_z 1/2 ||A z - b||^2 + lam ||z||_1

is solved exactly (docs/design.md decision 2) by the homotopy / LARS-lasso path
(Osborne, Presnell & Turlach 2000; Efron et al. 2004): starting from lam_max =
||A^T b||_inf, where z = 0, the solution is piecewise affine in lam, and each breakpoint
adds a column to the active set or drops one. With m = 7 rows the active set never holds
more than 7 columns, so a path has a few dozen breakpoints; each costs one small linear
solve. The loop stops when the path reaches the target lam *and* the KKT conditions hold
there, checked with a rounding-error-aware tolerance; a problem that fails the check
raises instead of returning a wrong support.

Everything runs in float64 inside one ``tf.while_loop`` batched over the problems, so
the 8 problems of a recovery (4 normal + 4 reduce nodes, zero-padded to the widest node)
cost one call. By default the loop runs as a plain graph (see benchmarks/
lasso_benchmark.py for this machine's times): its first call per problem shape traces
it in under a second. ``xla=True`` compiles it instead: each call ~10x faster, but the
first one compiles for 2-4 s and the process keeps ~200 MB more memory, which a search
(one recovery per epoch) does not win back. This module is the entry point (arguments,
one traced program per problem shape, failed checks raised as errors);
:mod:`istanas_tf.homotopy` is the algorithm. Neither depends on anything but TensorFlow
and NumPy.

:func:`solve_lasso_iterative` runs a fixed number of ISTA or FISTA steps instead
(:mod:`istanas_tf.proximal`), for comparison with the exact path: they approach the
optimum without reaching it, and :mod:`istanas_tf.optimality` says how close they came.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from istanas_tf import homotopy, proximal

# The recovery solvers a search can use (flag --recovery_solver): the exact path, or a
# fixed number of proximal gradient steps.
SOLVERS = ("homotopy", *proximal.METHODS)

# Homotopy steps allowed before the solver gives up and raises. A path on a 7-row
# problem has at most a few dozen breakpoints; the cap only stops a cycling path
# (possible only for degenerate data, e.g. duplicated columns).
MAX_HOMOTOPY_STEPS = 500


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
def _traced_path(solve_path, k: int, m: int, n: int):
    """The concrete function of ``solve_path`` (plain or XLA) for one problem shape.
    Calling it directly skips tf.function's argument binding and signature matching,
    ~90 us per eager call."""
    return solve_path.get_concrete_function(
        tf.TensorSpec([k, m, n], tf.float64),
        tf.TensorSpec([k, m], tf.float64),
        tf.TensorSpec([3], tf.float64),
        tf.TensorSpec([k, n], tf.float64),
    )


@functools.lru_cache(maxsize=32)
def _settings(lam: float, use_z0: bool, max_steps: int) -> tf.Tensor:
    return tf.constant([lam, float(use_z0), float(max_steps)], tf.float64)


def solve_lasso(
    A, b, lam=1e-5, z0=None, max_steps=MAX_HOMOTOPY_STEPS, xla: bool = False
) -> tf.Tensor:
    """Exact LASSO solution z = argmin_z 1/2 ||A z - b||^2 + lam ||z||_1 (paper Eq. 9).

    Homotopy (LARS-lasso) from lam_max = ||A^T b||_inf down to lam, stopped when lam is
    reached and the KKT conditions verify there; see the module docstring. The work is
    one tf.function (float64, on the CPU: the path is a sequential loop of tiny solves,
    which on a GPU would be bound by launch latency). This wrapper converts
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
      xla: run the XLA-compiled loop (faster calls, a slow first call per shape and
        more memory; see the module docstring). Same optimum, to rounding.

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
        raise ValueError(
            f"A must be [m, n] with b [m], or [k, m, n] with b [k, m]; got A {A.shape}, b {b.shape}"
        )
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
        settings = tf.stack(
            [lam, tf.constant(float(use_z0), tf.float64), tf.constant(float(max_steps), tf.float64)]
        )
    # Static sizes where known: each eager shape op costs more than a homotopy step.
    k = A.shape[0] if A.shape[0] is not None else tf.shape(A)[0]
    if z0 is None:
        z0 = (
            _zeros(k, A.shape[2])
            if eager and isinstance(k, int)
            else tf.zeros([k, A.shape[2]], tf.float64)
        )
    else:
        z0 = _as_float64(z0)
        if z0.shape.rank != 2:
            z0 = tf.reshape(z0, [k, A.shape[2]])
    solve_path = homotopy.solve_path_xla if xla else homotopy.solve_path
    with tf.device("/CPU:0"):
        if eager and isinstance(k, int):
            z, status = _traced_path(solve_path, k, A.shape[1], A.shape[2])(A, b, settings, z0)
        else:
            z, status = solve_path(A, b, settings, z0)
    if eager:
        status = status.numpy()
        problems, steps = status[:-1], int(status[-1])
        if np.any(problems == homotopy.STATUS_NOT_FINITE):
            raise tf.errors.InvalidArgumentError(
                None,
                None,
                "solve_lasso: A, b or lam is not finite (or lam <= 0) in "
                f"problems {np.flatnonzero(problems == homotopy.STATUS_NOT_FINITE).tolist()}",
            )
        if np.any(problems != homotopy.STATUS_OK):
            raise tf.errors.InvalidArgumentError(
                None,
                None,
                "solve_lasso: no verified KKT point for problems "
                f"{np.flatnonzero(problems != homotopy.STATUS_OK).tolist()} after {steps} homotopy "
                f"steps (max_steps={max_steps})",
            )
    else:
        problems = status[:-1]
        check_finite = tf.debugging.Assert(
            tf.reduce_all(tf.not_equal(problems, homotopy.STATUS_NOT_FINITE)),
            [
                "solve_lasso: A, b or lam is not finite (or lam <= 0) in problems",
                tf.where(tf.equal(problems, homotopy.STATUS_NOT_FINITE))[:, 0],
            ],
        )
        with tf.control_dependencies([check_finite]):
            check_ok = tf.debugging.Assert(
                tf.reduce_all(tf.equal(problems, homotopy.STATUS_OK)),
                [
                    "solve_lasso: no verified KKT point for problems",
                    tf.where(tf.not_equal(problems, homotopy.STATUS_OK))[:, 0],
                    "after homotopy steps",
                    status[-1],
                    "max_steps",
                    max_steps,
                ],
            )
        with tf.control_dependencies([check_ok]):
            z = tf.identity(z)
    return z[0] if single else z


def solve_lasso_iterative(A, b, lam=1e-5, z0=None, method="fista", iterations=10000) -> tf.Tensor:
    """``iterations`` steps of FISTA or ISTA on 1/2 ||A z - b||^2 + lam ||z||_1.

    Float64, batched, one XLA-compiled loop per problem shape (the count is a tensor);
    see :mod:`istanas_tf.proximal`. Not exact: check the result with
    ``optimality.kkt_violation`` / ``optimality.magnitude_bounds``.

    Args:
      A: [m, n] or [k, m, n]; zero (padding) columns stay exactly zero in z.
      b: [m] or [k, m].
      lam: the l1 weight, > 0.
      z0: optional warm start shaped like the result (default zeros).
      method: ``"fista"`` or ``"ista"``.
      iterations: proximal gradient steps, >= 1 (a number or an int32 scalar tensor).

    Returns:
      z: float64, [n] or [k, n].
    """
    if method not in proximal.METHODS:
        raise ValueError(f"method={method!r} is not valid; valid: {', '.join(proximal.METHODS)}")
    if not isinstance(iterations, tf.Tensor) and (
        isinstance(iterations, bool)
        or not isinstance(iterations, (int, np.integer))
        or iterations < 1
    ):
        raise ValueError(f"iterations={iterations!r} out of range: must be an integer >= 1")
    if isinstance(lam, (int, float)) and not lam > 0:
        raise ValueError(f"lam={lam!r} out of range: must be > 0")
    A, b = _as_float64(A), _as_float64(b)
    if A.shape.rank not in (2, 3) or b.shape.rank != A.shape.rank - 1:
        raise ValueError(
            f"A must be [m, n] with b [m], or [k, m, n] with b [k, m]; got A {A.shape}, b {b.shape}"
        )
    single = A.shape.rank == 2
    if single:
        A, b = A[None], b[None]
    z0 = tf.zeros_like(A[:, 0, :]) if z0 is None else _as_float64(z0)
    if z0.shape.rank == 1:
        z0 = z0[None]
    lam = tf.cast(tf.convert_to_tensor(lam, dtype_hint=tf.float64), tf.float64)
    run = proximal.fista if method == "fista" else proximal.ista
    with tf.device("/CPU:0"):
        z = run(A, b, lam, z0, tf.cast(iterations, tf.int32))
    return z[0] if single else z


def stack_problems(matrices, vectors, n_max: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Groups of problems -> one batch: A [k, m, n_max] with zero padding columns and
    b [k, m], float64.

    Args:
      matrices: per group, per problem A_j [m, n_j]. vectors: likewise b_j [m].
      n_max: the padded width (default: the widest A_j).
    """
    n_max = n_max or max(a.shape[1] for group in matrices for a in group)
    A = [
        tf.pad(tf.cast(a, tf.float64), [[0, 0], [0, n_max - a.shape[1]]])
        for g in matrices
        for a in g
    ]
    b = [tf.cast(v, tf.float64) for group in vectors for v in group]
    return tf.stack(A), tf.stack(b)
