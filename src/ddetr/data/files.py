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

MAX_TEXT_BYTES = 64 << 20  # a label file, split list, image list or dataset YAML beyond this is not one


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


def read_capped(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; one ``DatasetError`` naming the file and ``what`` it
    is when it cannot be read or is larger (nothing beyond `max_bytes` + 1 is read)."""
    try:
        with open_regular_file(path) as file:
            content = file.read(max_bytes + 1)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read {what}: {exc}") from exc
    if len(content) > max_bytes:
        raise DatasetError(f"{path}: {what} is larger than {max_bytes >> 20} MiB")
    return content


def read_text_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a split list, an image list) of at most `MAX_TEXT_BYTES`; ``DatasetError``
    naming the file and ``what`` it is when it cannot be read."""
    try:
        return read_capped(path, what).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
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
