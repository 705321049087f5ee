"""The evaluation network in float64 against the record of the code before the speed work.

``tests/golden/eval_parity.npz`` was written by ``tests/golden/make_eval_parity.py`` with
the code at commit f390b2d (Keras' own BatchNormalization, pointwise convs as convs);
see that script for the network, the weights and what is recorded. This test runs the
same script with the current code. In float64 a change of how something is computed
(a fused or reordered sum, a 1x1 conv as a matmul, a drop path at rate 0 that still
multiplies by 1) moves results by a few units of 1e-16 times their scale, amplified by
at most a few orders of magnitude through 5 cells: 1e-12 relative leaves that room,
while any change of what is computed (another eps, momentum, padding, variance) is
orders of magnitude above it.

One change is intended: the running variance is updated with the unbiased batch
variance (PyTorch's), where Keras used the biased one. From the same starting value
``v0`` (momentum 0.9), ``new - 0.9 v0 == (old - 0.9 v0) * n / (n - 1)`` per channel,
with ``n`` = batch x height x width of that BN's input.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
RTOL = 1e-12


def _load_script():
    """tests/golden/make_eval_parity.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "make_eval_parity", GOLDEN / "make_eval_parity.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "eval_parity.npz") as record:
        return dict(record)


@pytest.fixture(scope="module")
def current(script):
    return script.record(script.build())


def _close(actual, expected, scale, what):
    """|actual - expected| <= RTOL * scale, elementwise; scale: the quantity's size."""
    error = np.max(np.abs(np.asarray(actual) - np.asarray(expected)) / scale)
    assert error <= RTOL, f"{what}: relative difference {error:.3g} > {RTOL}"


def test_same_network(golden, current):
    """The same variables and BN layers, and the same BN input sizes: otherwise the
    comparisons below would pair unrelated numbers."""
    for key in ("variables", "grad_size", "small_variables", "bn_layers", "bn_channels", "bn_n"):
        assert golden[key].tolist() == current[key].tolist(), key


@pytest.mark.parametrize("key", ["logits_inference", "logits", "aux_logits", "loss"])
def test_outputs_and_loss(golden, current, key):
    """Relative to the array's largest entry (a logit near 0 has no relative precision
    of its own)."""
    _close(current[key], golden[key], np.max(np.abs(golden[key])), key)


def test_gradient_summaries(golden, current, script):
    """Norms relative to themselves; an inner product with the probe vector p relative
    to its Cauchy-Schwarz bound |g| |p| (it may cancel to near 0); the full small
    gradients relative to their norm."""
    paths = golden["variables"].tolist()
    norms = golden["grad_norm"]
    assert np.all(norms > 0), "a variable without gradient would make its checks vacuous"
    _close(current["grad_norm"], norms, norms, "gradient norms")
    sizes = dict(zip(paths, current["grad_size"], strict=True))
    probe_norms = np.array([np.linalg.norm(script.probe_for(p, sizes[p])) for p in paths])
    _close(current["grad_dot"], golden["grad_dot"], norms * probe_norms, "gradient probes")
    norm_of = dict(zip(paths, norms, strict=True))
    small = golden["small_variables"].tolist()
    scale = np.repeat([norm_of[p] for p in small], [sizes[p] for p in small])
    _close(current["small_gradients"], golden["small_gradients"], scale, "small gradients")


def test_running_statistics(golden, current, script):
    """Running means as before; running variances with the Bessel factor n / (n - 1)
    on the batch part. Both relative to the running variance (a mean may be near 0;
    its rounding is relative to the spread of the values it averages)."""
    channels = golden["bn_channels"]
    v0 = np.concatenate(
        [
            script.value_for(f"{path}/moving_variance", (count,))
            for path, count in zip(golden["bn_layers"].tolist(), channels, strict=True)
        ]
    )
    n = np.repeat(golden["bn_n"], channels).astype(np.float64)
    assert np.all(n > 1) and v0.shape == golden["moving_variance"].shape
    _close(current["moving_mean"], golden["moving_mean"], golden["moving_variance"], "means")
    old = golden["moving_variance"] - 0.9 * v0
    new = current["moving_variance"] - 0.9 * v0
    _close(new, old * n / (n - 1), current["moving_variance"], "variances (Bessel)")
