"""TensorBoard as Keras lays it out: runs per split, shared tags, the architecture."""

import types

import numpy as np
import tensorflow as tf

from istanas_tf import genotypes
from istanas_tf.training import config as config_lib
from istanas_tf.training import recorded, summaries


def _tags(folder):
    """{tag: plugin name} of every summary in the event files under ``folder``."""
    found = {}
    for events in tf.io.gfile.glob(f"{folder}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(events):
            for value in event.summary.value:
                found[value.tag] = value.metadata.plugin_data.plugin_name
    return found


def test_every_mode_maps_its_row_to_the_same_tags():
    two_stage = {"epoch": 3, "loss": 2.1, "accuracy": 0.2, "val_loss": 2.2, "lr": 0.02}
    retrain = {"epoch": 3, "loss": 2.1, "top1": 0.2, "top5": 0.6, "test_loss": 2.3}
    one_stage = {"epoch": 3, "loss": 2.1, "accuracy": 0.2, "test_accuracy": 0.3}
    assert summaries.scalars_by_run(two_stage) == {
        "train": {"epoch_loss": 2.1, "epoch_accuracy": 0.2, "epoch_learning_rate": 0.02},
        "validation": {"epoch_loss": 2.2},
    }
    assert summaries.scalars_by_run(retrain) == {
        "train": {"epoch_loss": 2.1, "epoch_accuracy": 0.2, "epoch_top5_accuracy": 0.6},
        "test": {"epoch_loss": 2.3},
    }
    assert summaries.scalars_by_run(one_stage)["test"] == {"epoch_accuracy": 0.3}
    assert summaries.scalars_by_run({"support_changed": True, "frozen": {}}) == {}


def _fake_search_model(method):
    rng = np.random.default_rng(0)
    z = [rng.normal(size=genotypes.num_candidates(j)) for j in range(genotypes.STEPS)]
    softmax = [np.full(genotypes.num_candidates(j), 1 / 7) for j in range(genotypes.STEPS)]
    architecture = types.SimpleNamespace(alphas=lambda: [tf.constant(a) for a in softmax])
    return types.SimpleNamespace(
        config=types.SimpleNamespace(method=method),
        z_values=lambda cell_type: z,
        architectures={"normal": architecture, "reduce": architecture},
    )


def test_search_epoch_writes_splits_heatmaps_shares_and_hparams(tmp_path):
    writers = summaries.Writers(str(tmp_path), chief=True)
    settings = recorded.recorded_settings(config_lib.TwoStageConfig(model_dir="x"))
    summaries.write_hparams(writers, settings)
    row = {"epoch": 1, "loss": 2.0, "accuracy": 0.1, "val_loss": 2.1, "val_accuracy": 0.1}
    summaries.write_epoch(writers, {**row, "genotype": {}}, 1, _fake_search_model("ista"))
    train, validation = _tags(tmp_path / "train"), _tags(tmp_path / "validation")
    assert {"epoch_loss", "epoch_accuracy"} <= set(train) & set(validation)
    assert train["architecture/normal"] == "images"
    assert train["architecture/reduce/node3/node2/sep_conv_3x3"] == "scalars"
    assert "abs_z/normal/node0" in train and train["genotype"] == "text"
    assert "hparams" in train.values()


def test_darts_logs_its_softmax_the_same_way(tmp_path):
    writers = summaries.Writers(str(tmp_path), chief=True)
    summaries.write_epoch(writers, {"epoch": 1, "loss": 2.0}, 1, _fake_search_model("darts"))
    train = _tags(tmp_path / "train")
    assert train["architecture/normal"] == "images" and "abs_z/normal/node0" not in train
    assert train["architecture/normal/node0/c_{k-2}/skip_connect"] == "scalars"


def test_the_heatmap_has_a_fixed_colour_scale():
    shares = [np.zeros(genotypes.num_candidates(j)) for j in range(genotypes.STEPS)]
    empty = summaries.architecture_heatmap(shares, "epoch 1")
    shares[0][:] = 1.0
    full = summaries.architecture_heatmap(shares, "epoch 1")
    assert empty.shape == full.shape and empty.dtype == np.uint8 and empty.shape[-1] == 3
    # Node 0 at share 1 is drawn in another colour than at 0; the rest is unchanged in
    # colour (a per-image rescaling would have changed every cell).
    changed = np.any(empty != full, axis=-1)[0]
    assert 0 < changed.mean() < 0.5
