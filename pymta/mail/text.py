"""A message's text as delivery holds it: the header in memory, a large body read from the spool in blocks.

A queued message may be as large as `max_message_size` (35 MB by default), and delivery must neither hold it
whole nor copy it to add a header field. A `Text` is `head`, bytes in memory that hold at least the whole
header block and the line that ends it (all of a small message), followed by `rest` bytes that `read(n,
offset)` (an `os.pread` of the queue file) gives from `start` on. Completing a message
(`message.complete_head`) or rewriting its From: changes only `head`; the DATA stream
(`delivery/smtp/data.py`) and the mailbox writers take it in blocks (`blocks`). What needs the whole message
at once (fitting lines over 998 octets, the 7-bit downgrade, a notice that returns the message) asks for
`whole()`: rare, and correct, just not streamed.

Main invariant: `head + the rest` is exactly the message, whichever way it is read; the queue file behind
`read` never changes while it is locked (queue files are written once and only ever unlinked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

# A body is read and sent in blocks of this size: large enough that a 30 MB message costs 120 reads and
# writes, small enough that no copy of it matters.
BLOCK = 256 * 1024
# RFC 5321 4.5.3.1.6: the longest line SMTP carries, CRLF not counted (`message.MAX_LINE`).
_MAX_LINE = 998
_CRLF = b"\r\n"


class UnreadableText(Exception):
    """The queue file behind a `Text` could not be read, or ended early, while the message was used. Not an
    OSError: it costs that message (deferred, ARCHITECTURE.md invariant 11), not the run."""


class Text:
    """A message: `head` in memory, then `rest` bytes that `read(n, offset)` gives from `start` on."""

    __slots__ = ("head", "read", "start", "rest", "_ascii")

    def __init__(
        self,
        head: bytes,
        read: Callable[[int, int], bytes] | None = None,
        start: int = 0,
        rest: int = 0,
    ) -> None:
        if rest and read is None:
            raise ValueError("a Text with more than its head needs a way to read it")
        self.head = head
        self.read = read
        self.start = start
        self.rest = rest
        self._ascii: bool | None = None

    def __len__(self) -> int:
        return len(self.head) + self.rest

    @property
    def in_memory(self) -> bool:
        """All of it is `head`."""
        return not self.rest

    def with_head(self, head: bytes) -> Text:
        """The same message with `head` in place of this one's (the rest is shared, not read)."""
        return Text(head, self.read, self.start, self.rest)

    def blocks(self, size: int = BLOCK) -> Iterator[bytes]:
        """The message in pieces: `head`, then the rest `size` bytes at a time. UnreadableText when the file
        behind it fails, or ends early (it cannot, unless someone truncated a locked queue file)."""
        if self.head:
            yield self.head
        offset, left = self.start, self.rest
        while left > 0:
            assert self.read is not None
            try:
                chunk = self.read(min(size, left), offset)
            except OSError as exc:
                raise UnreadableText(f"cannot read the queued message: {exc.strerror}") from exc
            if not chunk:
                raise UnreadableText("the queued message is shorter than when it was read")
            yield chunk
            offset += len(chunk)
            left -= len(chunk)

    def whole(self) -> bytes:
        """All of it in memory: `head` itself when that is all."""
        return self.head if not self.rest else b"".join(self.blocks())

    def isascii(self) -> bool:
        """Whether every byte is 7-bit (read through once, then remembered)."""
        if self._ascii is None:
            self._ascii = (
                self.head.isascii() if not self.rest else all(block.isascii() for block in self.blocks())
            )
        return self._ascii

    def header_isascii(self) -> bool:
        """Whether what comes before the first empty line (all of it without one) is 7-bit."""
        end = self.head.find(b"\r\n\r\n")
        if end >= 0:
            return self.head[:end].isascii()
        return self.isascii()

    def has_long_lines(self) -> bool:
        """Whether a line (between CRLFs) is longer than 998 octets, read block by block: only the last,
        unfinished line of a block is carried into the next (and never more than a line's limit of it)."""
        if len(self) <= _MAX_LINE:
            return False
        carried = b""
        for block in self.blocks():
            lines = (carried + block).split(_CRLF) if carried else block.split(_CRLF)
            carried = lines.pop()  # a CR at its end may be half of the CRLF that ends it: not counted yet
            if len(carried) - carried.endswith(b"\r") > _MAX_LINE or (
                lines and max(map(len, lines)) > _MAX_LINE
            ):
                return True
        return len(carried) > _MAX_LINE
