"""What writing a mailbox shares (`mbox`, `maildir`): the deferrals that stop a write, and the word a
delivery child sends its parent when the write begins.

A write that cannot happen raises DeferredError with the reason, one line saying what to fix; `local` turns
it into the recipient's deferral. In a delivery child (`local`), the child announces the moment it holds the
mailbox and begins to write (`begin_writing`): from then on its parent gives it CHILD_WRITE_TIMEOUT to
finish instead of the time to start.
"""

from __future__ import annotations

import errno
import os

# errno values that mean "no room": disk full, quota, file size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What the child sends down the answer pipe before the write; from then its deadline is CHILD_WRITE_TIMEOUT.
WRITING = b"W"


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
