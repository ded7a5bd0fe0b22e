"""Atomic files and folders that honour the user's umask: the file-system layer every writer shares.

A leaf module (it imports nothing of peftkit), so config, io, merge and train can all use it without an
import circle.

A reader sees a path's old content or its new content, never a mix, even when the writer is killed at
any moment (SIGKILL, OOM killer):

- a file is written beside its target under a temporary name, then renamed over it;
- a folder is built complete beside its target (``atomic_folder``), then swapped with it in one step
  (Linux ``renameat2(RENAME_EXCHANGE)``); the old tree, now under the temporary name, is deleted after.

Temporary names are ``.tmp-<name>-<tag>-<pid>-<random>`` beside ``<name>``, where the tag hashes the host
and the full name. The next write into the same place removes the leftovers of writers that died (the
pid no longer runs on this host) and never touches those of a writer still running. New files and
folders get the usual modes, 0666 and 0777 less the umask, like any other tool's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import stat
import zlib
from collections.abc import Iterator

_SHORT = 96  # characters of the target's name kept in a temporary name (NAME_MAX is 255)
_OLD = ".old"  # suffix of an old folder set aside by the two-rename fallback


# ---- temporary names and leftovers -----------------------------------------------------------------
def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8', 'surrogateescape')):08x}"


def _tag(name: str) -> str:
    return _crc(socket.gethostname()) + _crc(name)


def temp_path(final: str, old: bool = False) -> str:
    """A fresh temporary path beside ``final``, recognisable as ours by ``clean_leftovers``."""
    parent, name = os.path.split(final)
    entry = f".tmp-{name[:_SHORT]}-{_tag(name)}-{os.getpid()}-{secrets.token_hex(4)}{_OLD if old else ''}"
    return os.path.join(parent, entry)


def _leftover_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"\.tmp-{re.escape(name[:_SHORT])}-{_tag(name)}-(?P<pid>\d+)-[0-9a-f]{{8}}(?P<old>{re.escape(_OLD)})?"
    )


def _running(pid: int) -> bool:
    """Whether ``pid`` runs on this host (our own pid counts: another thread may be writing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, under another user
        return True
    return True


def remove(path: str) -> None:
    """Delete a file, link or folder tree; gone already is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _leftovers(final: str) -> list[tuple[str, bool]]:
    """(path, is an old folder set aside) of the temporary entries of writers into ``final`` that died."""
    parent, name = os.path.split(final)
    pattern = _leftover_pattern(name)
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match and not _running(int(match["pid"])):
            found.append((os.path.join(parent, entry), match["old"] is not None))
    return found


def interrupted_swap(final: str) -> str | None:
    """The old folder a killed two-rename swap left beside a now missing ``final``, if any (for messages)."""
    if os.path.lexists(final):
        return None
    return next((path for path, old in _leftovers(final) if old), None)


def clean_leftovers(final: str) -> None:
    """Remove what writers into ``final`` that died left behind; a missing ``final`` whose old folder a killed
    fallback swap had set aside gets that folder back (the old content, as if the write never started)."""
    found = _leftovers(final)
    aside = [path for path, old in found if old]
    if aside and not os.path.lexists(final):
        newest = max(aside, key=lambda p: os.lstat(p).st_mtime_ns)
        with contextlib.suppress(OSError):  # another cleaner may have been first
            os.rename(newest, final)
    for path, _ in found:
        if os.path.lexists(path):
            remove(path)


def make_parents(path: str) -> None:
    """``os.makedirs`` of ``path``'s parent, but a missing ancestor whose old folder a killed fallback swap set
    aside gets it back first, instead of a new empty folder that would make the old content a leftover."""
    parent = os.path.dirname(path)
    missing = []
    while parent and not os.path.isdir(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(missing):
        clean_leftovers(folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)


# ---- checks -----------------------------------------------------------------------------------------
def file_kind(mode: int) -> str:
    """What a stat mode is, in words ("a FIFO (named pipe)", ...)."""
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "not a regular file"


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is no regular file (a FIFO would block a reader forever), else None.
    Symlinks are followed: a link to a regular file is fine."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def folder_target_problem(final: str | os.PathLike) -> str | None:
    """Why a folder cannot be written at ``final`` (a file in the way, a parent we may not write), else None."""
    final = resolve(final)
    if os.path.lexists(final) and not os.path.isdir(final):
        return f"{final!r} is {file_kind(os.stat(final).st_mode) if os.path.exists(final) else 'a broken link'}, not a folder"
    parent = os.path.dirname(final)
    while not os.path.isdir(parent):  # the first existing ancestor decides
        if os.path.lexists(parent):
            return f"{parent!r} is a file, not a folder"
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "it is on a read-only file system" if _read_only_fs(parent) else "permission denied"
        return f"cannot create anything in {parent!r} ({reason})"
    return None


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def resolve(final: str | os.PathLike) -> str:
    """Absolute path; a symlink at the end is followed, so a write replaces the folder it points to and keeps
    the link (as writing files through it would)."""
    final = os.path.abspath(os.fspath(final))
    return os.path.realpath(final) if os.path.islink(final) else final


# ---- files ------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file. The file gets
    mode 0666 less the umask, as ``open(path, "w")`` would give it."""
    path = os.path.abspath(os.fspath(path))
    make_parents(path)
    clean_leftovers(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_file_synced(path: str, data: bytes) -> None:
    """Write a new file (mode 0666 less the umask) and flush it to disk."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_path(path: str) -> None:
    """Flush a file or a folder's entries to disk (best effort: some systems cannot open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- folders ----------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def standard_modes(tree: str) -> None:
    """Give every folder and regular file under ``tree`` (itself included) mode 0777 / 0666 less the umask.
    Some writers create private files whatever the umask (safetensors' save_file makes them 0600), which
    would leave a saved adapter or merged model unreadable to the group the user shares it with."""
    mask = current_umask()
    os.chmod(tree, 0o777 & ~mask)
    for parent, dirs, files in os.walk(tree):
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(parent, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, 0o666 & ~mask)


def _load_renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).
    Returns False, having changed nothing, where the system or the file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def replace_folder(tmp: str, final: str) -> None:
    """Put the complete folder ``tmp`` at ``final`` as a whole, then delete what ``final`` held.

    Where ``renameat2(RENAME_EXCHANGE)`` works (Linux 3.15+, glibc 2.28+, ext4, xfs, btrfs, tmpfs, ...) the
    swap is one atomic step: at every moment ``final`` is the complete old folder or the complete new one.
    Elsewhere (macOS, some network or FUSE file systems) two renames: the old folder is set aside as
    ``.tmp-<name>-…​.old``, then the new one renamed in. A kill between the two leaves no folder at ``final``
    (a loader then fails clearly, never loads a mix); the next write into ``final`` puts the old folder back
    before it starts, so nothing is lost."""
    parent = os.path.dirname(final)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        fsync_path(parent)
    elif exchange(tmp, final):
        fsync_path(parent)
        remove(tmp)  # the old tree now sits under the temporary name
    else:
        aside = temp_path(final, old=True)
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(aside, final)
            raise
        fsync_path(parent)
        remove(aside)


def swap_hazard(final: str | os.PathLike) -> str | None:
    """Why the folder ``final`` must not be replaced by a swap, else None: a mount point cannot be renamed
    (EBUSY), and swapping our current directory (or one above it) would leave this process in a deleted one."""
    final = resolve(final)
    if not os.path.isdir(final):
        return None
    if os.path.ismount(final):
        return "a mount point"
    with contextlib.suppress(OSError):
        cwd = os.getcwd()
        if cwd == final or cwd.startswith(final.rstrip(os.sep) + os.sep):
            return "the current directory"
    return None


def link_missing(src: str, dst: str) -> None:
    """Give ``dst`` every entry of ``src`` it lacks: files as hard links (a copy where links fail), folders
    recursively with their modes, symlinks as symlinks. Entries ``dst`` already has are the new content."""
    for entry in os.scandir(src):
        target = os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False):
            made = not os.path.lexists(target)
            if made:
                os.mkdir(target)
            if os.path.isdir(target) and not os.path.islink(target):
                link_missing(entry.path, target)
            if made:  # after filling it: the user's mode may forbid writing
                os.chmod(target, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
        elif os.path.lexists(target):
            continue
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            try:
                os.link(entry.path, target, follow_symlinks=False)
            except OSError:
                if not entry.is_file(follow_symlinks=False):
                    raise
                shutil.copy2(entry.path, target)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, replace: bool = False, keep_existing: bool = False) -> Iterator[str]:
    """Yield an empty temporary folder beside ``final`` to fill; on success it takes ``final``'s place as a
    whole (see ``replace_folder``), on any error it is deleted and ``final`` is untouched.

    An existing ``final`` is replaced only when ``replace`` (else only an empty one). With ``keep_existing``
    the new folder also gets every entry of the old one it lacks (hard links): the user's other files and
    sub-folders survive, while each file written anew replaces its old version in the same swap.
    Leftovers of earlier writers into ``final`` that died are removed first. What is written in the folder
    gets mode 0777 (folders) / 0666 (files) less the umask (``standard_modes``); a replaced folder keeps its
    own mode and the old entries kept keep theirs."""
    final = resolve(final)
    make_parents(final)
    clean_leftovers(final)
    if os.path.lexists(final) and not os.path.isdir(final):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", final)
    tmp = temp_path(final)
    os.mkdir(tmp)
    try:
        yield tmp
        standard_modes(tmp)
        if os.path.isdir(final):
            if not replace and os.listdir(final):
                raise FileExistsError(errno.ENOTEMPTY, "exists and is not empty", final)
            if keep_existing:
                link_missing(final, tmp)
            os.chmod(tmp, stat.S_IMODE(os.stat(final).st_mode))
        fsync_path(tmp)
        replace_folder(tmp, final)
    except BaseException:
        remove(tmp)
        raise
