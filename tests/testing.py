"""A shared test harness for the Keras layer contract, after keras-hub's ``run_layer_test``.

The style guide asks every layer (and model, and optimizer) of the package for:
``__init__(..., **kwargs)`` forwarding the kwargs to Keras; every constructor argument
stored under its own name; ``get_config()`` calling ``super().get_config()`` and adding
exactly the constructor arguments; registration with
``@keras.saving.register_keras_serializable(package="istanas_tf")``.

:func:`run_layer_test` checks one :class:`LayerCase` (a class, constructor kwargs and,
for layers, sample inputs) against that contract and against what the contract is for:
a layer rebuilt from its config, given the original's weights, computes the same thing,
and the layer trains (gradients reach every variable the forward pass uses).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from istanas_tf import operations

PACKAGE = "istanas_tf"

# CIFAR-10 as the tests see it: class names in label order, normalisation statistics in
# [0, 1] pixel units (the DARTS code's values).
CIFAR10_CLASSES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


REPO = pathlib.Path(__file__).resolve().parents[1]


def this_checkout_env(**settings) -> dict[str, str]:
    """The environment for a subprocess that must import this checkout's package (put
    first on ``PYTHONPATH``: the installed one may be another checkout's), plus
    ``settings``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({key: str(value) for key, value in settings.items()})
    return env


def tiny_loop(**settings):
    """A ``LoopConfig`` for a test run: 1 epoch of batch 8, no evaluation, no progress
    bar, unless ``settings`` say otherwise."""
    from istanas_tf.training import config as config_lib

    return config_lib.LoopConfig(
        **{**dict(epochs=1, batch_size=8, eval_steps=0, verbose=False), **settings}
    )


def candidate_bn_affine(network, cell_type: str, node: int) -> set[int]:
    """Oracle: ids of the gamma/beta variables of node ``node``'s candidate ops, in
    every super-net cell of ``cell_type``, found by variable name."""
    return {
        id(v)
        for cell in network.cells
        if ("reduce" if cell.reduction else "normal") == cell_type
        for op in cell.candidates[node]
        for v in op.weights
        if v.name in ("gamma", "beta")
    }


# ``forward(layer, inputs, training) -> tensor or sequence of tensors``.
Forward = Callable[[Any, Sequence[tf.Tensor], bool], Any]


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One class under test, with what it is built from and what it must produce.

    Attributes:
      cls: the class under test.
      init_kwargs: constructor arguments (JSON-like values where possible: the harness
        checks that the config records them).
      input_data: positional call inputs (numpy arrays). ``None`` together with
        ``forward=None``: only the config contract is checked (e.g. optimizers).
      call_kwargs: keyword call arguments of the standard forward pass; numpy arrays
        among them become tensors, other values (e.g. Python supports) pass as they are.
      expected_output_shape: the inference output's shape, or a sequence of shapes
        when the forward pass returns several tensors.
      expected_num_trainable_weights: trainable weight variables after the first call.
      expected_num_non_trainable_weights: non-trainable weight variables likewise.
      forward: replaces ``layer(*inputs, **call_kwargs, training=training)``, e.g. for
        a layer without ``call`` whose output is ``alphas()``.
      build: called on the layer (and on its clone) before the first forward pass, e.g.
        ``SearchNetwork.build_all`` or a dense pass that creates every candidate's weights.
      unused_variables: returns the trainable variables the training forward pass may
        leave unused (e.g. candidate ops off the support); they must get no gradient.
      learning_rate: of the SGD step of the training check.
      id: the pytest id (default: the class name).
    """

    cls: type
    init_kwargs: dict[str, Any]
    input_data: tuple | None = None
    call_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    expected_output_shape: Any = None
    expected_num_trainable_weights: int | None = None
    expected_num_non_trainable_weights: int | None = None
    forward: Forward | None = None
    build: Callable[[Any], Any] | None = None
    unused_variables: Callable[[Any], list] | None = None
    learning_rate: float = 1e-3
    id: str | None = None

    @property
    def config_only(self) -> bool:
        """No inputs and no forward pass: only the config contract applies."""
        return self.input_data is None and self.forward is None

    def __str__(self) -> str:
        return self.id or self.cls.__name__


def run_layer_test(case: LayerCase, package: str = PACKAGE) -> None:
    """Checks one case: config contract, weight counts, clone outputs, a training step.

    Args:
      case: the class, its arguments and its expectations.
      package: the registration package the class must be registered under.
    """
    layer = check_config_contract(case.cls, case.init_kwargs, package)
    if case.config_only:
        return
    if (
        case.expected_num_trainable_weights is None
        or case.expected_num_non_trainable_weights is None
        or case.expected_output_shape is None
    ):
        raise ValueError(
            f"{case}: a case with a forward pass needs expected weight counts "
            "and an expected output shape"
        )
    config = layer.get_config()
    inputs = tuple(tf.convert_to_tensor(x) for x in (case.input_data or ()))
    forward = case.forward or standard_forward(case.call_kwargs)
    if case.build is not None:
        case.build(layer)
    outputs = forward(layer, inputs, False)

    check_weight_counts(
        layer, case.expected_num_trainable_weights, case.expected_num_non_trainable_weights
    )
    check_output_shape(outputs, case.expected_output_shape)
    check_clone_computes_the_same(layer, config, inputs, forward, case.build)
    # Building and calling must not change the config (it describes the constructor).
    assert layer.get_config() == config, (
        f"{type(layer).__name__}.get_config() changed after build and call"
    )
    unused = case.unused_variables(layer) if case.unused_variables is not None else []
    check_training_step(layer, inputs, forward, unused, case.learning_rate)


# ---------------------------------------------------------------------- config contract
def constructor_parameters(cls: type) -> list[str]:
    """The named parameters of ``cls.__init__``, without ``self`` and ``*args/**kwargs``."""
    parameters = inspect.signature(cls.__init__).parameters
    return [
        name
        for name, p in parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def keras_base_config(obj) -> dict[str, Any]:
    """The config Keras' own base class gives ``obj`` (``name``, ``trainable``, ...).

    The nearest class in the MRO that Keras defines and that defines ``get_config``;
    called unbound, so what our classes add is left out.
    """
    for klass in type(obj).__mro__:
        if klass.__module__.split(".")[0] == "keras" and "get_config" in vars(klass):
            return klass.get_config(obj)
    raise AssertionError(f"{type(obj).__name__} does not derive from a Keras class")


def _is_json_like(value) -> bool:
    """Whether a constructor argument is plain JSON data the config can be compared to."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_like(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_like(v) for k, v in value.items())
    return False


def _same_value(recorded, given) -> bool:
    """Whether the config records a given argument: equal, tuples as lists, and floats
    to float32 precision (Keras keeps e.g. learning rates in float32 variables)."""
    if isinstance(given, float) and isinstance(recorded, float):
        return math.isclose(recorded, given, rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(given, (list, tuple)):
        return (
            isinstance(recorded, (list, tuple))
            and len(recorded) == len(given)
            and all(_same_value(r, g) for r, g in zip(recorded, given, strict=True))
        )
    if isinstance(given, dict):
        return (
            isinstance(recorded, dict)
            and recorded.keys() == given.keys()
            and all(_same_value(recorded[k], given[k]) for k in given)
        )
    return type(recorded) is type(given) and recorded == given


def check_config_contract(cls: type, init_kwargs: dict[str, Any], package: str = PACKAGE):
    """Checks registration, kwargs forwarding, attributes and the config round trips.

    Returns:
      The instance built from ``init_kwargs`` (with a harness-chosen name unless the
      kwargs name it), not yet built.
    """
    registered = f"{package}>{cls.__name__}"
    assert keras.saving.get_registered_name(cls) == registered, (
        f"{cls.__name__} is not registered as {registered!r}: decorate it with "
        f"@keras.saving.register_keras_serializable(package={package!r})"
    )
    assert keras.saving.get_registered_object(registered) is cls

    signature = inspect.signature(cls.__init__).parameters.values()
    assert any(p.kind == p.VAR_KEYWORD for p in signature), (
        f"{cls.__name__}.__init__ must take **kwargs and forward them to Keras"
    )
    kwargs = dict(init_kwargs)
    # A distinctive name shows that the kwargs reach Keras' constructor.
    kwargs.setdefault("name", f"{cls.__name__.lower()}_under_test")
    obj = cls(**kwargs)
    assert obj.name == kwargs["name"], (
        f"{cls.__name__} dropped name={kwargs['name']!r}: kwargs are not forwarded"
    )

    parameters = constructor_parameters(cls)
    not_stored = [p for p in parameters if not hasattr(obj, p)]
    assert not not_stored, (
        f"{cls.__name__} does not store constructor arguments under their own names: {not_stored}"
    )

    config = obj.get_config()
    base = keras_base_config(obj)
    expected_keys = set(parameters) | set(base)
    missing, extra = sorted(expected_keys - set(config)), sorted(set(config) - expected_keys)
    assert not missing and not extra, (
        f"{cls.__name__}.get_config() must return the constructor arguments plus Keras' "
        f"base keys {sorted(base)}: missing {missing}, extra {extra}"
    )
    changed = sorted(k for k in base if config[k] != base[k])
    assert not changed, (
        f"{cls.__name__}.get_config() does not keep super().get_config()'s values of {changed}"
    )
    wrong = {
        k: (config[k], v)
        for k, v in kwargs.items()
        if k in config and _is_json_like(v) and not _same_value(config[k], v)
    }
    assert not wrong, (
        f"{cls.__name__}.get_config() does not record the arguments given "
        f"(key: (recorded, given)): {wrong}"
    )

    try:
        text = json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise AssertionError(
            f"{cls.__name__}.get_config() is not JSON-serialisable: {error}"
        ) from error
    loaded = json.loads(text)
    assert loaded == config, (
        f"{cls.__name__}.get_config() changes in a JSON round trip (tuples or numpy "
        f"values?): {config} -> {loaded}"
    )

    # From the JSON form: what a .keras file gives back.
    clone = cls.from_config(loaded)
    assert type(clone) is cls
    assert clone.get_config() == config, (
        f"{cls.__name__}.from_config(config).get_config() differs from config"
    )

    serialized = keras.saving.serialize_keras_object(obj)
    assert serialized["registered_name"] == registered
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(restored) is cls
    assert restored.get_config() == config, (
        f"{cls.__name__}: serialize/deserialize_keras_object changes the config"
    )
    return obj


# ---------------------------------------------------------------------- forward passes
def _to_tensors(structure):
    """Numpy arrays in ``structure`` as tensors; Python values (supports) left alone."""
    return tf.nest.map_structure(
        lambda x: tf.convert_to_tensor(x) if isinstance(x, np.ndarray) else x, structure
    )


def standard_forward(call_kwargs: dict[str, Any]) -> Forward:
    """``layer(*inputs, **call_kwargs, training=training)``; ``training`` only where
    ``call`` takes it."""
    call_kwargs = _to_tensors(call_kwargs)

    def forward(layer, inputs, training):
        kwargs = dict(call_kwargs)
        if "training" in inspect.signature(layer.call).parameters:
            kwargs["training"] = training
        return layer(*inputs, **kwargs)

    return forward


def _flat_outputs(outputs) -> list[tf.Tensor]:
    """A forward pass's output(s) as a flat list of tensors."""
    return [tf.convert_to_tensor(o) for o in tf.nest.flatten(outputs)]


def _shapes(structure):
    """A tensor's shape as a tuple, or a list of them for several outputs."""
    if isinstance(structure, (list, tuple)) and not all(
        isinstance(d, (int, type(None))) for d in structure
    ):
        return [tuple(s) if isinstance(s, (list, tuple)) else tuple(s.shape) for s in structure]
    return tuple(structure) if isinstance(structure, (list, tuple)) else tuple(structure.shape)


def _listing(paths: list[str], limit: int = 8) -> str:
    """The first ``limit`` variable paths and how many more (a super-net has hundreds)."""
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return f"{paths[:limit]}{more}"


def check_weight_counts(layer, trainable: int, non_trainable: int) -> None:
    """Numbers of trainable and non-trainable weight variables (not parameters)."""
    actual = (len(layer.trainable_weights), len(layer.non_trainable_weights))
    assert actual == (trainable, non_trainable), (
        f"{type(layer).__name__}: expected {trainable} trainable and {non_trainable} "
        f"non-trainable weights, got {actual[0]} and {actual[1]}: "
        f"trainable {_listing([v.path for v in layer.trainable_weights])}, "
        f"non-trainable {_listing([v.path for v in layer.non_trainable_weights])}"
    )


def check_output_shape(outputs, expected) -> None:
    """The output's shape, or each output's shape in order."""
    assert _shapes(outputs) == _shapes(expected), (
        f"expected output shape {_shapes(expected)}, got {_shapes(outputs)}"
    )


def check_clone_computes_the_same(
    layer, config: dict[str, Any], inputs, forward: Forward, build: Callable | None
) -> None:
    """``from_config`` + the original's weights -> the same inference output (1e-6) and
    the same variable paths (checkpoints are keyed by them)."""
    clone = type(layer).from_config(config)
    if build is not None:
        build(clone)
    forward(clone, inputs, False)
    assert [v.path for v in clone.weights] == [v.path for v in layer.weights], (
        f"{type(layer).__name__}: the clone's variable paths differ from the original's"
    )
    clone.set_weights(layer.get_weights())
    expected = _flat_outputs(forward(layer, inputs, False))
    actual = _flat_outputs(forward(clone, inputs, False))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- training
def _loss(outputs) -> tf.Tensor:
    """mean(output ** 2), summed over the outputs when there are several."""
    return tf.add_n(
        [tf.reduce_mean(tf.square(tf.cast(o, tf.float32))) for o in _flat_outputs(outputs)]
    )


def check_training_step(
    layer, inputs, forward: Forward, unused: list, learning_rate: float = 1e-3
) -> None:
    """In training mode: gradients reach every trainable variable except the declared
    unused ones (which get none), and one SGD step lowers the loss or moves every
    used variable."""
    variables = layer.trainable_variables
    unused_ids = {id(v) for v in unused}
    known = {id(v) for v in variables}
    assert unused_ids <= known, "unused_variables returned non-trainable or foreign variables"
    with tf.GradientTape() as tape:
        loss = _loss(forward(layer, inputs, True))
    gradients = tape.gradient(loss, variables)
    no_gradient = [
        v.path
        for v, g in zip(variables, gradients, strict=True)
        if g is None and id(v) not in unused_ids
    ]
    assert not no_gradient, f"{type(layer).__name__}: no gradient for {_listing(no_gradient)}"
    reached = [
        v.path
        for v, g in zip(variables, gradients, strict=True)
        if g is not None and id(v) in unused_ids
    ]
    assert not reached, (
        f"{type(layer).__name__}: variables declared unused have gradients: {_listing(reached)}"
    )

    pairs = [(g, v) for g, v in zip(gradients, variables, strict=True) if g is not None]
    before = [v.numpy().copy() for _, v in pairs]
    if pairs:
        keras.optimizers.SGD(learning_rate).apply([g for g, _ in pairs], [v for _, v in pairs])
    loss_after = _loss(forward(layer, inputs, True))
    unchanged = [
        v.path for (_, v), old in zip(pairs, before, strict=True) if np.array_equal(v.numpy(), old)
    ]
    assert float(loss_after) < float(loss) or not unchanged, (
        f"{type(layer).__name__}: one SGD step neither lowered the loss ({float(loss)} -> "
        f"{float(loss_after)}) nor changed {_listing(unchanged)}"
    )


def record_symbolic_builds(monkeypatch) -> list[str]:
    """From now on, lists the layers Keras builds by tracing their ``call`` on symbolic
    inputs (what ``Layer._maybe_build`` does for a layer with sublayers and no
    ``build``): the cost ``build`` methods exist to avoid."""
    import keras.src.backend as keras_backend

    traced = []
    trace = keras_backend.compute_output_spec

    def recording(function, *args, **kwargs):
        traced.append(getattr(getattr(function, "__self__", None), "name", repr(function)))
        return trace(function, *args, **kwargs)

    monkeypatch.setattr(keras_backend, "compute_output_spec", recording)
    return traced


def variables_by_creation(model) -> list[tuple[str, np.ndarray]]:
    """``(path, value)`` of every variable of ``model``, in the order they were created
    (TF numbers each variable's handle from one counter)."""
    return [
        (v.path, keras.ops.convert_to_numpy(v))
        for v in sorted(model.variables, key=lambda v: int(v.value._unique_id.rsplit("_", 1)[1]))
    ]


# The layer classes of the candidate ops whose build can be checked against Keras' build
# by running call. FactorizedReduce cannot build by running (its call reads its two 1x1
# convs' kernels as one 2x2 conv, never calling them); operations_test checks its build
# and numbers against the version that called them.
OPS_WITH_BUILD = tuple(
    getattr(operations, name) for name in ("ReLUConvBN", "SepConv", "DilConv", "Pool", "Identity")
)


def build_by_run(monkeypatch, *classes) -> None:
    """Layers of ``classes`` made from now on build as Keras builds a layer without
    ``build``: by tracing ``call`` on symbolic inputs, then the eager call creates the
    weights. The reference that ``build`` methods must reproduce."""
    for cls in classes:
        monkeypatch.setattr(cls, "build", keras.layers.Layer.build)
