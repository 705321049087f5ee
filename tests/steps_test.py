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
    with pytest.raises(
        steps.NonFiniteLossError, match="epoch 4, step 3.*RUN keeps its last checkpoint"
    ):
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


def _epoch_with_progress(monkeypatch, terminal, seconds_per_line):
    monkeypatch.setattr(steps.sys.stderr, "isatty", lambda: terminal, raising=False)
    monkeypatch.setattr(steps, "PROGRESS_LINE_SECONDS", seconds_per_line)
    model = types.SimpleNamespace(metrics=[])
    steps.run_train_steps(
        lambda batch: {"loss": 2.0}, model, range(5), 5, epoch=0, model_dir="RUN", verbose=True
    )


def test_on_a_terminal_the_bar_goes_to_stderr_not_stdout(monkeypatch, capsys):
    _epoch_with_progress(monkeypatch, terminal=True, seconds_per_line=0.0)
    out, err = capsys.readouterr()
    assert out == "" and "1/5" in err and "loss: 2.0" in err  # later updates throttled


def test_without_a_terminal_long_epochs_log_step_lines_with_an_eta(monkeypatch, capsys):
    logged = []
    monkeypatch.setattr(steps.logging, "info", lambda fmt, *args: logged.append(fmt % args))
    _epoch_with_progress(monkeypatch, terminal=False, seconds_per_line=0.0)
    out, err = capsys.readouterr()
    assert out == "" and "\x1b[" not in err
    assert len(logged) == 5 and "epoch 1 step 3/5  loss 2  elapsed 0m00s  eta 0m00s" in logged[2]


def test_the_epoch_line_ends_with_elapsed_time_and_eta(monkeypatch):
    logged = []
    monkeypatch.setattr(steps.logging, "info", lambda message: logged.append(message))
    clock = steps.EpochClock(first_epoch=2, epochs=10)
    steps.log_epoch("epoch 3/10", {"epoch": 3, "loss": 1.23456}, ("loss", "lr"), clock)
    assert logged[0].startswith("epoch 3/10  loss 1.235  lr -  elapsed 0m00s  eta 0m00s")


def test_distributed_steps_are_traced_without_autograph():
    """AutoGraph would rewrite this ``if`` into a ``tf.cond``; without it the tensor's
    truth value is refused at trace time (the step's first trace is cheaper so)."""
    import tensorflow as tf

    def step(x):
        return x if tf.reduce_sum(x) > 0 else -x

    train_fn = steps.distributed_step(
        tf.distribute.get_strategy(), step, types.SimpleNamespace(metrics=[])
    )
    with pytest.raises(TypeError, match="bool"):
        train_fn(tf.ones([2]))
