"""Evaluation networks: auxiliary head, config round trip, refused settings."""

import numpy as np
import pytest
import tensorflow as tf
from testing import record_symbolic_builds

from istanas_tf import genotypes, networks


def test_auxiliary_logits_only_in_training():
    network = networks.build_network("cifar", "DARTS_V1", 8, 5, 10, 32, auxiliary=True)
    x = tf.random.normal([2, 32, 32, 3])
    logits, aux_logits = network(x, training=True)
    assert logits.shape == (2, 10) and aux_logits.shape == (2, 10)
    inference = network(x, training=False)
    assert isinstance(inference, tf.Tensor) and inference.shape == (2, 10)
    without_head = networks.build_network("cifar", "DARTS_V1", 8, 5, 10, 32)
    assert isinstance(without_head(x, training=True), tf.Tensor)


def test_evaluation_networks_build_without_tracing_any_layer(monkeypatch):
    """Every layer with sublayers (ops, cells, auxiliary head) has a ``build``: Keras
    never traces a call on symbolic inputs to build one."""
    traced = record_symbolic_builds(monkeypatch)
    networks.build_network(
        "cifar", "DARTS_V2", 4, 5, 10, 32, auxiliary=True, bn_after_param_free_ops=True
    )
    networks.build_network("imagenet", "ISTA_onestage", 4, 3, 10, 224, auxiliary=True)
    assert traced == []


def test_network_config_round_trip():
    network = networks.build_network(
        "cifar", "ISTA_twostage", 8, 5, 10, 32, auxiliary=True, drop_path_rate=0.1
    )
    clone = networks.NetworkCIFAR.from_config(network.get_config())
    clone(tf.zeros([1, 32, 32, 3]))
    clone(tf.zeros([2, 32, 32, 3]), training=True)
    clone.set_weights(network.get_weights())
    x = tf.random.normal([2, 32, 32, 3])
    np.testing.assert_allclose(
        clone(x, training=False), network(x, training=False), rtol=1e-5, atol=1e-5
    )
    assert clone.genotype == network.genotype


def test_fewer_than_three_layers_is_refused():
    with pytest.raises(ValueError, match="layers must be at least 3.*got 2"):
        networks.NetworkCIFAR("DARTS_V2", 16, 2, 10)


def test_unknown_genotype_name_lists_valid_names():
    with pytest.raises(genotypes.GenotypeError, match="valid names: ISTA_twostage"):
        networks.NetworkCIFAR("ISTA_threestage", 16, 8, 10)
