"""The super-net's training step on 2 replicas equals the step on one device.

The default suite's check of the replica machinery (the end-to-end runs on 2 replicas,
minutes each, are opt-in in ``distribute_test.py``): a subprocess configures 2 logical
CPUs (before TensorFlow starts), builds the tiny super-net as a search run builds it,
once with the default strategy and once with ``MirroredStrategy`` (2 replicas, so
synchronized BN), and runs two steps of ``steps.distributed_step`` on the same global
batches: the two-stage step (architecture step, then weight step) and the one-stage
step (one loss for both optimizers). Each replica gets half of each batch.

What holds by construction, and is asserted:

- the losses, every weight, BN running statistic and optimizer slot agree with the
  one-device step to float32 summation-order noise (the replicas' gradients are summed
  in another order than one device's);
- the architecture codes b agree to a few Adam steps: Adam moves each element by about
  its learning rate whatever the gradient's size, so a gradient at noise level may
  take either sign;
- the two replicas' copies of every variable are identical (both apply the same
  all-reduced update);
- both builds start from the same weights, codes and recovered z (a tf.function
  traced on a MirroredVariable captured it: the second super-net built under one
  strategy recovered its first z from the first super-net's trained b);
- the steps changed the weights, the codes and the running statistics (else the
  comparison would be empty). The accuracies are not compared: the tiny net's logits
  are near ties;
- a step dropped (as a loop drops it when the support changes) leaves no traced graph
  and no registered gradient function behind, on either strategy.
"""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from testing import this_checkout_env

# A tenth of the default: Adam moves each b by about this much whatever the size of its
# gradient, so a gradient at noise level may move it either way in the two runs.
ARCH_LEARNING_RATE = 6e-5
B_ATOL = 4 * ARCH_LEARNING_RATE
WEIGHTS_RTOL = 1e-5  # relative L2 over all weights of a mode
VARIABLE_RTOL = 1e-4  # of the variable's largest entry (measured: 5e-5 at most)
VARIABLE_ATOL = 1e-6  # measured: 3e-7 at most
LOSS_RTOL = 1e-5
STEPS = 2

HELPER = textwrap.dedent('''
    """Two steps of each mode on each strategy; argv[1]: the .npz out, argv[2]: the json out."""
    import dataclasses
    import gc
    import json
    import os
    import sys
    import time

    START = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from tensorflow.python.framework import func_graph, ops as tf_ops
    from istanas_tf import search_model
    from istanas_tf.training import builders, runtime
    from istanas_tf.training import config as config_lib
    from istanas_tf.training import steps as steps_lib

    GLOBAL_BATCH = 8

    def traced_graphs():
        gc.collect()
        return sum(isinstance(o, func_graph.FuncGraph) for o in gc.get_objects())

    def custom_gradients():
        return sum(n.startswith("CustomGradient-") for n in tf_ops._gradient_registry._registry)
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
         rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32))
        for _ in range(2 * %(steps)d)
    ]
    arrays, report = {}, {}
    # One MirroredStrategy for both modes: a second one in the process would number its
    # collectives from the start again and clash with the first one's.
    strategies = {name: runtime.make_strategy(name) for name in ("default", "mirrored")}
    for mode in ("two_stage", "one_stage"):
        for name, strategy in strategies.items():
            config = config_lib.TwoStageConfig(
                model_dir="unused",
                network=search_model.SearchNetworkConfig(
                    channels=4, layers=3, seed=0, one_stage=mode == "one_stage"),
            )
            # Clipping below the gradients' norm: the summed gradient is what is clipped.
            loop = dataclasses.replace(config.loop, grad_clip=0.1, deterministic=True, seed=0)
            runtime.seed_process(loop)  # as a run does: the same initial weights and b
            arch = config_lib.ArchitectureOptimizerConfig(learning_rate=%(arch_lr)r)
            with strategy.scope():
                model = builders.search_network(
                    config.network, 10, 32, replicas=strategy.num_replicas_in_sync)
                model.compile(builders.weight_optimizer(loop),
                              builders.architecture_optimizer(arch, None))
            if mode == "two_stage":
                step = lambda w, a: model.train_step((w, a))
            else:
                step = lambda images, labels: model.train_step((images, labels))
            graphs_before, gradients_before = traced_graphs(), custom_gradients()
            train_fn = steps_lib.distributed_step(strategy, step, model)

            def distribute(batch):
                if name == "default":
                    return tuple(tf.constant(t) for t in batch)
                dataset = tf.data.Dataset.from_tensors(batch)
                return next(iter(strategy.experimental_distribute_dataset(dataset)))

            key = f"{mode}/{name}"
            print(key, "built", round(time.perf_counter() - START, 1), file=sys.stderr)
            # By position (both builds create them in the same order; Keras numbers the
            # names of later instances, e.g. seed_generator_3), with their paths.
            variables = [(v.path, v) for v in model.variables] + [
                (f"optimizer/{v.path}", v)
                for v in model.optimizer.variables + model.arch_optimizer.variables
            ]
            for i, (_, v) in enumerate(variables):
                arrays[f"{key}/initial/{i:05d}"] = v.numpy()
            logs = []
            for s in range(%(steps)d):
                weights_batch, arch_batch = batches[2 * s], batches[2 * s + 1]
                if mode == "two_stage":
                    out = train_fn(distribute(weights_batch), distribute(arch_batch))
                else:
                    out = train_fn(*distribute(weights_batch))
                logs.append({k: float(v) for k, v in out.items()})
                print(key, "step", round(time.perf_counter() - START, 1), file=sys.stderr)
            for i, (_, v) in enumerate(variables):
                arrays[f"{key}/final/{i:05d}"] = v.numpy()
                copies = strategy.experimental_local_results(getattr(v, "value", v))
                arrays[f"{key}/copies/{i:05d}"] = np.stack([c.numpy() for c in copies])
            # What the step's trace leaves once the step is dropped (a loop drops it
            # when the support changes).
            del train_fn
            report[key] = {"logs": logs, "replicas": strategy.num_replicas_in_sync,
                           "paths": [path for path, _ in variables],
                           "graphs_kept": traced_graphs() - graphs_before,
                           "custom_gradients_kept": custom_gradients() - gradients_before}
    np.savez(sys.argv[1], **{k.replace("/", "|"): v for k, v in arrays.items()})
    with open(sys.argv[2], "w") as f:
        json.dump(report, f)
''') % dict(steps=STEPS, arch_lr=ARCH_LEARNING_RATE)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    """The helper's arrays and report: one subprocess, about 3 minutes of one core (each
    mirrored step's first call, tracing 2 replicas, takes ~45 s of it)."""
    folder = tmp_path_factory.mktemp("mirrored_step")
    script = folder / "helper.py"
    script.write_text(HELPER)
    arrays, report = folder / "arrays.npz", folder / "report.json"
    process = subprocess.run(
        [sys.executable, str(script), str(arrays), str(report)],
        capture_output=True,
        text=True,
        cwd=folder,
        env=this_checkout_env(),
        timeout=900,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    with np.load(arrays) as loaded:
        values = {k.replace("|", "/"): v for k, v in loaded.items()}
    return values, json.loads(report.read_text())


@pytest.mark.parametrize("mode", ["two_stage", "one_stage"])
def test_a_dropped_step_releases_its_trace(record, mode):
    """The synchronized BN's all-reduces are ``tf.custom_gradient``s, which TF registers
    for good with the traced graph in reach; a loop that traces its step again after
    every support change kept every old trace (~200 MB per epoch here)."""
    _, report = record
    for strategy in ("default", "mirrored"):
        run = report[f"{mode}/{strategy}"]
        assert run["custom_gradients_kept"] == 0, (strategy, run["custom_gradients_kept"])
        assert run["graphs_kept"] <= 0, (strategy, run["graphs_kept"])


def _group(values, key, stage, paths):
    """One run's arrays of one stage, by the default run's variable paths."""
    prefix = f"{key}/{stage}/"
    return {paths[int(k[len(prefix) :])]: v for k, v in values.items() if k.startswith(prefix)}


@pytest.mark.parametrize("mode", ["two_stage", "one_stage"])
def test_two_replicas_take_the_one_device_step(record, mode):
    values, report = record
    one, two = report[f"{mode}/default"], report[f"{mode}/mirrored"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    # The same variables in the same order (up to Keras' numbering of later names).
    unnumbered = [[re.sub(r"_\d+(?=/|$)", "", p) for p in run["paths"]] for run in (one, two)]
    assert unnumbered[0] == unnumbered[1]
    paths = dict(enumerate(one["paths"]))
    for log_one, log_two in zip(one["logs"], two["logs"], strict=True):
        for name in log_one:
            if "loss" in name:
                np.testing.assert_allclose(log_two[name], log_one[name], rtol=LOSS_RTOL)

    initial = _group(values, f"{mode}/default", "initial", paths)
    final = [_group(values, f"{mode}/{s}", "final", paths) for s in ("default", "mirrored")]
    # The architecture codes b_j of both encodings (not their optimizer slots).
    codes = {p for p in initial if re.search(r"_code/b_\d+$", p) and "optimizer/" not in p}
    assert len(codes) == 2 * 4, sorted(initial)  # normal and reduce, 4 nodes each
    # Both networks start from the same seeded weights and codes.
    for path, value in _group(values, f"{mode}/mirrored", "initial", paths).items():
        np.testing.assert_array_equal(value, initial[path], err_msg=path)

    changed = {path for path in initial if not np.array_equal(final[0][path], initial[path])}
    # Not an empty comparison: b, weights, BN statistics and optimizer slots all moved.
    for part in ("code", "kernel", "moving_mean", "moving_variance", "optimizer/"):
        assert any(part in path for path in changed), (part, sorted(changed)[:20])

    weights_one, weights_two = [], []
    for path in sorted(initial):
        if path in codes:
            np.testing.assert_allclose(
                final[1][path], final[0][path], rtol=0, atol=B_ATOL, err_msg=path
            )
        elif final[0][path].dtype.kind == "f":
            # Relative to the variable's scale: a gradient's noise is relative to its
            # largest entries, and a BN after a pool or skip has a running mean ~1e-11.
            gap = np.abs(final[1][path] - final[0][path]).max()
            assert gap <= VARIABLE_ATOL + VARIABLE_RTOL * np.abs(final[0][path]).max(), path
            weights_one.append(final[0][path].ravel())
            weights_two.append(final[1][path].ravel())
        else:
            np.testing.assert_array_equal(final[1][path], final[0][path], err_msg=path)
    flat_one, flat_two = np.concatenate(weights_one), np.concatenate(weights_two)
    relative = np.linalg.norm(flat_two - flat_one) / np.linalg.norm(flat_one)
    assert relative <= WEIGHTS_RTOL, f"weights differ by {relative:.2e} (relative L2)"

    copies = _group(values, f"{mode}/mirrored", "copies", paths)
    for path, stacked in copies.items():
        assert stacked.shape[0] == 2, path
        np.testing.assert_array_equal(stacked[1], stacked[0], err_msg=path)
