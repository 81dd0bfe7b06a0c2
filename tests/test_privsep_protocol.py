"""The root side of the privilege split's protocol, spoken to as a compromised delivery process would.

`privsep._serve` (the root process) reads frames (`pymta.delivery.frames`) from the delivery process over a
socket pair. Here a test thread plays a delivery process the `pymta` user has taken over: random bytes,
frames cut short, frames over the limits, frames that stall, and well-framed headers holding anything
JSON can hold. Whatever comes, root must end (never hang: every session here is given a deadline),
raise nothing but DeliveryProcessError, answer each complete request once, stay in step for the next
one, and call the local delivery function only for a well-formed request: a real local user, a sender
SMTP can carry, a time asctime() can write (ARCHITECTURE.md invariant 10). The real-users end of the same
promise is in tests/test_security_protocol.py.
"""

from __future__ import annotations

import json
import logging
import math
import pwd
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.config.model import Config, Local
from pymta.delivery import frames, local, privsep
from pymta.delivery.flush import FlushReport
from pymta.delivery.local import LocalOutcome, user_name_problem
from pymta.mail.address import MAX_PATH, path_octets
from pymta.records import replace

PREFIX = struct.Struct(">II")
MAX_MESSAGE = 1000  # the config's max_message_size here; with no allowance, also root's payload limit
SESSION_DEADLINE = 10.0  # seconds a session may take before the test calls it a hang
USERS = sorted(entry.pw_name for entry in pwd.getpwall() if not user_name_problem(entry.pw_name))
REPORT = {"busy": False, "housekeeping_done": True, "picked_up": 1, "attempted": 2, "sent": 1, "deferred": 1}
DONE = {"op": "done", "report": {**REPORT, "failed": 0}}


@dataclass
class Recorder:
    """Stands in for `local.deliver_as_recipient`: records each call, delivers nothing."""

    calls: list[tuple[str, bytes, str, float]] = field(default_factory=list)

    def __call__(self, user: str, message: bytes, *, sender: str, local: Local, now: float) -> LocalOutcome:
        self.calls.append((user, message, sender, now))
        return LocalOutcome("delivered", f"delivered to {user}")


@dataclass
class Session:
    """One run of `_serve` against what the test sent: its result or error, and root's answers."""

    result: FlushReport | None = None
    error: BaseException | None = None
    answers: list[dict[str, Any]] = field(default_factory=list)
    recorder: Recorder = field(default_factory=Recorder)


@pytest.fixture(autouse=True)
def small_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A payload limit of MAX_MESSAGE bytes and a short stall limit, so the hostile cases stay quick."""
    monkeypatch.setattr(frames, "PAYLOAD_ALLOWANCE", 0)
    monkeypatch.setattr(frames, "IO_TIMEOUT", 0.3)
    yield


def frame(header: object, payload: bytes = b"") -> bytes:
    data = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(len(data), len(payload)) + data + payload


def request(user: str = "root", sender: str = "a@example.org", now: object = 1.7e9) -> dict[str, object]:
    return {"op": "deliver", "user": user, "sender": sender, "now": now}


def serve(sent: bytes, *, close: bool = True) -> Session:
    """Run root's `_serve` on one end of a socket pair while `sent` goes into the other (then closed, when
    `close`); fail the test when the session has not ended within SESSION_DEADLINE."""
    session = Session()
    root_end, process_end = socket.socketpair()
    config = replace(Config(), max_message_size=MAX_MESSAGE)

    def run_root() -> None:
        try:
            session.result = privsep._serve(config, root_end, logging.getLogger("test"), session.recorder)
        except BaseException as error:  # noqa: BLE001 - the test looks at what it was
            session.error = error
        finally:
            root_end.close()

    def write() -> None:
        try:
            process_end.sendall(sent)
            if close:
                process_end.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # root ended the session first: what it did is what the test checks

    root = threading.Thread(target=run_root, daemon=True)
    writer = threading.Thread(target=write, daemon=True)
    root.start()
    writer.start()
    received = bytearray()
    process_end.settimeout(SESSION_DEADLINE)
    try:
        while chunk := process_end.recv(65536):
            received += chunk
    except (TimeoutError, OSError):
        pass
    root.join(SESSION_DEADLINE)
    writer.join(SESSION_DEADLINE)
    process_end.close()
    assert not root.is_alive(), "root's _serve hung"
    while received:
        header_size, payload_size = PREFIX.unpack_from(received)
        assert payload_size == 0 and header_size <= frames.MAX_HEADER
        end = PREFIX.size + header_size
        session.answers.append(json.loads(received[PREFIX.size : end]))
        received = received[end:]
    return session


def assert_root_kept_its_promises(session: Session) -> None:
    """Nothing but DeliveryProcessError escaped; local delivery only for well-formed requests."""
    assert session.error is None or isinstance(session.error, privsep.DeliveryProcessError), session.error
    for user, message, sender, now in session.recorder.calls:
        assert user in USERS
        assert isinstance(sender, str) and (sender == "" or path_octets(sender) <= MAX_PATH)
        assert isinstance(now, float) and math.isfinite(now) and 0 <= now
        assert isinstance(message, bytes) and len(message) <= MAX_MESSAGE
    for answer in session.answers:
        assert LocalOutcome.from_json(json.dumps(answer)).status in ("delivered", "deferred", "failed")


# --- examples: each kind of hostile frame ---


def test_a_well_formed_session_delivers_and_reports() -> None:
    session = serve(frame(request(), b"Subject: x\r\n\r\nhi\r\n") + frame(DONE))

    assert session.error is None and session.result == FlushReport(**DONE["report"])  # type: ignore[arg-type]
    assert session.recorder.calls == [("root", b"Subject: x\r\n\r\nhi\r\n", "a@example.org", 1.7e9)]
    assert session.answers == [
        {"status": "delivered", "reason": "delivered to root", "mailbox": "", "locked": False}
    ]


LONG = "a" * 70_000 + "@example.org"
BAD_REQUESTS: dict[str, tuple[bytes, str]] = {
    "a 70,000-character sender": (frame(request(sender=LONG)), "deferred"),  # a header over the limit
    "11,000 x é as sender": (frame(request(sender="é" * 11_000 + "@x")), "deferred"),
    "a 300-character sender": (frame(request(sender="a" * 298 + "@x")), "failed"),
    "a header over MAX_HEADER": (frame(b"{" + b" " * (16 * 1024)), "deferred"),
    "a payload over the limit": (frame(request(), b"x" * (MAX_MESSAGE + 1)), "deferred"),
    "not JSON": (frame(b"\xff\xfe not json"), "deferred"),
    "JSON nested 16,000 deep": (frame(b"[" * 16_000), "deferred"),
    "a list": (frame([1, 2]), "deferred"),
    "an unknown op": (frame({"op": "chown", "path": "/etc/shadow"}), "deferred"),
    "an extra field": (frame({**request(), "mailbox": "/etc/shadow"}), "deferred"),
    "a path as user": (frame(request(user="../../etc/passwd")), "failed"),
    "no such user": (frame(request(user="nosuchuser-pymta-test")), "failed"),
    "a user that is a number": (frame(request(user=0)), "deferred"),  # type: ignore[arg-type]
    "NaN as time": (frame(request(now=math.nan)), "deferred"),
    "1e300 as time": (frame(request(now=1e300)), "deferred"),
    "a time that is no number": (frame(request(now="now")), "deferred"),
    "true as time": (frame(request(now=True)), "deferred"),
    "a done frame with a bad report": (frame({"op": "done", "report": {"busy": "yes"}}), ""),
}


@pytest.mark.parametrize(("sent", "expected"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_costs_only_itself(sent: bytes, expected: str) -> None:
    good = frame(request(), b"hello")

    session = serve(sent + good + frame(DONE))

    assert_root_kept_its_promises(session)
    if not expected:  # a last word that is malformed ends the run with a clear error
        assert isinstance(session.error, privsep.DeliveryProcessError) and "malformed report" in str(
            session.error
        )
        return
    assert session.error is None and session.result is not None
    assert [answer["status"] for answer in session.answers] == [expected, "delivered"]
    assert session.recorder.calls == [("root", b"hello", "a@example.org", 1.7e9)]  # the bad one never


@pytest.mark.parametrize(
    "sent",
    [
        PREFIX.pack(100, 0)[:5],  # the prefix cut short
        PREFIX.pack(100, 0) + b'{"op": "deliver"',  # the header cut short
        frame(request(), b"x" * 10)[:-3],  # the payload cut short
    ],
    ids=["prefix", "header", "payload"],
)
@pytest.mark.parametrize("then", ["closed", "silent"])
def test_a_frame_cut_short_ends_the_session_without_a_hang(sent: bytes, then: str) -> None:
    session = serve(frame(request(), b"first") + sent, close=then == "closed")

    assert isinstance(session.error, privsep.DeliveryProcessError), session.error
    assert "broke off" in str(session.error)
    assert session.recorder.calls == [("root", b"first", "a@example.org", 1.7e9)]
    assert len(session.answers) == 1


def test_an_error_frame_ends_the_run_with_its_code_and_one_line() -> None:
    session = serve(frame({"op": "error", "message": "spool gone\nforged log line", "code": 73}))

    assert isinstance(session.error, privsep.DeliveryProcessError)
    assert session.error.exit_code == 73 and "\n" not in str(session.error)
    for code in (0, 300, True, "73"):
        other = serve(frame({"op": "error", "message": "x", "code": code}))
        assert isinstance(other.error, privsep.DeliveryProcessError) and other.error.exit_code == 70


def test_a_closed_channel_between_frames_is_the_end_of_the_process() -> None:
    session = serve(frame(request(), b"only"))
    assert session.error is None and session.result is None and len(session.answers) == 1


# --- fuzzing ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
hostile_users = st.sampled_from([*USERS[:5], "", "-root", ".", "root\n", "a" * 300, "x.lock", "nosuchuser"])
hostile_senders = st.sampled_from(["", "a@x", "a" * 255, "a" * 254, "é" * 127, "<>", "\x00\r\n"]) | st.text(
    max_size=300
)
hostile_times = st.sampled_from([0, -1, 1.7e9, 2.6e11, math.inf, -math.inf, math.nan, True, "1", None])
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(["deliver", "done", "error", "Deliver", ""])},
    optional={"user": hostile_users, "sender": hostile_senders, "now": hostile_times, "extra": json_values},
)
headers = requests | st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values
complete_frames = st.builds(
    lambda header, payload: frame(header, payload), headers, st.binary(max_size=MAX_MESSAGE + 10)
) | st.builds(
    lambda junk, size, payload: PREFIX.pack(len(junk), size) + junk + payload[:size],
    st.binary(max_size=200),
    st.integers(0, 50),
    st.binary(min_size=50, max_size=50),
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(complete_frames, max_size=6))
def test_root_stays_in_step_whatever_complete_frames_come(sent: list[bytes]) -> None:
    session = serve(b"".join(sent) + frame(request(), b"last") + frame(DONE))

    assert_root_kept_its_promises(session)
    if session.error is None and isinstance(session.result, FlushReport):
        assert session.recorder.calls[-1] == ("root", b"last", "a@example.org", 1.7e9)
        assert session.answers[-1]["status"] == "delivered"


@FUZZ
@given(st.binary(max_size=400))
def test_root_never_hangs_or_crashes_on_random_bytes(sent: bytes) -> None:
    assert_root_kept_its_promises(serve(sent))


@FUZZ
@given(st.lists(complete_frames, min_size=1, max_size=4), st.data())
def test_root_never_hangs_on_a_session_cut_anywhere(sent: list[bytes], data: st.DataObject) -> None:
    """Cut inside a frame, the rest may never come (the process stalls): root gives up on its own. Cut
    between frames, root waits for the next for as long as the process lives, so the process ends."""
    stream = b"".join(sent)
    cut = data.draw(st.integers(0, len(stream)))
    boundaries = {sum(map(len, sent[:count])) for count in range(len(sent) + 1)}
    stall = cut not in boundaries and data.draw(st.booleans())
    assert_root_kept_its_promises(serve(stream[:cut], close=not stall))


# --- the delivery process's side ---


def test_the_delivery_process_asks_root_only_what_root_would_serve() -> None:
    root_end, process_end = socket.socketpair()
    recorder = Recorder()
    config = replace(Config(), max_message_size=MAX_MESSAGE)
    root = threading.Thread(
        target=privsep._serve, args=(config, root_end, logging.getLogger("test"), recorder), daemon=True
    )
    root.start()
    agent = privsep._LocalAgent(process_end, frames.payload_limit(config))
    try:
        too_long = agent.deliver("root", b"hello", sender=LONG, local=Local(), now=1.7e9)
        too_large = agent.deliver("root", b"x" * (MAX_MESSAGE + 1), sender="", local=Local(), now=1.7e9)
        delivered = agent.deliver("root", b"hello", sender="a@example.org", local=Local(), now=1.7e9)
    finally:
        process_end.close()
        root.join(SESSION_DEADLINE)
        root_end.close()

    assert too_long.status == "failed" and "5.1.7" in too_long.reason
    assert too_large.status == "failed" and "5.3.4" in too_large.reason
    assert delivered == LocalOutcome("delivered", "delivered to root")
    assert recorder.calls == [("root", b"hello", "a@example.org", 1.7e9)]  # the refused ones were not sent


def test_the_delivery_process_gives_up_on_a_silent_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root that takes a request and never answers: the delivery process waits as long as a local delivery
    may take, then defers that message and every later local one at once (the channel is out of step)."""
    monkeypatch.setattr(local, "child_time_limit", lambda lock_timeout=0.0: 0.1)  # privsep imports it late
    root_end, process_end = socket.socketpair()
    agent = privsep._LocalAgent(process_end, MAX_MESSAGE)
    try:
        first = agent.deliver("root", b"one", sender="", local=Local(), now=1.7e9)
        second = agent.deliver("root", b"two", sender="", local=Local(), now=1.7e9)
        root_end.setblocking(False)
        sent = root_end.recv(65536)
    finally:
        root_end.close()
        process_end.close()

    assert first.status == second.status == "deferred"
    assert "did not answer" in first.reason and second.reason == first.reason
    assert sent.endswith(b"one") and b"two" not in sent  # the second was not even sent
