"""Runs train/main.py in a subprocess, as a user would, and reads what a run leaves.

Shared by the end-to-end tests of the three kinds of run.
"""

import json
import os
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


# A tiny network on a subset, reproducible: what end-to-end tests run. (Progress stays on:
# with stderr not a terminal it must not reach stdout or write a bar.)
TINY_SETTINGS = dict(
    init_channels=4, layers=3, batch_size=16, eval_steps=2, deterministic="true", seed=3
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


# Where run_main_killed stops a run: patched into the library in the child process, so
# the kill lands exactly there (a timed SIGKILL from outside cannot aim at these points).
_KILL_POINTS = {
    # The metrics row of epoch EPOCH is written, its checkpoint not yet.
    "before_checkpoint": """
from istanas_tf.training import state
save = state.RunState.save
def killing_save(self, epoch):
    if epoch == EPOCH:
        kill()
    save(self, epoch)
state.RunState.save = killing_save
""",
    # During the checkpoint of epoch EPOCH: tf.train.CheckpointManager writes
    # ckpt-N_temp/ and renames it at the end; killed with the folder half-written.
    "in_checkpoint": """
import os
from istanas_tf.training import state
save = state.RunState.save
def killing_save(self, epoch):
    if epoch == EPOCH:
        temp = os.path.join(self.checkpoint_dir, f"ckpt-{epoch}_temp")
        os.makedirs(temp)
        with open(os.path.join(temp, "part-00000-of-00001.data-00000-of-00001"), "wb") as f:
            f.write(b"half a checkpoint")
        kill()
    save(self, epoch)
state.RunState.save = killing_save
""",
    # During the export: the SavedModel is written into its temporary folder, not yet
    # renamed into its version directory.
    "in_export": """
from istanas_tf import export
def killing_move(temp_dir, version_dir, overwrite):
    kill()
export._move_into_place = killing_move
""",
}


def run_main_killed(args, point, epoch=0, timeout=900):
    """``run_main(args)``, SIGKILLed at ``point`` (a key of ``_KILL_POINTS``; ``epoch``
    says which epoch's checkpoint, 1-based). Returns the finished process."""
    code = "\n".join(
        [
            "import os, runpy, signal, sys",
            "def kill():",
            "    os.kill(os.getpid(), signal.SIGKILL)",
            _KILL_POINTS[point].replace("EPOCH", str(epoch)),
            f"sys.argv = [{MAIN!r}, *sys.argv[1:]]",
            f"runpy.run_path({MAIN!r}, run_name='__main__')",
        ]
    )
    # train/ on the path, as when main.py runs as a script (it imports cli_flags).
    path = os.pathsep.join(filter(None, [str(REPO / "train"), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
    )


def metrics_rows(model_dir, timing=False):
    """The run's metrics.jsonl rows; without the wall-clock keys (``*_time_s``) unless
    ``timing``, so that two runs' rows compare exactly."""
    rows = [json.loads(line) for line in (pathlib.Path(model_dir) / "metrics.jsonl").open()]
    if timing:
        return rows
    return [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in rows]
