"""The size of the evaluation network of any support of a one-stage super-net.

The one-stage super-net holds the evaluation network of every support: the same stem,
cell preprocessing and classifier, and each candidate op built as the evaluation cell
builds it (ending in the BN that absorption folds alpha into). Its parameters and its
multiply-adds are therefore sums over parts: a fixed part, plus the selected candidate
ops of every cell. :class:`SupportSize` measures each part once (parameters from the
variables; multiply-adds with ``network_size``'s graph count, each distinct candidate op
traced once on its input shape) and then sizes any support by table look-ups: the
stopping rule checks every recovered architecture against ``--max_params`` and
``--max_multiply_adds`` without building its network, and a run can say up front when
even the smallest architecture is over a limit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from istanas_tf import genotypes, network_size, networks

CELL_TYPES = genotypes.CELL_TYPES
NUM_OPS = genotypes.NUM_OPS


def _table() -> dict[str, list[np.ndarray]]:
    """Zeros per cell type and node, one entry per candidate (flat index)."""
    return {
        cell_type: [
            np.zeros(genotypes.num_candidates(node), np.int64) for node in range(genotypes.STEPS)
        ]
        for cell_type in CELL_TYPES
    }


def _variables_size(variables) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


def _traced(function, input_shape) -> tuple[int, object]:
    """``(multiply-adds, output shapes as lists)`` of ``function`` on one input."""
    cost, outputs = network_size.traced_multiply_adds(function, list(input_shape))
    return cost, tf.nest.map_structure(lambda tensor: tensor.shape.as_list(), outputs)


def _traced_layer(layer, input_shape) -> tuple[int, list[int]]:
    """:func:`_traced` of a layer in inference mode."""
    return _traced(lambda x: layer(x, training=False), input_shape)


def _smallest_picks(costs: np.ndarray, picks: int, distinct_inputs: bool) -> int:
    """The least total of ``picks`` distinct candidates of one node (``costs`` [n_j],
    flat index ``predecessor * 7 + op``); with ``distinct_inputs`` no two picks share a
    predecessor, so each predecessor offers only its cheapest op."""
    if distinct_inputs:
        costs = costs.reshape(-1, NUM_OPS).min(axis=1)
    return int(np.sort(costs)[:picks].sum())


class SupportSize:
    """Parameters and multiply-adds of the evaluation network of a super-net's supports.

    ``parameters(supports)`` equals ``network_size.count_parameters`` of the absorbed
    network (auxiliary head not counted), ``multiply_adds(supports)`` its
    ``network_size.count_multiply_adds`` at ``image_size`` (one image, inference mode).
    The multiply-add table is traced on first use only.

    Args:
      super_net: a built ``search_model.SearchNetwork`` (its ``stem_layers``, ``cells``,
        ``classifier``, ``auxiliary_head`` and ``architecture_variables``).
      image_size: input height and width of the evaluation network.
    """

    def __init__(self, super_net, image_size: int):
        self.super_net = super_net
        self.image_size = image_size
        self._parameters = self._parameter_table()
        self._multiply_adds = None

    def _parameter_table(self) -> tuple[int, dict[str, list[np.ndarray]]]:
        net, per_candidate, candidates = self.super_net, _table(), set()
        for cell in net.cells:
            cell_type = genotypes.cell_type(cell.reduction)
            for node, node_ops in enumerate(cell.candidates):
                for index, op in enumerate(node_ops):
                    per_candidate[cell_type][node][index] += _variables_size(op.trainable_variables)
                    candidates |= {id(v) for v in op.trainable_variables}
        excluded = candidates | {id(v) for v in net.architecture_variables}
        if net.auxiliary_head is not None:  # trains only; not part of the network's size
            excluded |= {id(v) for v in net.auxiliary_head.trainable_variables}
        fixed = _variables_size(v for v in net.trainable_variables if id(v) not in excluded)
        return fixed, per_candidate

    def _multiply_add_table(self) -> tuple[int, dict[str, list[np.ndarray]]]:
        """Traces the stem, each cell's preprocessing and each distinct candidate op (by
        op, stride and input shape) once, following the shapes through the cells."""
        net, per_candidate, traced = self.super_net, _table(), {}
        fixed, (s0, s1) = _traced(
            lambda x: networks.run_stem(net.stem_layers, x, training=False),
            [1, self.image_size, self.image_size, 3],
        )
        for cell in net.cells:
            cell_type = genotypes.cell_type(cell.reduction)
            cost0, state = _traced_layer(cell.preprocess0, s0)
            fixed += cost0 + _traced_layer(cell.preprocess1, s1)[0]
            # Node 0's first candidate reads s0 at the cell's stride: its output has the
            # shape of every node, the input of the candidates reading nodes.
            node_shape = _traced_layer(cell.candidates[0][0], state)[1]
            for node, node_ops in enumerate(cell.candidates):
                for index, op in enumerate(node_ops):
                    predecessor, primitive = divmod(index, NUM_OPS)
                    shape = state if predecessor < 2 else node_shape
                    stride = 2 if cell.reduction and predecessor < 2 else 1
                    key = (primitive, stride, tuple(shape))
                    if key not in traced:
                        traced[key] = _traced_layer(op, shape)[0]
                    per_candidate[cell_type][node][index] += traced[key]
            s0, s1 = s1, [*node_shape[:3], cell.steps * cell.channels]  # the concat
        fixed += _traced_layer(net.classifier, [1, s1[-1]])[0]
        return int(fixed), per_candidate

    def _total(self, table, supports: Mapping[str, Sequence[Sequence[int]]]) -> int:
        fixed, per_candidate = table
        return fixed + sum(
            int(per_candidate[cell_type][node][list(support)].sum())
            for cell_type in CELL_TYPES
            for node, support in enumerate(supports[cell_type])
        )

    def _multiply_add_tables(self):
        if self._multiply_adds is None:
            self._multiply_adds = self._multiply_add_table()
        return self._multiply_adds

    def parameters(self, supports: Mapping[str, Sequence[Sequence[int]]]) -> int:
        """Parameters of the evaluation network of ``supports`` (flat indices per node)."""
        return self._total(self._parameters, supports)

    def multiply_adds(self, supports: Mapping[str, Sequence[Sequence[int]]]) -> int:
        """Multiply-adds of the evaluation network of ``supports`` for one image."""
        return self._total(self._multiply_add_tables(), supports)

    def _smallest(self, table, picks: int, distinct_inputs: bool) -> int:
        fixed, per_candidate = table
        return fixed + sum(
            _smallest_picks(costs, picks, distinct_inputs)
            for cell_type in CELL_TYPES
            for costs in per_candidate[cell_type]
        )

    def smallest_parameters(self, picks: int, distinct_inputs: bool = False) -> int:
        """The fewest parameters of any architecture of ``picks`` ops per node."""
        return self._smallest(self._parameters, picks, distinct_inputs)

    def smallest_multiply_adds(self, picks: int, distinct_inputs: bool = False) -> int:
        """The fewest multiply-adds of any architecture of ``picks`` ops per node."""
        return self._smallest(self._multiply_add_tables(), picks, distinct_inputs)
