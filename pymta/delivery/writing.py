"""What writing a mailbox shares (`mbox`, `maildir`): the deferrals that stop a write, and the word a
delivery child sends its parent when the write begins.

A message reaches the writers as `Pieces`: a function that gives its pieces, LF line ends, each cut at a line
end (`unix_lines`), anew for every try. A large one is so read from the queue file as it is written, never
held whole (`mail.text.Text`); one that cannot be read on the way is a deferral like a full disk.

A write that cannot happen raises DeferredError with the reason, one line saying what to fix; `local` turns
it into the recipient's deferral. In a delivery child (`local`), the child announces the moment it holds the
mailbox and begins to write (`begin_writing`): from then on its parent gives it CHILD_WRITE_TIMEOUT to
finish instead of the time to start.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Iterator

from pymta.mail.text import UnreadableText

# errno values that mean "no room": disk full, quota, file size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What the child sends down the answer pipe before the write; from then its deadline is CHILD_WRITE_TIMEOUT.
WRITING = b"W"


# A message to write: a function that gives its pieces, anew for each try (an mbox replaced while we waited
# for its lock is written again).
Pieces = Callable[[], Iterable[bytes]]


class DeferredError(Exception):
    """Stop this delivery and defer it with the message as reason."""


class LockedError(DeferredError):
    """The mbox stayed locked past the deadline."""


class UncreatableError(DeferredError):
    """The mbox is missing and this user may not create it (EACCES, EPERM: the mail spool lets only root
    or a group create files). `plain` says so without the fix for the mbox."""

    def __init__(self, text: str, plain: str) -> None:
        super().__init__(text)
        self.plain = plain


def euid() -> int:
    """This process's effective uid: as root, what is created is given to the user."""
    return os.geteuid()


def describe(error: OSError) -> str:
    return error.strerror or str(error)


def clean(sender: str) -> str:
    """`sender` safe for one header or From_ line: controls dropped, whitespace as '_'; "" stays ""."""
    return "".join("_" if char.isspace() else char for char in sender if ord(char) >= 32 and char != "\x7f")


# In a delivery child: the answer pipe, where `begin_writing` tells the parent that the write begins.
_writing_fd: int | None = None


def announce_to(fd: int) -> None:
    """In a delivery child: `begin_writing` tells the parent through `fd`."""
    global _writing_fd
    _writing_fd = fd


def begin_writing() -> None:
    """In a delivery child with the mailbox in hand: tell the parent, once, that the write begins."""
    global _writing_fd
    if _writing_fd is not None:
        os.write(_writing_fd, WRITING)
        _writing_fd = None


def unix_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """A message's blocks (CRLF line ends) with LF line ends, in pieces that each end a line (but the last):
    a CRLF is never split, and what is done per line (`>From ` quoting) never meets half of one. A line
    longer than a block is gathered as a list of its parts and joined once it ends, not copied anew with
    every block."""
    carried: list[bytes] = []  # the parts of a line that has not ended yet
    for block in blocks:
        cut = block.rfind(b"\n") + 1
        if not cut:
            if block:
                carried.append(block)
            continue
        data = b"".join((*carried, block[:cut])) if carried else block[:cut]
        yield data.replace(b"\r\n", b"\n")
        carried = [block[cut:]] if cut < len(block) else []
    if carried:
        yield b"".join(carried).replace(b"\r\n", b"\n")


def write_pieces(fd: int, pieces: Iterable[bytes]) -> None:
    """Write every piece to `fd`. OSError as os.write raises it; UnreadableText when the queue file behind
    them fails (the caller undoes what was written either way)."""
    for piece in pieces:
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view) :]


def failure_text(error: OSError | UnreadableText) -> str:
    """What went wrong with a write, for a deferral's reason (`describe`, or why the message could not be
    read), and a hint when it was no room."""
    if isinstance(error, UnreadableText):
        return str(error)
    full = " (disk full or over quota?)" if error.errno in NO_SPACE else ""
    return f"{describe(error)}{full}"
