"""The channel between the root process of a system-mode flush and its delivery process (see `privsep`).

Each message on the socket is a frame: an 8-byte prefix holding two unsigned 32-bit big-endian
lengths (the header's and the payload's), the header (a JSON object in UTF-8, at most MAX_HEADER
bytes), then the payload (the message of a local delivery; at most `payload_limit`, nothing in the
other frames). The delivery process sends `deliver` requests, each answered by one frame whose header
is the outcome, and ends with one `done` (its report) or `error` frame. The reader checks the prefix
against its limits before it reads more: a frame over them is read and thrown away (so the two sides
stay in step), a frame that is no well-formed request is answered with a deferral; either costs only
its own message. A frame, once begun, must arrive within IO_TIMEOUT plus a second per MiB.

Root treats the delivery process as untrusted (it runs as `pymta`, the user that reads what users and
servers send): `delivery_request` is the whole of what root acts on, checked field by field.
"""

from __future__ import annotations

import json
import socket
import struct
import time

from pymta.mail.address import MAX_PATH, path_octets
from pymta.privileges import lookup_user
from pymta.queue.entry import MAX_TIME
from pymta.records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    from pymta.config.model import Config

_PREFIX = struct.Struct(">II")
# Bytes of a frame's JSON header: a request holds a user name and a path of at most 256 octets, six
# times that at worst once JSON escapes it, and an answer one line of reason.
MAX_HEADER = 16 * 1024
# Characters of free text (an error, a reason) put into a header: far inside MAX_HEADER when escaped.
MAX_TEXT = 2000
# Seconds a frame may pause once begun, and a send may block; the payload adds a second per MiB.
IO_TIMEOUT = 30.0
_BYTES_PER_SECOND = 1 << 20
# Bytes a local delivery's message may exceed `max_message_size` by: the headers delivery adds (Date,
# Message-ID, From), the envelope line a direct drop may carry, a bounce's report around the original.
PAYLOAD_ALLOWANCE = 8 << 20


class FrameError(Exception):
    """A frame broke off, stalled, or cannot be read: the channel is out of step and must close."""


class EndOfStreamError(FrameError):
    """The other side closed the channel between frames."""


@record(frozen=True)
class Refusal:
    """A request root does not serve, and the outcome that answers it."""

    status: Literal["deferred", "failed"]
    reason: str


def payload_limit(config: Config) -> int:
    """The largest message root takes for one local delivery."""
    return config.max_message_size + PAYLOAD_ALLOWANCE


def fit(text: str) -> str:
    """`text` cut to MAX_TEXT characters, so a header made of it stays within MAX_HEADER."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def send(channel: socket.socket, header: dict[str, object], payload: bytes = b"") -> None:
    """Send one frame; raises FrameError for a header over MAX_HEADER, OSError (a timeout) when the other
    side takes it too slowly."""
    data = json.dumps(header).encode()
    if len(data) > MAX_HEADER:
        raise FrameError(f"a header of {len(data)} bytes, more than {MAX_HEADER}")
    channel.settimeout(_frame_time(len(payload)))  # sendall's timeout covers the whole send
    channel.sendall(_PREFIX.pack(len(data), len(payload)) + data)
    if payload:
        channel.sendall(payload)


def send_quietly(channel: socket.socket, header: dict[str, object]) -> None:
    """`send` for a last word: when root cannot take it, the exit status still tells."""
    try:
        send(channel, header)
    except (OSError, FrameError):
        pass


def _frame_time(size: int) -> float:
    return IO_TIMEOUT + size / _BYTES_PER_SECOND


def receive(
    channel: socket.socket, *, wait: float | None, max_payload: int = 0
) -> tuple[bytes, bytes] | None:
    """The next frame's header and payload, waiting `wait` seconds (None: for good) for it to begin.

    A frame over the limits is read and thrown away: None. Raises EndOfStreamError when the channel closes
    between frames, FrameError when a frame breaks off or stalls (or none begins within `wait`)."""
    channel.settimeout(wait)
    try:
        first = channel.recv(_PREFIX.size)
    except TimeoutError:
        raise FrameError(f"nothing came for {wait:g} s") from None
    if not first:
        raise EndOfStreamError("the channel closed")
    header_size, payload_size = _PREFIX.unpack(
        first + _read_exact(channel, _PREFIX.size - len(first), time.monotonic() + IO_TIMEOUT)
    )
    deadline = time.monotonic() + _frame_time(header_size + payload_size)
    if header_size > MAX_HEADER or payload_size > max_payload:
        _discard(channel, header_size + payload_size, deadline)
        return None
    return _read_exact(channel, header_size, deadline), _read_exact(channel, payload_size, deadline)


def _read_exact(channel: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        got += _receive_into(channel, view[got : got + (1 << 20)], deadline)
    return bytes(data)


def _discard(channel: socket.socket, size: int, deadline: float) -> None:
    scratch = memoryview(bytearray(1 << 16))
    while size:
        size -= _receive_into(channel, scratch[: min(size, len(scratch))], deadline)


def _receive_into(channel: socket.socket, view: memoryview, deadline: float) -> int:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FrameError("a frame stalled part-way")
    channel.settimeout(left)
    try:
        count = channel.recv_into(view)
    except TimeoutError:
        raise FrameError("a frame stalled part-way") from None
    if not count:
        raise FrameError("the channel closed part-way through a frame")
    return count


@record(frozen=True)
class DeliveryRequest:
    """A local delivery root will make: to a local user, from a sender SMTP can carry, at a time asctime()
    can write."""

    user: str
    sender: str
    now: float


def delivery_request(header: object, size: int, max_payload: int) -> DeliveryRequest | Refusal:
    """`header` (a frame's decoded JSON, its payload `size` bytes) as a DeliveryRequest, or the refusal
    that answers it."""
    if size > max_payload:
        return Refusal(
            "failed", f"5.3.4 the message is larger than local delivery takes ({max_payload} bytes)"
        )
    if not isinstance(header, dict) or header.get("op") != "deliver":
        return Refusal("deferred", "root refused a request that is no local delivery")
    if set(header) != {"op", "user", "sender", "now"}:
        return Refusal("deferred", "root refused a local delivery request with other fields")
    user, sender, now = header["user"], header["sender"], header["now"]
    if not isinstance(user, str) or not isinstance(sender, str):
        return Refusal("deferred", "root refused a local delivery request whose user or sender is no text")
    if isinstance(now, bool) or not isinstance(now, int | float) or not 0 <= now <= MAX_TIME:
        return Refusal("deferred", "root refused a local delivery request whose time is out of range")
    from pymta.delivery.local import user_name_problem  # lazy: only a split flush

    problem = user_name_problem(user)
    if problem:
        return Refusal("failed", f"5.1.3 refused: {problem}")
    if lookup_user(user) is None:
        return Refusal("failed", f"5.1.1 no such local user: {user}")
    octets = path_octets(sender) if sender else 0
    if octets > MAX_PATH:
        return Refusal("failed", f"5.1.7 the sender is {octets} octets long; SMTP carries at most {MAX_PATH}")
    return DeliveryRequest(user, sender, float(now))


def decode(data: bytes) -> object:
    """A header's JSON, or None when it is none (deep nesting included)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None
