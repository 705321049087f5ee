"""Host memory that the C allocator holds free, given back to the system while a new
trace's first call runs.

A traced step's first call runs TensorFlow's graph optimiser (grappler) before the step
itself. Grappler's temporaries (~100 MB for the C = 16, 8-cell search step) are freed
when it finishes, but glibc's ``malloc`` keeps freed memory inside its arenas, and the
step's tensors then come from other threads' arenas and TensorFlow's allocator, so the
process's peak resident memory is raised by memory nobody uses. ``malloc_trim`` returns
free pages inside the arenas to the system; :func:`returning_freed_memory` calls it from
a background thread while a block runs (the first call is one C++ call: nothing can run
between its optimisation and its execution on the calling thread).

Only where the C library has ``malloc_trim`` (glibc, i.e. Linux); elsewhere the context
does nothing. Measured in WORKSPACE.md (section "Against the published code on this
machine; the first call's freed memory returned").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Callable, Iterator

# How often the background thread trims while a block runs. Each trim walks the free
# lists of every arena; grappler's passes take seconds, so 50 ms catches its memory
# early at ~100 trims per first call (no cost measured, WORKSPACE.md).
TRIM_PERIOD_S = 0.05


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim(pad)``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def available() -> bool:
    """Whether this process's C library can give freed memory back (glibc)."""
    return _malloc_trim() is not None


@contextlib.contextmanager
def returning_freed_memory(period_s: float = TRIM_PERIOD_S) -> Iterator[None]:
    """Runs the block while a background thread returns the C allocator's free pages to
    the system every ``period_s`` seconds, and once more at the end.

    Meant for the first call of a traced function (see the module docstring); the values
    the block computes are untouched (``malloc_trim`` only releases pages no allocation
    holds). A no-op without glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        yield
        return
    stop = threading.Event()

    def trim_until_stopped():
        # ctypes releases the GIL around the call, so the block's Python code runs on.
        while not stop.wait(period_s):
            trim(0)

    thread = threading.Thread(target=trim_until_stopped, name="malloc_trim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        trim(0)
