"""Writes (or recomputes) the float64 golden record of a small evaluation network.

The record pins what the CIFAR evaluation network computes in float64, so that speed
work (fused BatchNorm, pointwise convs as matmuls, drop path at rate 0) can be checked
against the code before it. ``tests/eval_parity_test.py`` imports this file and calls
:func:`record` with the current code; the committed ``eval_parity.npz`` was written by
the code at commit f390b2d (Keras' own BatchNormalization):

    git clone -q REPO /tmp/old && git -C /tmp/old checkout f390b2d
    PYTHONPATH=/tmp/old python tests/golden/make_eval_parity.py tests/golden/eval_parity.npz

The network: ``build_network("cifar", "ISTA_twostage", C=8, 5 cells, 10 classes,
32x32 images, auxiliary=True)`` under the float64 dtype policy (32x32 is the smallest
CIFAR size whose auxiliary head has a valid input: 8x8 after the two reductions). Every
float variable gets values drawn from a numpy RNG seeded by its path (CRC-32), drawn
flat and reshaped, so a value does not depend on initializers, on the other variables,
or on a kernel's shape (a 1x1 conv kernel and the same matrix as a matmul weight get
the same numbers). Drop path rate 0. The running statistics start from random values
(not 0/1), so that the inference pass also tests their use.

Recorded, all in float64, eagerly:

- ``logits_inference``: ``network(images, training=False)`` before any training pass;
- ``logits``, ``aux_logits``: ``network(images, training=True)``;
- ``loss``: cross-entropy + 0.4 * auxiliary cross-entropy (the train_step's loss; it
  computes it in float32, so the record computes the same formula in float64);
- ``variables`` (trainable, sorted by path), with per variable the gradient's size
  (``grad_size``), norm (``grad_norm``) and inner product with a fixed random vector
  seeded by the path (``grad_dot``); ``small_gradients``: the full gradients, concatenated, of the
  ``small_variables`` (at most :data:`FULL_SIZE` values);
- ``bn_layers`` (sorted by path) with ``bn_channels`` and ``bn_n``, the values per
  channel of each one's input in the training pass (batch x height x width), and
  ``moving_mean`` and ``moving_variance`` after that pass, concatenated over the
  layers (their values before it are :func:`value_for`'s).

Arrays are concatenated rather than one npz member per variable: the file stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import zlib

import keras
import numpy as np
import tensorflow as tf

CHANNELS, CELLS, CLASSES, IMAGE_SIZE, BATCH = 8, 5, 10, 32, 4
AUXILIARY_WEIGHT = 0.4
FULL_SIZE = 256  # gradients of at most this many values are stored in full
BN_SUFFIXES = ("/gamma", "/beta", "/moving_mean", "/moving_variance")


def _rng(path: str, salt: int = 0) -> np.random.Generator:
    """An RNG that depends only on a variable's path (and a salt per use)."""
    return np.random.default_rng([zlib.crc32(path.encode()), salt])


def value_for(path: str, shape) -> np.ndarray:
    """Deterministic float64 values for the variable at ``path``.

    BN scales U(0.5, 1.5), running variances U(0.5, 2), shifts, biases and running
    means N(0, 0.2); kernels N(0, 1 / fan_in) with fan_in = size / last dim (the same
    for a 1x1 conv kernel and its matrix).
    """
    size = int(np.prod(shape, dtype=np.int64))
    rng = _rng(path)
    if path.endswith("/drop_path_rate"):
        flat = np.zeros(size)
    elif path.endswith("/gamma"):
        flat = rng.uniform(0.5, 1.5, size)
    elif path.endswith("/moving_variance"):
        flat = rng.uniform(0.5, 2.0, size)
    elif len(shape) <= 1:
        flat = rng.normal(0.0, 0.2, size)
    else:
        flat = rng.normal(0.0, 1.0, size) / np.sqrt(size / shape[-1])
    return flat.reshape(shape)


def probe_for(path: str, size: int) -> np.ndarray:
    """The fixed random vector a gradient is projected on (flat, unit variance)."""
    return _rng(path, salt=1).normal(size=size)


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """Images N(0, 1) (NHWC) and labels."""
    rng = np.random.default_rng(2024)
    images = rng.normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3))
    return images, rng.integers(0, CLASSES, size=BATCH)


@contextlib.contextmanager
def float64_policy():
    """Layers made in this scope compute and keep their variables in float64."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build():
    """The network, built in float64, with :func:`value_for` in every float variable."""
    from istanas_tf import networks

    with float64_policy():
        network = networks.build_network(
            "cifar",
            "ISTA_twostage",
            CHANNELS,
            CELLS,
            CLASSES,
            IMAGE_SIZE,
            auxiliary=True,
            bn_after_param_free_ops=False,
            seed=0,
            name="network",
        )
    for variable in network.variables:
        if variable.dtype.startswith("float"):
            assert variable.dtype == "float64", (variable.path, variable.dtype)
            variable.assign(value_for(variable.path, tuple(variable.shape)))
    return network


def batch_norms(network) -> list:
    """The network's BatchNormalization layers (ours derive from Keras')."""
    return [
        layer
        for layer in network._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _bn_path(layer) -> str:
    """A BN layer's variable path prefix, e.g. ``network/cell0/preprocess0/bn``."""
    return layer.moving_mean.path[: -len("/moving_mean")]


def _cross_entropy(labels, logits) -> tf.Tensor:
    """Mean cross-entropy, in the logits' precision."""
    picked = tf.gather(logits, labels, batch_dims=1)
    return tf.reduce_mean(tf.reduce_logsumexp(logits, axis=-1) - picked)


def _counting(call, path: str, counts: dict[str, int]):
    """``call`` that first records its input's values per channel in ``counts[path]``."""

    def counted(x, *args, **kwargs):
        counts[path] = int(np.prod(x.shape[:-1]))
        return call(x, *args, **kwargs)

    return counted


def record(network) -> dict[str, np.ndarray]:
    """Runs the passes described in the module docstring; returns the record."""
    images, labels = inputs()
    images = tf.constant(images, tf.float64)
    out: dict[str, np.ndarray] = {}
    bns = sorted(batch_norms(network), key=_bn_path)
    out["logits_inference"] = network(images, training=False).numpy()

    # Count each BN's values per channel in the training pass (its input's shape).
    counts: dict[str, int] = {}
    for layer in bns:
        layer.call = _counting(layer.call, _bn_path(layer), counts)
    variables = sorted(network.trainable_variables, key=lambda v: v.path)
    try:
        with tf.GradientTape() as tape:
            logits, aux_logits = network(images, training=True)
            loss = _cross_entropy(labels, logits) + AUXILIARY_WEIGHT * _cross_entropy(
                labels, aux_logits
            )
        gradients = tape.gradient(loss, variables)
    finally:
        for layer in bns:
            del layer.call  # back to the class's method
    assert logits.dtype == tf.float64 and loss.dtype == tf.float64
    out["logits"], out["aux_logits"], out["loss"] = logits.numpy(), aux_logits.numpy(), loss.numpy()

    flat = [g.numpy().ravel() for g in gradients]
    out["variables"] = np.array([v.path for v in variables])
    out["grad_size"] = np.array([g.size for g in flat])
    out["grad_norm"] = np.array([np.linalg.norm(g) for g in flat])
    out["grad_dot"] = np.array(
        [probe_for(v.path, g.size) @ g for v, g in zip(variables, flat, strict=True)]
    )
    small = [g.size <= FULL_SIZE for g in flat]
    out["small_variables"] = np.array([v.path for v, s in zip(variables, small) if s])
    out["small_gradients"] = np.concatenate([g for g, s in zip(flat, small) if s])

    out["bn_layers"] = np.array([_bn_path(layer) for layer in bns])
    out["bn_n"] = np.array([counts[_bn_path(layer)] for layer in bns])
    out["bn_channels"] = np.array([layer.moving_mean.shape[0] for layer in bns])
    out["moving_mean"] = np.concatenate([layer.moving_mean.numpy() for layer in bns])
    out["moving_variance"] = np.concatenate([layer.moving_variance.numpy() for layer in bns])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the .npz file to write")
    args = parser.parse_args()
    np.savez_compressed(args.output, **record(build()))


if __name__ == "__main__":
    main()
