"""Which CPU kernels run: oneDNN's from the command line and in the tests, unless the
user says otherwise, and the run's log says which."""

import os
import pathlib
import subprocess
import sys

import pytest

from istanas_tf.training import runtime

REPO = pathlib.Path(__file__).resolve().parents[1]

# Imports train/main.py as a module (its flags are defined, nothing runs; its neighbour
# cli_flags found through PYTHONPATH), then asks TensorFlow whether it started with
# oneDNN's kernels.
IMPORT_MAIN_THEN_ASK = """
import runpy
runpy.run_path("train/main.py", run_name="not_main")
from istanas_tf.training import runtime
print("onednn", runtime.onednn_enabled())
"""


def test_the_tests_run_the_command_lines_kernels():
    """conftest.py sets TF_ENABLE_ONEDNN_OPTS before TensorFlow starts (later is too late:
    TensorFlow reads it once)."""
    assert runtime.onednn_enabled() is (os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1")


@pytest.mark.parametrize("setting, expected", [(None, "True"), ("0", "False")])
def test_the_command_line_turns_onednn_on_unless_told_not_to(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "train"), env.get("PYTHONPATH")]))
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_MAIN_THEN_ASK],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["onednn", expected]


@pytest.mark.parametrize(
    "enabled, expected",
    [(True, "CPU kernels: oneDNN"), (False, "set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow")],
)
def test_the_run_logs_which_kernels_it_uses(enabled, expected, monkeypatch):
    # The log call itself is recorded: absl's logger may stop propagating to pytest's
    # capture once another test in the same process has run absl's app.
    lines = []
    monkeypatch.setattr(runtime, "onednn_enabled", lambda: enabled)
    monkeypatch.setattr(runtime.logging, "info", lambda message, *args: lines.append(message))
    runtime.log_cpu_kernels()
    assert len(lines) == 1 and expected in lines[0]
