"""The run directory's run_config.json: recorded once, compared on resume, kind explicit."""

import dataclasses
import json

import pytest

from istanas_tf.training import config as config_lib
from istanas_tf.training import recorded, run_dir


def _settings(**loop):
    config = config_lib.TwoStageConfig(model_dir="unused", loop=config_lib.LoopConfig(**loop))
    return recorded.recorded_settings(config)


def test_recorded_then_resumed_with_resumable_changes(tmp_path):
    assert run_dir.check_run_config(str(tmp_path), _settings(epochs=5)) is False
    record = json.loads((tmp_path / run_dir.RUN_CONFIG).read_text())
    assert record["kind"] == "two_stage" and record["loop"]["epochs"] == 5
    # More epochs and another strategy are a resume, recorded at their latest value.
    assert run_dir.check_run_config(str(tmp_path), _settings(epochs=9, strategy="mirrored"))
    assert json.loads((tmp_path / run_dir.RUN_CONFIG).read_text())["loop"]["epochs"] == 9


def test_other_settings_are_refused_naming_the_flags(tmp_path):
    run_dir.check_run_config(str(tmp_path), _settings(seed=1))
    other = recorded.recorded_settings(
        config_lib.TwoStageConfig(
            model_dir="unused",
            loop=config_lib.LoopConfig(seed=2),
            arch=config_lib.ArchitectureOptimizerConfig(weight_decay=1e-2),
        )
    )
    with pytest.raises(run_dir.RunDirError) as error:
        run_dir.check_run_config(str(tmp_path), other)
    # Named by their flags (arch.weight_decay is --arch_weight_decay), and the data's
    # seed (unchanged here) is not confused with the loop's.
    assert "--seed: recorded 1, now 2" in str(error.value)
    assert "--arch_weight_decay: recorded 0.001, now 0.01" in str(error.value)
    assert str(error.value).count("--seed") == 1


def test_a_run_of_another_kind_is_refused_in_one_sentence(tmp_path):
    run_dir.check_run_config(str(tmp_path), _settings())
    one_stage = recorded.recorded_settings(config_lib.OneStageConfig(model_dir="unused"))
    with pytest.raises(run_dir.RunDirError, match="holds a two-stage search, not a one-stage"):
        run_dir.check_run_config(str(tmp_path), one_stage)


def test_a_run_config_without_kind_is_refused_not_guessed(tmp_path):
    (tmp_path / run_dir.RUN_CONFIG).write_text(json.dumps({"epochs": 50, "method": "ista"}))
    for read in (
        lambda: run_dir.read_run_config(str(tmp_path)),
        lambda: run_dir.check_run_config(str(tmp_path), _settings()),
    ):
        with pytest.raises(run_dir.RunDirError, match="written by another version"):
            read()
    with pytest.raises(run_dir.RunDirError, match="no run was written there"):
        run_dir.read_run_config(str(tmp_path / "empty"))


def test_resumable_changes_are_kept_in_the_history(tmp_path):
    run_dir.check_run_config(str(tmp_path), _settings(epochs=1, learning_rate=0.05))
    (tmp_path / run_dir.CHECKPOINTS).mkdir()
    (tmp_path / run_dir.CHECKPOINTS / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n'
    )
    (tmp_path / run_dir.CHECKPOINTS / "ckpt-1.index").write_bytes(b"")
    # A diverged run resumed at a lower learning rate, then extended.
    run_dir.check_run_config(str(tmp_path), _settings(epochs=1, learning_rate=0.01))
    run_dir.check_run_config(str(tmp_path), _settings(epochs=4, learning_rate=0.01))
    run_dir.check_run_config(str(tmp_path), _settings(epochs=4, learning_rate=0.01))  # same
    record = json.loads((tmp_path / run_dir.RUN_CONFIG).read_text())
    assert record["loop"]["learning_rate"] == 0.01 and record["loop"]["epochs"] == 4
    assert record[run_dir.HISTORY] == [
        {"resumed_after_epoch": 1, "changed": {"--learning_rate": [0.05, 0.01]}},
        {"resumed_after_epoch": 1, "changed": {"--epochs": [1, 4]}},
    ]


def test_the_same_folder_spelled_another_way_resumes(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    config = config_lib.TwoStageConfig(
        model_dir="unused", data=config_lib.DataConfig(dataset="folder:images")
    )
    run_dir.check_run_config(str(tmp_path / "run"), recorded.recorded_settings(config))
    record = json.loads((tmp_path / "run" / run_dir.RUN_CONFIG).read_text())
    assert record["data"]["dataset"] == f"folder:{tmp_path / 'images'}"  # resolved
    for spelling in (f"folder:{tmp_path}/images", "folder:./images/", "folder:images"):
        again = dataclasses.replace(config, data=config_lib.DataConfig(dataset=spelling))
        assert run_dir.check_run_config(str(tmp_path / "run"), recorded.recorded_settings(again))
    other = dataclasses.replace(config, data=config_lib.DataConfig(dataset="folder:elsewhere"))
    with pytest.raises(run_dir.RunDirError, match="--dataset: recorded"):
        run_dir.check_run_config(str(tmp_path / "run"), recorded.recorded_settings(other))


def test_another_kind_is_told_what_to_run_instead(tmp_path):
    run_dir.check_run_config(str(tmp_path), _settings())
    train = recorded.recorded_settings(config_lib.TrainConfig(model_dir="unused"))
    with pytest.raises(run_dir.RunDirError) as error:
        run_dir.check_run_config(str(tmp_path), train)
    message = str(error.value)
    assert f"--flagfile={tmp_path}/flags.txt" in message
    assert f"--genotype={tmp_path}/genotype.json" in message
    assert len(message.replace(str(tmp_path), "RUN")) < 250 and ". " not in message  # a sentence


def test_settings_added_after_a_run_was_recorded_count_at_their_default(tmp_path):
    """A run recorded before a setting existed resumes when the setting is at its
    default (here the one-stage run's lr schedule and multiply-add limit)."""
    settings = recorded.recorded_settings(config_lib.OneStageConfig(model_dir="unused"))
    older = {k: v for k, v in settings.items() if k not in ("lr_schedule", "max_multiply_adds")}
    (tmp_path / run_dir.RUN_CONFIG).write_text(json.dumps(older))
    assert run_dir.check_run_config(str(tmp_path), settings)
    record = json.loads((tmp_path / run_dir.RUN_CONFIG).read_text())
    assert record["lr_schedule"] == "cosine" and run_dir.HISTORY not in record
    (tmp_path / run_dir.RUN_CONFIG).write_text(json.dumps(older))
    other = recorded.recorded_settings(
        config_lib.OneStageConfig(model_dir="unused", lr_schedule="warmup_linear")
    )
    with pytest.raises(run_dir.RunDirError, match="--lr_schedule: recorded 'cosine'"):
        run_dir.check_run_config(str(tmp_path), other)
