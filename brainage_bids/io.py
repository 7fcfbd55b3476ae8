"""Small file helpers shared by every writer: atomic writes and checksums.

A file that a user (or a later pipeline step) might read is never visible half-written:
it is written under a hidden temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: How a failed write reads in the one line a user sees, by errno.
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
    errno.EISDIR: "a directory is in the way",
    errno.ENOTDIR: "a file is in the way of a folder",
    errno.EIO: "input/output error",
}


class OutputError(OSError):
    """A file could not be written; ``str()`` is one line naming the file (errno is kept)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return str(self.args[0])


def write_error(err: OSError, target: str | os.PathLike[str]) -> OutputError:
    """``no space left on device writing PATH`` (or the like) for a failed write of target."""
    if isinstance(err, OutputError):
        return err
    reason = WRITE_ERRORS.get(err.errno or -1) or (err.strerror or str(err)).lower()
    return OutputError(f"{reason} writing {target}", err.errno)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The temporary name keeps the target's suffixes (``.nii.gz`` stays ``.nii.gz``) so that
    libraries that choose a format by extension write the right thing. Any failure to write
    (a full disk, a read-only folder) leaves no temporary file and raises
    :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    suffix = "".join(target.suffixes)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}",
                                        dir=target.parent)
    except OSError as err:
        raise write_error(err, target) from err
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; derivatives must be readable as any normal file would be
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o666 & ~umask)
        yield tmp
        tmp.replace(target)
    except OSError as err:
        if err.errno not in WRITE_ERRORS and err.filename not in (str(tmp), str(target)):
            raise  # e.g. the source of a copy is missing: not a failure to write
        raise write_error(err, target) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False,
                                                default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
