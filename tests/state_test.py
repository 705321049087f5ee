"""The divergence guard of training/state.py: what counts as diverged, and that nothing of
a diverged epoch is saved."""

import math

import keras
import pytest
import tensorflow as tf

from istanas_tf.training import state


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
