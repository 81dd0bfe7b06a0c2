"""What an SMTP session gives back: an outcome per recipient, or a `SessionError` that ends the session.

Results are values, failures of the session are exceptions (ARCHITECTURE.md, "Import rules"). `Status` is
the one vocabulary of a recipient's outcome, shared with local delivery (`delivery.local`),
and `RecipientOutcome` the one shape of it, kept by the flush for every recipient of an attempt.
"""

from __future__ import annotations

from pymta.errors import EX_TEMPFAIL, PymtaError
from pymta.records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    Status = Literal["delivered", "deferred", "failed"]
    # What one attempt made of a recipient (`delivery.record.Attempt`): a Status, or "expanded" (an alias,
    # sent on to its targets). A session's outcomes are always a Status.
    Result = Literal["delivered", "deferred", "failed", "expanded"]
    Stage = Literal["connect", "greeting", "tls", "auth", "credentials", "protocol", "closed"]


@record(frozen=True, slots=True)
class RecipientOutcome:
    """What became of one recipient of one message: what the server said, or what local delivery, the
    aliases or the flush decided (`delivery.record.Attempt` keeps one per recipient)."""

    recipient: str  # the address as it went out (on the wire: qualified)
    status: Result  # delivered (2xx to DATA), deferred (4xx), failed (5xx); expanded only from the flush
    reply: str  # "550 5.1.1 <x@example.org>: user unknown": code, enhanced code, text, on one line
    relay: str = ""  # who gave it: "host[ip]:port", "local" or "none"; "" from a session (`session.relay`)
    tls: str = ""  # the TLS a direct delivery got (verified, encrypted, none), for the log; "" otherwise
    sts: str = ""  # the MTA-STS mode its MX host was chosen under (enforce, testing), for the log

    @property
    def code(self) -> int:
        return int(self.reply[:3])

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status code, e.g. "5.1.1" (X.0.0 when the server gave none)."""
        return self.reply.split(" ", 2)[1]


class SessionError(PymtaError):
    """The session with the smarthost failed as a whole; every recipient not yet answered is deferred.

    `str(error)` is one line: `relay: what failed, why; what to do`. `stage` says where it failed. A failed
    session is always closed before the error is raised; the caller opens a new one. `reconnect` is True when
    the server went away *between* messages (the RSET before a message found the connection closed, or got
    421), or the connection ended while an earlier started message was finished: nothing of that message
    reached the server, so the caller should open the session again and resend it at once. `untouched` is True
    when the session failed at MAIL, RCPT or DATA, before any of the message's text was sent: the server
    cannot have taken it, so another smarthost may get it in the same run. `outcome_unknown` is True when the
    message's text went out and the answer to its end never came (no answer within `data_timeout`, the
    connection lost): the server may have taken it, so sending it again may deliver it twice (RFC 5321
    4.5.3.2.6); the error says so. `reply` is the server's reply that caused the failure, when there was one.
    `certificate_failed` is True when the server's certificate did not verify (`pymta test` then fetches it
    unverified, to show it).
    """

    exit_code = EX_TEMPFAIL

    def __init__(
        self,
        relay: str,
        reason: str,
        *,
        stage: Stage,
        reply: str | None = None,
        reconnect: bool = False,
        untouched: bool = False,
        outcome_unknown: bool = False,
        certificate_failed: bool = False,
    ) -> None:
        super().__init__(f"{relay}: {reason}")
        self.relay = relay
        self.reason = reason
        self.stage: Stage = stage
        self.reply = reply
        self.reconnect = reconnect
        self.untouched = untouched
        self.outcome_unknown = outcome_unknown
        self.certificate_failed = certificate_failed


_STATUS_BY_CLASS: dict[int, Status] = {2: "delivered", 4: "deferred", 5: "failed"}


def status_of(code: int) -> Status | None:
    """The outcome a reply code means for a recipient; None for codes outside 2xx, 4xx, 5xx."""
    return _STATUS_BY_CLASS.get(code // 100) if 200 <= code <= 599 else None


def known_status(code: int) -> Status:
    status = status_of(code)
    if status is None:  # the session raises SessionError for these first
        raise AssertionError(f"reply code {code} has no outcome")
    return status
