"""The pure equations of ISTA-NAS between a recovered code z and an architecture.

ISTA-NAS (Yang et al., NeurIPS 2020) encodes each intermediate node ``j`` of a cell type
by a trainable code ``b_j`` in R^m and a fixed random matrix ``A_j`` (m x n_j). Once the
LASSO (:mod:`istanas_tf.lasso`) has recovered ``z_j`` from ``b_j``:

* the node's support ``S_j`` is its k entries of largest |z_j| (:func:`select_support`);
* between two recoveries the network weighs the support's ops with
  ``alpha_j[S] = z_j[S] - A_j[:, S]^T (A_j[:, S] z_j[S] - b_j)`` (:func:`alpha_from_b`);
* the supports of the normal and the reduction cell are the genotype
  (:func:`genotype_from_supports`, the one route from supports to a genotype).

Flat candidate index: ``predecessor * num_ops + op`` (docs/method.md section 2). Every function
here takes tensors or Python data and returns them; nothing holds state.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from istanas_tf import genotypes

NUM_OPS = genotypes.NUM_OPS


def select_support(z, k: int, num_ops: int = NUM_OPS, distinct_inputs: bool = False) -> tf.Tensor:
    """The support S_j of one node: its k entries of largest |z| (docs/method.md section 2).

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
        raise ValueError(
            f"z must be [num_inputs * num_ops] with num_ops={num_ops}, got shape {z.shape}"
        )
    magnitude = tf.abs(z)
    if not distinct_inputs:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} out of range: must be in [1, {n}] ({n} candidates)")
        return tf.math.top_k(magnitude, k=k).indices
    num_inputs = n // num_ops
    if not 1 <= k <= num_inputs:
        raise ValueError(
            f"k={k} out of range with distinct_inputs: must be in "
            f"[1, {num_inputs}] ({num_inputs} predecessors)"
        )
    per_input = tf.reshape(magnitude, [num_inputs, num_ops])
    # top_k rather than argmax: it guarantees the lower index on ties (argmax does not).
    best = tf.math.top_k(per_input, k=1)
    inputs = tf.math.top_k(best.values[:, 0], k=k).indices
    return inputs * num_ops + tf.gather(best.indices[:, 0], inputs)


def alpha_from_b(A_S, z_S, b) -> tf.Tensor:
    """Architecture weights of a node's support (docs/method.md section 2).

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


def picks_from_support(
    support: Sequence[Sequence[int]], num_ops: int = NUM_OPS
) -> tuple[genotypes.Pick, ...]:
    """Genotype picks ``(op_name, predecessor)`` node by node, from flat support indices.

    Args:
      support: per node, its flat candidate indices (predecessor * num_ops + op), in the
        order the picks should take (by descending |z|).
      num_ops: must equal len(genotypes.PRIMITIVES) to name the ops.
    """
    if num_ops != len(genotypes.PRIMITIVES):
        raise ValueError(
            f"picks need num_ops == {len(genotypes.PRIMITIVES)} (the "
            f"PRIMITIVES of the search space), got num_ops={num_ops}"
        )
    return tuple(
        (genotypes.PRIMITIVES[int(i) % num_ops], int(i) // num_ops)
        for node in support
        for i in node
    )


def genotype_from_supports(
    normal: Sequence[Sequence[int]], reduce: Sequence[Sequence[int]], num_ops: int = NUM_OPS
) -> genotypes.Genotype:
    """The Genotype of a normal and a reduction cell's supports (flat indices per node)."""
    for name, support in (("normal", normal), ("reduce", reduce)):
        sizes = [len(node) for node in support]
        if len(sizes) != genotypes.STEPS or any(size != genotypes.PICKS_PER_NODE for size in sizes):
            raise ValueError(
                f"{name}: a genotype needs {genotypes.STEPS} nodes with "
                f"{genotypes.PICKS_PER_NODE} picks each (sparseness "
                f"{genotypes.PICKS_PER_NODE}); got picks per node {sizes}"
            )
    return genotypes.genotype_from_picks(
        picks_from_support(normal, num_ops), picks_from_support(reduce, num_ops)
    )
