"""Keeping the query threads off the file system: a Landlock domain (Linux 5.13+) per thread.

DuckDB cannot be told "no file access for SQL" while the same database writes its own files:
with `enable_external_access = false` it still lets any query read the views file, its WAL and
its temp directory (it puts them on `allowed_paths` itself, and its storage needs them there),
and `disabled_filesystems = 'LocalFileSystem'` also stops the storage (the first commit of a
fresh file fails; a checkpoint fails fatally). So the wall is the kernel's: a query thread
calls `deny_files()` once, and from then on the kernel refuses that thread (and only it)
every open, listing, creation or removal of any file (but reading the archive's segments, which
the service's `archive_events` view reads), whatever path DuckDB or Python asks for
(`stat`, which tells a name and a size but no content, is not governed: the statement check
refuses `glob` and every other table function that could ask).
Files it already had open are unaffected: the views file is open before, so query results
still come from the buffer pool, which reads it through the store's own handle.

It covers what runs on the calling thread. With DuckDB `threads = 1` (the projections'
default) a query runs wholly on the thread that executes it; with more, DuckDB's worker threads
run parts of it too and are not sandboxed (`uncovered()` says so at start).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence

__all__ = ["deny_files", "uncovered", "unavailable"]

# Syscall numbers shared by every architecture (added after the tables were unified).
_CREATE_RULESET = 444
_ADD_RULE = 445
_RESTRICT_SELF = 446
_RULE_PATH_BENEATH = 1
_READ_FILE_AND_DIR = (1 << 2) | (1 << 3)  # LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR
_CREATE_RULESET_VERSION = 1
_PR_SET_NO_NEW_PRIVS = 38
# Filesystem access rights each Landlock ABI version knows (bit masks of LANDLOCK_ACCESS_FS_*):
# v1 execute .. make_sym (13 rights), v2 refer, v3 truncate, v5 ioctl_dev.
_FS_RIGHTS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _abi() -> int:
    """The kernel's Landlock ABI version. Raises OSError when Landlock is missing or disabled."""
    if not sys.platform.startswith("linux"):
        raise OSError(f"Landlock is a Linux feature (this is {sys.platform})")
    version = _libc().syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    if version < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"Landlock is not available: {os.strerror(errno)}")
    return int(version)


def unavailable() -> str | None:
    """Why `deny_files()` cannot work on this machine, or None when it can."""
    try:
        _abi()
    except OSError as exc:
        return str(exc)
    return None


def uncovered(duckdb_threads: int | None) -> str | None:
    """Why sandboxed query threads would still leave a way to the file system (see the module
    docstring), or None when they leave none."""
    why = unavailable()
    if why is not None:
        return why
    if duckdb_threads != 1:
        threads = f"{duckdb_threads} threads" if duckdb_threads else "a thread per core"
        return f"DuckDB runs {threads}, and its worker threads are not sandboxed"
    return None


def deny_files(readable: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Forbid the calling thread, for the rest of its life, every file system access Landlock
    governs (open for reading or writing, list, create, remove, rename, execute), except reading
    files and listing directories beneath each of `readable` (existing directories: the archive's
    segments, which the service's own `archive_events` view reads). Other threads are
    unaffected; threads it starts later inherit the restriction. Raises OSError when the kernel
    refuses (no Landlock: see `unavailable()`) or a `readable` directory cannot be opened."""
    abi = _abi()
    rights = _FS_RIGHTS[max(v for v in _FS_RIGHTS if v <= abi)]
    libc = _libc()
    # struct landlock_ruleset_attr, first field only (handled_access_fs): accepted by every ABI.
    attr = ctypes.c_uint64(rights)
    fd = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"landlock_create_ruleset failed: {os.strerror(errno)}")
    try:
        # Required of an unprivileged thread, and per thread too (the process keeps its own).
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(errno)}")
        for directory in readable:
            _allow_reading(libc, fd, directory)
        # Beyond those rules, every governed access is refused everywhere.
        if libc.syscall(_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"landlock_restrict_self failed: {os.strerror(errno)}")
    finally:
        os.close(fd)


class _PathBeneath(ctypes.Structure):
    """struct landlock_path_beneath_attr (packed)."""

    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _allow_reading(libc: ctypes.CDLL, ruleset: int, directory: str | os.PathLike[str]) -> None:
    """Add to `ruleset` a rule letting its threads read files and list directories beneath
    `directory`. Raises OSError."""
    parent = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(_READ_FILE_AND_DIR, parent)
        if libc.syscall(_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                        ctypes.c_uint32(0)) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"landlock_add_rule({directory}) failed: {os.strerror(errno)}")
    finally:
        os.close(parent)
