"""FileLockBackend's own behaviour: a private directory, private files, no symlinks, no I/O
before first use."""

from __future__ import annotations

import os
import pwd
import stat
import tempfile
import threading
from pathlib import Path

import anyio
import pytest

from fastapi_once.backends import FileLockBackend


async def nothing() -> str:
    return "ok"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.anyio
async def test_the_directory_is_created_private_and_its_files_are_0600(tmp_path: Path) -> None:
    """A missing directory is made 0700 (parents too); lock and marker files are 0600."""
    directory = tmp_path / "a" / "locks"
    backend = FileLockBackend(directory)
    assert await backend.run_once("tests.file.job", nothing) == "ok"
    assert mode(directory) == 0o700
    files = sorted(directory.iterdir())
    assert [p.suffix for p in files] == [".json", ".lock"]
    assert all(mode(p) == 0o600 for p in files)
    assert all(p.name.startswith("tests.file.job-") for p in files)


def test_the_constructor_touches_nothing(tmp_path: Path) -> None:
    """Building the backend (at import time, say) creates no directory and opens no file."""
    directory = tmp_path / "a" / "locks"
    FileLockBackend(directory)
    assert not (tmp_path / "a").exists()


@pytest.mark.anyio
async def test_without_a_directory_it_uses_a_private_one_in_the_system_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``FileLockBackend()`` works: ``fastapi_once-<uid>`` under the temp dir, mode 0700."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    backend = FileLockBackend()
    assert await backend.run_once("tests.file.default", nothing) == "ok"
    directory = tmp_path / f"fastapi_once-{os.geteuid()}"
    assert backend.directory == str(directory)
    assert mode(directory) == 0o700
    assert str(directory) in backend.describe()


@pytest.mark.anyio
@pytest.mark.parametrize("bits", [0o770, 0o707, 0o777])
async def test_a_directory_writable_by_group_or_others_is_refused(
    tmp_path: Path, bits: int
) -> None:
    """Others could plant or hold its files: the error says so and how to fix it."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(bits)
    with pytest.raises(PermissionError, match="writable by group or others") as info:
        await FileLockBackend(directory).run_once("tests.file.job", nothing)
    assert f"chmod 700 {directory}" in str(info.value)


@pytest.mark.anyio
async def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """Only a directory owned by the process's own user will do."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to give the directory to another user")
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(PermissionError, match=f"owned by uid {nobody.pw_uid}"):
        await FileLockBackend(directory).run_once("tests.file.job", nothing)


@pytest.mark.anyio
async def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    """The directory itself is opened without following symlinks."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(PermissionError, match="is a symlink"):
        await FileLockBackend(link).run_once("tests.file.job", nothing)


@pytest.mark.anyio
@pytest.mark.parametrize("suffix", [".json", ".lock"])
async def test_a_symlink_planted_in_the_directory_is_not_followed(
    tmp_path: Path, suffix: str
) -> None:
    """A marker or lock file replaced by a symlink is refused, not followed."""
    from fastapi_once.backends._file import _file_key

    directory = tmp_path / "locks"
    backend = FileLockBackend(directory)
    await backend.reset("tests.file.job")  # creates the directory
    target = tmp_path / "target"
    target.write_text("{}")
    (directory / f"{_file_key('tests.file.job')}{suffix}").symlink_to(target)
    with pytest.raises(PermissionError, match="is a symlink"):
        await backend.run_once("tests.file.job", nothing)
    assert target.read_text() == "{}"


@pytest.mark.anyio
async def test_a_follower_waits_for_the_leader_in_a_thread_of_the_same_process(
    tmp_path: Path,
) -> None:
    """flock locks belong to open files, so two event loops in one process exclude each other."""
    backend = FileLockBackend(tmp_path / "locks")
    runs: list[str] = []
    leading = threading.Event()

    async def slow() -> str:
        runs.append("thread")
        leading.set()
        await anyio.sleep(0.3)
        return "from the thread"

    async def never() -> str:
        runs.append("main")
        return "from main"

    def other_loop() -> str:
        result: str = anyio.run(backend.run_once, "tests.file.threads", slow)
        return result

    async with anyio.create_task_group() as tg:
        results: list[str] = []

        async def in_thread() -> None:
            results.append(await anyio.to_thread.run_sync(other_loop))

        tg.start_soon(in_thread)
        await anyio.to_thread.run_sync(leading.wait)
        results.append(await backend.run_once("tests.file.threads", never))
    assert results == ["from the thread", "from the thread"]
    assert runs == ["thread"]


def test_options_are_checked(tmp_path: Path) -> None:
    """A bad option is a ValueError naming it."""
    for option in ("wait_timeout", "ttl", "poll_interval"):
        with pytest.raises(ValueError, match=f"{option}=-1"):
            FileLockBackend(tmp_path, **{option: -1})
    with pytest.raises(ValueError, match="ttl=0"):
        FileLockBackend(tmp_path, ttl=0)
