"""Shared pytest fixtures: the CIFAR-10 image folder beside the repo, quiet TF logs."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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
