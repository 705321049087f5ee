"""The two-stage search end to end through train/main.py: artifacts, resume, bad input."""

import json
import re
import shutil
import signal

import numpy as np
import pytest
import tensorflow as tf
from main_runner import (
    checkpoint_state,
    metrics_rows,
    run_main,
    run_main_killed,
    run_to_completion,
    tiny_flags,
)

from istanas_tf import genotypes

EPOCHS = 2


def _tiny_flags(folder, model_dir, **overrides):
    """The CPU config, smaller: 48 images per class, C = 4, 3 cells, 2 epochs."""
    settings = dict(max_examples_per_class=48, epochs=EPOCHS, learning_rate=0.05)
    return tiny_flags("cifar10_two_stage_cpu.cfg", folder, model_dir, **{**settings, **overrides})


# The architecture state and the weights of every cell must be in a resumed checkpoint.
STATE_PARTS = "normal_code.Sb_0 reduce_code.Sz normal_code.Ssupport cell1.Spreprocess0 moving_mean"


@pytest.fixture(scope="module")
def finished_run(cifar10_folder, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("search")
    return model_dir, run_to_completion(_tiny_flags(cifar10_folder, model_dir))


def test_search_writes_every_artifact(finished_run):
    model_dir, result = finished_run
    # stdout is the JSON result and nothing else; the log has no progress-bar redraws.
    summary = json.loads(result.stdout)
    assert "\x1b[" not in result.stderr and "\r" not in result.stderr
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    for key in (
        "loss",
        "arch_loss",
        "accuracy",
        "val_accuracy",
        "lr",
        "step_time_s",
        "recovery_time_s",
        "z_distance",
        "genotype",
    ):
        assert key in rows[-1]
    # The recovery report of the exact solver: every node at a KKT point, per node.
    for row in rows:
        assert all(len(row[key]["normal"]) == 4 for key in ("kkt_violation", "certified"))
        assert row["kkt_violation_max"] < 1e-6
        assert row["certified_nodes"] == sum(sum(flags) for flags in row["certified"].values())
    assert rows[0]["lr"] > rows[-1]["lr"]  # cosine schedule
    genotype = genotypes.load_json(model_dir / "genotype.json")
    assert len(genotype.normal) == len(genotype.reduce) == 8  # two picks per node
    assert genotypes.to_json_dict(genotype) == summary["genotype"]
    for epoch in range(1, EPOCHS + 1):
        assert (model_dir / "genotypes" / f"epoch_{epoch:03d}.json").exists()
        assert (model_dir / "cells" / f"epoch_{epoch:03d}.png").exists()
    assert (model_dir / "cells.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"--epochs={EPOCHS}" in (model_dir / "flags.txt").read_text()
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(f"ckpt-{EPOCHS}")
    # TensorBoard as Keras lays it out: a run per split, the same tags in each.
    tags = {}
    for run in ("train", "validation"):
        events = (model_dir / "tensorboard" / run).glob("events.out.tfevents.*")
        tags[run] = {
            value.tag
            for file in events
            for event in tf.compat.v1.train.summary_iterator(str(file))
            for value in event.summary.value
        }
    assert {"epoch_loss", "epoch_accuracy"} <= tags["train"] & tags["validation"]
    assert {
        "epoch_learning_rate",
        "recovery_time_s",
        "recovery/kkt_violation_max",
        "recovery/certified_nodes",
        "genotype",
        "genotype/cells",
        "architecture/normal",
        "architecture/reduce/node0/c_{k-1}/sep_conv_3x3",
        "abs_z/normal/node0",
    } <= tags["train"]
    # The summary line per epoch is on the log (stderr through absl).
    assert result.stderr.count("epoch ") >= EPOCHS
    assert (
        len(re.findall(r"kkt_violation_max \S+  certified_nodes [0-8]/8", result.stderr)) == EPOCHS
    )


def test_describe_accepts_the_searched_genotype(finished_run):
    model_dir, _ = finished_run
    result = run_main(["--mode=describe", f"--genotype={model_dir / 'genotype.json'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["params"] > 0


def test_rerun_of_a_finished_run_resumes_and_does_nothing(finished_run, cifar10_folder):
    model_dir, _ = finished_run
    before = (model_dir / "metrics.jsonl").read_text()
    result = run_main(_tiny_flags(cifar10_folder, model_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (model_dir / "metrics.jsonl").read_text() == before


def test_kills_between_a_row_and_its_checkpoint_resume_to_the_uninterrupted_records(
    finished_run, cifar10_folder, tmp_path
):
    reference_dir, _ = finished_run
    model_dir = tmp_path / "killed"
    checkpoints = model_dir / "checkpoints"
    args = _tiny_flags(cifar10_folder, model_dir)
    # Kill 1: epoch 1's metrics row written, no checkpoint at all yet.
    killed = run_main_killed(args, "before_checkpoint", epoch=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [row["epoch"] for row in metrics_rows(model_dir)] == [1]
    assert tf.train.latest_checkpoint(str(checkpoints)) is None
    # Kill 2: resumed from nothing (the stray row dropped), killed writing checkpoint 2.
    killed = run_main_killed(args, "in_checkpoint", epoch=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [row["epoch"] for row in metrics_rows(model_dir)] == [1, 2]
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-1")
    assert (checkpoints / "ckpt-2_temp").is_dir()
    # The resume drops row 2, removes the half checkpoint and ends as the run that was
    # never interrupted: the same rows (wall-clock times aside) and genotype.
    result = run_to_completion(args)
    assert "ckpt-2_temp" in result.stderr  # logged as removed
    assert metrics_rows(model_dir) == metrics_rows(reference_dir)
    assert not list(checkpoints.glob("*_temp"))
    genotype = (model_dir / "genotype.json").read_text()
    assert genotype == (reference_dir / "genotype.json").read_text()
    # Every variable of the final checkpoint, bit for bit.
    resumed = checkpoint_state(model_dir, STATE_PARTS.split())
    reference = checkpoint_state(reference_dir, STATE_PARTS.split())
    assert resumed.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)


def test_flags_txt_replays_the_run_and_a_refused_start_changes_nothing(
    finished_run, cifar10_folder
):
    model_dir, _ = finished_run
    recorded = (model_dir / "flags.txt").read_text()
    # Only this project's flags, each once (absl's and TF's own would not parse back).
    names = [line.split("=")[0] for line in recorded.splitlines()]
    assert len(names) == len(set(names)) and "--test_random_seed" not in names
    assert f"--model_dir={model_dir}" in recorded.splitlines()
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    refused = run_main(_tiny_flags(cifar10_folder, model_dir, lam=1e-4))
    assert refused.returncode == 2 and "--lam: recorded 1e-05, now 0.0001" in refused.stderr
    replayed = run_main([f"--flagfile={model_dir / 'flags.txt'}"])
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert "Resumed" in replayed.stderr
    after = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    after.pop(model_dir / ".lock", None)
    before.pop(model_dir / ".lock", None)
    # The replay resumed a finished run: nothing to do, nothing changed but new
    # (empty-handed) TensorBoard event files.
    assert {p: b for p, b in after.items() if "tensorboard" not in str(p)} == {
        p: b for p, b in before.items() if "tensorboard" not in str(p)
    }


def test_divergence_stops_before_the_checkpoint_and_a_lower_lr_resumes(
    finished_run, cifar10_folder, tmp_path
):
    model_dir = tmp_path / "diverging"
    shutil.copytree(finished_run[0], model_dir)
    (model_dir / ".lock").unlink(missing_ok=True)
    kept = {
        name: (model_dir / name).read_bytes()
        for name in ("genotype.json", "metrics.jsonl", "run_config.json", "flags.txt")
    }
    more = EPOCHS + 1
    diverged = run_main(_tiny_flags(cifar10_folder, model_dir, epochs=more, learning_rate=1e6))
    assert diverged.returncode == 2, diverged.stderr[-3000:]
    assert f"diverged at epoch {more}" in diverged.stderr or "non-finite" in diverged.stderr
    assert "Traceback" not in diverged.stderr
    # The last good epoch is intact: nothing of the diverged one was saved.
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(f"ckpt-{EPOCHS}")
    assert {name: (model_dir / name).read_bytes() for name in kept} == kept
    # The advice works: a lower learning rate resumes, and the change is in the history.
    resumed = run_main(_tiny_flags(cifar10_folder, model_dir, epochs=more, learning_rate=0.01))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["epoch"] for row in metrics_rows(model_dir)] == [*range(1, more + 1)]
    history = json.loads((model_dir / "run_config.json").read_text())["history"]
    assert history == [
        {
            "resumed_after_epoch": EPOCHS,
            "changed": {"--epochs": [EPOCHS, more], "--learning_rate": [0.05, 0.01]},
        }
    ]


def test_model_dir_of_another_run_is_refused_naming_the_flags(finished_run, cifar10_folder):
    model_dir, _ = finished_run
    result = run_main(_tiny_flags(cifar10_folder, model_dir, sparseness=3, lam=1e-4))
    assert result.returncode == 2
    assert "--lam: recorded 1e-05, now 0.0001" in result.stderr
    assert "--sparseness: recorded 2, now 3" in result.stderr


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("learning_rate", "0", "--learning_rate must be > 0"),
        ("learning_rate", "-0.1", "--learning_rate must be > 0"),
        ("epochs", "0", "--epochs must be >= 1"),
        ("train_portion", "1.0", "--train_portion"),
        ("train_portion", "0", "--train_portion"),
    ],
)
def test_bad_flags_fail_with_a_message_naming_the_flag(
    tmp_path, cifar10_folder, flag, value, message
):
    result = run_main(_tiny_flags(cifar10_folder, tmp_path / "run", **{flag: value}), timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
