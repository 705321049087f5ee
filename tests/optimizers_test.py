"""The PyTorch-rule optimizers against a numpy transcription of torch.optim."""

import gc
import json
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import tensorflow as tf
from testing import this_checkout_env

from istanas_tf import graph_constants, optimizers


def _torch_sgd_reference(w, grads, lrs, momentum, wd, clip):
    buf = np.zeros_like(w)
    for g, lr in zip(grads, lrs):
        norm = np.linalg.norm(g)
        if norm > clip:  # torch.nn.utils.clip_grad_norm_ (single tensor: global norm)
            g = g * clip / (norm + 1e-6)
        g = g + wd * w
        buf = momentum * buf + g
        w = w - lr * buf
    return w


def _torch_adam_reference(w, grads, lr, b1, b2, eps, wd):
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


def test_sgd_matches_pytorch_rule_with_changing_lr_and_clipping():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=[5]).astype(np.float64)
    grads = [rng.normal(scale=4.0, size=[5]) for _ in range(6)]
    lrs = [0.1, 0.08, 0.05, 0.03, 0.01, 0.001]
    variable = tf.Variable(w0)
    opt = optimizers.TorchSGD(learning_rate=lrs[0], momentum=0.9, l2=3e-4, clip_global_norm=5.0)
    opt.build([variable])
    for g, lr in zip(grads, lrs):
        opt.learning_rate = lr
        opt.apply([tf.constant(g)], [variable])
    expected = _torch_sgd_reference(w0, grads, lrs, 0.9, 3e-4, 5.0)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5)
    # Keras' own SGD folds the lr into the buffer and would differ here.
    assert not np.allclose(expected, w0 - sum(lr * g for lr, g in zip(lrs, grads)))


def test_adam_matches_pytorch_rule_with_coupled_l2():
    rng = np.random.default_rng(1)
    w0 = rng.normal(scale=1e-3, size=[7])
    grads = [rng.normal(scale=1e-2, size=[7]) for _ in range(5)]
    variable = tf.Variable(w0)
    opt = optimizers.TorchAdam(learning_rate=6e-4, beta_1=0.5, beta_2=0.999, l2=1e-3)
    opt.build([variable])
    for g in grads:
        opt.apply([tf.constant(g)], [variable])
    expected = _torch_adam_reference(w0, grads, 6e-4, 0.5, 0.999, 1e-8, 1e-3)
    # Keras stores the lr in float32 (6e-4 -> 6.00000028e-4): 5e-8 relative per step.
    np.testing.assert_allclose(variable.numpy() - w0, expected - w0, rtol=1e-6)


def test_global_norm_clipping_spans_all_variables():
    a, b = tf.Variable([0.0, 0.0]), tf.Variable([0.0])
    opt = optimizers.TorchSGD(learning_rate=1.0, momentum=0.0, clip_global_norm=1.0)
    opt.build([a, b])
    opt.apply([tf.constant([3.0, 0.0]), tf.constant([4.0])], [a, b])
    # Global norm 5 -> scaled by 1/5: steps of 0.6 and 0.8.
    np.testing.assert_allclose(a.numpy(), [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), [-0.8], rtol=1e-6)


def _written_out_sgd(w, grads, lrs, momentum, wd):
    """PyTorch's SGD rule as separate float32 TF ops (the optimizer's former body)."""
    w, buf = tf.constant(w), tf.zeros_like(w)
    for g, lr in zip(grads, lrs):
        g = tf.constant(g) + tf.constant(wd, tf.float32) * w
        buf = momentum * buf + g
        w = w - tf.constant(lr, tf.float32) * buf
    return w.numpy()


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_sgd_fused_kernel_is_bit_identical_to_the_written_out_rule(traced):
    # The fused ResourceApplyMomentum rounds exactly as the rule's separate products
    # and sums, traced too. (The rule written out as separate ops, traced, did not:
    # grappler's arithmetic optimizer rearranged it, 36 of these 216 values 1 ulp off.)
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=[3, 3, 4, 6]).astype(np.float32)
    grads = [rng.normal(size=w0.shape).astype(np.float32) for _ in range(5)]
    lrs = [0.1, 0.07, 0.05, 0.02, 0.003]
    variable = tf.Variable(w0)
    opt = optimizers.TorchSGD(learning_rate=lrs[0], momentum=0.9, l2=3e-4)
    opt.build([variable])
    apply = tf.function(opt.apply) if traced else opt.apply
    for g, lr in zip(grads, lrs):
        opt.learning_rate.assign(lr)
        apply([tf.constant(g)], [variable])
    expected = _written_out_sgd(w0, grads, lrs, 0.9, 3e-4)
    np.testing.assert_array_equal(variable.numpy(), expected)
    assert not np.array_equal(expected, w0)


def test_sgd_traces_few_ops_per_variable():
    """The fused kernel is the point: a step of the dense super-net updates ~1,400
    weights, and every traced op costs ~0.5-1 ms of tracing. The written-out rule traced
    19 ops per variable (read, products, sums, two assignments), the fused kernel with
    its own constants and learning-rate read 13; now 10, counting the clip's and L2's ops
    and the captured handles (the constants and the read are made once per graph)."""

    def traced_ops(count):
        variables = [tf.Variable(tf.zeros([3, 4])) for _ in range(count)]
        opt = optimizers.TorchSGD(0.1, momentum=0.9, l2=3e-4, clip_global_norm=5.0)
        opt.build(variables)
        apply = tf.function(lambda gradients: opt.apply(gradients, variables))
        graph = apply.get_concrete_function([tf.TensorSpec([3, 4])] * count).graph
        return len(graph.get_operations())

    assert (traced_ops(20) - traced_ops(10)) / 10 <= 10


def test_constants_made_once_per_graph_keep_no_graph_alive():
    """The update's shared constants are cached per traced graph, weakly: once the step
    is dropped its graph goes (a support change re-traces the step every epoch)."""
    variables = [tf.Variable(tf.zeros([3])) for _ in range(2)]
    opt = optimizers.TorchSGD(0.1, momentum=0.9, l2=3e-4)
    opt.build(variables)
    apply = tf.function(lambda gradients: opt.apply(gradients, variables))
    graph = apply.get_concrete_function([tf.TensorSpec([3])] * 2).graph
    momentum_inputs = {
        op.inputs[-1].ref() for op in graph.get_operations() if op.type == "ResourceApplyMomentum"
    }
    assert len(momentum_inputs) == 1  # one momentum constant for both variables
    assert graph in graph_constants._GRAPH_TENSORS
    graph_ref = weakref.ref(graph)
    del apply, graph, momentum_inputs
    gc.collect()
    assert graph_ref() is None


_TWO_DEVICE_UPDATE = textwrap.dedent("""
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from istanas_tf import optimizers
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        variables = [tf.Variable(tf.zeros([3])) for _ in range(2)]
        opt = optimizers.TorchSGD(0.1, momentum=0.9, l2=3e-4)
        opt.build(variables)
    step = tf.function(lambda: strategy.run(lambda: opt.apply([tf.ones([3])] * 2, variables)))
    graph = step.get_concrete_function().graph
    print(json.dumps([
        [op.device, op.inputs[2].op.name, op.inputs[2].device, op.inputs[-1].op.name,
         op.inputs[-1].device]
        for op in graph.get_operations() if op.type == "ResourceApplyMomentum"
    ]))
""")


def test_each_device_updates_with_its_own_constants():
    """Under a MirroredStrategy each device's updates share that device's learning-rate
    read and momentum constant, not device 0's (a copy per update otherwise)."""
    process = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICE_UPDATE],
        capture_output=True,
        text=True,
        env=this_checkout_env(),
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    updates = json.loads(process.stdout.splitlines()[-1])
    assert len(updates) == 4 and len({device for device, *_ in updates}) == 2
    for device, _, lr_device, _, momentum_device in updates:
        assert momentum_device == device and lr_device in ("", device)  # "": placer's pick
    reads, constants = {}, {}
    for device, lr, _, momentum, _ in updates:
        reads.setdefault(device, set()).add(lr)
        constants.setdefault(device, set()).add(momentum)
    # One of each per device, shared by both variables there, none shared across devices.
    assert all(len(names) == 1 for names in [*reads.values(), *constants.values()])
    assert len(set.union(*reads.values())) == len(set.union(*constants.values())) == 2
