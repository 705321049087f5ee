"""Runs train/main.py in a subprocess, as a user would, and reads what a run leaves.

Shared by the end-to-end tests of the three kinds of run.
"""

import json
import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parents[1]
MAIN = str(REPO / "train" / "main.py")


def run_main(args, timeout=900):
    """``python train/main.py ARGS`` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, MAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


# A tiny network on a subset, reproducible and quiet: what end-to-end tests run.
TINY_SETTINGS = dict(
    init_channels=4,
    layers=3,
    batch_size=16,
    eval_steps=2,
    deterministic="true",
    seed=3,
    progress="false",
)


def tiny_flags(flagfile, folder, model_dir, **settings):
    """Command-line flags: a shipped CPU flagfile (``train/configs/``), the CIFAR-10 folder,
    the run directory, :data:`TINY_SETTINGS`, then ``settings`` (added or replacing)."""
    flags = {
        "flagfile": str(REPO / "train" / "configs" / flagfile),
        "dataset": f"folder:{folder}",
        "model_dir": str(model_dir),
        **TINY_SETTINGS,
        **settings,
    }
    return [f"--{name}={value}" for name, value in flags.items()]


def run_to_completion(args, timeout=900):
    """``run_main(args)``, asserting that it succeeded (its stderr tail otherwise)."""
    result = run_main(args, timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def last_json(result):
    """The JSON object a finished command prints as its last line of stdout."""
    return json.loads(result.stdout.strip().splitlines()[-1])


def checkpoint_state(model_dir, required_parts):
    """Every saved variable of a run's latest checkpoint, by key.

    Asserts that each of ``required_parts`` is part of some key, so that a comparison of
    two states cannot pass on a checkpoint that lost a group of variables.
    """
    reader = tf.train.load_checkpoint(str(pathlib.Path(model_dir) / "checkpoints"))
    keys = [
        k
        for k in reader.get_variable_to_shape_map()
        if not k.startswith("_") and "save_counter" not in k
    ]
    for part in required_parts:
        assert any(part in k for k in keys), part
    return {k: reader.get_tensor(k) for k in keys}


def assert_evaluations_match(summary, model_dir, data_flags, examples, tolerance):
    """``--mode=eval`` of the run's SavedModel and of its run directory give the top-1
    and top-5 the run reported, on ``examples`` test images; returns the evaluations."""
    evaluations = []
    for source in (f"--saved_model={summary['export']}", f"--model_dir={model_dir}"):
        result = run_main(["--mode=eval", source, *data_flags], timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        evaluation = last_json(result)
        assert evaluation["examples"] == examples
        assert evaluation["top1"] == pytest.approx(summary["test_top1"], abs=tolerance)
        assert evaluation["top5"] == pytest.approx(summary["test_top5"], abs=tolerance)
        evaluations.append(evaluation)
    return evaluations
