"""File helpers that several stages share: reading a file whole but bounded, and opening a directory without
following a link. A leaf (ARCHITECTURE.md): it imports nothing of pymta, so the spool, the aliases reader and
local delivery can all use it without importing each other.
"""

import os

# Opens a file to read it whole: never blocking on a FIFO, never making a terminal ours.
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
# Opens a directory only to look up names in it: without read rights where the system has O_PATH (Linux; a
# drop directory is 1733), and never through a symbolic link as its last part.
LOOKUP_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_CHUNK = 65536


def read_all(fd: int, size: int = 0, limit: int | None = None, start: int = 0) -> bytes:
    """Everything in the file behind `fd` from offset `start` (its start: whatever the descriptor's offset),
    or its first `limit` bytes from there. `size` (what fstat said) lets a file that size come in one read: a
    shorter read than asked is the end of the file."""
    chunks = []
    offset = start
    wanted = size - start + 1 if size > start else _CHUNK
    while True:
        if limit is not None:
            wanted = min(wanted, limit - (offset - start))
        chunk = os.pread(fd, wanted, offset)
        chunks.append(chunk)
        offset += len(chunk)
        if len(chunk) < wanted or offset - start == limit:
            return b"".join(chunks)
        wanted = _CHUNK


def open_directory(name: str, dir_fd: int | None = None, *, lookup_only: bool = True) -> int:
    """A descriptor of the directory `name` (relative to `dir_fd`), never through a symbolic link as its last
    part: the caller checks what was opened (`os.fstat`), never the name, so nothing can be swapped between
    the check and the use. `lookup_only` (O_PATH): enough to open names inside it, not to read, fchmod or
    fsync it. Raises OSError: ENOTDIR or ELOOP when `name` is no directory or is a link."""
    flags = LOOKUP_FLAGS if lookup_only else (os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    return os.open(name, flags, dir_fd=dir_fd)
