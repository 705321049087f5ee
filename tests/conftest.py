"""Shared pytest fixtures: the CIFAR-10 image folder beside the repo, quiet TF logs."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The command line's CPU kernels (train/main.py turns oneDNN on), so the tests run what
# users run.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

CIFAR10_FOLDER = REPO_ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def cifar10_folder() -> pathlib.Path:
    """The real CIFAR-10 image folder in ../shared (read-only; never copied)."""
    if not (CIFAR10_FOLDER / "train").is_dir():
        pytest.fail(
            f"CIFAR-10 image folder not found at {CIFAR10_FOLDER}; "
            "tests expect ../shared/data/cifar10 beside the repository."
        )
    return CIFAR10_FOLDER


# The longest files first (measured on 2 cores; seconds of one worker): pytest-xdist's
# ``--dist loadfile`` hands whole files to the workers in collection order, and the
# longest file, collected near the end, ran alone for the last minutes.
LONGEST_FILES = (
    "two_stage_test.py",  # ~550 s
    "one_stage_test.py",  # ~420 s
    "retrain_test.py",  # ~330 s
    "callbacks_test.py",  # ~210 s
    "mirrored_step_test.py",  # ~190 s
)


def pytest_collection_modifyitems(config, items):
    """Orders the longest files first (a stable sort: other files and every file's own
    tests keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))
