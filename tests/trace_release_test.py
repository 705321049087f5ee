"""Old traces are released when a support change makes the loop trace its steps again.

The support is Python data baked into the traced steps, so every recovery that changes
it makes the run trace new step functions (``search_run.SearchRun.trace_steps``). The
old ones must be freed: a search of hundreds of epochs would otherwise keep a whole
step graph per epoch. Here the support changes before every epoch (a scripted recovery
committed through ``SearchNetwork.commit``), the steps are traced again as the loop
does (``steps.distributed_step``), and the live FuncGraphs and traced functions are
counted exactly after each epoch: they must stay what they were after the first one.
(They grew by one FuncGraph per epoch while Keras' optimizer all-reduced the gradients
through a ``tf.custom_gradient`` registered globally per trace.)
"""

import gc

import numpy as np
import tensorflow as tf
from tensorflow.python.eager.polymorphic_function import (
    atomic_function,
    concrete_function,
    polymorphic_function,
)
from tensorflow.python.framework import func_graph

from istanas_tf import optimizers, search_model
from istanas_tf.training import steps

IMAGE_SIZE, EPOCHS = 8, 4
TRACE_CLASSES = (
    func_graph.FuncGraph,
    concrete_function.ConcreteFunction,
    atomic_function.AtomicFunction,
    polymorphic_function.Function,
)


def _live_traces() -> dict[str, int]:
    gc.collect()
    counts = dict.fromkeys((cls.__name__ for cls in TRACE_CLASSES), 0)
    for obj in gc.get_objects():
        for cls in TRACE_CLASSES:
            if isinstance(obj, cls):
                counts[cls.__name__] += 1
    return counts


def _rotated_recoveries(model, epoch):
    """Per cell type, the recovery of a z whose two picks of node j are candidates
    ``epoch + j`` and the next one: every node's support moves at every epoch."""
    recoveries = {}
    for cell_type, encoding in model.architectures.items():
        z = np.zeros((encoding.steps, encoding.num_candidates[-1]))
        for node, candidates in enumerate(encoding.num_candidates):
            z[node, (epoch + node) % candidates] = 2.0
            z[node, (epoch + node + 1) % candidates] = 1.0
        recoveries[cell_type] = encoding.recovery_of(z)
    return recoveries


def test_a_support_change_per_epoch_keeps_the_live_traces_constant():
    strategy = tf.distribute.get_strategy()
    model = search_model.SearchNetwork(
        search_model.SearchNetworkConfig(num_classes=2, channels=4, layers=3)
    )
    model.build_all(IMAGE_SIZE)
    model.compile(
        optimizers.TorchSGD(0.05, momentum=0.9, l2=3e-4, clip_global_norm=5.0),
        optimizers.TorchAdam(3e-4, beta_1=0.5, l2=1e-3),
    )
    rng = np.random.default_rng(0)
    batch = (
        tf.constant(rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)), tf.float32),
        tf.constant([0, 1]),
    )
    counts = []
    for epoch in range(EPOCHS):
        assert model.commit(_rotated_recoveries(model, epoch + 1))  # the support changed
        # As SearchRun.trace_steps, then a step of the epoch (which traces).
        train_fn = steps.distributed_step(strategy, lambda w, a: model.train_step((w, a)), model)
        train_fn(batch, batch)
        assert train_fn.experimental_get_tracing_count() == 1
        counts.append(_live_traces())
    assert all(c == counts[0] for c in counts[1:]), counts
