"""Optimizers with the published PyTorch code's update rules (docs/method.md section 8).

Keras' built-in SGD folds the learning rate into the momentum buffer and its
``weight_decay`` is decoupled; the paper's runs used PyTorch, where

- L2 is added to the gradient (``g <- g + wd * w``) inside the optimizer step,
- SGD keeps ``buf <- m * buf + g`` and applies the lr at update time (``w -= lr * buf``),
  which differs from Keras once the lr changes (cosine schedule),
- gradients are clipped to a global norm *before* the L2 term is added,
- Adam adds eps to the bias-corrected ``sqrt(v_hat)``.

Under ``tf.distribute`` the clipping norm must be that of the summed (global-batch)
gradient, so it is applied after the cross-replica all-reduce, not per replica.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from istanas_tf import graph_constants

_register = keras.saving.register_keras_serializable(package="istanas_tf")


def tf_variable(variable):
    """The TF variable of a Keras or TF variable (inside a strategy's ``update``, a
    distributed variable's local component); what ``GradientTape.watch`` takes."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def _handle(variable):
    """The resource handle of a Keras or TF variable (per device inside a strategy's
    ``update``, where a distributed variable's handle is its local component's)."""
    return tf_variable(variable).handle


def _once_per_graph(key, variable, make):
    """``make()``, made once per traced graph and device, shared by the updates of every
    variable on that device.

    An optimizer's ``update_step`` runs once per variable: a constant or a cast made in it
    is traced once per variable (two ``Const`` and a read of the learning rate each, a
    few thousand ops in the dense super-net's step). Keyed by ``variable``'s device too,
    so that under a ``MirroredStrategy`` each device's updates read their own.
    """
    return graph_constants.once_per_graph((*key, tf_variable(variable).device), make)


class _TorchStyleOptimizer(keras.optimizers.Optimizer):
    """Adds coupled L2 and post-all-reduce global-norm clipping to a Keras optimizer."""

    def __init__(
        self, learning_rate, l2: float = 0.0, clip_global_norm: float | None = None, **kwargs
    ):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.l2 = l2
        self.clip_global_norm = clip_global_norm

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # Keras' own clipnorm runs before the all-reduce (per replica); clip the summed
        # gradient instead so that N replicas step exactly like one device. This
        # overrides a private Keras method: Keras has no public hook between the
        # cross-replica sum and the update (hence keras pinned to 3.15 in pyproject.toml).
        grads_and_vars = list(grads_and_vars)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            # Only a real sum: Keras all-reduces through a tf.custom_gradient, which in
            # a traced step registers a gradient function in TF's process-wide
            # registry, never removed, that holds the step's FuncGraph. Each re-trace
            # of the step (a support change) would keep its whole graph alive; with one
            # replica the sum is the gradient itself. (With more, the search's train
            # step forgets those entries: batch_norm.custom_gradients_released.)
            grads_and_vars = list(super()._all_reduce_sum_gradients(grads_and_vars))
        if self.clip_global_norm is None:
            return grads_and_vars
        present = [(g, v) for g, v in grads_and_vars if g is not None]
        clipped, _ = tf.clip_by_global_norm([g for g, _ in present], self.clip_global_norm)
        return list(zip(clipped, [v for _, v in present]))

    def _with_l2(self, gradient, variable):
        if self.l2:
            l2 = _once_per_graph(
                ("l2", self.l2, gradient.dtype),
                variable,
                lambda: tf.constant(self.l2, gradient.dtype),
            )
            return gradient + l2 * tf.convert_to_tensor(variable)
        return gradient

    def get_config(self):
        return {**super().get_config(), "l2": self.l2, "clip_global_norm": self.clip_global_norm}


@_register
class TorchSGD(_TorchStyleOptimizer):
    """PyTorch SGD: ``buf = m * buf + (g + wd * w); w -= lr * buf``.

    Args:
      learning_rate: float, variable or schedule; read at every update.
      momentum: momentum factor m.
      l2: L2 coefficient wd added to the gradient (after clipping).
      clip_global_norm: clip the all-reduced gradients to this global norm, or None.
    """

    def __init__(
        self,
        learning_rate=0.025,
        momentum: float = 0.9,
        l2: float = 0.0,
        clip_global_norm: float | None = None,
        name: str = "torch_sgd",
        **kwargs,
    ):
        super().__init__(
            learning_rate, l2=l2, clip_global_norm=clip_global_norm, name=name, **kwargs
        )
        self.momentum = momentum

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(v, "momentum") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        gradient = self._with_l2(tf.convert_to_tensor(gradient, dtype), variable)
        # _get_variable_index is private, but it is how Keras' own optimizers find a
        # variable's slots; there is no public equivalent (keras pinned to 3.15).
        buffer = self.momentums[self._get_variable_index(variable)]
        # One fused kernel per variable: ``buf = buf * m + g; w -= buf * lr``, the
        # rule's float operations in its order (TF's CPU kernel has no fused
        # multiply-add), eager and traced alike. Written out as separate ops it traced
        # ~8 more ops per variable, and in a traced step grappler's arithmetic
        # optimizer rearranged them (results 1 ulp apart from the rule's).
        tf.raw_ops.ResourceApplyMomentum(
            var=_handle(variable),
            accum=_handle(buffer),
            lr=_once_per_graph(
                ("lr", id(learning_rate), dtype), variable, lambda: tf.cast(learning_rate, dtype)
            ),
            grad=gradient,
            momentum=_once_per_graph(
                ("momentum", self.momentum, dtype),
                variable,
                lambda: tf.constant(self.momentum, dtype),
            ),
            use_locking=False,
            use_nesterov=False,
        )

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


@_register
class TorchAdam(_TorchStyleOptimizer):
    """PyTorch Adam with coupled L2 (``torch.optim.Adam(weight_decay=wd)``).

    ``m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    w -= lr * m_hat / (sqrt(v_hat) + eps)`` with ``g = grad + wd * w``.
    """

    def __init__(
        self,
        learning_rate=3e-4,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        l2: float = 0.0,
        clip_global_norm: float | None = None,
        name: str = "torch_adam",
        **kwargs,
    ):
        super().__init__(
            learning_rate, l2=l2, clip_global_norm=clip_global_norm, name=name, **kwargs
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.first_moments = [self.add_variable_from_reference(v, "m") for v in variables]
        self.second_moments = [self.add_variable_from_reference(v, "v") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        gradient = self._with_l2(gradient, variable)
        dtype = variable.dtype
        learning_rate = tf.cast(learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        m, v = self.first_moments[index], self.second_moments[index]
        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * gradient)
        self.assign(v, self.beta_2 * v + (1.0 - self.beta_2) * tf.square(gradient))
        # tf.constant, not tf.cast: casting a Python float goes through float32.
        m_hat = m / (1.0 - tf.pow(tf.constant(self.beta_1, dtype), step))
        v_hat = v / (1.0 - tf.pow(tf.constant(self.beta_2, dtype), step))
        self.assign_sub(variable, learning_rate * m_hat / (tf.sqrt(v_hat) + self.epsilon))

    def get_config(self):
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }
