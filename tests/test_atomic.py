"""The one atomic writer (services/io/atomic.py): fsync of file and directory, crash safety, atomic
replacement of an existing file or directory."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.io import atomic
from services.io.atomic import (
    TEMPORARY,
    atomic_directory,
    atomic_file,
    create_once,
    sweep_temporaries,
    write_atomically,
)
from services.local.natsauth import write_secret


@pytest.fixture
def fsynced(monkeypatch) -> list[Path]:
    """Paths handed to os.fsync, in order (resolved from the descriptor when it is synced)."""
    calls: list[Path] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def hidden_leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob(".*tmp-*"))


@pytest.mark.unit
def test_atomic_file_fsyncs_the_file_before_the_rename_and_then_the_directory(tmp_path, fsynced):
    target = tmp_path / "out" / "a.json"
    with atomic_file(target) as tmp:
        tmp.write_text("whole")
        assert TEMPORARY.match(tmp.name) and tmp.parent == target.parent
    assert target.read_text() == "whole"
    assert len(fsynced) == 2
    assert TEMPORARY.match(fsynced[0].name) and fsynced[0].parent == target.parent.resolve()
    assert fsynced[1] == target.parent.resolve()


@pytest.mark.unit
def test_write_atomically_and_create_once_fsync_file_and_directory(tmp_path, fsynced):
    write_atomically(tmp_path / "t.toml", "a = 1\n")
    assert (tmp_path / "t.toml").read_text() == "a = 1\n"
    assert [p == tmp_path.resolve() for p in fsynced] == [False, True]
    fsynced.clear()
    assert create_once(tmp_path / "once", b"first")
    assert not create_once(tmp_path / "once", b"second")
    assert (tmp_path / "once").read_bytes() == b"first"
    assert [p == tmp_path.resolve() for p in fsynced] == [False, True, False]
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.unit
def test_atomic_directory_fsyncs_every_file_and_folder_and_the_parent(tmp_path, fsynced):
    target = tmp_path / "store.zarr"
    with atomic_directory(target) as tmp:
        (tmp / "0" / "c").mkdir(parents=True)
        (tmp / "zarr.json").write_text("{}")
        (tmp / "0" / "c" / "0").write_bytes(b"chunk")
    written = tmp.resolve()
    inside = {p.relative_to(written).as_posix() for p in fsynced if p.is_relative_to(written)}
    assert inside == {".", "0", "0/c", "0/c/0", "zarr.json"}
    assert len(fsynced) == len(inside) + 1
    assert fsynced[-1] == tmp_path.resolve()  # the rename itself is made durable last
    assert sorted(p.name for p in target.rglob("*")) == ["0", "0", "c", "zarr.json"]


@pytest.mark.unit
def test_fsync_can_be_left_out_for_directories(tmp_path, fsynced):
    with atomic_directory(tmp_path / "d", fsync=False) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("x")
    assert fsynced == [] and (tmp_path / "d" / "f").read_text() == "x"


@pytest.mark.unit
def test_an_error_mid_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    store = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError), atomic_directory(store) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and not store.exists()
    assert hidden_leftovers(tmp_path) == []


CRASH = """
import os, sys
from pathlib import Path
from services.io.atomic import atomic_directory, atomic_file
kind, target = sys.argv[1], Path(sys.argv[2])
with (atomic_file if kind == "file" else atomic_directory)(target) as tmp:
    if kind == "dir":
        tmp.mkdir()
        tmp = tmp / "zarr.json"
    tmp.write_text("half")
    os._exit(9)  # killed mid-write: no clean-up runs
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_crash_mid_write_leaves_nothing_under_the_final_name(tmp_path, kind):
    target = tmp_path / ("a.json" if kind == "file" else "s.zarr")
    done = subprocess.run(
        [sys.executable, "-c", CRASH, kind, str(target)],
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert done.returncode == 9
    assert not os.path.lexists(target)
    left = hidden_leftovers(tmp_path)
    assert [p.name.split(".tmp-")[0] for p in left] == [f".{target.name}"]
    assert sweep_temporaries([tmp_path], max_age_s=3600) == left  # its writer is gone
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_replacing_a_directory_swaps_it_in_one_step(tmp_path, monkeypatch):
    """With renameat2 the final name is never absent: the old store is never renamed away."""
    target = tmp_path / "s.zarr"
    with atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "v").write_text("1")
    renamed_away: list[str] = []
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == target:
            renamed_away.append(str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert renamed_away == []
    assert hidden_leftovers(tmp_path) == [] and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.unit
def test_replacing_without_renameat2_falls_back_to_two_renames(tmp_path, monkeypatch):
    target = tmp_path / "s.zarr"
    target.mkdir()
    (target / "v").write_text("1")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.unit
def test_a_directory_never_created_leaves_the_old_one(tmp_path):
    target = tmp_path / "s.zarr"
    target.mkdir()
    (target / "v").write_text("1")
    with pytest.raises(FileNotFoundError), atomic_directory(target):
        pass  # the caller wrote nothing
    assert (target / "v").read_text() == "1"
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_readers_always_see_a_whole_old_or_new_version(tmp_path, kind):
    """A reader polling the final name while it is replaced 200 times never finds it missing or
    partial."""
    target = tmp_path / ("a.txt" if kind == "file" else "s.zarr")
    probe = target if kind == "file" else target / "v"

    def write(version: int) -> None:
        body = f"{version}:" + "x" * 4096
        if kind == "file":
            write_atomically(target, body)
            return
        with atomic_directory(target, fsync=False) as tmp:
            tmp.mkdir()
            (tmp / "v").write_text(body)

    write(0)
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(probe.read_text())
            except OSError as err:
                seen.append(f"missing: {err}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(1, 201):
            write(version)
    finally:
        stop.set()
        reader.join()
    bad = [s[:40] for s in seen if not (s.endswith("x" * 4096) and len(s.split(":")[1]) == 4096)]
    assert seen and bad == []
    assert probe.read_text().startswith("200:")


@pytest.mark.unit
def test_secrets_are_written_through_it_and_stay_private(tmp_path, fsynced):
    path = write_secret(tmp_path / "creds" / "svc.pass", "s3cret")
    assert path.read_text() == "s3cret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "creds").stat().st_mode & 0o777 == 0o700
    assert fsynced[-1] == (tmp_path / "creds").resolve()
    write_secret(path, "other")
    assert path.read_text() == "other" and path.stat().st_mode & 0o777 == 0o600
    assert hidden_leftovers(tmp_path) == []
