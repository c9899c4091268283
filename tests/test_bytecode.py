"""Child processes get a bytecode cache of gputwin's own where Python may not write beside the sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gputwin.control.bytecode import cache_folder, child_env, ships_bytecode

NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1", "HOME": "/home/u", "PATH": "/bin"}


def test_no_bytecode_allowed_and_none_shipped_gives_a_prefix_and_allows_writes(tmp_path: Path) -> None:
    no_pyc = {**NO_PYC, "HOME": str(tmp_path)}
    env = child_env(no_pyc, ships=lambda: False)
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert env["PYTHONPYCACHEPREFIX"] == str(tmp_path / ".cache/gputwin/pycache")
    assert env["PATH"] == "/bin" and no_pyc["PYTHONDONTWRITEBYTECODE"] == "1"  # the caller's mapping unchanged
    assert (tmp_path / ".cache/gputwin/pycache").stat().st_mode & 0o777 == 0o700  # made this user's alone


def test_a_cache_folder_others_may_write_is_not_used(tmp_path: Path) -> None:
    """Its bytecode runs in every trainer: a folder another user (or group) can write to is left alone."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    env = {**NO_PYC, "GPUTWIN_PYCACHE": str(shared)}
    assert child_env(env, ships=lambda: False) == env
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    env = {**NO_PYC, "GPUTWIN_PYCACHE": str(blocked / "pycache")}
    assert child_env(env, ships=lambda: False) == env


def test_the_environment_is_left_alone_where_nothing_needs_changing() -> None:
    never = lambda: False  # noqa: E731
    assert child_env({"HOME": "/h"}, ships=never) == {"HOME": "/h"}  # writes allowed: Python caches as usual
    assert child_env(NO_PYC, ships=lambda: True) == NO_PYC  # the install has its .pyc files
    own = {**NO_PYC, "PYTHONPYCACHEPREFIX": "/mine"}
    assert child_env(own, ships=never) == own  # the user's prefix is theirs
    off = {**NO_PYC, "GPUTWIN_PYCACHE": "off"}
    assert child_env(off, ships=never) == off


def test_the_cache_folder_follows_gputwin_pycache_then_xdg(tmp_path: Path) -> None:
    assert cache_folder({**NO_PYC, "GPUTWIN_PYCACHE": "~/pyc"}) == Path("~/pyc").expanduser()
    assert cache_folder({**NO_PYC, "XDG_CACHE_HOME": "/c"}) == Path("/c/gputwin/pycache")
    chosen = str(tmp_path / "x")
    assert child_env({**NO_PYC, "GPUTWIN_PYCACHE": chosen}, ships=lambda: False)["PYTHONPYCACHEPREFIX"] == chosen


def test_ships_bytecode_looks_beside_the_module(tmp_path: Path) -> None:
    package = tmp_path / "pkg_with_pyc"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "big.py").write_text("X = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert not ships_bytecode("pkg_with_pyc", "big")
        (package / "__pycache__" / f"big.{sys.implementation.cache_tag}.pyc").write_bytes(b"")
        assert ships_bytecode("pkg_with_pyc", "big")
        assert ships_bytecode("no_such_package_here", "big")  # nothing to compile
    finally:
        sys.path.remove(str(tmp_path))


def test_a_child_with_the_env_writes_its_bytecode_only_under_the_prefix(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "somemod.py").write_text("VALUE = 41 + 1\n")
    env = child_env({**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "GPUTWIN_PYCACHE": str(tmp_path / "cache")},
                    ships=lambda: False)
    done = subprocess.run([sys.executable, "-c", "import somemod; print(somemod.VALUE)"], cwd=source, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "42", done.stderr
    assert not (source / "__pycache__").exists()
    assert list((tmp_path / "cache").rglob("somemod.*.pyc"))
