"""training/steps.py: an epoch of steps stops at the first non-finite value."""

import types

import pytest

from istanas_tf.training import steps


def test_a_non_finite_step_stops_the_epoch_at_that_step():
    values = iter([2.3, 2.2, float("nan"), 2.0])
    calls = []

    def step_fn(batch):
        calls.append(batch)
        return {"loss": next(values), "accuracy": 0.1}

    model = types.SimpleNamespace(metrics=[])
    with pytest.raises(steps.NonFiniteLossError, match="epoch 4, step 3.*RUN/checkpoints"):
        steps.run_train_steps(step_fn, model, range(10), 5, epoch=3, model_dir="RUN", verbose=False)
    assert calls == [0, 1, 2]  # nothing ran after the bad step


def test_finite_steps_return_the_last_metrics_and_times():
    model = types.SimpleNamespace(metrics=[])
    logs, epoch_time, step_time = steps.run_train_steps(
        lambda batch: {"loss": 1.0 / (batch + 1)},
        model,
        range(10),
        4,
        epoch=0,
        model_dir="RUN",
        verbose=False,
    )
    assert logs == {"loss": 0.25} and epoch_time >= step_time >= 0
