"""The SMTP connections of one flush: one session per smarthost for the whole run, and failover.

`Sessions` opens a smarthost's session on first use and reuses it for every message; a smarthost that
cannot be reached is not tried again in the run, and the next one of the message's route is. `route` says
which smarthosts a sender's mail (to a recipient) goes through, or that it goes to the recipient's MX hosts;
an MX address is a target like a smarthost (`direct.MxRelay`), and a recipient one MX host defers (4xx) is
tried on the next (`_next_mx`). The delivery loop (`flush.Flusher`) records what comes back.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable

from pymta.config.model import DIRECT, Config, Rewrite, Smarthost
from pymta.delivery.direct import MxRelay
from pymta.delivery.smtp.outcome import RecipientOutcome, SessionError
from pymta.mail.text import Text
from pymta.queue.entry import QueueEntry
from pymta.records import replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from pymta.delivery.smtp.outcome import Status
    from pymta.delivery.smtp.session import SmtpSession, Transaction

# A smarthost whose sessions break this many times in a row in one run (no answer within a limit, the
# connection lost in the middle of a message), with no message answered in between, is not tried again in
# that run: each break costs a reconnect, and a server that takes every message and then hangs would
# otherwise cost a data_timeout (10 minutes) per message, holding the queue for hours.
MAX_BROKEN_SESSIONS = 2


def route(
    config: Config, sender: str, recipient: str | None = None
) -> tuple[tuple[Smarthost, ...] | None, Rewrite | None]:
    """The smarthosts to try for mail from `sender` (to `recipient`), in order, and the route's own
    rewrite: the first route whose recipient pattern matches `recipient`, else the first whose sender
    pattern matches `sender` (fnmatch, case-insensitive), else every configured smarthost and None.
    None for the smarthosts means the recipient's MX hosts: a route to `direct`, or `direct: true`."""
    matched = None
    if config.routes:  # none in the usual config: no generator is then made per recipient of every message
        matched = next(
            (
                rule
                for rule in config.routes
                if rule.recipient is not None and _matches(recipient, rule.recipient)
            ),
            None,
        ) or next(
            (rule for rule in config.routes if rule.sender is not None and _matches(sender, rule.sender)),
            None,
        )
    if matched is None:
        return (None if config.direct else config.smarthosts), None
    if matched.smarthost == DIRECT:
        return None, None
    return tuple(host for host in config.smarthosts if host.label == matched.smarthost), matched.rewrite


def _matches(address: str | None, pattern: str) -> bool:
    return address is not None and fnmatch.fnmatchcase(address.lower(), pattern.lower())


class Delivery:
    """One message handed to `Sessions.start`: where it is going, and what came of it."""

    __slots__ = (
        "hosts",
        "entry",
        "recipients",
        "prepare",
        "expanded",
        "host",
        "session",
        "transaction",
        "result",
        "failed_on",
        "untried",
    )

    def __init__(
        self,
        hosts: tuple[Smarthost, ...],
        entry: QueueEntry,
        recipients: list[str],
        prepare: Callable[[Smarthost], tuple[str, Text]],
        expanded: frozenset[str] = frozenset(),
    ) -> None:
        self.hosts = hosts
        self.entry = entry
        self.recipients = recipients
        self.prepare = prepare
        self.expanded = expanded  # recipients that are alias targets: no NOTIFY=SUCCESS for them
        self.host: Smarthost | None = None  # the smarthost it was started on
        self.session: SmtpSession | None = None
        self.transaction: Transaction | None = None
        # The outcomes and relay when they are known without an answer to this message (no smarthost works,
        # or it cannot be sent over SMTP at all).
        self.result: tuple[dict[str, RecipientOutcome], str] | None = None
        # The smarthosts whose session broke at this message before any of its text went out, and why: it
        # is not started there again in this run.
        self.failed_on: dict[Smarthost, str] = {}
        # Why it was not tried at all (its smarthosts were given up in this run), or None; `result` then
        # holds no outcomes, and the message's state is left as it was.
        self.untried: str | None = None


class Sessions:
    """The SMTP connections of one run, one per smarthost, opened on first use and reused for every message.

    A smarthost that cannot be reached (connect, greeting, TLS or AUTH fail) is not tried again in the same
    run: a dead server would otherwise cost a timeout per message. The next smarthost of the route is tried
    instead (DESIGN.md: "tried in order; the next one when one is unreachable").

    A session that breaks in the middle of a message (no answer within its limit, the connection lost)
    costs that message an attempt and the run a reconnect: the next message opens a new connection, and
    every message's state records only what happened to it (a message started behind the broken one is
    started again). Only after MAX_BROKEN_SESSIONS such breaks in a row, with no message answered between
    them, is the smarthost given up for the run; the messages left for it are then not tried at all, and
    their state stays as it was, due for the next run.

    A message is started, then finished (`start`, `finish`; `send` does both). The flush starts the next
    message before it finishes the current one, so that with PIPELINING the next one's commands go out with
    the current one's text (`SmtpSession.start`). When a session fails or reconnects while it finishes one
    message, the message started behind it had sent nothing that can be delivered: it is started again.
    """

    def __init__(self, config: Config, logger: logging.Logger) -> None:
        self.config = config
        self.log = logger
        self.open: dict[Smarthost, SmtpSession] = {}
        self.broken: dict[Smarthost, str] = {}  # smarthosts that could not be reached this run, and why
        self.breaks: dict[Smarthost, int] = {}  # sessions broken mid-message in a row, by smarthost
        # Smarthosts left for the next run after MAX_BROKEN_SESSIONS breaks in a row, and why.
        self.given_up: dict[Smarthost, str] = {}
        self.waiting: list[Delivery] = []  # started and not finished, oldest first

    def send(
        self,
        hosts: tuple[Smarthost, ...],
        entry: QueueEntry,
        recipients: list[str],
        prepare: Callable[[Smarthost], tuple[str, Text]],
    ) -> tuple[dict[str, RecipientOutcome], str]:
        """Send one message through the first smarthost that works; the outcome of each recipient and the
        relay that gave it. `prepare(host)` gives the envelope sender and the message as that host gets
        them. When none works, every recipient is deferred with the reasons."""
        return self.finish(self.start(hosts, entry, recipients, prepare))

    def start(
        self,
        hosts: tuple[Smarthost, ...],
        entry: QueueEntry,
        recipients: list[str],
        prepare: Callable[[Smarthost], tuple[str, Text]],
        expanded: frozenset[str] = frozenset(),
    ) -> Delivery:
        """Start one message (arguments as for `send`; `expanded` the recipients that are alias targets) on
        the first smarthost that works; `finish` gives its outcomes. Started messages are finished in the
        order they were started."""
        delivery = Delivery(hosts, entry, recipients, prepare, expanded)
        self._begin(delivery)
        if delivery.result is None:
            self.waiting.append(delivery)
        return delivery

    def finish(
        self, delivery: Delivery, *, while_waiting: Callable[[], None] | None = None
    ) -> tuple[dict[str, RecipientOutcome], str]:
        """The outcome of each recipient of a started message, and the relay that gave it. `while_waiting`
        as for `SmtpSession.finish`."""
        if delivery in self.waiting:
            self.waiting.remove(delivery)
        result = self._finish(delivery, while_waiting)
        for other in self.waiting:
            if other.transaction is not None and other.transaction.lost:
                self._begin(other)  # its session failed or reconnected meanwhile; nothing of it went out
        return result

    def _begin(self, delivery: Delivery) -> None:
        delivery.transaction = delivery.result = delivery.untried = None  # a restart forgets the lost one
        reasons = list(delivery.failed_on.values())
        given_up = []
        recipients = delivery.recipients
        # Each dict is asked only when it holds something: a smarthost (a frozen record) is hashed from all
        # its fields at every lookup, and in a run where nothing fails they stay empty.
        for host in delivery.hosts:
            if delivery.failed_on and host in delivery.failed_on:
                continue
            if self.given_up and host in self.given_up:
                given_up.append(self.given_up[host])
                continue
            session = self._session(host)
            if session is None:
                reasons.append(self.broken[host])
                continue
            sender, message = delivery.prepare(host)
            delivery.host, delivery.session = host, session
            try:
                delivery.transaction = session.start(sender, recipients, message, **_dsn(delivery))
            except ValueError as exc:
                reply = f"554 5.6.0 cannot be sent over SMTP: {exc}"
                delivery.result = _all(recipients, "failed", reply), session.relay
            return
        if given_up and not reasons:  # nothing happened to this message: no outcome to record
            delivery.untried = "; ".join(given_up)
            delivery.result = {}, "none"
            return
        relay = delivery.hosts[0].label if len(delivery.hosts) == 1 else "none"
        delivery.result = _all(recipients, "deferred", "; ".join(reasons)), relay

    def _finish(
        self, delivery: Delivery, while_waiting: Callable[[], None] | None = None
    ) -> tuple[dict[str, RecipientOutcome], str]:
        if delivery.transaction is not None and delivery.transaction.lost:
            self._begin(delivery)
        if delivery.result is not None:
            return delivery.result
        host, session, transaction = delivery.host, delivery.session, delivery.transaction
        assert host is not None and session is not None and transaction is not None
        recipients = delivery.recipients
        try:
            outcomes = session.finish(transaction, while_waiting=while_waiting)
        except SessionError as exc:
            self._close(host, session)
            if exc.reconnect:
                # The server closed the idle connection between messages (or said 421 to RSET): nothing of
                # this one reached it, and a new connection takes it.
                self._begin(delivery)
                return self._finish(delivery, while_waiting)
            self._broke(host, str(exc))
            if exc.untouched:
                # It failed at MAIL, RCPT or DATA: none of its text was sent, so the next smarthost of its
                # route may have it now (a 421 at MAIL used to wait for the next run on this one).
                delivery.failed_on[host] = str(exc)
                if self._may_fail_over(delivery):
                    self._begin(delivery)
                    return self._finish(delivery, while_waiting)
            # Otherwise the message was in flight: the server may have taken it (when the answer to its end
            # never came, the error says so), so it is not sent to another smarthost in this run (that would
            # risk a duplicate); it is deferred. The next message opens a new connection.
            return _all(recipients, "deferred", str(exc)), session.relay
        except ValueError as exc:
            return _all(recipients, "failed", f"554 5.6.0 cannot be sent over SMTP: {exc}"), session.relay
        if self.breaks:
            self.breaks.pop(host, None)  # it answers: a later break starts the count again
        answered = {outcome.recipient: outcome for outcome in outcomes}
        if isinstance(host, MxRelay):
            answered = self._next_mx(delivery, host, session, answered)
        return answered, session.relay

    def _next_mx(
        self, delivery: Delivery, host: MxRelay, session: SmtpSession, outcomes: dict[str, RecipientOutcome]
    ) -> dict[str, RecipientOutcome]:
        """The outcomes an MX host gave, each with its relay and TLS; the recipients it deferred (4xx) are
        tried on the next MX relays in this run (RFC 5321 5.1), those free now (`idle`). When none of
        them answers, the deferring reply stands."""
        outcomes = {
            recipient: replace(outcome, relay=session.relay, tls=session.tls_level, sts=host.sts)
            for recipient, outcome in outcomes.items()
        }
        deferred = [recipient for recipient, outcome in outcomes.items() if outcome.status == "deferred"]
        rest = self.idle(delivery.hosts[delivery.hosts.index(host) + 1 :])
        if not deferred or not rest:
            return outcomes
        again = Delivery(rest, delivery.entry, deferred, delivery.prepare, delivery.expanded)
        self._begin(again)
        if again.result is not None:
            return outcomes
        more, relay = self._finish(again)
        return outcomes | {
            recipient: outcome if outcome.relay else replace(outcome, relay=relay)
            for recipient, outcome in more.items()
        }

    def _may_fail_over(self, delivery: Delivery) -> bool:
        """Whether `delivery` can be started on the next working smarthost of its route now: there is one,
        and no other message is started on its session (messages are finished in the order they were
        started on a session, so this one cannot go behind them; it waits for the next run instead)."""
        target = next(
            (
                host
                for host in delivery.hosts
                if host not in self.broken and host not in self.given_up and host not in delivery.failed_on
            ),
            None,
        )
        if target is None:
            return False
        session = self.open.get(target)
        return session is None or not any(waiting.session is session for waiting in self.waiting)

    def _session(self, host: Smarthost) -> SmtpSession | None:
        if self.broken and host in self.broken:
            return None
        session = self.open.get(host)
        if session is None:
            from pymta.delivery.smtp.session import SmtpSession  # lazy: smtplib and ssl, for a smarthost only

            session = SmtpSession(host, self.config.hostname)
            try:
                session.open()
            except SessionError as exc:
                self._drop(host, str(exc))
                return None
            self.open[host] = session
            if isinstance(host, MxRelay) and host.sts == "testing" and session.tls_level != "verified":
                self.log.warning(
                    f"MX host {host.label}: tls={session.tls_level}; its domain's MTA-STS policy is in mode "
                    f"testing, and in mode enforce the mail would wait (no certificate valid for {host.host})"
                )
        return session

    def _drop(self, host: Smarthost, reason: str) -> None:
        """`host` cannot be reached: it is not tried again in this run."""
        self.log.warning(f"{_kind(host)} {host.label}: {reason}")
        self.broken[host] = reason
        session = self.open.pop(host, None)
        if session is not None:
            session.close()

    def _close(self, host: Smarthost, session: SmtpSession) -> None:
        """Close `session` (it failed); the next message for `host` opens a new one."""
        if self.open.get(host) is session:
            del self.open[host]
        session.close()

    def _broke(self, host: Smarthost, reason: str) -> None:
        """A session with `host` broke in the middle of a message: count it, and give the smarthost up for
        this run after MAX_BROKEN_SESSIONS in a row."""
        self.log.warning(f"{_kind(host)} {host.label}: {reason}")
        breaks = self.breaks.get(host, 0) + 1
        self.breaks[host] = breaks
        if breaks >= MAX_BROKEN_SESSIONS:
            self.given_up[host] = (
                f"{_kind(host)} {host.label} broke off {breaks} sessions in a row in this run"
            )
            self.log.warning(
                f"{_kind(host)} {host.label}: {breaks} sessions in a row broke off mid-message; not tried "
                "again in this run: the messages left for it wait, untried, for the next run"
            )

    def idle(self, hosts: tuple[Smarthost, ...]) -> tuple[Smarthost, ...]:
        """Those of `hosts` a message can be started on and finished at once: not broken or given up in
        this run, and no other message is started on their session (messages are finished in the order
        they were started on a session)."""
        busy = {waiting.session for waiting in self.waiting if waiting.session is not None}
        return tuple(
            host
            for host in hosts
            if host not in self.broken and host not in self.given_up and self.open.get(host) not in busy
        )

    def close(self) -> None:
        """QUIT every open session (a session with a message half sent is only closed)."""
        for session in self.open.values():
            session.close()
        self.open.clear()
        self.waiting.clear()


def _kind(host: Smarthost) -> str:
    return "MX host" if isinstance(host, MxRelay) else "smarthost"


def _dsn(delivery: Delivery) -> dict[str, Any]:
    """The DSN and body options of a message, as `SmtpSession.start` and `send` take them."""
    entry = delivery.entry
    return {
        "notify": entry.dsn_notify,
        "ret": entry.dsn_ret,
        "envid": entry.dsn_envid,
        "body_type": entry.body_type,
        "expanded": delivery.expanded,
    }


def _all(recipients: list[str], status: Status, reply: str) -> dict[str, RecipientOutcome]:
    return {recipient: RecipientOutcome(recipient, status, reply) for recipient in recipients}
