"""Opening dataset files safely: regular files only.

A path from an annotation file may name a FIFO, a socket or a device (`/dev/zero`, a named pipe
without a writer): a plain `open` of it blocks or reads forever. `open_regular_file` opens without
blocking, checks with `fstat` that the file is a regular one (symbolic links are followed, so a
symlink farm works) and only then hands it out.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from .validation import DatasetError


class NotRegularFileError(OSError):
    """The path exists but is not a regular file (a FIFO, socket, device or folder)."""


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for binary reading; raise `NotRegularFileError` unless it is a regular file.

    Raises:
        FileNotFoundError, PermissionError, ...: as `open`.
        NotRegularFileError: not a regular file (nothing is read from it).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"not a regular file ({_kind(mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a split list, an image list); ``DatasetError`` naming the file and
    ``what`` it is when it cannot be read."""
    try:
        with open_regular_file(path) as file:
            return file.read().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read {what}: {exc}") from exc


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a plain file"
