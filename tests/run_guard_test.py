"""The run directory's guard: one process per directory, stale temporaries removed, a
failed start undone."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from istanas_tf import export
from istanas_tf.training import run_dir, run_guard


def _tree(root):
    """Every file under ``root`` with its bytes, for byte-identical comparisons."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            file = os.path.join(folder, name)
            with open(file, "rb") as f:
                found[os.path.relpath(file, root)] = f.read()
    return found


def _a_run_directory(root):
    (root / "checkpoints").mkdir(parents=True)
    (root / "run_config.json").write_text('{"kind": "train"}\n')
    (root / "flags.txt").write_text("--epochs=2\n")
    (root / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (root / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (root / "checkpoints" / "ckpt-1.index").write_bytes(b"\x00index")
    return _tree(root)


def _a_failing_start(guard, root):
    guard.acquire()
    (root / "run_config.json").write_text('{"kind": "train", "other": 1}\n')
    (root / "flags.txt").write_text("--epochs=3\n")
    (root / "tensorboard").mkdir()
    (root / "tensorboard" / "events.out").write_bytes(b"new")
    with open(root / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2}\n')
    raise ValueError("--batch_size=4096 is larger than the training split")


def test_a_failed_start_leaves_the_directory_byte_identical(tmp_path):
    root = tmp_path / "run"
    before = _a_run_directory(root)
    with pytest.raises(ValueError, match="--batch_size"):
        with run_guard.RunGuard(str(root)) as guard:
            _a_failing_start(guard, root)
    assert _tree(root) == before
    assert not (root / "tensorboard").exists() and not (root / run_guard.LOCK).exists()


def test_a_failed_start_in_a_new_directory_leaves_nothing(tmp_path):
    root = tmp_path / "new"
    with pytest.raises(ValueError):
        with run_guard.RunGuard(str(root)) as guard:
            guard.acquire()
            run_dir.write_json(str(root / "run_config.json"), {"kind": "train"})
            raise ValueError("refused")
    assert not root.exists()


def test_a_failure_after_a_new_checkpoint_is_left_for_the_resume(tmp_path):
    root = tmp_path / "run"
    _a_run_directory(root)
    with pytest.raises(RuntimeError):
        with run_guard.RunGuard(str(root)) as guard:
            guard.acquire()
            (root / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n')
            (root / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
            raise RuntimeError("diverged at epoch 3")
    assert (root / "metrics.jsonl").read_text().count("epoch") == 2


def test_a_success_keeps_what_the_run_wrote(tmp_path):
    root = tmp_path / "run"
    _a_run_directory(root)
    with run_guard.RunGuard(str(root)) as guard:
        guard.acquire()
        (root / "flags.txt").write_text("--epochs=3\n")
    assert (root / "flags.txt").read_text() == "--epochs=3\n"


def test_a_model_dir_that_is_a_file_names_the_flag(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(run_dir.RunDirError, match=r"--model_dir=.*a_file is a file"):
        with run_guard.RunGuard(str(file)):
            pass


def test_stale_temporaries_go_and_live_ones_stay(tmp_path):
    root = tmp_path / "run"
    _a_run_directory(root)
    (root / "checkpoints" / "ckpt-2_temp").mkdir()
    (root / "checkpoints" / "ckpt-2_temp" / "part-00000").write_bytes(b"half")
    (root / "run_config.json.tmp").write_text("{")
    versions = root / "export" / "istanas"
    host = socket.gethostname()
    # A process that has ended (this short-lived child) and one that lives (this one).
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = versions / f".tmp-3-{host}-{child.stdout.strip()}-0a1b2c3d"
    live = versions / f".tmp-4-{host}-{os.getpid()}-0a1b2c3d"
    elsewhere = versions / ".tmp-5-another-host-1-0a1b2c3d"
    for folder in (dead, live, elsewhere):
        folder.mkdir(parents=True)
    shared = tmp_path / "models" / "istanas"
    shared_dead = shared / dead.name
    shared_dead.mkdir(parents=True)
    with run_guard.RunGuard(str(root), (str(tmp_path / "models"),)) as guard:
        guard.acquire()
        removed = guard.remove_stale_temporaries()
    assert sorted(removed) == sorted(
        str(p)
        for p in (
            root / "checkpoints" / "ckpt-2_temp",
            root / "run_config.json.tmp",
            dead,
            shared_dead,
        )
    )
    assert live.exists() and elsewhere.exists()
    assert (root / "checkpoints" / "ckpt-1.index").exists()
    assert export.stale_temporaries(str(versions)) == []


def test_a_second_process_on_the_directory_is_refused_and_changes_nothing(tmp_path):
    root = tmp_path / "run"
    before = _a_run_directory(root)
    (root / "checkpoints" / "ckpt-2_temp").mkdir()  # the live run's checkpoint being written
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from istanas_tf.training import run_guard
            with run_guard.RunGuard({str(root)!r}) as guard:
                guard.acquire()
                print("locked", flush=True)
                sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_guard.RunDirBusyError, match="in use by another running"):
            with run_guard.RunGuard(str(root)) as guard:
                guard.acquire()
        assert (root / "checkpoints" / "ckpt-2_temp").exists()
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    after = _tree(root)
    after.pop(run_guard.LOCK, None)
    assert after == before
