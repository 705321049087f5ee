"""The two-stage search end to end through train/main.py: artifacts, resume, bad input."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from main_runner import MAIN, REPO, checkpoint_state, run_main, run_to_completion, tiny_flags
from testing import tiny_loop

from istanas_tf import data, genotypes, search_model
from istanas_tf.training import config as config_lib
from istanas_tf.training import steps, two_stage

EPOCHS = 3


def _tiny_flags(folder, model_dir, **overrides):
    """The CPU config, smaller: 48 images per class, C = 4, 3 cells, 3 epochs."""
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
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
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
    assert rows[0]["lr"] > rows[-1]["lr"]  # cosine schedule
    genotype = genotypes.load_json(model_dir / "genotype.json")
    assert len(genotype.normal) == len(genotype.reduce) == 8  # two picks per node
    assert genotypes.to_json_dict(genotype) == summary["genotype"]
    for epoch in (1, 2, 3):
        assert (model_dir / "genotypes" / f"epoch_{epoch:03d}.json").exists()
        assert (model_dir / "cells" / f"epoch_{epoch:03d}.png").exists()
    assert (model_dir / "cells.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--epochs=3" in (model_dir / "flags.txt").read_text()
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-3")
    events = list((model_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    tags = {
        v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value
    }
    assert {
        "loss",
        "accuracy",
        "val_accuracy",
        "lr",
        "recovery_time_s",
        "genotype",
        "genotype/cells",
        "abs_z/normal",
    } <= tags
    # The summary line per epoch is on the log (stderr through absl).
    assert result.stderr.count("epoch ") >= 3


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


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(
    finished_run, cifar10_folder, tmp_path
):
    reference_dir, _ = finished_run
    model_dir = tmp_path / "killed"
    args = _tiny_flags(cifar10_folder, model_dir)
    process = subprocess.Popen(
        [sys.executable, MAIN, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_checkpoint = model_dir / "checkpoints" / "ckpt-1.index"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"
    done = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(done) < EPOCHS

    result = run_main(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed" in result.stderr
    assert genotypes.load_json(model_dir / "genotype.json") == genotypes.load_json(
        reference_dir / "genotype.json"
    )
    resumed = checkpoint_state(model_dir, STATE_PARTS.split())
    reference = checkpoint_state(reference_dir, STATE_PARTS.split())
    assert resumed.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]


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


def _tiny_config(cifar10_folder, model_dir, **loop):
    return config_lib.TwoStageConfig(
        model_dir=str(model_dir),
        network=search_model.SearchNetworkConfig(channels=4, layers=3, seed=1),
        data=data.DataConfig(
            dataset=f"folder:{cifar10_folder}",
            max_examples_per_class=16,
            deterministic=True,
            seed=1,
        ),
        loop=tiny_loop(
            **{
                **dict(
                    epochs=2,
                    batch_size=16,
                    learning_rate=0.05,
                    eval_steps=1,
                    deterministic=True,
                    seed=1,
                ),
                **loop,
            }
        ),
    )


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cifar10_folder, tmp_path):
    config = _tiny_config(cifar10_folder, tmp_path / "nan", epochs=1)
    run = two_stage.TwoStageRun(config)
    run.run()
    checkpoint = tf.train.latest_checkpoint(str(tmp_path / "nan" / "checkpoints"))
    assert checkpoint.endswith("ckpt-1")

    run = two_stage.TwoStageRun(
        dataclasses.replace(config, loop=dataclasses.replace(config.loop, epochs=2))
    )
    stem_kernel = run.model.stem_conv.conv.kernel
    stem_kernel.assign(np.full(stem_kernel.shape, np.nan, np.float32))
    with pytest.raises(steps.NonFiniteLossError, match="epoch 2.*last good checkpoint"):
        run.run()
    assert tf.train.latest_checkpoint(str(tmp_path / "nan" / "checkpoints")) == checkpoint
    reader = tf.train.load_checkpoint(checkpoint)
    assert all(
        np.all(np.isfinite(reader.get_tensor(k)))
        for k in reader.get_variable_to_shape_map()
        if reader.get_variable_to_dtype_map()[k].is_floating
    )
