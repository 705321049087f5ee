"""The architecture state of a super-net cell type: ISTA-NAS codes or DARTS logits.

:class:`ArchitectureEncoding` holds ISTA-NAS' state for one cell type (docs/method.md
section 2): per node a fixed random matrix ``A_j``, a trainable code ``b_j``, and the last
committed recovery ``z`` and support. Recovery is two steps, so that a caller can decide
what to keep: :func:`solve_jointly` solves every node of several encodings in one batched
exact LASSO (:mod:`istanas_tf.lasso`) and returns :class:`Recovery` values; ``commit``
makes one the current state, node by node.

``darts.DartsArchitecture`` is the dense DARTS baseline's counterpart. Both offer the
super-net the same reading interface: ``support_tuple()`` (the ops a
forward pass runs, static Python data), ``alphas(support)`` (their weights, tensors
differentiable in the trainable variables) and ``selected_support()`` (the picks of the
genotype, flat indices per node, turned into a genotype by
``sparse_coding.genotype_from_supports``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from istanas_tf import genotypes, lasso, optimality, sparse_coding

NUM_OPS = genotypes.NUM_OPS
NUM_CELL_INPUTS = genotypes.NUM_CELL_INPUTS
# The support variable's value before the first commit: no op index is negative.
_NOT_RECOVERED = -1

_register = keras.saving.register_keras_serializable(package="istanas_tf")


class Recovery(NamedTuple):
    """A recovery of one cell type's nodes, not yet committed to its encoding.

    Attributes:
      z: float64 [steps, n_max]; node j's code in z[j, :n_j], exact zeros after.
      support: int32 [steps, sparseness] flat indices per node, by descending |z|.
      distances: float64 [steps], ||z_new - z_last||_2 per node (the one-stage method's
        freezing criterion, docs/method.md section 4).
      kkt_violation: float64 [steps], the largest miss of the LASSO's optimality
        conditions per node, in units of lam (``optimality.kkt_violation``).
      certified: bool [steps], whether the node's support is provably the one the exact
        optimum gives (``optimality.support_certified``).
    """

    z: tf.Tensor
    support: tf.Tensor
    distances: tf.Tensor
    kkt_violation: tf.Tensor
    certified: tf.Tensor


def _array_initializer(value: np.ndarray):
    """A Keras initializer returning a fixed array (drawn once from the layer's seed)."""

    def initializer(shape, dtype=None):
        return tf.constant(value.reshape(shape), dtype=dtype)

    return initializer


def _check_int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} out of range: must be an integer >= {low}")


@_register
class ArchitectureEncoding(keras.layers.Layer):
    """The sparse-coding architecture state of one cell type (docs/method.md section 2).

    For each intermediate node j (n_j = num_ops * (j + 2) candidates):
      A_j: [proj_dims, n_j] float32, Uniform[0, 1) from ``seed``, never changed.
      b_j: [proj_dims] float32, trainable, 1e-3 * N(0, 1) from ``seed``; one variable per
        node so the one-stage method can stop training nodes one by one.
    and for all nodes together:
      z: [steps, n_max] float32, the last committed recovery (zero-padded rows).
      support: [steps, sparseness] int32, flat indices predecessor * num_ops + op.

    All of them are Keras variables, tracked by tf.train.Checkpoint. A new encoding has
    drawn A and b but recovered nothing yet (support -1): Algorithm 1's first recovery
    is a ``commit(solve())`` (``SearchNetwork.build_all`` does it for the super-net). The
    layer has no ``call``: the super-net reads ``alphas(support)`` and ``support_tuple()``.

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

    def __init__(
        self,
        steps=genotypes.STEPS,
        num_ops=NUM_OPS,
        proj_dims=7,
        sparseness=genotypes.PICKS_PER_NODE,
        lam=1e-5,
        distinct_inputs=False,
        seed=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_int_at_least("steps", steps, 1)
        _check_int_at_least("num_ops", num_ops, 1)
        _check_int_at_least("proj_dims", proj_dims, 1)
        if distinct_inputs:
            limit, why = NUM_CELL_INPUTS, f"node 0 has {NUM_CELL_INPUTS} predecessors"
        else:
            limit = NUM_CELL_INPUTS * num_ops
            why = f"node 0 has {NUM_CELL_INPUTS} inputs x {num_ops} ops = {limit} candidates"
        if (
            isinstance(sparseness, bool)
            or not isinstance(sparseness, (int, np.integer))
            or not 1 <= sparseness <= limit
        ):
            raise ValueError(
                f"sparseness={sparseness!r} out of range: must be an integer in "
                f"[1, {limit}] with distinct_inputs={distinct_inputs} ({why})"
            )
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
            genotypes.num_candidates(j, self.num_ops) for j in range(self.steps)
        )
        # The variables do not depend on any input: create them now, so that a new
        # encoding (or one made by from_config) can be solved and restored at once.
        self.build()

    def build(self, input_shape=None):
        n_max = self.num_candidates[-1]
        # Separate streams, so A does not depend on how b is drawn and vice versa.
        rng_A = np.random.default_rng([self.seed, 0])
        rng_b = np.random.default_rng([self.seed, 1])
        # One attribute per variable (not a list): tf.train.Checkpoint does not follow
        # Keras' tracked lists, and per-node names keep checkpoint keys readable.
        for j, n in enumerate(self.num_candidates):
            setattr(
                self,
                f"A_{j}",
                self.add_weight(
                    name=f"A_{j}",
                    shape=(self.proj_dims, n),
                    dtype="float32",
                    trainable=False,
                    initializer=_array_initializer(rng_A.uniform(size=(self.proj_dims, n))),
                ),
            )
        for j in range(self.steps):
            setattr(
                self,
                f"b_{j}",
                self.add_weight(
                    name=f"b_{j}",
                    shape=(self.proj_dims,),
                    dtype="float32",
                    trainable=True,
                    initializer=_array_initializer(1e-3 * rng_b.standard_normal(self.proj_dims)),
                ),
            )
        self.z = self.add_weight(
            name="z",
            shape=(self.steps, n_max),
            dtype="float32",
            trainable=False,
            initializer="zeros",
        )
        self.support = self.add_weight(
            name="support",
            shape=(self.steps, self.sparseness),
            dtype="int32",
            trainable=False,
            initializer=keras.initializers.Constant(_NOT_RECOVERED),
        )
        self.built = True

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
        config.update(
            steps=self.steps,
            num_ops=self.num_ops,
            proj_dims=self.proj_dims,
            sparseness=self.sparseness,
            lam=self.lam,
            distinct_inputs=self.distinct_inputs,
            seed=self.seed,
        )
        return config

    def _check_finite_b(self) -> None:
        """Refuses NaN/inf codes: they would give an arbitrary, silently wrong genotype."""
        for j, b in enumerate(self.b):
            if tf.executing_eagerly():
                values = b.numpy()
                if not np.all(np.isfinite(values)):
                    raise ValueError(
                        f"{self.name}: b of node {j} contains NaN or inf ({values}); "
                        "the architecture code diverged, no genotype can be recovered"
                    )
            else:
                tf.debugging.assert_all_finite(
                    b.value, f"{self.name}: b of node {j} contains NaN or inf"
                )

    def _layout(self) -> tuple:
        """The static description of this encoding's problems (a tracing key)."""
        return (self.num_candidates, self.sparseness, self.num_ops, self.distinct_inputs)

    def recovery_of(self, z) -> Recovery:
        """The Recovery a given code would be (support, distances, report), without
        solving anything. ``z``: float64 [steps, >= n_max], node j's code in row j."""
        A, b = lasso.stack_problems([[a.value for a in self.A]], [[v.value for v in self.b]])
        z = tf.convert_to_tensor(z, tf.float64)
        return _recovery_of(z, A, b, self.lam, self.z, self._layout())

    def solve(self, warm_start: bool = True, **options) -> Recovery:
        """Recovers every node from the current b without changing the state.

        Args:
          warm_start: start from the last committed z (same optimum for the homotopy).
          **options: ``solver`` and ``iterations`` of :func:`solve_jointly`.
        """
        return solve_jointly([self], warm_start, **options)[0]

    def commit(self, recovery: Recovery, nodes=None) -> None:
        """Makes a recovery the current z and support.

        Args:
          recovery: from solve() or solve_jointly().
          nodes: optional [steps] bools, True for the nodes to update; others keep their
            z_last and support (frozen nodes of the one-stage method). Default: all.
        """
        update = np.ones(self.steps, bool) if nodes is None else nodes
        self._assign(recovery.z, recovery.support, tf.convert_to_tensor(update, tf.bool))

    @tf.function(autograph=False)
    def _assign(self, z, support, update):
        # One graph for the masked update of both variables: eagerly, these few ops
        # cost more than a whole solve.
        self.z.assign(tf.where(update[:, None], tf.cast(z, tf.float32), self.z))
        self.support.assign(tf.where(update[:, None], support, self.support))

    def support_tuple(self) -> tuple[tuple[int, ...], ...]:
        """The current support as static Python data, one tuple of flat indices per node.

        Raises:
          ValueError: nothing has been committed yet (see the class docstring).
        """
        support = self.support.numpy()
        if np.any(support == _NOT_RECOVERED):
            raise ValueError(
                f"{self.name}: no architecture recovered yet; commit a "
                "recovery first (encoding.commit(encoding.solve()))"
            )
        return tuple(tuple(int(i) for i in row) for row in support)

    def selected_support(self) -> tuple[tuple[int, ...], ...]:
        """The genotype's picks: the support itself, by descending |z|."""
        return self.support_tuple()

    def alphas(self, support=None) -> list[tf.Tensor]:
        """Per-node alpha on a support, differentiable in b (``sparse_coding.alpha_from_b``).

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
            alphas.append(sparse_coding.alpha_from_b(A_S, z_S, self.b[j]))
        return alphas


def solve_jointly(
    encodings: Sequence[ArchitectureEncoding],
    warm_start: bool = True,
    solver: str = "homotopy",
    iterations: int = 10000,
) -> list[Recovery]:
    """Recovers all nodes of several encodings in one batched LASSO solve.

    The normal and the reduction encoding together make the 8 problems of a recovery,
    zero-padded to the widest node. Each recovery carries its KKT report and support
    certificate (:mod:`istanas_tf.optimality`), computed in the same graph. Nothing is
    committed.

    Args:
      encodings: with equal proj_dims and lam.
      warm_start: start from each encoding's last committed z (the homotopy's optimum
        does not depend on it; ISTA / FISTA continue from it).
      solver: one of ``lasso.SOLVERS``: ``"homotopy"`` (exact, ``lasso.solve_lasso``),
        ``"fista"`` or ``"ista"`` (``lasso.solve_lasso_iterative``).
      iterations: ISTA / FISTA steps (>= 1); unused by the homotopy.

    Returns:
      One Recovery per encoding, in order.
    """
    if solver not in lasso.SOLVERS:
        raise ValueError(
            f"--recovery_solver={solver!r} is not valid; valid: {', '.join(lasso.SOLVERS)}"
        )
    _check_int_at_least("--recovery_iterations", iterations, 1)
    if not encodings:
        return []
    for attr in ("proj_dims", "lam"):
        values = {getattr(e, attr) for e in encodings}
        if len(values) > 1:
            raise ValueError(f"solve_jointly needs encodings with one {attr}, got {values}")
    for encoding in encodings:
        encoding._check_finite_b()
    # Tensors read now and static layouts: one traced solve for every encoding of a shape
    # (on the objects: a graph of 100+ MB each). Not variables: a MirroredVariable is
    # captured by the trace, which then solved the first network's b for a second one.
    return list(
        _solve_stacked(
            tuple(tuple(tf.convert_to_tensor(a.value) for a in e.A) for e in encodings),
            tuple(tuple(tf.convert_to_tensor(b.value) for b in e.b) for e in encodings),
            tuple(tf.convert_to_tensor(e.z.value) for e in encodings),
            tuple(e._layout() for e in encodings),
            encodings[0].lam,
            bool(warm_start),
            solver,
            tf.constant(int(iterations), tf.int32),
        )
    )


def recovery_report(
    recoveries: dict[str, Recovery], searching: dict[str, Sequence[bool]] | None = None
) -> dict:
    """The JSON-able numbers of recoveries for an epoch's metrics row.

    Args:
      recoveries: per cell type, a Recovery (``SearchNetwork.recover()``).
      searching: optional per cell type [steps] bools; the z distance of the other nodes
        (frozen before this epoch, not committed) is reported as 0.

    Returns:
      ``z_distance``, ``kkt_violation``, ``certified``: per cell type, a list per node;
      ``kkt_violation_max``, ``certified_nodes``: over all nodes. ``{}`` for ``{}``.
    """
    if not recoveries:
        return {}
    report = {"z_distance": {}, "kkt_violation": {}, "certified": {}}
    for cell_type, recovery in recoveries.items():
        distances = np.asarray(recovery.distances, np.float64)
        if searching is not None:
            distances = np.where(searching[cell_type], distances, 0.0)
        report["z_distance"][cell_type] = [float(d) for d in distances]
        report["kkt_violation"][cell_type] = [float(v) for v in recovery.kkt_violation]
        report["certified"][cell_type] = [bool(c) for c in recovery.certified]
    report["kkt_violation_max"] = max(max(v) for v in report["kkt_violation"].values())
    report["certified_nodes"] = sum(sum(c) for c in report["certified"].values())
    return report


def _recovery_of(z, A, b, lam, z_last, layout) -> Recovery:
    """The Recovery of z ([steps, >= n_max] float64) of problems A [steps, m, >= n_max],
    b [steps, m], against z_last [steps, n_max]; with its KKT report and certificate."""
    num_candidates, sparseness, num_ops, distinct_inputs = layout
    n_max = z_last.shape[1]
    z, A = z[:, :n_max], A[:, :, :n_max]
    support = tf.stack(
        [
            sparse_coding.select_support(z[j, :n], sparseness, num_ops, distinct_inputs)
            for j, n in enumerate(num_candidates)
        ]
    )
    distances = tf.norm(z - tf.cast(z_last, tf.float64), axis=-1)
    lam = tf.constant(lam, tf.float64)
    lower, upper = optimality.magnitude_bounds(A, b, z, lam)
    certified = tf.stack(
        [
            optimality.support_certified(
                lower[j, :n], upper[j, :n], support[j], num_ops, distinct_inputs
            )
            for j, n in enumerate(num_candidates)
        ]
    )
    return Recovery(
        z=z,
        support=support,
        distances=distances,
        kkt_violation=optimality.kkt_violation(A, b, z, lam),
        certified=certified,
    )


# autograph=False: every branch and loop here and in its callees is on static values;
# converting them all took most of each process's first recovery (~13 s).
@tf.function(autograph=False)
def _solve_stacked(A_parts, b_parts, z_parts, layouts, lam, warm_start, solver, iterations):
    """Stacks, solves, selects and reports in one graph: run eagerly, these few dozen
    small ops cost more than the solve itself.

    Args:
      A_parts, b_parts: per encoding, per node A_j [m, n_j] and b_j [m] (float32).
      z_parts: per encoding, the last z [steps, n_max_e].
      layouts: per encoding, ``ArchitectureEncoding._layout()`` (static).
      lam, warm_start, solver: static. iterations: int32 scalar tensor (ISTA / FISTA).
    """
    n_max = max(layout[0][-1] for layout in layouts)
    A, b = lasso.stack_problems(A_parts, b_parts, n_max)
    z0 = tf.concat(
        [tf.pad(tf.cast(z, tf.float64), [[0, 0], [0, n_max - z.shape[1]]]) for z in z_parts], axis=0
    )
    z0 = z0 if warm_start else None
    if solver == "homotopy":
        z = lasso.solve_lasso(A, b, lam, z0)
    else:
        z = lasso.solve_lasso_iterative(A, b, lam, z0, solver, iterations)
    recoveries, start = [], 0
    for z_last, layout in zip(z_parts, layouts):
        part = slice(start, start + len(layout[0]))
        recoveries.append(_recovery_of(z[part], A[part], b[part], lam, z_last, layout))
        start = part.stop
    return tuple(recoveries)
