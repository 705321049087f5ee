"""Nothing lost, nothing half-written: one process per run directory, and a start that
fails leaves the directory as it found it.

:class:`RunGuard` wraps every run (``with RunGuard(model_dir) as guard: ...``):

* it refuses a ``--model_dir`` that names a file;
* it holds an exclusive lock on ``<model_dir>/.lock`` (``fcntl.flock``) while the run
  lives, so a second process on the same directory is refused instead of interleaving
  its checkpoints with the first one's;
* holding the lock, it removes what a killed run left half-written: the
  ``checkpoints/ckpt-N_temp`` folders of a checkpoint being saved and the ``*.tmp``
  files of an atomic write (no live process can be writing them: the lock says none
  runs here), and the ``<export_dir>/<name>/.tmp-*`` folders of exports whose process
  has ended (``export.stale_temporaries``; an export folder may be shared);
* it remembers the directory as it was (every file's name, the bytes of the small files
  at its top); when the run raises before its first checkpoint of this process, it puts
  the directory back: files the start created are removed, files it rewrote
  (``run_config.json``, ``flags.txt``, ``metrics.jsonl``, ...) get their old bytes. A
  refused or failed start thus changes nothing, and the corrected command runs. After a
  checkpoint the run has made progress; then a failure leaves it for the next resume.

Only the chief of a multi-worker run writes the run directory, so only the chief guards
it: ``runtime.start`` calls :meth:`RunGuard.acquire` there, once the chief is known (the
other workers share the directory and must neither lock it nor undo the chief's files).
All of it goes through ``tf.io.gfile`` (a run directory may be ``gs://...``), except the
lock: it is advisory and local. On a remote filesystem, or one without ``flock`` (some
network mounts), the guard still cleans and rolls back but does not lock.
"""

from __future__ import annotations

import errno
import fcntl
import os

import tensorflow as tf
from absl import logging

from istanas_tf import export
from istanas_tf.training import run_dir

LOCK = ".lock"
# Top-level files up to this size are kept in memory to be restored (the json files,
# flags.txt, metrics.jsonl, diagrams); larger ones are never rewritten by a start.
_RESTORED_FILE_BYTES = 4 << 20


class RunDirBusyError(run_dir.RunDirError):
    """Another live process holds the run directory."""


def _files(root: str) -> set[str]:
    """Every file and folder under ``root``, as paths relative to it."""
    found = set()
    for folder, dirs, files in tf.io.gfile.walk(root):
        relative = folder[len(root) :].strip("/")
        for name in dirs + files:
            found.add(f"{relative}/{name.rstrip('/')}" if relative else name.rstrip("/"))
    return found


def _is_local(path: str) -> bool:
    return "://" not in path


def _remove(path: str) -> None:
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


class RunGuard:
    """The run directory's lock, stale-temporary cleanup and rollback of a failed start.

    Args:
      model_dir: the run directory (need not exist yet).
      export_dirs: other folders whose ``<name>/.tmp-*`` export temporaries belong to
        this run (``--export_dir``); ``<model_dir>/export`` is always one.
    """

    def __init__(self, model_dir: str, export_dirs: tuple[str, ...] = ()):
        self.model_dir = model_dir
        self.export_dirs = (run_dir.path(model_dir, run_dir.EXPORT), *export_dirs)
        self._lock_file = None
        self._existed = None
        self._before: set[str] = set()
        self._contents: dict[str, bytes] = {}
        self._checkpoint = None
        self._guarding = False

    def __enter__(self) -> RunGuard:
        if tf.io.gfile.exists(self.model_dir) and not tf.io.gfile.isdir(self.model_dir):
            raise run_dir.RunDirError(
                f"--model_dir={self.model_dir} is a file; pass a directory (new or a run's)"
            )
        return self

    def __exit__(self, error_type, error, traceback) -> bool:
        try:
            if error_type is not None and self._guarding:
                if self._latest_checkpoint() == self._checkpoint:
                    self._rollback()
        finally:
            self._unlock()
        return False

    def acquire(self) -> None:
        """On the chief, before the start writes anything: remembers the directory as it
        is and takes the lock (creating the directory if needed).

        Raises:
          RunDirBusyError: another live process holds the directory.
        """
        self._existed = tf.io.gfile.isdir(self.model_dir)
        if self._existed:
            self._before = _files(self.model_dir)
            for name in tf.io.gfile.listdir(self.model_dir):
                file = os.path.join(self.model_dir, name.rstrip("/"))
                if tf.io.gfile.isdir(file):
                    continue
                if tf.io.gfile.stat(file).length <= _RESTORED_FILE_BYTES:
                    self._contents[name] = _read(file)
        self._checkpoint = self._latest_checkpoint()
        tf.io.gfile.makedirs(self.model_dir)
        self._lock()
        # Only now: a refused lock must not "restore" files the live process writes.
        self._guarding = True

    def remove_stale_temporaries(self) -> list[str]:
        """Removes what killed runs left half-written (see the module docstring).

        Call it holding the lock (inside the guard), on the chief. Returns what it removed.
        """
        stale = []
        checkpoints = run_dir.path(self.model_dir, run_dir.CHECKPOINTS)
        if tf.io.gfile.isdir(checkpoints):
            stale += [
                os.path.join(checkpoints, name.rstrip("/"))
                for name in tf.io.gfile.listdir(checkpoints)
                if name.rstrip("/").endswith("_temp")
            ]
        for export_dir in self.export_dirs:
            # Exports are local (they need an atomic rename), so is their cleanup.
            if _is_local(export_dir) and os.path.isdir(export_dir):
                for model_name in os.listdir(export_dir):
                    stale += export.stale_temporaries(os.path.join(export_dir, model_name))
        stale += [
            os.path.join(self.model_dir, name)
            for name in tf.io.gfile.listdir(self.model_dir)
            if name.endswith(".tmp")
        ]
        for path in stale:
            _remove(path)
        return stale

    def _latest_checkpoint(self) -> str | None:
        index = run_dir.path(self.model_dir, run_dir.CHECKPOINTS, "checkpoint")
        if not tf.io.gfile.exists(index):
            return None
        return _read(index)

    def _lock(self) -> None:
        if not _is_local(self.model_dir):
            logging.info("%s is not a local path: the run directory is not locked", self.model_dir)
            return
        self._lock_file = open(run_dir.path(self.model_dir, LOCK), "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                self._lock_file.close()
                self._lock_file = None
                raise RunDirBusyError(
                    f"--model_dir={self.model_dir} is in use by another running process; "
                    "wait for it to end (or stop it), or use another --model_dir"
                ) from None
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise  # no flock on this filesystem: run unlocked, still guarded

    def _unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _rollback(self) -> None:
        """Puts the run directory back as :meth:`__enter__` found it."""
        if not tf.io.gfile.isdir(self.model_dir):
            return
        if not self._existed:
            tf.io.gfile.rmtree(self.model_dir)
            return
        # Deepest first, so a new folder is emptied before it is removed.
        for relative in sorted(_files(self.model_dir) - self._before, key=len, reverse=True):
            _remove(os.path.join(self.model_dir, relative))
        for name, content in self._contents.items():
            file = os.path.join(self.model_dir, name)
            if not tf.io.gfile.exists(file) or _read(file) != content:
                run_dir.atomic_write_bytes(file, content)


def _read(file: str) -> bytes:
    with tf.io.gfile.GFile(file, "rb") as f:
        return f.read()
