"""The search through ``model.fit`` (istanas_tf.callbacks, istanas_tf.search_data).

- Two-stage: ``fit`` + ``SparseRecovery`` + the cosine lr callback ends with the same
  metrics (bit for bit) and genotypes as the command line's loop (``TwoStageRun``), with
  the same seed and deterministic kernels. Both run the same ``train_step`` and
  ``test_step`` on the same batches (``search_datasets`` cuts the stream as the loop
  cuts its epochs) and the same recovery (``search_run.recover_and_commit``), in one
  process; a difference in any bit would point at a step, a batch or a recovery that is
  not shared.
- ``CSVLogger``, ``TensorBoard`` and ``BackupAndRestore`` run beside it (listed in the
  order that is hardest for the callback: the backup before the recovery); a fresh
  super-net of another seed resumes from the backup with the run's architecture.
- One-stage: ``fit`` + ``OneStageStopping`` stops every node, ends the search, and the
  absorbed network's SavedModel predicts what the super-net predicts.
- The example ``examples/search_with_fit.py`` runs as written (tiny sizes by its
  environment variables), and (slow) ``fit`` under ``MirroredStrategy`` on 2 logical CPUs.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from testing import this_checkout_env

from istanas_tf import absorption, callbacks, data, export, genotypes, search_data, search_model
from istanas_tf.training import builders, two_stage
from istanas_tf.training import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 2
BATCH = 16
# 16 images per class: 80 per search split, 5 batches; capped at 2 steps so that the
# data's per-epoch cut is exercised; 1 validation batch.
STEPS, EVAL_STEPS = 2, 1
METRICS = ("loss", "accuracy", "arch_loss", "val_loss", "val_accuracy")


def _config(folder, model_dir, seed=0):
    return config_lib.TwoStageConfig(
        model_dir=str(model_dir),
        network=search_model.SearchNetworkConfig(channels=4, layers=3, seed=seed),
        data=data.DataConfig(
            dataset=f"folder:{folder}", max_examples_per_class=16, deterministic=True, seed=0
        ),
        loop=config_lib.LoopConfig(
            epochs=EPOCHS,
            batch_size=BATCH,
            learning_rate=0.05,
            steps_per_epoch=STEPS,
            eval_steps=EVAL_STEPS,
            deterministic=True,
            seed=0,
            verbose=False,
        ),
    )


def _fit_model(config):
    """The super-net and optimizers the command line builds, seeded as it seeds."""
    keras.utils.set_random_seed(config.loop.seed)
    info = data.get_dataset_info(config.data)
    model, _, _ = builders.build_search_model(config, tf.distribute.get_strategy(), info)
    fit_data = search_data.search_datasets(
        config.data, info, BATCH, steps_per_epoch=STEPS, eval_steps=EVAL_STEPS
    )
    return model, fit_data


def _learning_rate(config):
    loop = config.loop
    return callbacks.cosine_learning_rate_schedule(
        loop.epochs, loop.learning_rate, loop.learning_rate_min
    )


class _ArchitectureProbe(keras.callbacks.Callback):
    """Records the genotype each epoch starts with (listed after the search callback)."""

    def __init__(self):
        super().__init__()
        self.genotypes = []

    def on_epoch_begin(self, epoch, logs=None):
        self.genotypes.append(genotypes.to_json_dict(self.model.genotype()))


@pytest.fixture(scope="module")
def searches(cifar10_folder, tmp_path_factory):
    """The command line's loop, then fit with the standard callbacks, same settings."""
    root = tmp_path_factory.mktemp("searches")
    config = _config(cifar10_folder, root / "cli")
    cli = two_stage.TwoStageRun(config)
    initial = genotypes.to_json_dict(cli.model.genotype())
    cli.run()
    rows = cli.state.metrics_log.read()

    model, fit_data = _fit_model(config)
    recovery = callbacks.SparseRecovery(genotype_dir=str(root / "genotypes"))
    history = model.fit(
        **fit_data.fit_arguments(),
        epochs=EPOCHS,
        verbose=0,
        callbacks=[
            keras.callbacks.BackupAndRestore(str(root / "backup"), delete_checkpoint=False),
            recovery,
            _learning_rate(config),
            keras.callbacks.CSVLogger(str(root / "log.csv")),
            keras.callbacks.TensorBoard(str(root / "tensorboard")),
        ],
    )
    return dict(
        root=root,
        config=config,
        initial=initial,
        rows=rows,
        cli_model=cli.model,
        model=model,
        history=history.history,
        recovery=recovery,
    )


def test_fit_with_sparse_recovery_matches_the_command_line_loop(searches):
    rows, history, recovery = searches["rows"], searches["history"], searches["recovery"]
    assert len(rows) == len(history["loss"]) == EPOCHS
    for epoch, row in enumerate(rows):
        for key in METRICS:
            assert history[key][epoch] == row[key], (key, epoch)
        assert history["learning_rate"][epoch] == np.float32(row["lr"])
        assert history["support_changed"][epoch] == float(row["support_changed"])
        assert genotypes.to_json_dict(recovery.genotypes[epoch]) == row["genotype"]
        assert recovery.z_distances[epoch] == row["z_distance"]
        assert history["kkt_violation_max"][epoch] == row["kkt_violation_max"]
        assert history["certified_nodes"][epoch] == row["certified_nodes"]
    # Not vacuous: the support moved, so the steps were traced again in both.
    assert any(row["support_changed"] for row in rows)
    assert rows[-1]["genotype"] != searches["initial"]
    for cli_variable, fit_variable in zip(
        searches["cli_model"].variables, searches["model"].variables
    ):
        np.testing.assert_array_equal(fit_variable.numpy(), cli_variable.numpy())
    final = genotypes.load_json(searches["root"] / "genotypes" / "genotype.json")
    assert genotypes.to_json_dict(final) == rows[-1]["genotype"]


def _tags(folder):
    return {
        value.tag
        for events in pathlib.Path(folder).glob("events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(events))
        for value in event.summary.value
    }


def test_csv_logger_and_tensorboard_record_the_recovery(searches):
    root = searches["root"]
    with open(root / "log.csv") as f:
        logged = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in logged] == list(range(EPOCHS))
    for row, history_loss in zip(logged, searches["history"]["loss"]):
        assert float(row["support_changed"]) in (0.0, 1.0)
        assert float(row["recovery_time_s"]) > 0
        assert 0 <= float(row["kkt_violation_max"]) < 1e-3  # the exact solver: rounding
        assert 0 <= float(row["certified_nodes"]) <= 2 * genotypes.STEPS
        assert float(row["loss"]) == pytest.approx(history_loss)
    train = _tags(root / "tensorboard" / "train")
    assert {
        "epoch_loss",
        "epoch_arch_loss",
        "epoch_support_changed",
        "epoch_learning_rate",
        "epoch_kkt_violation_max",
    } <= train
    assert {"epoch_loss", "epoch_accuracy"} <= _tags(root / "tensorboard" / "validation")


def test_backup_and_restore_resumes_the_architecture(searches):
    """A fresh super-net of another seed (so other A, b and supports) resumes from the
    backup of the search above: it starts epoch 3 with that search's final genotype.
    The backup was written before that epoch's recovery (BackupAndRestore listed first):
    the resumed fit recovers from the backed-up b."""
    config = _config(searches["config"].data.dataset[len("folder:") :], "unused", seed=1)
    model, fit_data = _fit_model(config)
    assert genotypes.to_json_dict(model.genotype()) != searches["rows"][-1]["genotype"]
    probe = _ArchitectureProbe()
    history = model.fit(
        **fit_data.fit_arguments(),
        epochs=EPOCHS + 1,
        verbose=0,
        callbacks=[
            callbacks.SparseRecovery(),
            keras.callbacks.BackupAndRestore(str(searches["root"] / "backup")),
            probe,
        ],
    )
    assert len(history.history["loss"]) == 1  # only epoch 3 ran
    assert probe.genotypes == [searches["rows"][-1]["genotype"]]
    # The matrices A (drawn from the seed, never trained) are the backup's.
    matrices = [[v for v in m.variables if "/A_" in v.path] for m in (searches["model"], model)]
    assert len(matrices[1]) == 2 * genotypes.STEPS
    for trained, restored in zip(*matrices):
        np.testing.assert_array_equal(restored.numpy(), trained.numpy())


def test_one_stage_fit_stops_every_node_and_the_export_predicts_as_the_super_net(
    cifar10_folder, tmp_path
):
    keras.utils.set_random_seed(0)
    data_config = data.DataConfig(
        dataset=f"folder:{cifar10_folder}", max_examples_per_class=8, cutout_length=16, seed=0
    )
    info = data.get_dataset_info(data_config)
    config = config_lib.OneStageConfig(
        model_dir=str(tmp_path / "unused"),
        network=search_model.SearchNetworkConfig(channels=4, layers=3, one_stage=True),
        data=data_config,
        loop=config_lib.LoopConfig(batch_size=8, learning_rate=0.025, verbose=False),
    )
    model, _, _ = builders.build_search_model(config, tf.distribute.get_strategy(), info)
    fit_data = search_data.search_datasets(
        data_config, info, 8, one_stage=True, steps_per_epoch=2, eval_steps=1
    )
    # Every node moves by far less than 1 in an epoch: all stop after the first; the
    # search ends after the next epoch, as the command line's does. A multiply-add
    # limit no architecture meets rejects the recovered one (the freezes still stand).
    stopping = callbacks.OneStageStopping(
        freeze_tolerance=1.0, search_epochs=10, max_multiply_adds=1
    )
    history = model.fit(**fit_data.fit_arguments(), epochs=10, verbose=0, callbacks=[stopping])
    assert len(history.history["loss"]) == 2 and model.stop_training
    assert history.history["newly_frozen"] == [8.0, 0.0]
    assert history.history["frozen_nodes"] == [8.0, 8.0]
    assert history.history["rejected"] == [1.0, 0.0]
    # The recovery report of the one epoch that ran the rule (the second only ended it).
    (violation,) = history.history["kkt_violation_max"]
    assert 0 <= violation < 1e-3
    assert stopping.search_ended == 2
    assert stopping.stop_epochs == {t: [1] * genotypes.STEPS for t in genotypes.CELL_TYPES}
    assert all(all(flags) for flags in model.frozen_nodes.values())
    # The training phase: fit again with the callback still listed; it stays out of it.
    history = model.fit(**fit_data.fit_arguments(), epochs=2, verbose=0, callbacks=[stopping])
    assert len(history.history["loss"]) == 2 and "frozen_nodes" not in history.history

    network = absorption.absorb(model, info.image_size[0], auxiliary=False)
    version = export.export_for_dataset(network, info, str(tmp_path / "export"), "istanas")
    serve = tf.saved_model.load(version).signatures["serving_default"]
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    normalized = data.normalize(tf.constant(pixels) / 255.0, info.mean, info.std)
    expected = model(normalized, training=False).numpy()
    scale = np.abs(expected).max()
    logits = serve(images=tf.constant(pixels))["logits"].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)


def test_search_datasets_give_fit_epoch_e_the_loops_epoch_e_batches(cifar10_folder):
    """Epoch e of the repeated stream is the first ``steps`` batches of the pipeline the
    loop builds for epoch e, for each search split (the loop zips and stops them)."""
    data_config = data.DataConfig(
        dataset=f"folder:{cifar10_folder}", max_examples_per_class=4, deterministic=True
    )
    info = data.get_dataset_info(data_config)  # 20 images per search split: 5 batches
    steps, epochs = 2, 3
    stream = search_data.search_datasets(data_config, info, 4, steps_per_epoch=steps)
    assert stream.steps_per_epoch == steps
    batches = list(stream.train.take(steps * epochs))
    for epoch in range(epochs):
        for index, split in enumerate(("search_weights", "search_arch")):
            loop = data.make_dataset(
                data_config, info, split, training=True, batch_size=4, epoch_seed=epoch
            )
            for step, (images, labels) in enumerate(loop.take(steps)):
                fit_images, fit_labels = batches[epoch * steps + step][index]
                np.testing.assert_array_equal(fit_images.numpy(), images.numpy())
                np.testing.assert_array_equal(fit_labels.numpy(), labels.numpy())


def test_callbacks_refuse_the_other_search(cifar10_folder):
    model = search_model.SearchNetwork(search_model.SearchNetworkConfig(channels=4, layers=3))
    with pytest.raises(ValueError, match="use callbacks.SparseRecovery"):
        callbacks.OneStageStopping().set_model(model)
    with pytest.raises(ValueError, match="freeze_tolerance must be >= 0"):
        callbacks.OneStageStopping(freeze_tolerance=-1)
    with pytest.raises(ValueError, match="max_multiply_adds must be >= 1"):
        callbacks.OneStageStopping(max_multiply_adds=0)
    with pytest.raises(ValueError, match="drives a search_model.SearchNetwork"):
        callbacks.SparseRecovery().set_model(keras.Sequential())
    data_config = data.DataConfig(dataset=f"folder:{cifar10_folder}", max_examples_per_class=2)
    info = data.get_dataset_info(data_config)
    with pytest.raises(ValueError, match="batch_size=64 is larger than a training split"):
        search_data.search_datasets(data_config, info, 64)


def _env(**settings):
    quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    return this_checkout_env(**{"TF_CPP_MIN_LOG_LEVEL": quiet, **settings})


# Opt-in (42 s of one worker): kept the default suite under 20 minutes on 2 cores; the
# fit tests above run the same callbacks.
@pytest.mark.slow
def test_the_example_runs_as_written(cifar10_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "search_with_fit.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(
            ISTANAS_DATASET=f"folder:{cifar10_folder}",
            ISTANAS_EXAMPLES_PER_CLASS=8,
            ISTANAS_CHANNELS=4,
            ISTANAS_LAYERS=3,
            ISTANAS_STEPS_PER_EPOCH=2,
            ISTANAS_LOG_DIR=tmp_path / "logs",
        ),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    genotype = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(genotype["normal"]) == len(genotype["reduce"]) == 2 * genotypes.STEPS
    assert list((tmp_path / "logs" / "train").glob("events.out.tfevents.*"))


MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from istanas_tf import callbacks, data, optimizers, search_data, search_model

    data_config = data.DataConfig(dataset="folder:" + sys.argv[1], max_examples_per_class=16,
                                  deterministic=True)
    info = data.get_dataset_info(data_config)
    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        model = search_model.SearchNetwork(search_model.SearchNetworkConfig(
            num_classes=info.num_classes, channels=4, layers=3))
        model.build_all(32)
        model.compile(optimizers.TorchSGD(0.05, momentum=0.9, l2=3e-4, clip_global_norm=5.0),
                      optimizers.TorchAdam(6e-4, beta_1=0.5, l2=1e-3))
    fit_data = search_data.search_datasets(data_config, info, 16, steps_per_epoch=3,
                                           eval_steps=1)
    recovery = callbacks.SparseRecovery()
    history = model.fit(**fit_data.fit_arguments(), epochs=2, verbose=0, callbacks=[recovery])
    print(json.dumps({"replicas": strategy.num_replicas_in_sync,
                      "history": history.history, "genotypes": len(recovery.genotypes)}))
""")


@pytest.mark.slow
def test_fit_under_mirrored_strategy_runs_the_search_with_recovery(cifar10_folder, tmp_path):
    script = tmp_path / "mirrored_fit.py"
    script.write_text(MIRRORED)
    result = subprocess.run(
        [sys.executable, str(script), str(cifar10_folder)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["replicas"] == 2 and summary["genotypes"] == 2
    history = summary["history"]
    assert len(history["loss"]) == 2 and all(np.isfinite(history["arch_loss"]))
    assert set(history["support_changed"]) <= {0.0, 1.0}
