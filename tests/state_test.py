"""The divergence guard of training/state.py: what counts as diverged, and that nothing of
a diverged epoch is saved."""

import json
import math

import keras
import pytest
import tensorflow as tf

from istanas_tf import genotypes
from istanas_tf.training import config as config_lib
from istanas_tf.training import recorded, run_dir, run_guard, state


def test_the_limit_is_a_hundred_uniform_guesses():
    assert state.divergence_limit(10) == pytest.approx(100 * math.log(10))
    assert state.divergence_limit(1000) == pytest.approx(100 * math.log(1000))


@pytest.mark.parametrize(
    "row",
    [
        {"epoch": 2, "loss": 8.8e13, "val_loss": 2.3},
        {"epoch": 2, "loss": 2.3, "valid_loss": float("nan")},
        {"epoch": 2, "loss": 2.3, "arch_loss": float("inf")},
        {"epoch": 2, "loss": 2.3, "test_loss": 231.0},
    ],
)
def test_exploding_or_non_finite_losses_stop_the_run(row):
    with pytest.raises(state.DivergedError, match="diverged at epoch 2") as error:
        state.check_divergence(row, state.divergence_limit(10), "RUN")
    assert "--learning_rate" in str(error.value) and "RUN keeps the last good" in str(error.value)


def test_a_loss_that_stays_sane_passes():
    # Accuracies and times are not losses; a bad first epoch of 10 x ln(10) is allowed.
    row = {"epoch": 1, "loss": 23.0, "test_loss": 10.9, "accuracy": 0.1, "train_time_s": 1e9}
    state.check_divergence(row, state.divergence_limit(10), "RUN")


def test_end_epoch_saves_nothing_of_a_diverged_epoch(tmp_path):
    weight = keras.Variable(1.0, name="weight")
    run_state = state.RunState(
        str(tmp_path), tf.distribute.get_strategy(), {"model": [weight]}, num_classes=10
    )
    run_state.end_epoch({"epoch": 1, "loss": 2.0})
    with pytest.raises(state.DivergedError):
        run_state.end_epoch({"epoch": 2, "loss": float("nan")})
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-1")
    assert [row["epoch"] for row in run_state.metrics_log.read()] == [1]


def test_a_run_directory_on_a_gfile_filesystem(tmp_path):
    """Everything a run writes and reads back goes through tf.io.gfile: an in-memory
    ram:// directory holds a run, resumes it and rolls a failed start back."""
    model_dir = f"ram://{tmp_path.name}/run"
    settings = recorded.recorded_settings(config_lib.TrainConfig(model_dir=model_dir))
    weight = keras.Variable(1.0, name="weight")
    with run_guard.RunGuard(model_dir) as guard:
        guard.acquire()
        assert run_dir.check_run_config(model_dir, settings) is False
        run_state = state.RunState(
            model_dir, tf.distribute.get_strategy(), {"model": [weight]}, num_classes=10
        )
        run_state.end_epoch({"epoch": 1, "loss": 2.0})
        run_dir.write_genotype(model_dir, genotypes.get_genotype("ISTA_twostage"), 1)
        run_state.end_epoch({"epoch": 2, "loss": 1.5})
    weight.assign(5.0)
    # A resume: settings checked, checkpoint 2 restored, rows past it dropped.
    run_state.metrics_log.append({"epoch": 3, "loss": 1.0})  # a row without its checkpoint
    assert run_dir.check_run_config(model_dir, settings) is True
    assert run_state.restore() and run_state.epochs_done == 2 and float(weight.numpy()) == 1.0
    assert [row["epoch"] for row in run_state.metrics_log.read()] == [1, 2]
    genotype = json.loads(tf.io.gfile.GFile(run_dir.path(model_dir, run_dir.GENOTYPE)).read())
    assert genotypes.from_json_dict(genotype) == genotypes.get_genotype("ISTA_twostage")
    # A refused start there changes nothing.
    before = tf.io.gfile.GFile(run_dir.path(model_dir, run_dir.RUN_CONFIG)).read()
    with pytest.raises(run_dir.RunDirError):
        with run_guard.RunGuard(model_dir) as guard:
            guard.acquire()
            run_dir.atomic_write_text(run_dir.path(model_dir, "flags.txt"), "--epochs=9\n")
            run_dir.check_run_config(
                model_dir, recorded.recorded_settings(config_lib.OneStageConfig(model_dir=""))
            )
    assert tf.io.gfile.GFile(run_dir.path(model_dir, run_dir.RUN_CONFIG)).read() == before
    assert not tf.io.gfile.exists(run_dir.path(model_dir, "flags.txt"))
