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
The lock is advisory and local: on filesystems without ``flock`` (some network mounts)
the guard still cleans and rolls back.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil

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
    for folder, dirs, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        for name in dirs + files:
            found.add(os.path.normpath(os.path.join(relative, name)))
    return found


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
        if os.path.exists(self.model_dir) and not os.path.isdir(self.model_dir):
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
        self._existed = os.path.isdir(self.model_dir)
        if self._existed:
            self._before = _files(self.model_dir)
            for name in os.listdir(self.model_dir):
                file = os.path.join(self.model_dir, name)
                if os.path.isfile(file) and os.path.getsize(file) <= _RESTORED_FILE_BYTES:
                    self._contents[name] = _read(file)
        self._checkpoint = self._latest_checkpoint()
        os.makedirs(self.model_dir, exist_ok=True)
        self._lock()
        # Only now: a refused lock must not "restore" files the live process writes.
        self._guarding = True

    def remove_stale_temporaries(self) -> list[str]:
        """Removes what killed runs left half-written (see the module docstring).

        Call it holding the lock (inside the guard), on the chief. Returns what it removed.
        """
        stale = []
        checkpoints = run_dir.path(self.model_dir, run_dir.CHECKPOINTS)
        if os.path.isdir(checkpoints):
            stale += [
                os.path.join(checkpoints, name)
                for name in os.listdir(checkpoints)
                if name.endswith("_temp")
            ]
        for export_dir in self.export_dirs:
            if os.path.isdir(export_dir):
                for model_name in os.listdir(export_dir):
                    stale += export.stale_temporaries(os.path.join(export_dir, model_name))
        stale += [
            os.path.join(self.model_dir, name)
            for name in os.listdir(self.model_dir)
            if name.endswith(".tmp")
        ]
        for path in stale:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        return stale

    def _latest_checkpoint(self) -> str | None:
        index = run_dir.path(self.model_dir, run_dir.CHECKPOINTS, "checkpoint")
        if not os.path.exists(index):
            return None
        with open(index) as f:
            return f.read()

    def _lock(self) -> None:
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
        if not os.path.isdir(self.model_dir):
            return
        if not self._existed:
            shutil.rmtree(self.model_dir, ignore_errors=True)
            return
        # Deepest first, so a new folder is emptied before it is removed.
        for relative in sorted(_files(self.model_dir) - self._before, key=len, reverse=True):
            path = os.path.join(self.model_dir, relative)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        for name, content in self._contents.items():
            file = os.path.join(self.model_dir, name)
            if not os.path.isfile(file) or _read(file) != content:
                run_dir.atomic_write_bytes(file, content)


def _read(file: str) -> bytes:
    with open(file, "rb") as f:
        return f.read()
