"""Durable writes: a file or folder put in place by `os.replace` survives a power cut only once
its bytes, and the folder that names it, are on disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def sync(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's list of names, to disk (where the file system can:
    some network and FUSE file systems refuse to sync a folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (os.path.isdir(path) and err.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def put_in_place(tmp: str | Path, path: str | Path) -> None:
    """Rename a written file over `path`: a reader finds the old file or the whole new one."""
    sync(tmp)
    os.replace(tmp, path)
    sync(Path(path).parent)


def write_text(path: str | Path, text: str) -> None:
    """`path.write_text(text)`, but never half-written (a stop or a full disk mid-write); an error
    names the file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        tmp.write_text(text)
        put_in_place(tmp, path)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
