"""The search super-net: sparse ISTA-NAS cells and the dense DARTS baseline.

Every candidate op of every edge exists (any op may be selected later), but a cell's
``call`` runs only the ops on the current support (docs/method.md sections 2-3,
docs/design.md decision 1). The support is Python data: when recovery changes it, the
training loop traces its step functions again. The architecture weights on the support
are tensors computed from the trainable codes ``b`` inside the step, so gradients reach
``b``.

Recovery has one path for both methods: ``recover()`` solves every node of both cell
types in one batched LASSO and returns the recoveries; ``commit(recoveries, nodes)``
makes them (or some nodes of them) the architecture. ``genotype()`` turns supports into
a genotype through ``sparse_coding.genotype_from_supports``.

``method="darts"`` is DARTS' first-order super-net in the same code: every edge runs all
seven ops, weighted by a softmax over the edge's architecture parameters.

``one_stage=True`` is the one-stage ISTA-NAS super-net (docs/method.md section 4), again the
same code: affine BN everywhere, a BN after every pooling op and after the stride-1
identity, an auxiliary head, drop path, and the gamma/beta of the BNs inside candidate
ops frozen (not trained, batch statistics still used) until their node stops searching.
Freezing is bookkeeping, not ``Variable.trainable``: the frozen variables are left out
of the lists the train step differentiates, so the weight optimizer is built over all of
them up front (docs/design.md decision 5) and a node can be unfrozen between epochs. The
network it converges to is absorbed into an evaluation network by ``absorption.absorb``:
NetworkCIFAR, or NetworkImageNet for ``family="imagenet"`` (the same stems, reductions
and auxiliary head). ``evaluation_size()`` sizes the evaluation network of any support.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from istanas_tf import (
    architecture,
    blocks,
    darts,
    evaluation_size,
    genotypes,
    lasso,
    networks,
    search_steps,
    sparse_coding,
)
from istanas_tf import cells as cell_lib

METHODS = ("ista", "darts")
CELL_TYPES = genotypes.CELL_TYPES
Supports = dict[str, tuple[tuple[int, ...], ...]]


@dataclasses.dataclass(frozen=True)
class SearchNetworkConfig:
    """Settings of the super-net (docs/method.md sections 2-3).

    Attributes:
      num_classes: classifier outputs (a run takes it from the dataset).
      channels: C (16 in the paper's two-stage search; flag ``--init_channels``).
      layers: cells (8); reductions at layers // 3 and 2 * layers // 3.
      method: ``"ista"`` (sparse ISTA-NAS cells) or ``"darts"`` (dense softmax cells).
      proj_dims: m, rows of each A_j (7).
      sparseness: k, ops kept per node (2).
      lam: LASSO penalty (1e-5).
      distinct_inputs: the k picks of a node must read different predecessors.
      seed: seed of A, of the initial b and of the drop path noise.
      sync_batch_norm: BN statistics over the global batch under tf.distribute, so that
        a multi-replica search computes what one device would.
      one_stage: the one-stage super-net of docs/method.md section 4 (``method="ista"`` only):
        affine BN, BN after pooling and identity ops, frozen gamma/beta inside candidate
        ops, auxiliary head, drop path, one batch per step.
      auxiliary_weight: weight of the auxiliary cross-entropy (one-stage; 0.4).
      recovery_solver: the LASSO solver of each recovery: ``homotopy`` (exact), ``fista``
        or ``ista`` (a fixed number of steps, warm-started from the last z).
      recovery_iterations: ISTA / FISTA steps per recovery (unused by the homotopy).
      family: the evaluation network's shape, ``"cifar"`` (one stem, NetworkCIFAR) or
        ``"imagenet"`` (NetworkImageNet's stems of stride 8 and auxiliary head); a run
        takes it from its dataset.
    """

    num_classes: int = 10
    channels: int = 16
    layers: int = 8
    method: str = "ista"
    proj_dims: int = 7
    sparseness: int = 2
    lam: float = 1e-5
    distinct_inputs: bool = False
    seed: int = 0
    sync_batch_norm: bool = True
    one_stage: bool = False
    auxiliary_weight: float = 0.4
    recovery_solver: str = "homotopy"
    recovery_iterations: int = 10000
    family: str = "cifar"

    def validate(self) -> None:
        """Raises ValueError naming the flag of the first invalid setting."""
        if self.method not in METHODS:
            raise ValueError(f"--method={self.method!r} is not valid; valid: {', '.join(METHODS)}")
        if self.one_stage and self.method != "ista":
            raise ValueError(
                f"the one-stage search needs --method=ista, got --method={self.method!r}"
            )
        if self.recovery_solver not in lasso.SOLVERS:
            raise ValueError(
                f"--recovery_solver={self.recovery_solver!r} is not valid; "
                f"valid: {', '.join(lasso.SOLVERS)}"
            )
        for flag, value, least in (
            ("recovery_iterations", self.recovery_iterations, 1),
            ("layers", self.layers, 3),
            ("proj_dims", self.proj_dims, 1),
            ("sparseness", self.sparseness, 1),
            ("seed", self.seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"--{flag} must be at least {least} (an integer), got {value!r}")
        if self.family not in networks.FAMILIES:
            raise ValueError(
                f"network family {self.family!r} is not valid; valid: "
                f"{', '.join(networks.FAMILIES)} (a run takes it from its dataset)"
            )
        if not self.lam > 0:
            raise ValueError(f"--lam must be > 0, got {self.lam!r}")
        if self.channels < 2 or self.channels % 2:
            raise ValueError(
                f"--init_channels must be an even number >= 2 (FactorizedReduce "
                f"halves it), got {self.channels}"
            )


@keras.saving.register_keras_serializable(package="istanas_tf")
class SearchNetwork(search_steps.SearchSteps, blocks.DropPathSchedule, keras.Model):
    """The super-net: stem, ``layers`` search cells, global pool and classifier.

    The two-stage net uses affine-free BN in all cells and a BN after each pooling op;
    the stem BN keeps its affine parameters (docs/method.md section 3). The one-stage net
    (``config.one_stage``) is described in the module docstring. Call ``build_all``
    before use: it creates every candidate op's weights and recovers the first
    architecture. Its ``compile``, ``train_step`` and ``test_step`` are
    ``search_steps.SearchSteps``'.

    One-stage state, per cell type and node j, in variables (checkpointed): whether the
    node has stopped searching (``freeze_node``; its b is no longer trained) and whether
    the BN gamma/beta inside its candidate ops are trainable (``unfreeze_node``).

    Args:
      config: the super-net's settings (a SearchNetworkConfig or its dict).
    """

    def __init__(self, config: SearchNetworkConfig, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = SearchNetworkConfig(**config)
        config.validate()
        self.config = config
        with (
            blocks.synchronized_batch_norm(config.sync_batch_norm),
            networks.unnamed_tf_variables(),
        ):
            self._build_layers(config)
        self._supports = self._frozen = self._bn_trainable = None
        self._size = None  # evaluation_size(), made on first use

    def _build_layers(self, config: SearchNetworkConfig) -> None:
        c = config.channels
        one_stage = config.one_stage
        imagenet = config.family == "imagenet"
        # The evaluation network's stem, so that absorption copies it layer by layer.
        self.stem_layers = networks.stem_layers(c, imagenet)
        options = dict(affine=one_stage, bn_after_pool=True, bn_after_identity=one_stage)
        self.cells = [
            cell_lib.SearchCell(
                spec.channels,
                spec.reduction,
                spec.reduction_prev,
                **options,
                drop_path=one_stage,
                seed=config.seed * 1000 + i,
                name=f"cell{i}",
            )
            for i, spec in enumerate(cell_lib.cell_schedule(config.layers, c, imagenet))
        ]
        self.aux_position = 2 * config.layers // 3
        self.auxiliary_head = (
            networks.AuxiliaryHead(config.num_classes, imagenet, name="auxiliary_head")
            if one_stage
            else None
        )
        self.classifier = keras.layers.Dense(config.num_classes, name="classifier")
        if config.method == "ista":
            make = lambda cell_type, seed: architecture.ArchitectureEncoding(
                proj_dims=config.proj_dims,
                sparseness=config.sparseness,
                lam=config.lam,
                distinct_inputs=config.distinct_inputs,
                seed=seed,
                name=f"{cell_type}_code",
            )
        else:
            make = lambda cell_type, seed: darts.DartsArchitecture(
                seed=seed, name=f"{cell_type}_alphas"
            )
        # Distinct seeds: the normal and reduction encodings draw different A and b.
        self.architectures = {
            "normal": make("normal", 2 * config.seed + 1),
            "reduce": make("reduce", 2 * config.seed + 2),
        }
        if one_stage:
            # Drop path rate, ramped by the training loop; a variable so traced steps read
            # the current value and checkpoints keep it.
            self.drop_path_rate = self.add_weight(
                shape=(), initializer="zeros", trainable=False, name="drop_path_rate"
            )
            # Freeze flags per cell type, [steps] int32 (1 = set): checkpointed with the
            # model's variables, read into Python data by sync_supports().
            for cell_type in CELL_TYPES:
                for flag in ("frozen", "bn_trainable"):
                    setattr(
                        self,
                        f"{cell_type}_{flag}",
                        self.add_weight(
                            shape=(genotypes.STEPS,),
                            dtype="int32",
                            initializer="zeros",
                            trainable=False,
                            name=f"{cell_type}_{flag}",
                        ),
                    )
        else:
            self.drop_path_rate = 0.0

    def get_config(self):
        return {**super().get_config(), "config": dataclasses.asdict(self.config)}

    # ------------------------------------------------------------------ architecture
    def _read_flags(self, flag: str) -> dict[str, tuple[bool, ...]]:
        if not self.config.one_stage:
            return {cell_type: (False,) * genotypes.STEPS for cell_type in CELL_TYPES}
        return {
            cell_type: tuple(bool(v) for v in getattr(self, f"{cell_type}_{flag}").numpy())
            for cell_type in CELL_TYPES
        }

    def sync_supports(self) -> bool:
        """Re-reads the supports (and one-stage freeze flags) from the architecture state
        (after recovery, freezing or restore).

        Returns whether they changed, i.e. whether traced step functions are stale.
        """
        state = (
            {t: arch.support_tuple() for t, arch in self.architectures.items()},
            self._read_flags("frozen"),
            self._read_flags("bn_trainable"),
        )
        changed = state != (self._supports, self._frozen, self._bn_trainable)
        self._supports, self._frozen, self._bn_trainable = state
        return changed

    @property
    def supports(self) -> Supports:
        """The current support per cell type, as Python data (static in traced steps)."""
        if self._supports is None:
            raise ValueError(
                "the super-net has no architecture yet: call build_all() (or commit a recovery)"
            )
        return self._supports

    @property
    def frozen_nodes(self) -> dict[str, tuple[bool, ...]]:
        """Per cell type and node, whether its search has stopped (static data)."""
        return self._read_flags("frozen") if self._frozen is None else self._frozen

    def recover(self) -> dict[str, architecture.Recovery]:
        """Solves the LASSO of every node of both cell types in one batched call (with
        ``config.recovery_solver``); each Recovery carries its KKT report and certificate.

        Nothing changes until ``commit``. DARTS has nothing to recover: ``{}``.
        """
        if self.config.method != "ista":
            return {}
        encodings = [self.architectures[cell_type] for cell_type in CELL_TYPES]
        recoveries = architecture.solve_jointly(
            encodings,
            solver=self.config.recovery_solver,
            iterations=self.config.recovery_iterations,
        )
        return dict(zip(CELL_TYPES, recoveries))

    def commit(
        self,
        recoveries: dict[str, architecture.Recovery],
        nodes: dict[str, np.ndarray] | None = None,
    ) -> bool:
        """Makes recoveries the architecture and refreshes the supports.

        Args:
          recoveries: from ``recover()`` (or scripted, in tests), per cell type.
          nodes: optional per cell type [steps] bools, True for the nodes to update; the
            others keep their z and support. Default: every node.

        Returns:
          Whether the supports (or flags) changed: traced steps are then stale.
        """
        for cell_type, recovery in recoveries.items():
            self.architectures[cell_type].commit(
                recovery, None if nodes is None else nodes[cell_type]
            )
        return self.sync_supports()

    def genotype(self, supports: Supports | None = None) -> genotypes.Genotype:
        """The genotype of ``supports`` (flat indices per node), default the current one.

        ISTA-NAS picks are the support itself; DARTS picks by its top-2 rule.
        """
        if supports is None:
            supports = {t: arch.selected_support() for t, arch in self.architectures.items()}
        return sparse_coding.genotype_from_supports(supports["normal"], supports["reduce"])

    def z_values(self, cell_type: str) -> list[np.ndarray]:
        """The last recovered z of each node of ``cell_type`` (ISTA only), [n_j] each."""
        encoding = self.architectures[cell_type]
        z = encoding.z.numpy()
        return [z[j, :n] for j, n in enumerate(encoding.num_candidates)]

    def _set_flag(self, flag: str, cell_type: str, node: int) -> None:
        if not self.config.one_stage:
            raise ValueError(
                "freezing nodes is part of the one-stage search "
                "(SearchNetworkConfig(one_stage=True))"
            )
        if cell_type not in CELL_TYPES:
            raise ValueError(f"unknown cell type {cell_type!r}; valid: {', '.join(CELL_TYPES)}")
        if not 0 <= node < genotypes.STEPS:
            raise ValueError(f"node must be in [0, {genotypes.STEPS}), got {node}")
        variable = getattr(self, f"{cell_type}_{flag}")
        variable.assign(tf.tensor_scatter_nd_update(variable, [[node]], [1]))
        self.sync_supports()

    def unfreeze_node(self, cell_type: str, node: int) -> None:
        """Makes the BN gamma/beta inside node ``node``'s candidate ops trainable.

        Applies to every cell of ``cell_type`` ("normal" or "reduce"), whose cells share
        the architecture. The next traced step trains them (the step is traced again).
        """
        self._set_flag("bn_trainable", cell_type, node)

    def freeze_node(self, cell_type: str, node: int) -> None:
        """Stops the search of one node (docs/method.md section 4): its b is no longer
        trained, and the BN gamma/beta inside its candidate ops become trainable."""
        self._set_flag("frozen", cell_type, node)
        self.unfreeze_node(cell_type, node)

    def evaluation_parameter_count(self, supports: Supports | None = None) -> int:
        """Parameters of the evaluation network of ``supports`` (default: the current ones).

        The one-stage super-net holds the evaluation network of any support: the same
        stem, preprocessing, classifier and candidate ops (each ending in a BN, as with
        ``bn_after_param_free_ops``). So the count is the super-net's trainable
        parameters outside the candidate ops, the architecture and the auxiliary head,
        plus those of the candidate ops on the support, in every cell. This matches
        ``network_size.count_parameters`` of the absorbed network, without building it.
        """
        supports = self.supports if supports is None else supports
        excluded = self._candidate_variables() | {id(v) for v in self.architecture_variables}
        if self.auxiliary_head is not None:
            excluded |= {id(v) for v in self.auxiliary_head.trainable_variables}
        active = self._active_op_variables(supports)
        return sum(
            int(np.prod(v.shape))
            for v in self.trainable_variables
            if id(v) not in excluded or id(v) in active
        )

    def evaluation_size(self) -> evaluation_size.SupportSize:
        """Sizes of the evaluation network of any support, at the ``build_all`` image
        size (made on first use; its multiply-add table is traced when first asked)."""
        if self._size is None:
            self._size = evaluation_size.SupportSize(self, self.image_size)
        return self._size

    def evaluation_multiply_adds(self, supports: Supports | None = None) -> int:
        """Multiply-adds of the evaluation network of ``supports`` (default: the current
        ones) for one image: ``network_size.count_multiply_adds`` of the absorbed net."""
        supports = self.supports if supports is None else supports
        return self.evaluation_size().multiply_adds(supports)

    # ------------------------------------------------------------------ forward
    def build(self, *args, **kwargs):
        """Weights are created by build_all (every candidate op, not only the support)."""

    def build_all(self, image_size: int) -> None:
        """Creates every candidate op's weights from the cells' channel schedule (no
        forward pass: running all ops only to create their weights took most of a
        minute), then recovers the first architecture from the initial b (Algorithm 1:
        draw A, initialise b, recover z, take the support)."""
        self.image_size = image_size
        networks.build_by_shape(self, (None, image_size, image_size, 3))
        self.built = True
        self.commit(self.recover())

    def _forward(self, images, supports, weights, training, auxiliary=False):
        """Returns ``(logits, aux_logits)``; aux_logits is None unless ``auxiliary`` and
        the network has an auxiliary head."""
        s0, s1 = networks.run_stem(self.stem_layers, images, training)
        # Each node's weights split into scalars once for every cell of its type: indexed
        # per op and cell, a weight vector traced a strided slice and its gradient's
        # ~9 ops for each (10 % of the sparse step's graph, more of the dense one's).
        weights = {
            cell_type: [tf.unstack(node_weights) for node_weights in cell_weights]
            for cell_type, cell_weights in weights.items()
        }
        aux_logits = None
        for i, cell in enumerate(self.cells):
            cell_type = genotypes.cell_type(cell.reduction)
            s0, s1 = (
                s1,
                cell(
                    s0,
                    s1,
                    supports=supports[cell_type],
                    weights=weights[cell_type],
                    drop_path_rate=self.traced_drop_path_rate,
                    training=training,
                ),
            )
            if i == self.aux_position and self.auxiliary_head is not None and auxiliary:
                aux_logits = self.auxiliary_head(s1, training=training)
        return self.classifier(tf.reduce_mean(s1, axis=[1, 2])), aux_logits

    def alphas(self) -> dict[str, list[tf.Tensor]]:
        """Per cell type and node, the weights of the supported ops (differentiable in
        the architecture variables), in the order of ``supports``."""
        return {
            cell_type: arch.alphas(self.supports[cell_type])
            for cell_type, arch in self.architectures.items()
        }

    def call(self, images, training=None):
        """Returns logits, or ``(logits, aux_logits)`` in training with the auxiliary head
        (one-stage), as the evaluation network does."""
        logits, aux_logits = self._forward(
            images, self.supports, self.alphas(), training, auxiliary=bool(training)
        )
        return logits if aux_logits is None else (logits, aux_logits)
