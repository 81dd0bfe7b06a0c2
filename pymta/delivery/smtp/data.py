"""A message's text as DATA carries it (RFC 5321 4.5.2), made block by block: a large message is never held
whole, nor copied.

Every line ending becomes CRLF (a bare LF or a lone CR too: the spool holds CRLF already, since sendmail
normalises, but a drop written by other means must not smuggle an end of DATA past the server), a line that
starts with "." gets a second one, and the text ends with CRLF before the final ".". Each of these is
carried across the edge of a block: a CR that ends a block waits for the next one (it may be half of a
CRLF), and a "." that starts a block is stuffed when the block before ended a line.

Main invariant: the blocks joined are the same bytes, whatever the blocks' sizes, as the whole message
encoded at once (`tests/test_data_stream.py` holds that with hypothesis).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

CRLF = b"\r\n"
END = b".\r\n"


class DataEncoder:
    """Encodes one message's text, block by block (`encode`), then its end (`finish`)."""

    __slots__ = ("_at_line_start", "_held_cr", "_empty")

    def __init__(self) -> None:
        self._at_line_start = True  # the last byte out ended a line (or nothing went out yet)
        self._held_cr = False  # the last block ended with CR: it is written with the next one
        self._empty = True

    def encode(self, block: bytes) -> bytes:
        """The next piece of the encoded text (possibly empty: a lone CR waits for what follows it)."""
        if self._held_cr:
            block = b"\r" + block
            self._held_cr = False
        if block.endswith(b"\r"):
            block = block[:-1]
            self._held_cr = True
        if not block:
            return b""
        self._empty = False
        lf = block.count(b"\n")
        if lf != block.count(CRLF) or lf != block.count(b"\r"):  # a bare LF or a lone CR: rare, normalised
            block = block.replace(CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", CRLF)
        if b"\n." in block:
            block = block.replace(b"\n.", b"\n..")
        if self._at_line_start and block.startswith(b"."):
            block = b"." + block
        self._at_line_start = block.endswith(b"\n")
        return block

    def finish(self) -> bytes:
        """What ends the text: a CR held back (as CRLF), the CRLF a last line lacks, and the final dot."""
        if self._held_cr:
            return CRLF + END
        if self._empty or self._at_line_start:
            return END
        return CRLF + END


def encoded(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The DATA text of the message made of `blocks`, ending with the final dot, piece by piece."""
    encoder = DataEncoder()
    for block in blocks:
        piece = encoder.encode(block)
        if piece:
            yield piece
    yield encoder.finish()
