"""Atomic, non-destructive saving: the staging and renaming behind every checkpoint save (the one writer,
wan_model.io.formats: in-memory saves and the streaming convert_nvfp4 alike).

    with atomic_save(path, layout, overwrite) as tmp:   # layout None: `path` is one file
        write the checkpoint at tmp (a fresh empty directory, or the file to create)

Policy: a save never deletes or changes a file it did not write.
  * one file (layout None): an existing `path` is refused unless overwrite=True (then replaced); a
    directory or another non-regular file at `path` is always refused.
  * a directory (layout): a missing or empty `path`, or one holding only a checkpoint of `layout`
    (nothing but its entries, its required ones present), is replaced whole. Any other directory is
    refused unless overwrite=True; then only the entries of `layout` are replaced and every other file
    stays. A file at `path` is always refused. Refusals raise FileExistsError / NotADirectoryError /
    IsADirectoryError naming the path and what is in it, before anything is written.

What a kill (SIGKILL, or power loss: data are fsynced before a rename) or an exception leaves.
Everything is written into a staging directory `.NAME.tmp-XXXXXXXX/` (NAME = basename of `path`) next
to `path`, then renamed into place:
  1. `path` missing: one rename (RENAME_NOREPLACE). `path` is absent or complete, at every instant.
  2. `path` a file and overwrite=True, or a directory replaced whole: one rename, for a directory
     renameat2(RENAME_EXCHANGE). `path` holds the old checkpoint or the new complete one, at every
     instant. The detached old directory is checked again (only our entries) and deleted; if something
     else appeared in it meanwhile, it is swapped back (and the save refused, or merged as in 3).
  3. a directory with other files and overwrite=True (staged inside `path`), or case 2 where renameat2
     is missing or the filesystem cannot exchange: the old entries of `layout` are moved aside, the
     `commit` entry (config.json / transformer/) first, then the new ones renamed in, `commit` last.
     Other files are never touched. A kill during these few renames leaves `path` without its commit
     entry, which our loader and diffusers' refuse: never a mix of old and new tensors. An exception
     during them is rolled back.
A failed save removes its staging directory. A killed one leaves it; the next save of the same `path`
removes those it proves are its own: the name pattern, a MARKER file with MARKER_TEXT inside, and the
marker's flock free (a save holds it while it runs, the kernel drops it when the process dies); also an
empty `.NAME.tmp-*` directory (killed right after creating it: removing it loses nothing) and one whose
sole entry is a MARKER holding the start of MARKER_TEXT (killed while writing it).
Saved files and directories follow the umask, a replaced directory too (the staging directory is 0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import os
import re
import shutil
import stat
import tempfile

MARKER = "SAVE-IN-PROGRESS.wan_model"
MARKER_TEXT = b"a wan_model checkpoint save in progress; if it was killed, the next save of it removes this\n"
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


@dataclasses.dataclass(frozen=True)
class Layout:
    """The top-level entries of a checkpoint directory of ours.

    files:    regular expression (full match) of its file names
    required: regular expressions each matched by at least one entry of a complete checkpoint
    commit:   the entry moved aside first and renamed into place last (without it, loaders refuse the dir)
    dirs:     names of sub-checkpoint directories, each of layout `child`
    """

    files: str
    required: tuple[str, ...]
    commit: str
    dirs: tuple[str, ...] = ()
    child: "Layout | None" = None

    def matches(self, name: str) -> bool:
        return name in self.dirs or re.fullmatch(self.files, name) is not None


def _owns(directory: str, name: str, layout: Layout) -> bool:
    """Whether entry `name` of `directory` is a part of a `layout` checkpoint (name and type)."""
    p = os.path.join(directory, name)
    if os.path.islink(p) or not layout.matches(name):
        return False
    if name in layout.dirs:
        return os.path.isdir(p) and not _blockers(p, layout.child)
    return os.path.isfile(p)


def _blockers(directory: str, layout: Layout) -> list[str]:
    """The entries that keep `directory` from being replaced whole: those not of `layout`, or all of them
    when the required ones are missing. [] for an empty directory or a complete checkpoint of ours."""
    names = sorted(os.listdir(directory))
    foreign = [n for n in names if not _owns(directory, n, layout)]
    if foreign or not names or all(any(re.fullmatch(r, n) for n in names) for r in layout.required):
        return foreign
    return names


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def check_destination(path, layout: Layout | None = None, overwrite: bool = False) -> str:
    """The absolute real path a save to `path` writes; raises if the policy (module docstring) refuses it."""
    dst = os.path.realpath(os.fspath(path))
    hint = "pass overwrite=True (CLI: --overwrite) to replace it, or choose another path"
    if layout is None:
        if os.path.isdir(dst):
            raise IsADirectoryError(f"{dst} is a directory; this format saves one file: give a file path")
        if os.path.lexists(dst):
            if not os.path.isfile(dst):
                raise FileExistsError(f"{dst} exists and is not a regular file; refusing to replace it")
            if not overwrite:
                raise FileExistsError(f"{dst} already exists; refusing to replace it (nothing was changed): {hint}")
        return dst
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise NotADirectoryError(f"{dst} exists and is not a directory; this format saves a directory: "
                                 "give a new or checkpoint directory (nothing was changed)")
    if os.path.isdir(dst):
        blockers = _blockers(dst, layout)
        clash = [n for n in blockers if layout.matches(n)]
        if blockers and not overwrite:
            raise FileExistsError(
                f"{dst} already holds files that are not a checkpoint written here ({_listing(blockers)}); "
                "refusing to save there (nothing was changed): pass overwrite=True (CLI: --overwrite) to "
                "replace only the checkpoint's files and keep the others, or choose a new directory")
        if clash:
            raise FileExistsError(f"{dst}: {_listing(clash)} have a checkpoint file's name but are not "
                                  "checkpoint files of this format; refusing to replace them (nothing was changed)")
    return dst


@functools.cache
def _renameat2():
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def _rename2(src: str, dst: str, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the libc, kernel or filesystem lacks it. Raises OSError."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), src, None, dst)


def _rename_noreplace(src: str, dst: str) -> None:
    """Rename src to dst; FileExistsError if dst exists (it is never replaced)."""
    try:
        if _rename2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        pass
    else:
        if not os.path.lexists(dst):
            os.rename(src, dst)
            return
    raise FileExistsError(f"{dst} appeared during the save; it was not replaced (the new files were discarded)")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _finish(path: str, dir_mode: int) -> None:
    """Give the staged tree the modes of a new directory / file (writers such as safetensors create 0600
    files) and fsync it."""
    if os.path.isdir(path):
        os.chmod(path, dir_mode)
        for name in os.listdir(path):
            _finish(os.path.join(path, name), dir_mode)
    else:
        os.chmod(path, dir_mode & 0o666)
    _fsync(path)


def remove_stale(directory: str, name: str) -> None:
    """Remove the staging directories `.NAME.tmp-*` in `directory` left by killed saves: those with our
    MARKER (MARKER_TEXT, or the start of it as sole entry: killed while creating it) whose flock is
    free, and empty ones (killed right after creating it; nothing is lost). Anything else is left alone."""
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        p = os.path.join(directory, entry)
        if not entry.startswith(f".{name}.tmp-") or os.path.islink(p) or not os.path.isdir(p):
            continue
        with contextlib.suppress(OSError):
            os.rmdir(p)  # fails unless empty
            continue
        try:
            fd = os.open(os.path.join(p, MARKER), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            text = os.read(fd, len(MARKER_TEXT) + 1)
            if not stat.S_ISREG(os.fstat(fd).st_mode) or text != MARKER_TEXT and not (
                    MARKER_TEXT.startswith(text) and os.listdir(p) == [MARKER]):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running save
            _remove_staging(p)
        finally:
            os.close(fd)


def _remove_staging(path: str) -> None:
    """rmtree, the MARKER last: killed meanwhile, what is left is still provably a staging directory."""
    for entry in os.listdir(path):
        if entry != MARKER:
            p = os.path.join(path, entry)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    os.unlink(os.path.join(path, MARKER))
    os.rmdir(path)


class _Staging:
    """A marked, locked staging directory `.NAME.tmp-XXXXXXXX` in `where`; `dir_mode`: the mode a new
    directory gets there (umask, setgid of `where`)."""

    def __init__(self, where: str, name: str):
        self.path = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=where)
        self._fd = os.open(os.path.join(self.path, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # before the text: a cleaner that reads it finds the lock held
        os.write(self._fd, MARKER_TEXT)
        probe = os.path.join(self.path, "mode")
        os.mkdir(probe)
        self.dir_mode = stat.S_IMODE(os.stat(probe).st_mode)
        os.rmdir(probe)

    def remove(self) -> None:
        try:
            with contextlib.suppress(OSError):  # never mask the save's own error; the next save retries
                _remove_staging(self.path)
        finally:
            os.close(self._fd)


def _exchange(new: str, dst: str, layout: Layout, overwrite: bool) -> bool:
    """Swap `new` in for the directory `dst` in one rename (case 2); False: merge instead (case 3)."""
    try:
        if not _rename2(new, dst, _RENAME_EXCHANGE):
            return False
    except OSError:  # e.g. EBUSY: dst is a mount point
        return False
    blockers = _blockers(new, layout)  # `new` is now the detached old dst
    if not blockers:
        return True
    _rename2(new, dst, _RENAME_EXCHANGE)
    if not overwrite:
        raise FileExistsError(f"{dst}: {_listing(blockers)} appeared during the save; nothing was changed")
    return False


def _merge(new: str, dst: str, layout: Layout, stage: str) -> None:
    """Move the entries of `layout` in `dst` aside (commit entry first), then `new`'s in (commit last)."""
    old = os.path.join(stage, "old")
    os.mkdir(old)
    done: list[tuple[str, str]] = []
    try:
        for n in sorted((n for n in os.listdir(dst) if _owns(dst, n, layout)), key=lambda n: n != layout.commit):
            _rename_noreplace(os.path.join(dst, n), os.path.join(old, n))
            done.append((os.path.join(dst, n), os.path.join(old, n)))
        for n in sorted(os.listdir(new), key=lambda n: n == layout.commit):
            _rename_noreplace(os.path.join(new, n), os.path.join(dst, n))
            done.append((os.path.join(new, n), os.path.join(dst, n)))
    except BaseException:
        for src, moved in reversed(done):
            os.rename(moved, src)
        raise
    _fsync(dst)


@contextlib.contextmanager
def atomic_save(path, layout: Layout | None = None, overwrite: bool = False):
    """Yield where to write the checkpoint (an empty directory for a `layout`, else a file path), then move
    it to `path` as the module docstring states; an exception removes everything written."""
    dst = check_destination(path, layout, overwrite)
    parent, name = os.path.split(dst)
    remove_stale(parent, name)
    remove_stale(dst, name)
    dst = check_destination(dst, layout, overwrite)
    os.makedirs(parent, exist_ok=True)
    in_place = layout is not None and os.path.isdir(dst) and bool(_blockers(dst, layout))
    stage = _Staging(dst if in_place else parent, name)
    try:
        new = os.path.join(stage.path, "new")
        if layout is not None:
            os.mkdir(new)
        yield new
        _finish(new, stage.dir_mode)
        if layout is None:
            if overwrite and os.path.lexists(dst):
                check_destination(dst, None, overwrite)
                os.replace(new, dst)
            else:
                _rename_noreplace(new, dst)
        elif not os.path.lexists(dst):
            _rename_noreplace(new, dst)
        else:
            check_destination(dst, layout, overwrite)
            if in_place or not _exchange(new, dst, layout, overwrite):
                _merge(new, dst, layout, stage.path)
        _fsync(parent)
    finally:
        stage.remove()
