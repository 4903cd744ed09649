"""Writing files and folders so that a reader never sees half of one.

Every stage writes its outputs through here (checkpoints, training reports, bundles, quantized
files): the content goes to a hidden temporary name beside the final one (the same folder, so
the same filesystem and an atomic ``os.replace``), and only a complete file or folder is renamed
into place. A run killed half-way leaves at most a hidden ``.NAME.*.tmp`` beside the output.

Temporary files and folders are created with ``os.open(..., 0o666)`` / ``os.mkdir(..., 0o777)``,
so the kernel applies the umask exactly as for any other file, and a file keeps that mode
whatever its writer does: under umask 022 a checkpoint is 0644 (folders 0755), readable by other
users and by a container running under another uid. (``tempfile.mkstemp`` / ``mkdtemp`` create
0600 / 0700 and would carry that mode to the final name.) A file's data is flushed to disk
before the rename, so the final name never points at data a crash could still lose.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tinyllava_edge.errors import TinyLlavaError

TEMP_SUFFIX = ".tmp"


def _hidden_name(final: Path, suffix: str = TEMP_SUFFIX) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}{suffix}")


def _create(final: Path, make) -> Path:
    """A fresh hidden name beside `final`, made by `make(path)` (which raises FileExistsError when the
    name is taken); a folder that cannot hold it is one sentence."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        while True:
            path = _hidden_name(final)
            try:
                make(path)
                return path
            except FileExistsError:  # another writer drew the same name: draw again
                continue
    except FileExistsError:  # from mkdir: the parent is a file
        raise TinyLlavaError(f"cannot write {final}: {final.parent} is a file, not a folder") from None
    except OSError as exc:  # no permission, a read-only or full filesystem, an ancestor that is a file
        raise TinyLlavaError(f"cannot write {final} ({exc.strerror or exc})") from None


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside `final` for the block to write (any writer may open it by
    name); when the block ends without an error the file is synced and renamed to `final`, and
    otherwise removed. The file exists (empty) when the block starts."""
    final = Path(final)
    # 0o666: the kernel takes the umask off, as for any new file
    tmp = _create(final, lambda path: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        # Some writers replace the file with one of their own (safetensors' is 0600): give it back
        # the mode the umask gave.
        if stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)
        _sync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(final: str | os.PathLike, text: str) -> Path:
    """`final` holds `text` (UTF-8), written through a temporary name."""
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(final)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden folder beside `final` for the block to fill, removed if the block fails.

    The block ends by calling :func:`replace_folder` (it may still check the staged content
    first); a folder the block leaves without moving it is removed too.
    """
    staging = _create(Path(final), lambda path: path.mkdir(0o777))  # minus the umask, as any new folder
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, final: Path) -> None:
    """Rename the finished `staging` folder to `final`. An existing `final` (the caller has checked
    that it may go) is moved aside first and put back if the rename fails.

    Everything inside first takes the mode the umask gives (the staging folder has it): some
    writers that filled it (safetensors, GPTQModel) create their files 0600.
    """
    folder_mode = stat.S_IMODE(staging.stat().st_mode)
    for path in staging.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, folder_mode if path.is_dir() else folder_mode & 0o666)
    old = None
    if final.exists():
        old = _hidden_name(final, ".old")
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
