"""The DARTS cell: the evaluation cell of a genotype and the super-net's search cell.

A cell reads the outputs of the two previous cells, ``s0`` and ``s1``, preprocesses them
to C channels (FactorizedReduce for ``s0`` when the previous cell reduced, else
ReLU-Conv1x1-BN), computes ``genotypes.STEPS`` intermediate nodes, and concatenates them
along channels (docs/method.md section 1). Both networks stack cells on one channel schedule
(:func:`cell_schedule`): reductions at cells ``layers // 3`` and ``2 * layers // 3``,
where C doubles.

- :class:`Cell` (evaluation networks) builds only the genotype's picks, two per node.
- :class:`SearchCell` (the super-net) builds every candidate op of every edge, since any
  op may be selected later, but its ``call`` runs only the ops on the support it is
  given (docs/method.md sections 2-3): that is where the sparse search saves its time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import keras
import tensorflow as tf

from istanas_tf import blocks, genotypes
from istanas_tf import operations as ops

NUM_OPS = genotypes.NUM_OPS

_register = keras.saving.register_keras_serializable(package="istanas_tf")


def reduction_layers(layers: int) -> tuple[int, int]:
    """Indices of the two reduction cells: ``layers // 3`` and ``2 * layers // 3``."""
    return layers // 3, 2 * layers // 3


def check_layers(layers: int) -> None:
    """A network needs at least 3 cells so that its two reductions are distinct cells."""
    if layers < 3:
        raise ValueError(
            f"layers must be at least 3 (the reductions sit at cells layers//3 and "
            f"2*layers//3 and must be distinct), got {layers}"
        )


class CellSpec(NamedTuple):
    """Where a cell sits in a network: its C, whether it and its predecessor reduce."""

    channels: int
    reduction: bool
    reduction_prev: bool


def cell_schedule(layers: int, channels: int, first_input_reduced: bool = False) -> list[CellSpec]:
    """The cells of a network of ``layers`` cells starting at ``channels``.

    Args:
      layers: number of cells (at least 3).
      channels: C of the first cells; it doubles at each reduction cell.
      first_input_reduced: the stem's ``s0`` has a higher resolution than ``s1`` (the
        ImageNet stem), so the first cell reads ``s0`` as if after a reduction.
    """
    check_layers(layers)
    specs, reduction_prev = [], first_input_reduced
    for index in range(layers):
        reduction = index in reduction_layers(layers)
        if reduction:
            channels *= 2
        specs.append(CellSpec(channels, reduction, reduction_prev))
        reduction_prev = reduction
    return specs


def _preprocessing(channels: int, reduction_prev: bool, affine: bool):
    """The layers bringing ``s0`` and ``s1`` to ``channels`` channels at one resolution."""
    if reduction_prev:
        preprocess0 = ops.FactorizedReduce(channels, affine=affine, name="preprocess0")
    else:
        preprocess0 = ops.ReLUConvBN(channels, affine=affine, name="preprocess0")
    return preprocess0, ops.ReLUConvBN(channels, affine=affine, name="preprocess1")


def _cell_output_shape(s1_shape, reduction: bool, channels: int) -> tuple:
    """A cell's output shape: ``s1``'s resolution (halved in a reduction cell), the
    concatenated nodes' channels."""
    stride = 2 if reduction else 1
    batch, height, width = s1_shape[:3]
    return (batch, ops.output_size(height, stride), ops.output_size(width, stride), channels)


@_register
class Cell(keras.layers.Layer):
    """One cell of an evaluation network: two preprocessed inputs, 4 nodes, concat.

    Args:
      picks: the cell's genotype picks, ``(op_name, input_index)``, two per node.
      concat: state indices concatenated into the output (channels = len(concat) * C).
      channels: C, the channel count of every op in the cell.
      reduction: whether ops reading the cell inputs use stride 2.
      reduction_prev: whether the previous cell reduced (s0 then needs FactorizedReduce).
      bn_after_param_free_ops: one-stage cells (BN after pooling and identity ops); the
        one-stage cell also drops identity paths, the DARTS cell exempts them.
      seed: seeds the drop path noise (None: unseeded).
    """

    def __init__(
        self,
        picks: Sequence[Sequence],
        concat: Sequence[int],
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        bn_after_param_free_ops: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.picks = [tuple(p) for p in picks]
        self.concat = list(concat)
        self.channels = channels
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.bn_after_param_free_ops = bn_after_param_free_ops
        self.seed = seed
        self.preprocess0, self.preprocess1 = _preprocessing(channels, reduction_prev, True)
        options = ops.OpOptions(
            bn_after_pool=bn_after_param_free_ops, bn_after_identity=bn_after_param_free_ops
        )
        self.ops = []
        self.drop_paths = []
        for position, (op_name, index) in enumerate(self.picks):
            stride = 2 if reduction and index < 2 else 1
            self.ops.append(
                ops.make_op(
                    op_name, channels, stride, options, layer_name=f"op{position}_{op_name}"
                )
            )
            self.drop_paths.append(
                blocks.DropPath(
                    seed=None if seed is None else seed + position, name=f"drop_path{position}"
                )
            )

    def build(self, s0_shape, s1_shape):
        """Builds the preprocessing and the picked ops, in the order ``call`` runs them."""
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        for op in self.ops:
            op.build(ops.channels_shape(self.channels))

    def compute_output_shape(self, s0_shape, s1_shape):
        return _cell_output_shape(s1_shape, self.reduction, len(self.concat) * self.channels)

    def call(self, s0, s1, drop_path_rate=0.0, training=None):
        states = [self.preprocess0(s0, training=training), self.preprocess1(s1, training=training)]
        for node in range(len(self.picks) // 2):
            total = 0.0
            for position in (2 * node, 2 * node + 1):
                op = self.ops[position]
                h = op(states[self.picks[position][1]], training=training)
                if not ops.is_bare_identity(op):
                    h = self.drop_paths[position](h, rate=drop_path_rate, training=training)
                total = total + h
            states.append(total)
        return tf.concat([states[i] for i in self.concat], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "picks": [list(p) for p in self.picks],
            "concat": self.concat,
            "channels": self.channels,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "bn_after_param_free_ops": self.bn_after_param_free_ops,
            "seed": self.seed,
        }


@_register
class SearchCell(keras.layers.Layer):
    """A super-net cell holding all candidate ops, running only the supported ones.

    Args:
      channels: C of the cell's ops.
      reduction: ops reading the two cell inputs use stride 2.
      reduction_prev: s0 is preprocessed by FactorizedReduce.
      affine: BN with gamma/beta everywhere in the cell (False in the two-stage net).
      bn_after_pool: a BN after each pooling op (both super-nets).
      bn_after_identity: a BN after the stride-1 identity (one-stage cells).
      steps: intermediate nodes.
      drop_path: drop each supported op's output path in training (one-stage cells; the
        identity is dropped too, as in the one-stage evaluation cell).
      seed: seed of the drop path noise.

    ``call(s0, s1, supports, weights, drop_path_rate)`` takes, per node, a tuple of flat
    candidate indices (``predecessor * 7 + op``, Python ints) and the weights of those
    candidates: a tensor of that length, or a sequence of scalar tensors (the super-net
    unstacks each node's weights once for all its cells).
    """

    def __init__(
        self,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        affine: bool = True,
        bn_after_pool: bool = False,
        bn_after_identity: bool = False,
        steps: int = genotypes.STEPS,
        drop_path: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.channels = channels
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.affine = affine
        self.bn_after_pool = bn_after_pool
        self.bn_after_identity = bn_after_identity
        self.steps = steps
        self.drop_path = drop_path
        self.seed = seed
        # One layer serves every op: each call draws fresh noise from its seed generator.
        self.drop_path_layer = blocks.DropPath(seed=seed, name="drop_path") if drop_path else None
        self.preprocess0, self.preprocess1 = _preprocessing(channels, reduction_prev, affine)
        options = ops.OpOptions(
            affine=affine, bn_after_pool=bn_after_pool, bn_after_identity=bn_after_identity
        )
        self.candidates = []
        for node in range(steps):
            node_ops = []
            for index in range(genotypes.num_candidates(node)):
                predecessor, op = divmod(index, NUM_OPS)
                stride = 2 if reduction and predecessor < 2 else 1
                name = genotypes.PRIMITIVES[op]
                node_ops.append(
                    ops.make_op(
                        name,
                        channels,
                        stride,
                        options,
                        layer_name=f"node{node}_in{predecessor}_{name}",
                    )
                )
            self.candidates.append(node_ops)

    def build(self, s0_shape, s1_shape):
        """Builds the preprocessing and every candidate op (any may be selected later),
        in the order a forward pass through all of them would."""
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        for op in (op for node_ops in self.candidates for op in node_ops):
            op.build(ops.channels_shape(self.channels))

    def compute_output_shape(self, s0_shape, s1_shape):
        return _cell_output_shape(s1_shape, self.reduction, self.steps * self.channels)

    def call(self, s0, s1, supports, weights, drop_path_rate=0.0, training=None):
        states = [self.preprocess0(s0, training=training), self.preprocess1(s1, training=training)]
        for node in range(self.steps):
            total = None
            for position, index in enumerate(supports[node]):
                op = self.candidates[node][index]
                out = op(states[index // NUM_OPS], training=training)
                if self.drop_path_layer is not None:
                    out = self.drop_path_layer(out, rate=drop_path_rate, training=training)
                weighted = weights[node][position] * out
                # Summed from the first product, not from 0.0: the same value (0 + x is x)
                # without an add and a constant per node in the trace.
                total = weighted if total is None else total + weighted
            states.append(0.0 if total is None else total)
        return tf.concat(states[2:], axis=-1)

    def active_ops(self, supports) -> list[keras.layers.Layer]:
        """The candidate ops a forward pass with ``supports`` runs."""
        return [
            self.candidates[node][index] for node in range(self.steps) for index in supports[node]
        ]

    def candidate_batch_norms(self, node: int) -> list[keras.layers.BatchNormalization]:
        """Every BN inside the candidate ops of ``node`` (not the preprocessing BNs)."""
        return [bn for op in self.candidates[node] for bn in op.batch_norms]

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "affine": self.affine,
            "bn_after_pool": self.bn_after_pool,
            "bn_after_identity": self.bn_after_identity,
            "steps": self.steps,
            "drop_path": self.drop_path,
            "seed": self.seed,
        }
