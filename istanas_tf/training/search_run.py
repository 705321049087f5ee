"""What both searches share while they run: the super-net, its state, its traced steps.

A search run builds the super-net and its two optimizers (``builders``), restores them
and its bookkeeping from the run directory's latest checkpoint (re-reading the supports
into Python data), and traces its step functions again whenever the architecture
changes: the support and the frozen nodes are baked into the traces.

:func:`recover_and_commit` is the two-stage search's end-of-epoch recovery, shared by
the command line's loop and ``callbacks.SparseRecovery`` (``model.fit``).
"""

from __future__ import annotations

import dataclasses
import time

from istanas_tf import architecture, genotypes, search_model
from istanas_tf.training import builders, runtime
from istanas_tf.training import config as config_lib
from istanas_tf.training import state as state_lib
from istanas_tf.training import steps as steps_lib


@dataclasses.dataclass(frozen=True)
class CommittedRecovery:
    """One end-of-epoch recovery of the two-stage search, committed to the super-net.

    Attributes:
      recoveries: per cell type, the ``architecture.Recovery`` committed ({} for DARTS).
      changed: the supports changed, so traced steps are stale.
      seconds: wall time of the solve and the commit.
      report: ``architecture.recovery_report`` of the recoveries (per node z distance,
        KKT violation and certificate; ``{}`` for DARTS).
      genotype: the genotype after the commit.
    """

    recoveries: dict[str, architecture.Recovery]
    changed: bool
    seconds: float
    report: dict
    genotype: genotypes.Genotype


def recover_and_commit(model: search_model.SearchNetwork) -> CommittedRecovery:
    """Algorithm 1's end of an epoch: recovers every node from the trained b (one batched
    exact LASSO) and makes the result the architecture (docs/method.md section 3)."""
    start = time.perf_counter()
    recoveries = model.recover()
    changed = model.commit(recoveries)
    seconds = time.perf_counter() - start
    report = architecture.recovery_report(recoveries)
    return CommittedRecovery(recoveries, changed, seconds, report, model.genotype())


class SearchRun:
    """The part of ``TwoStageRun`` and ``OneStageRun`` that does not depend on the method.

    Attributes:
      config: the run's config.
      strategy, chief, info: as ``runtime.start`` set them up (``start_options``: its
        ``guard`` and ``flags_text``).
      model: the super-net (``search_model.SearchNetwork``), compiled.
      weight_optimizer, arch_optimizer: its two optimizers.
      state: the run directory's checkpoints, metrics and summaries.
    """

    def __init__(
        self,
        config: config_lib.TwoStageConfig | config_lib.OneStageConfig,
        check_data=None,
        **start_options,
    ):
        self.config = config
        setup = runtime.start(config, check_data=check_data, **start_options)
        self.strategy, self.chief, self.info = setup.strategy, setup.chief, setup.info
        self.model, self.weight_optimizer, self.arch_optimizer = builders.build_search_model(
            config, self.strategy, self.info
        )
        with self.strategy.scope():
            self.state = state_lib.RunState(
                config.model_dir,
                self.strategy,
                {
                    "model": self.model.variables,
                    "weight_optimizer": self.weight_optimizer.variables,
                    "arch_optimizer": self.arch_optimizer.variables,
                    **self._extra_state(),
                },
                num_classes=self.info.num_classes,
            )
        if self.state.restore():
            self.model.sync_supports()
        self.clock = steps_lib.EpochClock(self.state.epochs_done, config.loop.epochs)
        self.trace_steps()

    def _extra_state(self) -> dict[str, list]:
        """More checkpointed variables by group, created in the strategy's scope."""
        return {}

    def _train_step(self, *batches):
        """The per-replica step ``distributed_step`` runs; batches as the run feeds them."""
        return self.model.train_step(*batches)

    def trace_steps(self) -> None:
        """New step functions: the architecture (Python data) is baked into their traces."""
        self.train_fn = steps_lib.distributed_step(self.strategy, self._train_step, self.model)
        self.eval_fn = steps_lib.distributed_step(self.strategy, self.model.test_step, self.model)
