"""The search under tf.distribute strategies (docs/design.md decision 4).

Logical devices and TF_CONFIG must be set before TensorFlow initialises, so every search
here runs in a fresh subprocess (a small helper script written next to the runs). Every
run here takes minutes, so all are opt-in (``-m slow``); the default suite compares the
training steps on 2 replicas with one device in ``tests/mirrored_step_test.py``.

- MirroredStrategy on 2 logical CPU devices vs the default strategy on one: the same
  metrics rows (within float32 tolerance), genotypes and architecture codes b.
- The one-stage run (search, stopping rule, training phase, absorption, export) on
  MirroredStrategy with 2 logical CPUs vs one device.
- MultiWorkerMirroredStrategy with two local worker processes (TF_CONFIG on loopback
  ports): both finish with identical architecture variables; only the chief writes the
  run directory.

Tolerances. The two runs compute the same mathematical function but not in the same
float32 order (batch sums of 8 + 8 vs 16, synchronized BN statistics through an
all-reduce). On the freshly initialised super-net, float32 gradients differ from a
float64 reference by 1-2 % on one device as well (the alphas are ~1e-3 and feed
affine-free BNs), and Adam's first steps are ~sign(g) * lr, so a gradient component
within that noise of zero moves b by up to 2 * lr differently. With the paper's
arch_learning_rate (6e-4, the size of the alphas themselves) this noise is amplified into
different trajectories and genotypes; the test therefore uses a 10x smaller
arch_learning_rate (the supports still change, so comparing genotypes is not vacuous).
Measured (2-core CPU, TF 2.21): metrics agree to 1.4e-5 relative, the trained weights
to 2.1e-6 (relative L2 over all of them), b to 1.6 * arch_learning_rate.

- metrics rows: rtol 1e-4 (7x the noise). The untrained net's loss sits near ln 10, so
  loss is a weak witness; clipping each replica's gradient instead of the sum moves it
  by 1.7e-4 (and accuracy by 14 %).
- trained weights (kernels, stem BN, classifier; relative L2): 1e-5 (5x the noise).
  Per-replica clipping gives 2.6e-4; BN statistics not synchronized across replicas
  give 3.6e-5 and another genotype (with losses within 1e-4).
- b: atol 4 * arch_learning_rate, two reversed Adam steps; b is also compared through
  the genotypes (as architectures: the order of a node's two picks is not compared).
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Tiny search: 16 images per class (80 per search split), C=4, 3 cells, 5 steps/epoch.
ARCH_LEARNING_RATE = 6e-5
TINY = {
    "max_examples_per_class": 16,
    "channels": 4,
    "layers": 3,
    "batch_size": 16,
    "epochs": 2,
    "eval_steps": 1,
    "learning_rate": 0.05,
    "arch_learning_rate": ARCH_LEARNING_RATE,
    "seed": 0,
    # The weight gradients' global norm is ~0.2 here: clip below it so that every step
    # checks the clipping of the summed (not per-replica) gradient.
    "grad_clip": 0.1,
}
METRICS = ("loss", "arch_loss", "accuracy", "val_loss", "val_accuracy")
RTOL = 1e-4
WEIGHTS_RTOL = 1e-5
B_ATOL = 4 * ARCH_LEARNING_RATE
# z of the one-stage comparison (after one epoch): b differs by up to B_ATOL, and the
# LASSO maps that to z through (A_S^T A_S)^-1 A_S^T, which amplifies it on these
# coherent matrices; measured max |dz| 1.2e-4 (2-core CPU, TF 2.21), and 4 of the 8
# nodes had a top-2 margin above 2 |dz| (the others may flip between the two runs).
Z_ATOL = 5 * B_ATOL
MIRRORED_TIMEOUT_S = 1200
MULTI_WORKER_TIMEOUT_S = 1200

HELPER = textwrap.dedent('''
    """Runs tiny searches in this process; argv[1] is a JSON job description."""
    import dataclasses
    import json
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    job = json.loads(sys.argv[1])
    if job.get("logical_cpus"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * job["logical_cpus"])

    from istanas_tf import data, genotypes, search_model
    from istanas_tf.training import config as config_lib
    from istanas_tf.training import one_stage, runtime, two_stage

    tiny = job["tiny"]
    for run in job["runs"]:
        loop = config_lib.LoopConfig(
            epochs=tiny["epochs"], batch_size=tiny["batch_size"],
            learning_rate=tiny["learning_rate"], grad_clip=tiny["grad_clip"],
            eval_steps=tiny["eval_steps"], strategy=run["strategy"], deterministic=True,
            seed=tiny["seed"], verbose=False)
        arch = config_lib.ArchitectureOptimizerConfig(
            learning_rate=tiny["arch_learning_rate"])
        network = search_model.SearchNetworkConfig(
            channels=tiny["channels"], layers=tiny["layers"], seed=tiny["seed"],
            one_stage=bool(job.get("one_stage")))
        folder = data.DataConfig(dataset="folder:" + job["folder"],
                                 max_examples_per_class=tiny["max_examples_per_class"],
                                 cutout_length=16 if job.get("one_stage") else 0,
                                 deterministic=True, seed=tiny["seed"])
        if job.get("one_stage"):
            # Every node stops at the first recovery: whether a distance is under the
            # paper's 1e-3 is at the mercy of float32 noise in this tiny run. One
            # training epoch at the one-stage run's lr follows the search.
            config = config_lib.OneStageConfig(
                model_dir=run["model_dir"], network=network, data=folder, arch=arch,
                loop=dataclasses.replace(loop, epochs=1, learning_rate=0.025),
                freeze_tolerance=1.0, search_epochs=tiny["epochs"])
            # Through the run directory's guard, as run_one_stage: only the chief locks.
            with runtime.guard_run_dir(config) as guard:
                onestage = one_stage.OneStageRun(config, guard=guard)
                result = onestage.run()
            chief, replicas = onestage.chief, onestage.strategy.num_replicas_in_sync
            model = onestage.model
        else:
            config = config_lib.TwoStageConfig(
                model_dir=run["model_dir"], network=network, data=folder, loop=loop,
                arch=arch)
            with runtime.guard_run_dir(config) as guard:
                search = two_stage.TwoStageRun(config, guard=guard)
                initial = genotypes.to_json_dict(search.model.genotype())
                result = search.run()
            chief, replicas = search.chief, search.strategy.num_replicas_in_sync
            model = search.model
        architecture = {v.path: v.numpy() for arch_state in model.architectures.values()
                        for v in arch_state.variables}
        np.savez(run["arrays"], **{k.replace("/", "|"): v for k, v in architecture.items()})
        summary = {"result": result, "chief": chief, "replicas": replicas}
        if not job.get("one_stage"):
            summary["initial_genotype"] = initial
        with open(run["result"], "w") as f:
            json.dump(summary, f)
''')


def _helper(tmp_path) -> str:
    path = tmp_path / "distribute_helper.py"
    path.write_text(HELPER)
    return str(path)


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _run_spec(tmp_path, name, strategy, model_dir=None):
    return {
        "model_dir": str(model_dir or tmp_path / name),
        "strategy": strategy,
        "arrays": str(tmp_path / f"{name}_arch.npz"),
        "result": str(tmp_path / f"{name}_result.json"),
    }


def _rows(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _checkpoint(model_dir):
    """The model's variables in the run's latest checkpoint, by key."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if k.startswith("model/")
    }


def _codes(variables):
    """The architecture codes b_j of both encodings."""
    codes = {k: v for k, v in variables.items() if re.search(r"_code\.Sb_\d+/", k)}
    assert codes, "no architecture code b_* in the checkpoint"
    return codes


def _recovered_z(variables):
    """The committed z of both encodings, [steps, n_max] each, by checkpoint key."""
    found = {k: v for k, v in variables.items() if re.search(r"_code\.Sz/", k)}
    assert len(found) == 2, sorted(variables)
    return found


def _weights(variables):
    """Trained weights: everything but the architecture state and BN statistics."""
    return {
        k: v
        for k, v in variables.items()
        if "_code." not in k and "moving_" not in k and v.dtype.kind == "f"
    }


def _architecture(genotype, picks_per_node=2):
    """A genotype as the architecture it stands for: each node's picks as a set.

    Recovery lists a node's picks by descending |z|; two picks with |z| equal up to
    float noise (seen: 8.708e-4 vs 8.688e-4) may come in either order, which does not
    change the node (the sum of its picks).
    """
    return {
        cell: [
            sorted(map(tuple, genotype[cell][i : i + picks_per_node]))
            for i in range(0, len(genotype[cell]), picks_per_node)
        ]
        for cell in ("normal", "reduce")
    }


def _tail(text, n=4000):
    return text[-n:] if text else ""


def _assert_metric_close(row_one, row_two, key):
    """One metric of one epoch of the two runs agrees to RTOL."""
    np.testing.assert_allclose(
        row_two[key], row_one[key], rtol=RTOL, atol=0, err_msg=f"{key} of epoch {row_one['epoch']}"
    )


def _run_mirrored_and_default(cifar10_folder, tmp_path, **job):
    """Runs the helper once on 2 logical CPUs: the default strategy, then mirrored."""
    runs = [_run_spec(tmp_path, "default", "default"), _run_spec(tmp_path, "mirrored", "mirrored")]
    job = {"logical_cpus": 2, "folder": str(cifar10_folder), "tiny": TINY, "runs": runs, **job}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, _helper(tmp_path), json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=MIRRORED_TIMEOUT_S,
    )
    assert proc.returncode == 0, _tail(proc.stderr)
    print(f"default + mirrored runs: {time.monotonic() - start:.0f} s")
    return runs


# Opt-in (about 6 minutes on 2 cores; the one-stage run below about 5): the default
# suite checks the replica machinery (synchronized BN, all-reduced and clipped gradients,
# both optimizers, both kinds of step) in tests/mirrored_step_test.py, in 3 minutes.
@pytest.mark.slow
def test_mirrored_two_devices_matches_one_device(cifar10_folder, tmp_path):
    runs = _run_mirrored_and_default(cifar10_folder, tmp_path)

    results = {}
    for run in runs:
        with open(run["result"]) as f:
            results[run["strategy"]] = json.load(f)
    assert results["default"]["replicas"] == 1
    assert results["mirrored"]["replicas"] == 2

    one, two = _rows(runs[0]["model_dir"]), _rows(runs[1]["model_dir"])
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [1, 2]
    for row_one, row_two in zip(one, two):
        for key in METRICS:
            _assert_metric_close(row_one, row_two, key)
        assert _architecture(row_two["genotype"]) == _architecture(row_one["genotype"]), (
            f"genotype of epoch {row_one['epoch']}"
        )

    genotype = [
        _architecture(json.loads(pathlib.Path(r["model_dir"], "genotype.json").read_text()))
        for r in runs
    ]
    assert genotype[0] == genotype[1]
    # Otherwise the comparison would only compare the initial supports.
    assert genotype[0] != _architecture(results["default"]["initial_genotype"]), (
        "the tiny search no longer changes the architecture; raise ARCH_LEARNING_RATE"
    )

    variables = [_checkpoint(r["model_dir"]) for r in runs]
    assert variables[0].keys() == variables[1].keys()
    codes = [_codes(v) for v in variables]
    assert len(codes[0]) == 2 * 4  # normal and reduce, 4 nodes each
    for key in codes[0]:
        np.testing.assert_allclose(codes[1][key], codes[0][key], rtol=0, atol=B_ATOL, err_msg=key)
    weights = [_weights(v) for v in variables]
    flat = [np.concatenate([w[k].ravel() for k in sorted(w)]) for w in weights]
    relative = np.linalg.norm(flat[1] - flat[0]) / np.linalg.norm(flat[0])
    assert relative <= WEIGHTS_RTOL, f"weights differ by {relative:.2e} (relative L2)"


@pytest.mark.slow
def test_one_stage_run_mirrored_matches_one_device(cifar10_folder, tmp_path):
    """The one-stage run (search, stopping rule, training, absorb, export) on 2 replicas."""
    runs = _run_mirrored_and_default(cifar10_folder, tmp_path, one_stage=True)
    results = {}
    for run in runs:
        with open(run["result"]) as f:
            results[run["strategy"]] = json.load(f)
    assert results["mirrored"]["replicas"] == 2
    one, two = _rows(runs[0]["model_dir"]), _rows(runs[1]["model_dir"])
    assert [r["phase"] for r in one] == [r["phase"] for r in two] == ["search", "search", "train"]
    for row_one, row_two in zip(one, two):
        # Losses only: the one-stage net's logits start ~1e-3 apart (alpha ~ b ~ 1e-3
        # scales every node), so float32 noise flips the argmax of near-ties, and how many
        # flip is not bounded by anything this run controls (seen: 3, then 4 of 160 after
        # the training epoch, with the losses still equal to 1e-4). The accuracies'
        # aggregation over replicas is compared in the two-stage test (slow) above.
        for key in ("loss", "test_loss"):
            _assert_metric_close(row_one, row_two, key)
        assert row_two.get("newly_frozen") == row_one.get("newly_frozen")
    final = [results[s]["result"] for s in ("default", "mirrored")]
    assert (
        final[0]["node_stop_epochs"]
        == final[1]["node_stop_epochs"]
        == {"normal": [1] * 4, "reduce": [1] * 4}
    )
    # The architecture is the top-2 |z| of each node, a discontinuous function of b:
    # compare the continuous state, and the picks wherever float noise cannot flip them.
    z = [_recovered_z(_checkpoint(r["model_dir"])) for r in runs]
    robust = 0
    for key in z[0]:
        gap = np.abs(z[1][key] - z[0][key]).max(axis=-1)  # per node
        assert gap.max() <= Z_ATOL, (key, gap)
        for node, (one_z, two_z) in enumerate(zip(z[0][key], z[1][key])):
            magnitudes = np.sort(np.abs(one_z))[::-1]
            # Every |z| moved by at most gap: the 2nd and 3rd can only swap within 2 gap.
            if magnitudes[1] - magnitudes[2] > 2 * gap[node]:
                robust += 1
                assert set(np.argsort(-np.abs(one_z))[:2]) == set(np.argsort(-np.abs(two_z))[:2]), (
                    key,
                    node,
                )
    assert robust >= 2, "every node near-tied: the comparison would say nothing"
    assert final[1]["test_top1"] == pytest.approx(final[0]["test_top1"], abs=0.02)
    assert os.path.exists(os.path.join(final[1]["export"], "saved_model.pb"))


def _free_loopback_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_two_workers(cifar10_folder, tmp_path, **job_extra):
    """Runs the helper as two local MultiWorkerMirroredStrategy workers sharing one run
    directory; returns (run specs, results, model_dir)."""
    ports = _free_loopback_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    model_dir = tmp_path / "run"  # shared by the workers; only the chief writes into it
    runs = [_run_spec(tmp_path, f"worker{i}", "multi_worker", model_dir) for i in range(2)]
    processes = []
    start = time.monotonic()
    try:
        for index, run in enumerate(runs):
            job = {"folder": str(cifar10_folder), "tiny": TINY, "runs": [run], **job_extra}
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            log = open(tmp_path / f"worker{index}.log", "w")
            # The non-chief's scratch checkpoints (tempfile.mkdtemp) stay in tmp_path.
            scratch = tmp_path / f"worker{index}_tmp"
            scratch.mkdir()
            processes.append(
                (
                    subprocess.Popen(
                        [sys.executable, _helper(tmp_path), json.dumps(job)],
                        cwd=REPO,
                        env=_env(TF_CONFIG=tf_config, TMPDIR=str(scratch)),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
        # A worker that fails leaves the other waiting in a collective: stop at the first
        # failure (the finally kills the rest), and at the deadline in any case.
        deadline = start + MULTI_WORKER_TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [process.poll() for process, _ in processes]
            if all(code == 0 for code in codes) or any(code for code in codes):
                break
            time.sleep(1.0)
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    elapsed = time.monotonic() - start
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    # The worker that failed first, then the one stopped because of it.
    for index in sorted(range(2), key=lambda i: processes[i][0].returncode <= 0):
        process = processes[index][0]
        assert process.returncode == 0, (
            f"worker {index} exited with {process.returncode} after {elapsed:.0f} s "
            f"(killed at the {MULTI_WORKER_TIMEOUT_S} s deadline or after the other "
            f"worker failed if negative):\n{_tail(logs[index])}"
        )
    print(f"two-worker run: {elapsed:.0f} s")
    results = []
    for run in runs:
        with open(run["result"]) as f:
            results.append(json.load(f))
    return runs, results, model_dir


@pytest.mark.slow
def test_multi_worker_two_processes_identical_architecture(cifar10_folder, tmp_path):
    runs, results, model_dir = _run_two_workers(cifar10_folder, tmp_path)
    assert [r["chief"] for r in results] == [True, False]
    assert [r["replicas"] for r in results] == [2, 2]
    assert results[0]["result"]["genotype"] == results[1]["result"]["genotype"]

    arrays = [np.load(run["arrays"]) for run in runs]
    assert sorted(arrays[0].files) == sorted(arrays[1].files)
    assert any("b_0" in k for k in arrays[0].files)
    for key in arrays[0].files:
        np.testing.assert_array_equal(arrays[1][key], arrays[0][key], err_msg=key)

    # The chief's run directory: one metrics row per epoch, its genotype, its checkpoint.
    rows = _rows(model_dir)
    assert [r["epoch"] for r in rows] == list(range(1, TINY["epochs"] + 1))
    assert rows[-1]["genotype"] == results[0]["result"]["genotype"]
    genotype = json.loads((model_dir / "genotype.json").read_text())
    assert genotype == results[0]["result"]["genotype"]
    # Saving is collective: the non-chief saved too, but into its scratch directory.
    final = f"ckpt-{TINY['epochs']}.index"
    assert (model_dir / "checkpoints" / final).exists()
    assert list((tmp_path / "worker1_tmp").glob(f"istanas_worker_ckpt_*/{final}"))
    assert not list((tmp_path / "worker0_tmp").glob("istanas_worker_ckpt_*"))
    codes = _codes(_checkpoint(model_dir))
    for key, value in codes.items():
        name = re.search(r"(\w+_code)\.S(b_\d+)/", key).groups()
        np.testing.assert_array_equal(value, arrays[0]["|".join(name)], err_msg=key)


@pytest.mark.slow
def test_multi_worker_one_stage_run(cifar10_folder, tmp_path):
    """Two workers run the whole one-stage run; only the chief exports."""
    _, results, model_dir = _run_two_workers(cifar10_folder, tmp_path, one_stage=True)
    assert [r["chief"] for r in results] == [True, False]
    assert [r["replicas"] for r in results] == [2, 2]
    final = [r["result"] for r in results]
    for key in ("genotype", "node_stop_epochs", "test_top1", "params"):
        assert final[0][key] == final[1][key], key
    assert "export" in final[0] and "export" not in final[1]
    assert (pathlib.Path(final[0]["export"]) / "saved_model.pb").exists()
    assert [r["phase"] for r in _rows(model_dir)] == ["search", "search", "train"]
