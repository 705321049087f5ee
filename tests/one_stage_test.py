"""The one-stage run (docs/method.md section 4): the stopping rule with scripted recoveries,
then the whole run through train/main.py (resume, export, bad input)."""

import collections
import dataclasses
import functools
import json
import pathlib
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf
from main_runner import (
    MAIN,
    REPO,
    assert_evaluations_match,
    checkpoint_state,
    last_json,
    metrics_rows,
    run_main,
    run_main_killed,
    run_to_completion,
    tiny_flags,
)
from testing import candidate_bn_affine, tiny_loop

from istanas_tf import (
    absorption,
    blocks,
    data,
    genotypes,
    network_size,
    networks,
    optimizers,
    search_model,
    stopping,
)
from istanas_tf.training import config as config_lib
from istanas_tf.training import one_stage, recorded, restore, runtime

CELL_TYPES = genotypes.CELL_TYPES

# C = 4, 3 cells: cell 0 normal, cells 1 and 2 reduction; auxiliary head after cell 2.
TINY = dict(num_classes=10, channels=4, layers=3, seed=1, one_stage=True)
IMAGE_SIZE = 32
# A power of two near the paper's 1e-3: z_last (float32) + TOLERANCE is exact in float64,
# so a node scripted to move by exactly the tolerance is at distance == tolerance.
TOLERANCE = 2.0**-10


def _network():
    network = search_model.SearchNetwork(search_model.SearchNetworkConfig(**TINY))
    network.build_all(IMAGE_SIZE)
    network.compile(
        optimizers.TorchSGD(0.05, momentum=0.9, l2=3e-4, clip_global_norm=5.0),
        optimizers.TorchAdam(3e-4, beta_1=0.5, l2=1e-3),
    )
    return network


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return (
        tf.constant(rng.normal(size=(4, IMAGE_SIZE, IMAGE_SIZE, 3)), tf.float32),
        tf.constant([0, 1, 2, 3]),
    )


class ScriptedSolver:
    """Stands in for ``SearchNetwork.recover``: node j of each cell type moves its z by a
    scripted L2 distance per epoch (support kept), or to a scripted support."""

    def __init__(self, moves, supports=None):
        self.moves = moves  # epoch -> {cell_type: [distance per node]}
        self.supports = supports or {}  # epoch -> {cell_type: {node: (i, j)}}
        self.epoch = 0

    def __call__(self, network):
        self.epoch += 1
        recoveries = {}
        for cell_type in CELL_TYPES:
            encoding = network.architectures[cell_type]
            z = encoding.z.numpy().astype(np.float64)
            for node, distance in enumerate(self.moves[self.epoch][cell_type]):
                top = int(np.argmax(np.abs(z[node])))
                z[node, top] += distance  # moves the strongest entry: support unchanged
            for node, picks in self.supports.get(self.epoch, {}).get(cell_type, {}).items():
                z[node] = 0.0
                z[node, list(picks)] = [2.0, 1.0]
            recoveries[cell_type] = encoding.recovery_of(z)
        return recoveries


def _z(network):
    return {t: network.architectures[t].z.numpy().copy() for t in CELL_TYPES}


def test_nodes_freeze_at_the_scripted_epochs_and_keep_their_z(batch):
    network = _network()
    far, near = 0.5, 0.5 * TOLERANCE
    solver = ScriptedSolver(
        {
            # epoch 1: normal node 1 and reduce node 3 stop.
            1: {"normal": [far, near, far, far], "reduce": [far, far, far, near]},
            # epoch 2: normal node 0 exactly at the tolerance stops (<=); a frozen node's
            # scripted move (normal 1) must not reach its z.
            2: {"normal": [TOLERANCE, far, far, far], "reduce": [far, far, far, far]},
            # epoch 3: everything else stops.
            3: {"normal": [far, far, near, near], "reduce": [near, near, near, far]},
        }
    )
    freeze_epochs = {"normal": [None] * 4, "reduce": [None] * 4}
    for epoch in (1, 2, 3):
        before = _z(network)
        frozen_before = network.frozen_nodes
        decision = one_stage.stopping_step(
            network, TOLERANCE, max_params=10**9, recoveries=solver(network)
        )
        assert not decision.rejected
        after = _z(network)
        for cell_type in CELL_TYPES:
            for node in range(4):
                if frozen_before[cell_type][node]:
                    np.testing.assert_array_equal(after[cell_type][node], before[cell_type][node])
                    assert decision.distances[cell_type][node] == 0.0
                else:
                    moved = np.linalg.norm(after[cell_type][node] - before[cell_type][node])
                    # z is stored in float32.
                    assert moved == pytest.approx(solver.moves[epoch][cell_type][node], rel=1e-4)
            for node in decision.newly_frozen[cell_type]:
                freeze_epochs[cell_type][node] = epoch
        network.train_step(batch)  # the next epoch's training
    assert freeze_epochs == {"normal": [2, 1, 3, 3], "reduce": [3, 3, 3, 1]}
    assert all(all(flags) for flags in network.frozen_nodes.values())


def test_frozen_b_does_not_drift_and_the_right_bn_affines_train(batch):
    network = _network()
    solver = ScriptedSolver({1: {"normal": [0.5, 0.0, 0.5, 0.5], "reduce": [0.5, 0.5, 0.0, 0.5]}})
    # Let Adam build momentum on every b first: a frozen b must not keep moving on it.
    for _ in range(3):
        network.train_step(batch)
    one_stage.stopping_step(network, TOLERANCE, max_params=10**9, recoveries=solver(network))
    assert network.frozen_nodes == {
        "normal": (False, True, False, False),
        "reduce": (False, False, True, False),
    }
    normal_b, reduce_b = network.architectures["normal"].b, network.architectures["reduce"].b
    frozen_b = [normal_b[1], reduce_b[2]]
    searching_b = [b for b in normal_b + reduce_b if all(b is not f for f in frozen_b)]
    trainable = {id(v) for v in network.trainable_bn_affine_variables()}
    assert trainable == (
        candidate_bn_affine(network, "normal", 1) | candidate_bn_affine(network, "reduce", 2)
    )
    assert not trainable & {id(v) for v in network.frozen_bn_affine_variables()}

    frozen_before = [b.numpy().copy() for b in frozen_b]
    searching_before = [b.numpy().copy() for b in searching_b]
    bn_of = lambda ops: [v for op in ops for bn in op.batch_norms for v in (bn.gamma, bn.beta)]
    normal_cell = network.cells[0]
    support = network.supports["normal"]
    unfrozen_bn = bn_of([normal_cell.candidates[1][i] for i in support[1]])
    frozen_bn = bn_of([normal_cell.candidates[0][i] for i in support[0]])
    unfrozen_bn_before = [v.numpy().copy() for v in unfrozen_bn]
    frozen_bn_before = [v.numpy().copy() for v in frozen_bn]
    for _ in range(3):
        network.train_step(batch)
    for b, before in zip(frozen_b, frozen_before):
        np.testing.assert_array_equal(b.numpy(), before)
    assert all(
        not np.array_equal(b.numpy(), before) for b, before in zip(searching_b, searching_before)
    )
    # The supported ops of the frozen node train their BN affines; node 0's stay frozen.
    assert any(
        not np.array_equal(v.numpy(), before) for v, before in zip(unfrozen_bn, unfrozen_bn_before)
    )
    for v, before in zip(frozen_bn, frozen_bn_before):
        np.testing.assert_array_equal(v.numpy(), before)


def test_rejection_keeps_the_last_z_but_the_freeze_decisions_stand():
    network = _network()
    before = _z(network)
    supports_before = network.supports
    # Move normal node 3 onto two sep_conv_5x5 (the largest op), freeze normal node 0.
    solver = ScriptedSolver(
        {1: {"normal": [0.0, 0.5, 0.5, 0.5], "reduce": [0.5] * 4}},
        supports={1: {"normal": {3: (4, 11)}}},
    )
    # First measure the candidate's size without applying it (a fresh network, same seed).
    probe = _network()
    probe_solver = ScriptedSolver(solver.moves, solver.supports)
    probe_decision = one_stage.stopping_step(
        probe, TOLERANCE, max_params=10**9, recoveries=probe_solver(probe), max_multiply_adds=10**15
    )
    candidate_count = probe_decision.candidate_params
    assert candidate_count == probe.evaluation_parameter_count()
    candidate_multiply_adds = probe_decision.candidate_multiply_adds
    assert candidate_multiply_adds == probe.evaluation_multiply_adds()
    assert probe.supports["normal"][3] == (4, 11)

    decision = one_stage.stopping_step(
        network, TOLERANCE, max_params=candidate_count, recoveries=solver(network)
    )
    assert decision.rejected and decision.candidate_params == candidate_count
    assert decision.rejected_by == ("max_params",)
    assert decision.candidate_multiply_adds is None  # no multiply-add limit: not counted
    assert network.supports == supports_before
    for cell_type in CELL_TYPES:
        np.testing.assert_array_equal(_z(network)[cell_type], before[cell_type])
    assert network.frozen_nodes["normal"] == (True, False, False, False)
    assert decision.newly_frozen == {"normal": [0], "reduce": []}
    assert [tuple(pick) for pick in network.genotype(decision.candidate_supports).normal[6:]] == [
        ("sep_conv_5x5", 0),
        ("sep_conv_5x5", 1),
    ]

    # The same candidate against the multiply-add limit (node 0 already frozen): rejected
    # at its count, accepted one above.
    for limit, rejected_by in (
        (candidate_multiply_adds, ("max_multiply_adds",)),
        (candidate_multiply_adds + 1, ()),
    ):
        again = ScriptedSolver(solver.moves, solver.supports)
        decision = one_stage.stopping_step(
            network, TOLERANCE, 10**9, recoveries=again(network), max_multiply_adds=limit
        )
        assert decision.rejected_by == rejected_by
        assert decision.candidate_multiply_adds == candidate_multiply_adds
    assert network.supports["normal"][3] == (4, 11)

    # One parameter more of headroom and the same candidate is accepted.
    accepted = _network()
    accepted_solver = ScriptedSolver(solver.moves, solver.supports)
    decision = one_stage.stopping_step(
        accepted, TOLERANCE, max_params=candidate_count + 1, recoveries=accepted_solver(accepted)
    )
    assert not decision.rejected and accepted.supports["normal"][3] == (4, 11)


def test_evaluation_parameter_count_equals_the_absorbed_network():
    network = _network()
    rng = np.random.default_rng(4)
    for _ in range(3):
        for encoding in network.architectures.values():
            support = np.stack(
                [rng.choice(n, size=2, replace=False) for n in encoding.num_candidates]
            ).astype(np.int32)
            encoding.support.assign(support)
        network.sync_supports()
        absorbed = absorption.absorb(network, IMAGE_SIZE, auxiliary=False)
        assert network.evaluation_parameter_count() == network_size.count_parameters(absorbed)
        assert network.evaluation_multiply_adds() == network_size.count_multiply_adds(
            absorbed, IMAGE_SIZE
        )


def test_decide_rejects_at_either_limit_and_names_it():
    Recovery = collections.namedtuple("Recovery", "distances support")
    recoveries = {t: Recovery([1.0] * 4, [[2, 3]] * 4) for t in CELL_TYPES}
    supports = {t: ((0, 1),) * 4 for t in CELL_TYPES}
    frozen = {t: [False] * 4 for t in CELL_TYPES}

    def decide(max_params, max_multiply_adds=None):
        def multiply_adds(candidate):
            assert max_multiply_adds is not None, "counted without a limit"
            return 1000

        return stopping.decide(
            recoveries,
            supports,
            frozen,
            1e-3,
            max_params,
            lambda c: 100,
            max_multiply_adds,
            multiply_adds,
        )

    assert decide(101).rejected_by == () and decide(101).candidate_multiply_adds is None
    assert decide(100).rejected_by == ("max_params",) and decide(100).rejected
    assert decide(101, 1000).rejected_by == ("max_multiply_adds",)
    assert decide(101, 1001).rejected_by == () and decide(101, 1001).candidate_multiply_adds == 1000
    assert decide(100, 1000).rejected_by == ("max_params", "max_multiply_adds")


def test_limits_that_reject_every_architecture_are_refused_up_front(caplog):
    network = _network()
    # Oracle: two pooling ops per node (no convolution, only the BN after each) is the
    # smallest architecture in both counts.
    pools = [("max_pool_3x3", 0), ("avg_pool_3x3", 1)] * 4
    smallest = networks.build_network(
        "cifar",
        genotypes.Genotype(pools, [2, 3, 4, 5], pools, [2, 3, 4, 5]),
        4,
        3,
        10,
        IMAGE_SIZE,
        bn_after_param_free_ops=True,
    )
    params = network_size.count_parameters(smallest)
    multiply_adds = network_size.count_multiply_adds(smallest, IMAGE_SIZE)
    config = functools.partial(
        config_lib.OneStageConfig, "/tmp/unused", search_model.SearchNetworkConfig(**TINY)
    )
    for limits, flag, least in (
        (dict(max_params=params), "max_params", params),
        (
            dict(max_params=params + 1, max_multiply_adds=multiply_adds),
            "max_multiply_adds",
            multiply_adds,
        ),
    ):
        with pytest.raises(ValueError) as error:
            one_stage.check_limits(network, config(**limits))
        message = str(error.value)
        assert message.startswith(f"--{flag}={least} rejects every architecture")
        assert "--init_channels=4 --layers=3 at 32x32 images" in message
        assert f"has {least:,} " in message and f"raise --{flag} above {least}" in message
    # One above the smallest: accepted, with a warning that the current one is over.
    with caplog.at_level("WARNING"):
        one_stage.check_limits(
            network, config(max_params=params + 1, max_multiply_adds=multiply_adds + 1)
        )
    assert (
        "not below --max_params" in caplog.text and "not below --max_multiply_adds" in caplog.text
    )


def test_config_errors_name_the_flag():
    good = dict(model_dir="/tmp/unused", network=search_model.SearchNetworkConfig(**TINY))
    for field, value, flag in (
        ("max_params", 0, "--max_params"),
        ("max_multiply_adds", 0, "--max_multiply_adds"),
        ("lr_schedule", "step", "--lr_schedule"),
        ("warmup_epochs", -1, "--warmup_epochs"),
        ("label_smoothing", 1.0, "--label_smoothing"),
        ("search_epochs", 0, "--search_epochs"),
        ("freeze_tolerance", -1.0, "--freeze_tolerance"),
        ("drop_path_prob", 1.0, "--drop_path_prob"),
        ("arch", config_lib.ArchitectureOptimizerConfig(learning_rate=0.0), "--arch_learning_rate"),
        ("loop", config_lib.LoopConfig(epochs=0), "--epochs"),
    ):
        with pytest.raises(ValueError, match=flag):
            config_lib.OneStageConfig(**good, **{field: value}).validate()
    with pytest.raises(ValueError, match="one_stage=True"):
        config_lib.OneStageConfig(
            model_dir="/tmp/unused", network=search_model.SearchNetworkConfig()
        ).validate()


def test_recorded_settings_round_trip_and_keep_nested_names_apart():
    config = config_lib.OneStageConfig(
        model_dir="/tmp/x",
        network=search_model.SearchNetworkConfig(**TINY),
        data=data.DataConfig(seed=5, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)),
        loop=config_lib.LoopConfig(seed=7, deterministic=True),
        max_params=1234,
        max_multiply_adds=5678,
        lr_schedule="warmup_linear",
        label_smoothing=0.1,
        search_epochs=7,
    )
    settings = recorded.recorded_settings(config)
    assert settings["kind"] == "one_stage"
    assert (settings["loop"]["seed"], settings["data"]["seed"]) == (7, 5)
    assert (settings["loop"]["deterministic"], settings["data"]["deterministic"]) == (True, False)
    assert "verbose" not in settings["loop"] and "model_dir" not in settings
    assert "family" not in settings["network"]  # taken from the data, like num_classes
    assert settings["max_multiply_adds"] == 5678 and settings["lr_schedule"] == "warmup_linear"
    restored = recorded.from_recorded_settings("/tmp/x", settings)
    assert restored == config
    assert recorded.recorded_settings(restored) == settings


def test_imagenet_schedule_warms_up_the_search_and_runs_the_retraining_schedule_after():
    config = config_lib.OneStageConfig(
        model_dir="unused",
        loop=config_lib.LoopConfig(epochs=250, learning_rate=0.5, learning_rate_min=0.0),
        lr_schedule="warmup_linear",
        warmup_epochs=5,
    )
    search = [one_stage.search_learning_rate(config, e) for e in range(8)]
    assert search == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])
    retraining = config_lib.TrainConfig(
        model_dir="unused", loop=config.loop, lr_schedule="warmup_linear", warmup_epochs=5
    )
    for epoch in (0, 4, 5, 100, 249):
        assert runtime.learning_rate_at(config, epoch) == runtime.learning_rate_at(
            retraining, epoch
        )
    cosine = dataclasses.replace(config, lr_schedule="cosine")
    assert [one_stage.search_learning_rate(cosine, e) for e in (0, 9)] == [0.5, 0.5]


# ---------------------------------------------------------------------- the whole run
SEARCH_EPOCHS, TRAIN_EPOCHS = 2, 2


def _tiny_flags(folder, model_dir, **overrides):
    """The CPU config, smaller: 16 images per class, C = 4, 3 cells, 2 + 2 epochs."""
    settings = dict(max_examples_per_class=16, search_epochs=SEARCH_EPOCHS, epochs=TRAIN_EPOCHS)
    return tiny_flags("cifar10_one_stage_cpu.cfg", folder, model_dir, **{**settings, **overrides})


def _rows(model_dir):
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


# Parts of checkpoint keys a resumed one-stage run must hold (the comparison would
# pass vacuously on a checkpoint that lost a group of variables).
STATE_PARTS = (
    "normal_code.Sb_0 normal_frozen one_stage_node_stop_epoch drop_path_rate "
    "moving_mean arch_optimizer"
).split()


@pytest.fixture(scope="module")
def finished_run(cifar10_folder, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("one_stage")
    return model_dir, last_json(run_to_completion(_tiny_flags(cifar10_folder, model_dir)))


def test_run_searches_trains_absorbs_and_exports(finished_run, cifar10_folder):
    model_dir, summary = finished_run
    rows = _rows(model_dir)
    assert [r["phase"] for r in rows] == ["search"] * SEARCH_EPOCHS + ["train"] * TRAIN_EPOCHS
    # lr held while searching, then cosine 0.025 -> 0.001; drop path 0, then 0 -> 0.2.
    assert all(r["lr"] == 0.025 for r in rows[:SEARCH_EPOCHS])
    train = rows[SEARCH_EPOCHS:]
    assert [r["lr"] for r in train] == pytest.approx([0.025, 0.001 + 0.024 * 0.5])
    assert [r["drop_path_rate"] for r in train] == pytest.approx([0.0, 0.1])
    # Every node has a stop epoch within the search; the cap's stops are listed.
    stops = summary["node_stop_epochs"]
    assert all(1 <= e <= SEARCH_EPOCHS for t in ("normal", "reduce") for e in stops[t])
    assert json.loads((model_dir / "search_summary.json").read_text())["node_stop_epochs"] == stops
    assert rows[SEARCH_EPOCHS - 1]["search_ended"]
    # The recovery report of every search epoch that recovered: the exact solver's.
    assert "kkt_violation" in rows[0]
    for row in (r for r in rows[:SEARCH_EPOCHS] if "kkt_violation" in r):
        assert len(row["certified"]["reduce"]) == len(row["z_distance"]["normal"]) == 4
        assert row["kkt_violation_max"] < 1e-6
    for name in (
        "genotype.json",
        "cells.png",
        "dataset.json",
        "final_metrics.json",
        "flags.txt",
        "run_config.json",
    ):
        assert (model_dir / name).exists(), name
    assert list((model_dir / "tensorboard").iterdir())
    assert summary["export"] == str(model_dir / "export" / "istanas" / "1")
    assert summary["test_examples"] == 160

    # The SavedModel (and the run directory) evaluate to the accuracy the run reported.
    assert_evaluations_match(
        summary,
        model_dir,
        [f"--dataset=folder:{cifar10_folder}", "--max_examples_per_class=16"],
        examples=160,
        tolerance=1e-9,
    )


def test_rerun_of_a_finished_run_changes_nothing(finished_run, cifar10_folder):
    model_dir, summary = finished_run
    before = (model_dir / "metrics.jsonl").read_text()
    result = run_main(_tiny_flags(cifar10_folder, model_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert last_json(result) == summary
    assert (model_dir / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (model_dir / "export" / "istanas").iterdir()) == ["1"]


def _kill_after_checkpoint(args, model_dir, checkpoint):
    """Starts the run and SIGKILLs it once ``ckpt-<checkpoint>`` exists (next epoch)."""
    process = subprocess.Popen(
        [sys.executable, MAIN, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = model_dir / "checkpoints" / f"ckpt-{checkpoint}.index"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"
    assert len(_rows(model_dir)) < SEARCH_EPOCHS + TRAIN_EPOCHS


# Opt-in (about 5 minutes on 2 cores): the default suite keeps the two-stage kill test
# (the same checkpoint/metrics protocol) and this file's resume tests.
@pytest.mark.slow
def test_resume_after_kills_on_both_sides_of_the_search_training_boundary(
    finished_run, cifar10_folder, tmp_path
):
    reference_dir, reference = finished_run
    model_dir = tmp_path / "killed"
    args = _tiny_flags(cifar10_folder, model_dir)
    # Killed with the last search epoch's row written, not its checkpoint (the search
    # had just ended); the resume drops the row and searches that epoch again.
    killed = run_main_killed(args, "before_checkpoint", epoch=SEARCH_EPOCHS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(_rows(model_dir)) == SEARCH_EPOCHS
    # Its last checkpoint is still searching: there is no network to export yet.
    result = run_main(["--mode=export", f"--model_dir={model_dir}"])
    assert result.returncode == 2
    assert "has not ended" in result.stderr and "Traceback" not in result.stderr
    # Resumed in the search, killed during training epoch 2 (global epoch 4).
    _kill_after_checkpoint(args, model_dir, SEARCH_EPOCHS + 1)
    result = run_main(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed" in result.stderr
    resumed = last_json(result)
    for key in ("node_stop_epochs", "genotype", "test_top1", "test_top5", "params"):
        assert resumed[key] == reference[key], key
    # Deterministic and exact: the same rows (wall-clock times aside) as the run that was
    # never interrupted, and bit-identical logits from the two exported SavedModels.
    assert metrics_rows(model_dir) == metrics_rows(reference_dir)
    images = tf.random.uniform([4, 32, 32, 3], 0, 255, seed=2)
    logits = [
        tf.saved_model.load(summary["export"]).signatures["serving_default"](images=images)
        for summary in (resumed, reference)
    ]
    np.testing.assert_array_equal(logits[0]["logits"].numpy(), logits[1]["logits"].numpy())
    state = checkpoint_state(model_dir, STATE_PARTS)
    reference_state = checkpoint_state(reference_dir, STATE_PARTS)
    assert state.keys() == reference_state.keys()
    for key in reference_state:
        np.testing.assert_array_equal(state[key], reference_state[key], err_msg=key)
    assert [r["epoch"] for r in _rows(model_dir)] == [1, 2, 3, 4]


# Opt-in (93 s of one worker): kept the default suite under 20 minutes on 2 cores;
# retrain_test checks --mode=export and a rerun's export of a train run by default.
@pytest.mark.slow
def test_export_mode_versions_and_overwrite(finished_run, tmp_path):
    model_dir, summary = finished_run
    export_dir = tmp_path / "serving"
    args = ["--mode=export", f"--model_dir={model_dir}", f"--export_dir={export_dir}"]
    result = run_main(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert last_json(result) == {
        "export": str(export_dir / "istanas" / "1"),
        "params": summary["params"],
    }
    result = run_main(args + ["--version=1"])
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    exported = restore.export_run(str(model_dir), str(export_dir), version=1, overwrite=True)
    assert exported["export"] == str(export_dir / "istanas" / "1")

    # The exported logits equal the absorbed network's, and bad images fail clearly.
    serve = tf.saved_model.load(exported["export"]).signatures["serving_default"]
    images = tf.random.uniform([3, 32, 32, 3], 0, 255, seed=1)
    network, info = restore.restore_network(str(model_dir))
    expected = network(data.normalize(images / 255.0, info.mean, info.std), training=False)
    np.testing.assert_allclose(
        serve(images=images)["logits"].numpy(), expected.numpy(), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[N, 32, 32, 3\]"):
        serve(images=tf.zeros([1, 16, 16, 3]))
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        serve(images=tf.zeros([1, 32, 32, 3], tf.uint8))


def test_export_refuses_other_runs(tmp_path):
    # A two-stage search directory: a genotype, not a trained network.
    two_stage = tmp_path / "two_stage"
    two_stage.mkdir()
    (two_stage / "run_config.json").write_text(
        json.dumps({"kind": "two_stage", "network": {"method": "ista"}, "loop": {"epochs": 50}})
    )
    result = run_main(["--mode=export", f"--model_dir={two_stage}"])
    assert result.returncode == 2
    assert "two-stage search" in result.stderr and "--mode=train" in result.stderr
    result = run_main(["--mode=export", f"--model_dir={tmp_path / 'nothing'}"])
    assert result.returncode == 2 and "no run was written there" in result.stderr

    # A run whose search has not ended: see the kill test.


# Opt-in (58 s): margin under CI's 20 minutes; retrain_test runs mixed_float16 through
# the two-stage search and the retraining in the default suite.
@pytest.mark.slow
def test_mixed_float16_run_trains_b_and_weights_and_exports_float32(cifar10_folder, tmp_path):
    config = config_lib.OneStageConfig(
        model_dir=str(tmp_path / "mixed"),
        network=search_model.SearchNetworkConfig(**TINY),
        data=data.DataConfig(
            dataset=f"folder:{cifar10_folder}",
            max_examples_per_class=8,
            cutout_length=16,
            deterministic=True,
        ),
        loop=tiny_loop(steps_per_epoch=8, mixed_precision="float16"),
        search_epochs=1,
        freeze_tolerance=0.0,
    )
    run = one_stage.OneStageRun(config)
    assert run.model.cells[0].preprocess1.conv.conv.compute_dtype == "float16"
    b_before = [v.numpy().copy() for v in run.model.architecture_variables]
    weights = run.model.active_weight_variables()
    weights_before = [v.numpy().copy() for v in weights]
    # The cap: every node is forced to stop after this epoch. The first steps overflow
    # and are skipped while the dynamic loss scales fall from 2**15.
    run.search_epoch(0, 8)
    row = run.state.metrics_log.read()[-1]
    assert np.isfinite(row["loss"])
    assert all(
        not np.array_equal(v.numpy(), b) for v, b in zip(run.model.architecture_variables, b_before)
    )
    assert (
        np.mean([not np.array_equal(v.numpy(), w) for v, w in zip(weights, weights_before)]) > 0.9
    )
    assert row["forced_stops"] == {"normal": [0, 1, 2, 3], "reduce": [0, 1, 2, 3]}
    result = run.run()  # the training epoch, absorption (float32), export
    assert np.isfinite(result["test_top1"])
    serve = tf.saved_model.load(result["export"]).signatures["serving_default"]
    assert serve(images=tf.zeros([1, 32, 32, 3]))["logits"].dtype == tf.float32


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("max_params", 0, "--max_params must be >= 1"),
        ("search_epochs", 0, "--search_epochs must be >= 1"),
        ("freeze_tolerance", -1, "--freeze_tolerance must be >= 0"),
    ],
)
def test_bad_one_stage_flags_name_the_flag(tmp_path, cifar10_folder, flag, value, message):
    result = run_main(_tiny_flags(cifar10_folder, tmp_path / "run", **{flag: value}))
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.slow
def test_cpu_config_runs_to_completion_and_exports(cifar10_folder, tmp_path):
    """The shipped CPU config as a user runs it (about 5 minutes here)."""
    model_dir = tmp_path / "one_stage_cpu"
    result = run_main(
        [
            "--flagfile=train/configs/cifar10_one_stage_cpu.cfg",
            f"--dataset=folder:{cifar10_folder}",
            f"--model_dir={model_dir}",
            "--progress=false",
        ],
        timeout=3000,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result)
    rows = _rows(model_dir)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["test_top1"] > 0.15  # chance is 0.10
    assert (pathlib.Path(summary["export"]) / "saved_model.pb").exists()


def test_training_epochs_trace_the_steps_again_only_when_the_rate_crosses_zero(monkeypatch):
    """After the search (rate 0, steps without drop path) the training phase's epoch 0
    keeps the steps; epoch 1 (rate > 0) traces steps that read the rate, kept after."""

    class RatedModel(blocks.DropPathSchedule):
        drop_path_traced = False  # as the search epochs left it

        def __init__(self):
            self.drop_path_rate = tf.Variable(0.0)

    traces = []
    run = types.SimpleNamespace(
        config=types.SimpleNamespace(drop_path_prob=0.2, loop=types.SimpleNamespace(epochs=3)),
        weight_optimizer=types.SimpleNamespace(learning_rate=None),
        model=RatedModel(),
        trace_steps=lambda: traces.append(len(traces)),
        _train_epoch=lambda epoch, steps: {},
        state=types.SimpleNamespace(end_epoch=lambda row: None),
        clock=None,
    )
    monkeypatch.setattr(one_stage.runtime, "learning_rate_at", lambda config, epoch: 0.1)
    monkeypatch.setattr(one_stage.steps_lib, "log_epoch", lambda *a, **k: None)
    seen = []
    for phase_epoch in range(3):
        one_stage.OneStageRun._training_epoch(run, 10 + phase_epoch, phase_epoch, 1)
        seen.append((len(traces), run.model.drop_path_traced))
    assert seen == [(0, False), (1, True), (1, True)]
