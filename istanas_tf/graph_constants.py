"""Tensors made once per traced graph, shared by every op in it that needs them.

Code that runs once per variable or per layer (an optimizer's ``update_step``, a
layer's ``call``) traces its constants once per call: thousands of identical ``Const``
ops in a super-net's step, each costing ~0.5 ms to trace (grappler merges them again
at the first call, after the cost is paid).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import tensorflow as tf

# Per traced graph: key -> weak reference to the tensor made for it.
_GRAPH_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def once_per_graph(key: Hashable, make: Callable[[], tf.Tensor]) -> tf.Tensor:
    """``make()``, made once per traced graph and ``key``; eager, ``make()`` each call.

    ``key`` must name everything the tensor depends on, its device included where
    several devices trace into one graph (a ``MirroredStrategy`` step). It is made
    outside the caller's control dependencies. The cache holds the graph and the
    tensors weakly (a tensor holds its graph), so it keeps no trace alive.
    """
    if tf.executing_eagerly():
        return make()
    cache = _GRAPH_TENSORS.setdefault(tf.compat.v1.get_default_graph(), {})
    tensor = cache[key]() if key in cache else None
    if tensor is None:
        # Shared by later callers: none of this caller's control dependencies.
        with tf.control_dependencies(None):
            tensor = make()
        cache[key] = weakref.ref(tensor)
    return tensor
