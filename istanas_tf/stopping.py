"""The one-stage stopping rule (docs/method.md section 4), as a pure decision.

After each search epoch the one-stage method recovers every node and, for the nodes
still searching:

* freezes node j when its code barely moved, ``||z_new - z_last||_2 <= tolerance``;
* rejects the new architecture, keeping z_last for every node, when the evaluation
  network of the new supports has ``max_params`` parameters or more (the freeze
  decisions of that epoch still stand); otherwise the searching nodes take z_new.

:func:`decide` takes the recoveries, the current supports and frozen flags, and a way to
count an architecture's parameters, and returns a :class:`StopDecision`. It changes
nothing: the run applies the decision (``SearchNetwork.commit`` and ``freeze_node``), so
the rule can be tested with scripted recoveries and any parameter count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Supports = Mapping[str, Sequence[Sequence[int]]]


@dataclasses.dataclass(frozen=True)
class StopDecision:
    """What one after-epoch step of the stopping rule decided.

    Attributes:
      distances: per cell type, ``||z_new - z_last||_2`` of each node (0 for nodes frozen
        before this epoch, which are not recovered).
      newly_frozen: per cell type, the nodes that stop searching at this epoch.
      searching: per cell type, [steps] bools: the nodes that were still searching (the
        ones a commit of the new recovery updates).
      candidate_supports: per cell type, the supports of the new z (frozen nodes keeping
        their support), flat indices per node.
      candidate_params: the evaluation network's parameters for those supports.
      rejected: the candidate had ``max_params`` or more, so z_last is kept.
    """

    distances: dict[str, list[float]]
    newly_frozen: dict[str, list[int]]
    searching: dict[str, np.ndarray]
    candidate_supports: dict[str, tuple[tuple[int, ...], ...]]
    candidate_params: int
    rejected: bool


def decide(
    recoveries: Mapping,
    supports: Supports,
    frozen: Mapping[str, Sequence[bool]],
    freeze_tolerance: float,
    max_params: int,
    parameter_count: Callable[[Supports], int],
) -> StopDecision:
    """The stopping rule's decision for one epoch.

    Args:
      recoveries: per cell type, an ``architecture.Recovery`` of every node (``distances``
        [steps] and ``support`` [steps, k]).
      supports: per cell type, the current support (flat indices per node).
      frozen: per cell type, [steps] bools: nodes that stopped searching earlier.
      freeze_tolerance: the distance at or below which a node stops.
      max_params: an architecture with this many parameters or more is rejected.
      parameter_count: supports -> parameters of their evaluation network.
    """
    distances, newly_frozen, candidate, searching = {}, {}, {}, {}
    for cell_type, recovery in recoveries.items():
        searching[cell_type] = np.logical_not(np.asarray(frozen[cell_type], bool))
        distance = np.where(searching[cell_type], np.asarray(recovery.distances), 0.0)
        distances[cell_type] = [float(d) for d in distance]
        newly_frozen[cell_type] = [
            int(j) for j in np.flatnonzero(searching[cell_type] & (distance <= freeze_tolerance))
        ]
        support = np.where(
            searching[cell_type][:, None],
            np.asarray(recovery.support),
            np.asarray(supports[cell_type]),
        )
        candidate[cell_type] = tuple(tuple(int(i) for i in row) for row in support)
    params = parameter_count(candidate)
    return StopDecision(
        distances=distances,
        newly_frozen=newly_frozen,
        searching=searching,
        candidate_supports=candidate,
        candidate_params=params,
        rejected=params >= max_params,
    )
