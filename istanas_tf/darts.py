"""The DARTS baseline's architecture parameters (first-order DARTS, Liu et al. 2019).

One softmax logit per (edge, op): every candidate of every node runs, weighted by the
softmax over its edge's ops, and the genotype keeps DARTS' top-2 picks. It offers the
super-net the reading interface of ``architecture.ArchitectureEncoding``:
``support_tuple()``, ``alphas(support)`` and ``selected_support()``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from istanas_tf import genotypes

NUM_OPS = genotypes.NUM_OPS
NUM_CELL_INPUTS = genotypes.NUM_CELL_INPUTS

_register = keras.saving.register_keras_serializable(package="istanas_tf")


@_register
class DartsArchitecture(keras.layers.Layer):
    """DARTS' architecture parameters for one cell type: one logit per (edge, op).

    Node weights are a softmax over each edge's ops; every candidate runs. The genotype
    keeps, per node, the 2 edges with the strongest op and the strongest op on each
    (DARTS' top-2 rule), strongest edge first.

    Args:
      steps: intermediate nodes per cell.
      seed: seeds the initial logits, 1e-3 * N(0, 1).
      **kwargs: Keras layer arguments (name, dtype, ...).
    """

    def __init__(self, steps: int = genotypes.STEPS, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.steps = steps
        self.seed = seed
        self.build()

    def build(self, input_shape=None):
        rng = np.random.default_rng(self.seed)
        for node in range(self.steps):
            shape = (NUM_CELL_INPUTS + node, NUM_OPS)
            setattr(
                self,
                f"alpha{node}",
                self.add_weight(
                    shape=shape,
                    name=f"alpha{node}",
                    initializer=keras.initializers.Constant(1e-3 * rng.standard_normal(shape)),
                ),
            )
        self.built = True

    @property
    def logits(self) -> list[keras.Variable]:
        """Per node, the logits [predecessors, ops] (the architecture optimizer's list)."""
        return [getattr(self, f"alpha{node}") for node in range(self.steps)]

    def get_config(self):
        return {**super().get_config(), "steps": self.steps, "seed": self.seed}

    def support_tuple(self) -> tuple[tuple[int, ...], ...]:
        """Every candidate of every node: the dense super-net runs them all."""
        return tuple(tuple(range(genotypes.num_candidates(node))) for node in range(self.steps))

    def alphas(self, support=None) -> list[tf.Tensor]:
        """Per node, the softmax weights of every candidate, flat [n_j]."""
        del support  # dense: always every candidate
        return [tf.reshape(tf.nn.softmax(logits, axis=-1), [-1]) for logits in self.logits]

    def selected_support(self) -> tuple[tuple[int, ...], ...]:
        """The top-2 rule's picks as flat indices ``edge * NUM_OPS + op``, per node."""
        support = []
        for logits in self.logits:
            weights = tf.nn.softmax(logits, axis=-1).numpy()
            strongest = weights.max(axis=1)
            edges = sorted(np.argsort(-strongest, kind="stable")[: genotypes.PICKS_PER_NODE])
            edges = sorted(edges, key=lambda e: -strongest[e])
            support.append(tuple(int(e) * NUM_OPS + int(weights[e].argmax()) for e in edges))
        return tuple(support)
