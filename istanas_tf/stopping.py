"""The one-stage stopping rule (docs/method.md section 4), as a pure decision.

After each search epoch the one-stage method recovers every node and, for the nodes
still searching:

* freezes node j when its code barely moved, ``||z_new - z_last||_2 <= tolerance``;
* rejects the new architecture, keeping z_last for every node, when the evaluation
  network of the new supports has ``max_params`` parameters or more, or (when that
  limit is set) ``max_multiply_adds`` multiply-adds or more (the freeze decisions of
  that epoch still stand); otherwise the searching nodes take z_new.

:func:`decide` takes the recoveries, the current supports and frozen flags, and ways to
count an architecture's parameters and multiply-adds, and returns a
:class:`StopDecision`. It changes nothing: the run applies the decision
(``SearchNetwork.commit`` and ``freeze_node``), so the rule can be tested with scripted
recoveries and any parameter count.
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
      candidate_multiply_adds: its multiply-adds for one image (None: no such limit).
      rejected_by: the limits the candidate reached, by flag name (``max_params``,
        ``max_multiply_adds``); empty when it is accepted.
    """

    distances: dict[str, list[float]]
    newly_frozen: dict[str, list[int]]
    searching: dict[str, np.ndarray]
    candidate_supports: dict[str, tuple[tuple[int, ...], ...]]
    candidate_params: int
    candidate_multiply_adds: int | None
    rejected_by: tuple[str, ...]

    @property
    def rejected(self) -> bool:
        """The candidate reached a limit, so z_last is kept."""
        return bool(self.rejected_by)

    def rejection_reason(self, limits: Mapping[str, int | None]) -> str:
        """The limits the candidate reached, for a log line: ``"--max_params=3700000 (it
        has 3,912,410)"``, joined by "and"; ``limits`` maps each flag name to its value."""
        counts = {
            "max_params": self.candidate_params,
            "max_multiply_adds": self.candidate_multiply_adds,
        }
        return " and ".join(
            f"--{flag}={limits[flag]} (it has {counts[flag]:,})" for flag in self.rejected_by
        )


def decide(
    recoveries: Mapping,
    supports: Supports,
    frozen: Mapping[str, Sequence[bool]],
    freeze_tolerance: float,
    max_params: int,
    parameter_count: Callable[[Supports], int],
    max_multiply_adds: int | None = None,
    multiply_add_count: Callable[[Supports], int] | None = None,
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
      max_multiply_adds: an architecture with this many multiply-adds or more is
        rejected; None: no such limit (and ``multiply_add_count`` is not called).
      multiply_add_count: supports -> multiply-adds of their evaluation network.
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
    multiply_adds = None if max_multiply_adds is None else multiply_add_count(candidate)
    rejected_by = tuple(
        flag
        for flag, value, limit in (
            ("max_params", params, max_params),
            ("max_multiply_adds", multiply_adds, max_multiply_adds),
        )
        if limit is not None and value >= limit
    )
    return StopDecision(
        distances=distances,
        newly_frozen=newly_frozen,
        searching=searching,
        candidate_supports=candidate,
        candidate_params=params,
        candidate_multiply_adds=multiply_adds,
        rejected_by=rejected_by,
    )
