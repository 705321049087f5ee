"""Retraining a genotype (training/retrain.py): the CPU config end to end, export
accuracy, mixed precision, ImageNet."""

import dataclasses
import json
import pathlib
import signal
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from main_runner import (
    REPO,
    assert_evaluations_match,
    last_json,
    metrics_rows,
    run_main,
    run_main_killed,
    run_to_completion,
)
from PIL import Image
from testing import tiny_loop

from istanas_tf import blocks, data, search_model
from istanas_tf.training import config as config_lib
from istanas_tf.training import retrain, runtime, two_stage


def _tiny_flags(folder, model_dir):
    """The retraining CPU config, smaller: 60 images per class, C = 4, 3 cells, 3 epochs."""
    return [
        f"--flagfile={REPO / 'train/configs/cifar10_train_cpu.cfg'}",
        f"--dataset=folder:{folder}",
        f"--model_dir={model_dir}",
        *(
            "--max_examples_per_class=60 --init_channels=4 --layers=3 --epochs=3 "
            "--batch_size=32 --eval_steps=2 --progress=false --deterministic"
        ).split(),
    ]


@pytest.fixture(scope="module")
def trained_run(cifar10_folder, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("train")
    return model_dir, last_json(run_to_completion(_tiny_flags(cifar10_folder, model_dir)))


def test_cpu_config_trains_exports_and_reports_top1_top5(trained_run):
    model_dir, summary = trained_run
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]  # loss falls
    assert rows[0]["drop_path_rate"] == 0.0 and 0 < rows[-1]["drop_path_rate"] < 0.2
    assert 0.0 <= summary["test_top1"] <= summary["test_top5"] <= 1.0
    assert pathlib.Path(summary["export"], "saved_model.pb").exists()
    final = json.loads((model_dir / "final_metrics.json").read_text())
    assert final["test_top1"] == summary["test_top1"]


def test_export_and_checkpoint_evaluate_to_the_reported_accuracy(trained_run, cifar10_folder):
    model_dir, summary = trained_run
    for evaluation in assert_evaluations_match(
        summary,
        model_dir,
        [f"--dataset=folder:{cifar10_folder}", "--max_examples_per_class=60"],
        examples=600,
        tolerance=1e-6,
    ):
        assert set(evaluation["per_class_accuracy"]) >= {"airplane", "truck"}


def test_rerun_of_a_finished_run_exports_nothing_new(trained_run, cifar10_folder):
    model_dir, summary = trained_run
    result = run_main(_tiny_flags(cifar10_folder, model_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert last_json(result) == summary
    assert sorted(p.name for p in (model_dir / "export" / "istanas").iterdir()) == ["1"]


# Opt-in (75 s): margin under CI's 20 minutes; the export's temporary folder and rename
# are also covered by export_test.
@pytest.mark.slow
def test_kill_during_export_then_rerun_matches_an_uninterrupted_run_bit_for_bit(
    trained_run, cifar10_folder, tmp_path
):
    reference_dir, reference = trained_run
    model_dir = tmp_path / "killed_in_export"
    args = _tiny_flags(cifar10_folder, model_dir)
    killed = run_main_killed(args, "in_export")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    versions = model_dir / "export" / "istanas"
    assert [p.name[:7] for p in versions.iterdir()] == [".tmp-1-"]  # half-exported
    result = run_to_completion(args)
    assert sorted(p.name for p in versions.iterdir()) == ["1"]  # the temporary went
    # --deterministic: the same command gives the same numbers and the same network.
    assert metrics_rows(model_dir) == metrics_rows(reference_dir)
    summary = last_json(result)
    for key in ("test_loss", "test_top1", "test_top5", "params"):
        assert summary[key] == reference[key], key
    images = tf.random.uniform([4, 32, 32, 3], 0, 255, seed=2)
    logits = [
        tf.saved_model.load(run["export"]).signatures["serving_default"](images=images)
        for run in (summary, reference)
    ]
    np.testing.assert_array_equal(logits[0]["logits"].numpy(), logits[1]["logits"].numpy())


def test_export_mode_exports_a_train_run_without_its_dataset(trained_run, tmp_path):
    model_dir, summary = trained_run
    # dataset.json holds what the export needs: the dataset is not opened.
    recorded = json.loads((model_dir / "dataset.json").read_text())
    assert recorded["image_size"] == [32, 32] and len(recorded["class_names"]) == 10
    result = run_main(
        [
            "--mode=export",
            f"--model_dir={model_dir}",
            f"--export_dir={tmp_path}",
            "--model_name=served",
            "--dataset=folder:/nonexistent",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    exported = last_json(result)
    assert exported["export"] == str(tmp_path / "served" / "1")
    assert exported["params"] == summary["params"]
    original = tf.saved_model.load(summary["export"]).signatures["serving_default"]
    again = tf.saved_model.load(exported["export"]).signatures["serving_default"]
    images = tf.random.uniform([2, 32, 32, 3], 0, 255, seed=2)
    np.testing.assert_allclose(
        again(images=images)["logits"].numpy(),
        original(images=images)["logits"].numpy(),
        rtol=1e-6,
        atol=1e-6,
    )


def test_eval_errors_name_the_problem(tmp_path, trained_run, cifar10_folder):
    for source, message in (
        ("model_dir", "holds no checkpoint"),
        ("saved_model", "holds no SavedModel"),
    ):
        result = run_main(
            [
                "--mode=eval",
                f"--{source}={tmp_path}",
                f"--dataset=folder:{cifar10_folder}",
                "--max_examples_per_class=2",
            ]
        )
        assert result.returncode == 2 and message in result.stderr
    # A 3-class dataset against a 10-class checkpoint.
    folder = tmp_path / "three"
    for split in ("train", "test"):
        for name in ("a", "b", "c"):
            (folder / split / name).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(
                folder / split / name / "0.png"
            )
    model_dir, _ = trained_run
    result = run_main(["--mode=eval", f"--model_dir={model_dir}", f"--dataset=folder:{folder}"])
    assert result.returncode == 2
    assert "has 3 classes but the checkpoint" in result.stderr and "trained for 10" in result.stderr


def test_unparseable_genotype_file_names_the_field(tmp_path, cifar10_folder):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"normal": [["sep_conv_3x3", 0]] * 8, "reduce": [["nope", 0]] * 8}))
    result = run_main(
        [
            "--mode=train",
            f"--genotype={path}",
            f"--model_dir={tmp_path / 'r'}",
            f"--dataset=folder:{cifar10_folder}",
            "--max_examples_per_class=2",
        ]
    )
    assert result.returncode == 2
    assert "reduce[0] (node 0): unknown op 'nope'" in result.stderr


def _changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


def test_mixed_float16_every_optimizer_changes_its_variables(cifar10_folder, tmp_path):
    folder_data = data.DataConfig(
        dataset=f"folder:{cifar10_folder}", max_examples_per_class=8, deterministic=True
    )
    loop = tiny_loop(steps_per_epoch=3, mixed_precision="float16")
    run = two_stage.TwoStageRun(
        config_lib.TwoStageConfig(
            model_dir=str(tmp_path / "search"),
            data=folder_data,
            loop=loop,
            network=search_model.SearchNetworkConfig(channels=4, layers=3),
        )
    )
    assert run.model.cells[0].preprocess1.conv.conv.compute_dtype == "float16"
    arch_before = [v.numpy() for v in run.model.architecture_variables]
    weights = run.model.active_weight_variables()
    weights_before = [v.numpy() for v in weights]
    row = run.run()
    assert np.isfinite(row["loss"]) and np.isfinite(row["arch_loss"])
    assert all(_changed(arch_before, run.model.architecture_variables))
    assert np.mean(_changed(weights_before, weights)) > 0.9

    train = retrain.TrainRun(
        config_lib.TrainConfig(
            model_dir=str(tmp_path / "train"),
            data=folder_data,
            channels=4,
            layers=3,
            loop=dataclasses.replace(loop, eval_steps=1),
        )
    )
    variables = train.model.trainable_variables
    before = [v.numpy() for v in variables]
    for epoch in range(1):
        row = train.run_epoch(epoch, 3)
    assert np.isfinite(row["loss"])
    # Every weight but the auxiliary head (its loss is in, so it moves too).
    assert np.mean(_changed(before, variables)) > 0.95


def _image_folder(root, size, classes=3, per_class=4):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.jpg")
    return root


def _imagenet_config(tmp_path, dataset, **data_kwargs):
    return config_lib.TrainConfig(
        model_dir=str(tmp_path / "run"),
        genotype="ISTA_ImageNet",
        data=data.DataConfig(dataset=dataset, **data_kwargs),
        channels=8,
        layers=3,
        loop=tiny_loop(batch_size=4, steps_per_epoch=2, eval_steps=1, learning_rate=0.1),
        lr_schedule="warmup_linear",
        label_smoothing=0.1,
        drop_path_prob=0.0,
    )


def test_imagenet_path_on_a_224_folder_end_to_end(tmp_path):
    folder = _image_folder(tmp_path / "images", 224)
    run = retrain.TrainRun(_imagenet_config(tmp_path, f"folder:{folder}"))
    assert type(run.model).__name__ == "NetworkImageNet"
    result = run.run()
    assert np.isfinite(result["test_loss"])
    assert pathlib.Path(result["export"], "saved_model.pb").exists()


def test_imagenet_path_on_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        run = retrain.TrainRun(_imagenet_config(tmp_path, "imagenet2012"))
        assert run.info.num_classes == 1000
        row = run.run_epoch(0, 2)
    assert np.isfinite(row["loss"])


def test_warmup_then_linear_decay_schedule():
    config = config_lib.TrainConfig(
        model_dir="unused",
        loop=config_lib.LoopConfig(epochs=250, learning_rate=0.5, learning_rate_min=0.0),
        lr_schedule="warmup_linear",
        warmup_epochs=5,
    )
    lrs = [runtime.learning_rate_at(config, e) for e in range(250)]
    assert lrs[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lrs[5] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.5 / 245)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


class _RatedModel(blocks.DropPathSchedule):
    """A model with nothing but a drop path rate (and a step the loop can trace)."""

    def __init__(self):
        self.drop_path_rate = tf.Variable(0.0)
        self.train_step = "train_step"


def test_the_step_is_traced_again_only_when_the_drop_path_rate_crosses_zero(monkeypatch):
    """Epoch 0 of the ramp (rate 0) trains a step without drop path; epoch 1 (rate > 0) a
    new one that reads the rate, which later epochs keep."""
    traced = []
    run = types.SimpleNamespace(
        config=types.SimpleNamespace(
            drop_path_prob=0.2,
            loop=types.SimpleNamespace(epochs=4, eval_steps=0),
            data=types.SimpleNamespace(cutout_length=0),
        ),
        optimizer=types.SimpleNamespace(learning_rate=None),
        model=_RatedModel(),
        _step_fn=lambda step: traced.append(step) or f"step {len(traced)}",
        evaluate=lambda steps: {},
        state=types.SimpleNamespace(end_epoch=lambda row: None),
        clock=None,
    )
    monkeypatch.setattr(retrain.runtime, "learning_rate_at", lambda config, epoch: 0.1)
    monkeypatch.setattr(retrain.steps_lib, "train_on_split", lambda *a, **k: ({}, 0.0, 0.0))
    monkeypatch.setattr(retrain.steps_lib, "log_epoch", lambda *a, **k: None)
    seen = []
    for epoch in range(4):
        retrain.TrainRun.run_epoch(run, epoch, 1)
        seen.append((run.train_fn, run.model.drop_path_traced))
    assert seen == [("step 1", False), ("step 2", True), ("step 2", True), ("step 2", True)]
    assert float(run.model.drop_path_rate.numpy()) == pytest.approx(0.2 * 3 / 4)


@pytest.mark.slow  # ~30 s: XLA compiles the step on the CPU
def test_jit_compiled_retraining_trains_every_weight(cifar10_folder, tmp_path):
    """``--jit_compile`` wraps the step in its own XLA-compiled ``tf.function``."""
    run = retrain.TrainRun(
        config_lib.TrainConfig(
            model_dir=str(tmp_path / "train"),
            data=data.DataConfig(
                dataset=f"folder:{cifar10_folder}", max_examples_per_class=8, deterministic=True
            ),
            channels=4,
            layers=3,
            jit_compile=True,
            drop_path_prob=0.0,
            loop=dataclasses.replace(tiny_loop(steps_per_epoch=2), eval_steps=1),
        )
    )
    variables = run.model.trainable_variables
    before = [v.numpy() for v in variables]
    row = run.run_epoch(0, 2)
    assert np.isfinite(row["loss"]) and np.isfinite(row["test_loss"])
    assert np.mean(_changed(before, variables)) > 0.95
