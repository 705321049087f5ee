"""The super-net's Keras steps: which variables one batch trains, and how.

:class:`SearchSteps` is mixed into ``search_model.SearchNetwork`` (which provides the
forward pass and the variable lists) and holds its ``compile``, ``train_step`` and
``test_step``, in the shape every step of this project has: unpack, tape, one loss,
gradients on explicit variable lists, apply, update the metric trackers.

- Two-stage (docs/method.md section 3): an architecture step on an architecture batch (Adam
  on b), then a weight step on a weight batch (SGD on the weights the support uses),
  each in training mode.
- One-stage (docs/method.md section 4): one forward/backward pass of CE + 0.4 CE_aux on one
  batch serves both optimizers, on the b of the nodes still searching and the active,
  unfrozen weights.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from istanas_tf import batch_norm, genotypes, networks, optimizers


class SearchSteps:
    """What a step of the super-net trains, and its ``compile``, ``train_step`` and
    ``test_step`` (a mixin).

    The network it is mixed into provides ``config`` (``one_stage``,
    ``auxiliary_weight``), ``cells``, ``architectures``, ``supports`` and the one-stage
    freeze flags (``_frozen``, ``_bn_trainable``, read by ``sync_supports``).
    """

    # ------------------------------------------------------------------ what a step trains
    def _cells_of(self, cell_type: str) -> list:
        return [cell for cell in self.cells if genotypes.cell_type(cell.reduction) == cell_type]

    def _bn_affine(self, trainable: bool) -> list:
        if not self.config.one_stage:
            return []
        return [
            v
            for cell_type, flags in self._bn_trainable.items()
            for node, flag in enumerate(flags)
            if flag == trainable
            for cell in self._cells_of(cell_type)
            for bn in cell.candidate_batch_norms(node)
            for v in (bn.gamma, bn.beta)
        ]

    def frozen_bn_affine_variables(self) -> list:
        """The gamma/beta of candidate-op BNs that the train step leaves alone."""
        return self._bn_affine(trainable=False)

    def trainable_bn_affine_variables(self) -> list:
        """The gamma/beta of candidate-op BNs that are currently trained (when on the
        support): those of the nodes unfrozen by ``unfreeze_node``."""
        return self._bn_affine(trainable=True)

    @property
    def architecture_variables(self) -> list:
        """Trainable architecture variables: the b of every node (or DARTS' alphas)."""
        return [v for arch in self.architectures.values() for v in arch.trainable_variables]

    def active_architecture_variables(self) -> list:
        """The architecture variables a step trains: the b of nodes not yet frozen."""
        if not self.config.one_stage:
            return self.architecture_variables
        return [
            arch.b[node]
            for cell_type, arch in self.architectures.items()
            for node in range(arch.steps)
            if not self._frozen[cell_type][node]
        ]

    @property
    def weight_variables(self) -> list:
        """Every trainable network weight (all candidate ops), excluding architecture."""
        arch_ids = {id(v) for v in self.architecture_variables}
        return [v for v in self.trainable_variables if id(v) not in arch_ids]

    def _candidate_variables(self) -> set[int]:
        return {
            id(v)
            for cell in self.cells
            for node_ops in cell.candidates
            for op in node_ops
            for v in op.trainable_variables
        }

    def _active_op_variables(self, supports) -> set[int]:
        return {
            id(v)
            for cell in self.cells
            for op in cell.active_ops(supports[genotypes.cell_type(cell.reduction)])
            for v in op.trainable_variables
        }

    def active_weight_variables(self) -> list:
        """Trainable weights a forward pass with the current supports touches.

        One-stage: without the frozen BN gamma/beta of candidate ops.
        """
        inactive = self._candidate_variables() - self._active_op_variables(self.supports)
        inactive |= {id(v) for v in self.frozen_bn_affine_variables()}
        return [v for v in self.weight_variables if id(v) not in inactive]

    def compile(self, weight_optimizer, arch_optimizer, label_smoothing: float = 0.0, **kwargs):
        """Sets both optimizers and builds their slots up front (docs/design.md decision 5).

        ``label_smoothing`` applies to every cross-entropy of the steps (the one-stage
        ImageNet run uses 0.1, as the ImageNet retraining does). ``model.fit`` runs the
        step uncompiled by XLA unless ``jit_compile=True`` is passed, as the command
        line's loop does: the step is traced again whenever the support changes, and
        Keras' ``"auto"`` would compile every new trace on a GPU.
        """
        kwargs.setdefault("jit_compile", False)
        super().compile(optimizer=weight_optimizer, **kwargs)
        self.arch_optimizer = arch_optimizer
        self.label_smoothing = label_smoothing
        with networks.unnamed_tf_variables():
            weight_optimizer.build(self.weight_variables)
            arch_optimizer.build(self.architecture_variables)
        # The one-stage step has a single loss (on the same batch for both optimizers).
        names = ("loss",) if self.config.one_stage else ("loss", "arch_loss")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        networks.release_cached_kernels()  # every variable of the run exists now

    @property
    def metrics(self):
        return [*self.trackers.values(), self.accuracy]

    def _loss(self, labels, logits):
        # float32 under mixed precision; the evaluation networks' loss.
        return networks.cross_entropy(labels, logits, self.config.num_classes, self.label_smoothing)

    def train_step(self, data):
        """One architecture step then one weight step (docs/method.md section 3).

        Args:
          data: ``((weight_images, weight_labels), (arch_images, arch_labels))``;
            one-stage: ``(images, labels)`` (see _one_stage_train_step).
        """
        # Traced again after every support change: the synchronized BN's all-reduce
        # gradients must not keep each old trace alive.
        with batch_norm.custom_gradients_released():
            if self.config.one_stage:
                return self._one_stage_train_step(data)
            return self._two_stage_train_step(data)

    def _two_stage_train_step(self, data):
        """The architecture step, then the weight step (see train_step)."""
        (images, labels), (arch_images, arch_labels) = data
        arch_vars = self.architecture_variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            _watch_only(tape, arch_vars)
            per_example, loss = self._loss(arch_labels, self(arch_images, training=True))
            # Loss scaling (a LossScaleOptimizer under mixed_float16; else the identity).
            scaled_loss = self.arch_optimizer.scale_loss(loss)
        apply_present_gradients(
            self.arch_optimizer, tape.gradient(scaled_loss, arch_vars), arch_vars
        )
        self.trackers["arch_loss"].update_state(per_example)

        weight_vars = self.active_weight_variables()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            _watch_only(tape, weight_vars)
            logits = self(images, training=True)
            per_example, loss = self._loss(labels, logits)
            scaled_loss = self.optimizer.scale_loss(loss)
        apply_present_gradients(
            self.optimizer, tape.gradient(scaled_loss, weight_vars), weight_vars
        )
        self.trackers["loss"].update_state(per_example)
        self.accuracy.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def _one_stage_train_step(self, data):
        """One forward/backward of CE + auxiliary_weight * CE_aux on one batch, then an
        architecture step on the b of unfrozen nodes and a weight step on the active,
        unfrozen weights (docs/method.md section 4)."""
        images, labels = data
        arch_vars = self.active_architecture_variables()
        weight_vars = self.active_weight_variables()
        # One backward pass serves both optimizers. Under mixed_float16 each has its own
        # dynamic loss scale; the pass runs at the smaller one, so that an optimizer
        # whose gradients overflow lowers the scale of the shared pass (at the weight
        # optimizer's scale alone, overflowing b gradients would never recover), and
        # each optimizer gets its gradients re-scaled to its own scale. Without loss
        # scaling every factor is 1.
        weight_scale = self.optimizer.scale_loss(1.0)
        arch_scale = self.arch_optimizer.scale_loss(1.0) if arch_vars else weight_scale
        scale = tf.minimum(weight_scale, arch_scale)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            _watch_only(tape, arch_vars + weight_vars)
            logits, aux_logits = self(images, training=True)
            per_example, loss = self._loss(labels, logits)
            loss = loss + self.config.auxiliary_weight * self._loss(labels, aux_logits)[1]
            scaled_loss = loss * scale
        gradients = tape.gradient(scaled_loss, arch_vars + weight_vars)
        rescale = lambda grads, target: [None if g is None else g * (target / scale) for g in grads]
        if arch_vars:
            apply_present_gradients(
                self.arch_optimizer, rescale(gradients[: len(arch_vars)], arch_scale), arch_vars
            )
        apply_present_gradients(
            self.optimizer, rescale(gradients[len(arch_vars) :], weight_scale), weight_vars
        )
        self.trackers["loss"].update_state(per_example)
        self.accuracy.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        """The loss and accuracy of a batch in inference mode."""
        images, labels = data
        logits = self(images, training=False)
        per_example, _ = self._loss(labels, logits)
        self.trackers["loss"].update_state(per_example)
        self.accuracy.update_state(labels, logits)
        return {"loss": self.trackers["loss"].result(), "accuracy": self.accuracy.result()}


def _watch_only(tape: tf.GradientTape, variables: list) -> None:
    """Watches ``variables`` on a tape made with ``watch_accessed_variables=False``.

    Each step's tapes watch only the variables they differentiate: a tape that watches
    every variable read records, and traces gradient ops for, what grappler then prunes
    unused (the weight step's products by alpha toward b, the architecture step's
    convolution-filter gradients).
    """
    tape.watch([optimizers.tf_variable(v) for v in variables])


def apply_present_gradients(optimizer, gradients, variables) -> None:
    """Applies the gradients that exist.

    A supported op can still be disconnected from the loss (e.g. a genotype whose normal
    cells never read the previous cell leaves the reduction cells unused); like PyTorch,
    such variables are left alone rather than decayed.
    """
    pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
    if pairs:
        optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
