"""Runs train/main.py in a subprocess, as a user would, for the end-to-end tests."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
MAIN = str(REPO / "train" / "main.py")


def run_main(args, timeout=900):
    """``python train/main.py ARGS`` from the repository root; output captured as text."""
    return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def last_json(result):
    """The JSON object a finished command prints as its last line of stdout."""
    return json.loads(result.stdout.strip().splitlines()[-1])
