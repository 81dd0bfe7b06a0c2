"""The delivery loop: which message is due, where it goes, what the answer means, when to try again.

One flush runs at a time (an flock on the spool; a second one asks the first to look again and exits at
once). A run picks up new submissions, then takes the due messages oldest first and hands each to the first
smarthost of its route that answers, over one SMTP connection per smarthost for the whole run. After the
server's answer to each message the outcome of every recipient is written to the message's state before
the next message is sent, so a recipient the server accepted is never sent again (DESIGN.md invariant 3).

What an answer means (DESIGN.md, "Temporary vs permanent"): 2xx delivers a recipient; 4xx, a network,
timeout, TLS or AUTH problem, or a password source that fails defers it; only a 5xx answer to MAIL, RCPT or
DATA fails it. Deferred recipients are tried again after the next interval of `retry.schedule` (with a
little jitter, so that many messages deferred together do not all come back in the same second); past
`retry.lifetime` they fail as expired. A message whose recipients are all done leaves the queue when all
were delivered, and stays in state `failed` otherwise, for the admin and the bounce.
"""

from __future__ import annotations

import fnmatch
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import log
from .address import qualify
from .config import Config, Smarthost
from .message import complete
from .smtp import RecipientOutcome, SessionError, SmtpSession, Status
from .spool import NEVER, QueueEntry, Spool

# Deferred messages come back within +-10% of their interval, so a burst does not retry as a burst.
RETRY_JITTER = 0.1
# What the spool reports, by the status a recipient can have.
PENDING = ("pending", "deferred")
# A recipient's status as the log line says it, in Postfix's words.
LOGGED_STATUS = {"delivered": "sent", "deferred": "deferred", "failed": "bounced"}
NO_SMARTHOST = "no smarthost configured; add one under 'smarthosts:' in the config (see pymta.yaml(5))"


@dataclass
class FlushReport:
    """What one run did, for the command's summary and for tests."""

    busy: bool = False
    picked_up: int = 0
    attempted: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0

    def count(self, status: str) -> None:
        """Count one recipient's outcome: delivered, deferred or failed."""
        if status == "delivered":
            self.sent += 1
        elif status == "deferred":
            self.deferred += 1
        else:
            self.failed += 1

    def summary(self) -> str:
        if self.busy:
            return "another flush is running; it will deliver what is due"
        return (
            f"{self.attempted} message{'s' if self.attempted != 1 else ''} tried: {self.sent} recipients "
            f"delivered, {self.deferred} deferred, {self.failed} failed"
        )


class Flusher:
    """One run over the queue. `now` and `jitter` are injectable so tests can move time."""

    def __init__(
        self,
        config: Config,
        logger: logging.Logger | None = None,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.log = logger or logging.getLogger(log.LOGGER_NAME)
        self.clock = clock
        self.jitter = jitter
        self.sessions = Sessions(config, self.log)

    def run(self, *, force: bool = False, progress: Callable[[int, int], None] | None = None) -> FlushReport:
        """Deliver what is due (with `force`, everything waiting); report what happened.

        `progress(done, total)` is called after each message, for a progress display.
        """
        report = FlushReport()
        if not self.spool.exists():
            return report
        lock = self.spool.lock_flush()
        if lock is None:
            self.spool.request_flush()
            report.busy = True
            return report
        while lock is not None:
            try:
                self.spool.remove_leftovers()
                while True:
                    self.spool.take_flush_request()
                    self._one_pass(report, force, progress)
                    if not self.spool.take_flush_request():
                        break
            finally:
                self.sessions.close()
                self.spool.finish_removals()
                self.spool.release_flush(lock)
            # A flush that started after our last look found the lock taken and left a request: honour it,
            # unless yet another flush has the lock now (then that one will).
            lock = self.spool.lock_flush() if self.spool.has_flush_request() else None
        return report

    def due(self, force: bool) -> list[str]:
        return self.spool.due(NEVER - 1 if force else self.clock())

    def _one_pass(
        self, report: FlushReport, force: bool, progress: Callable[[int, int], None] | None
    ) -> None:
        picked = self.spool.pick_up(self.config.max_message_size, self.log.warning)
        report.picked_up += len(picked)
        self.spool.remove_stale_tmp(self.clock())
        due = self.due(force)
        for done, name in enumerate(due, 1):
            self._deliver(name, report)
            if progress is not None:
                progress(done, len(due))

    def _deliver(self, name: str, report: FlushReport) -> None:
        try:
            lock = self.spool.lock_message(name)
        except FileNotFoundError:
            return  # deleted by an admin while we worked
        if lock is None:
            self.log.info(f"id={name} is being changed by a queue command; it waits for the next run")
            return
        try:
            self._deliver_locked(name, report)
        finally:
            self.spool.unlock_message(lock)

    def _deliver_locked(self, name: str, report: FlushReport) -> None:
        try:
            entry, message = self.spool.load(name)
        except FileNotFoundError:
            return  # deleted by an admin while we worked
        except (OSError, ValueError) as exc:
            self.log.error(f"id={name} cannot read the queued message ({exc}); moved to corrupt/")
            self.spool.set_aside_queued(name)
            return
        pending = [r.address for r in entry.recipients if r.status in PENDING]
        if not pending:
            return
        report.attempted += 1
        now = self.clock()
        if now - entry.queued_at > self.config.retry.lifetime:
            from .config import format_duration

            reason = f"expired: not delivered within {format_duration(self.config.retry.lifetime)}"
            self._record(entry, _all(pending, "failed", reason), "none", report)
            return
        hosts = route(self.config, qualify(entry.sender, self.config.domain))
        if not hosts:
            self._record(entry, _all(pending, "deferred", NO_SMARTHOST), "none", report)
            return
        domain = self.config.domain
        wire = complete(
            message,
            queued_at=entry.queued_at,
            message_id=entry.id,
            sender=entry.sender,
            submitted_by=entry.submitted_by,
            full_name=entry.full_name,
            domain=domain,
            hostname=self.config.hostname,
        )
        # Bare local parts go out qualified; `root` and `root@domain` are one recipient on the wire.
        on_wire = {address: qualify(address, domain) for address in pending}
        results, relay = self.sessions.send(
            hosts, entry, qualify(entry.sender, domain), list(dict.fromkeys(on_wire.values())), wire
        )
        self._record(entry, {address: results[on_wire[address]] for address in pending}, relay, report)

    def _record(
        self, entry: QueueEntry, results: dict[str, RecipientOutcome], relay: str, report: FlushReport
    ) -> None:
        """Write the outcome of one attempt to the message's state (or remove it when all are delivered)."""
        now = self.clock()
        attempts = entry.attempts + 1
        recipients: dict[str, dict[str, str | None]] = {}
        last_error = None
        for recipient in entry.recipients:
            status, error = recipient.status, recipient.last_error
            result = results.get(recipient.address)
            if result is not None:
                status = result.status
                error = None if status == "delivered" else result.reply
                last_error = error or last_error
                report.count(status)
                self.log.info(
                    log.delivery_line(
                        entry.id,
                        result.recipient,
                        relay,
                        now - entry.queued_at,
                        attempts,
                        LOGGED_STATUS[status],
                        result.reply,
                    )
                )
            recipients[recipient.address] = {"status": status, "last_error": error}
        statuses = {r["status"] for r in recipients.values()}
        if statuses <= {"delivered"}:
            self.spool.remove(entry)
            return
        if statuses & set(PENDING):
            state = "deferred"
            delay = self.config.retry.delay_after(attempts)
            next_attempt = now + delay * (1 + RETRY_JITTER * (2 * self.jitter() - 1))
        else:
            state = "failed"
            next_attempt = NEVER
        self.spool.write_state(
            entry.id,
            {
                "state": state,
                "attempts": attempts,
                "last_attempt": now,
                "next_attempt": next_attempt if state == "deferred" else None,
                "last_error": last_error or entry.last_error,
                "relay": relay,
                "recipients": recipients,
            },
            next_attempt,
        )


def route(config: Config, sender: str) -> tuple[Smarthost, ...]:
    """The smarthosts to try for a message from `sender`, in order: the first route whose pattern matches
    (fnmatch, case-insensitive), else every configured smarthost."""
    for rule in config.routes:
        if fnmatch.fnmatchcase(sender.lower(), rule.sender.lower()):
            return tuple(host for host in config.smarthosts if host.label == rule.smarthost)
    return config.smarthosts


class Sessions:
    """The SMTP connections of one run, one per smarthost, opened on first use and reused for every message.

    A smarthost that cannot be reached, or whose session breaks mid-message, is not tried again in the same
    run: a dead server would otherwise cost a timeout per message. The next smarthost of the route is tried
    instead (DESIGN.md: "tried in order; the next one when one is unreachable").
    """

    def __init__(self, config: Config, logger: logging.Logger) -> None:
        self.config = config
        self.log = logger
        self.open: dict[Smarthost, SmtpSession] = {}
        self.broken: dict[Smarthost, str] = {}  # smarthosts that failed this run, and why

    def send(
        self,
        hosts: tuple[Smarthost, ...],
        entry: QueueEntry,
        sender: str,
        recipients: list[str],
        message: bytes,
    ) -> tuple[dict[str, RecipientOutcome], str]:
        """Send one message through the first smarthost that works; the outcome of each recipient and the
        relay that gave it. When none works, every recipient is deferred with the reasons."""
        reasons = []
        for host in hosts:
            session = self._session(host)
            if session is None:
                reasons.append(self.broken[host])
                continue
            try:
                return self._send(session, entry, sender, recipients, message), session.relay
            except SessionError as exc:
                self._drop(host, str(exc))
                # The message was in flight: the connection may have died after the server took it, so it
                # is not sent to another smarthost in this run (that would risk a duplicate); it is deferred.
                return _all(recipients, "deferred", str(exc)), session.relay
        relay = hosts[0].label if len(hosts) == 1 else "none"
        return _all(recipients, "deferred", "; ".join(reasons)), relay

    def _send(
        self, session: SmtpSession, entry: QueueEntry, sender: str, recipients: list[str], message: bytes
    ) -> dict[str, RecipientOutcome]:
        for attempt in (1, 2):
            try:
                outcomes = session.send(
                    sender,
                    recipients,
                    message,
                    notify=entry.dsn_notify,
                    ret=entry.dsn_ret,
                    envid=entry.dsn_envid,
                    body_type=entry.body_type,
                )
            except SessionError as exc:
                if not exc.reconnect or attempt == 2:
                    raise
                # The server closed the idle connection between messages: nothing of this one reached it.
                session.close()
                session.open()
                continue
            except ValueError as exc:
                return _all(recipients, "failed", f"554 5.6.0 cannot be sent over SMTP: {exc}")
            return {outcome.recipient: outcome for outcome in outcomes}
        raise AssertionError("unreachable")

    def _session(self, host: Smarthost) -> SmtpSession | None:
        if host in self.broken:
            return None
        session = self.open.get(host)
        if session is None:
            session = SmtpSession(host, self.config.hostname)
            try:
                session.open()
            except SessionError as exc:
                self._drop(host, str(exc))
                return None
            self.open[host] = session
        return session

    def _drop(self, host: Smarthost, reason: str) -> None:
        self.log.warning(f"smarthost {host.label}: {reason}")
        self.broken[host] = reason
        session = self.open.pop(host, None)
        if session is not None:
            session.close()

    def close(self) -> None:
        """QUIT every open session."""
        for session in self.open.values():
            session.close()
        self.open.clear()


def _all(recipients: list[str], status: Status, reply: str) -> dict[str, RecipientOutcome]:
    return {recipient: RecipientOutcome(recipient, status, reply) for recipient in recipients}


TEST_MESSAGE = (
    "Subject: pymta test message\r\n"
    "To: {to}\r\n"
    "Auto-Submitted: auto-generated\r\n"
    "\r\n"
    "This is a test message from pymta on {host}, sent with `pymta test --to`.\r\n"
    "If you read it, delivery through the smarthost works.\r\n"
)


def send_test_message(
    config: Config, to: str, logger: logging.Logger | None = None
) -> tuple[str, QueueEntry | None]:
    """Queue a test message for `to` as the user running this, and run a flush.

    Returns the queue id and, when the message is still waiting (deferred, failed, or left to a flush that
    was already running), its entry; None when it was delivered.
    """
    from .address import recipients_from_args
    from .spool import real_user

    recipients = recipients_from_args([to])
    login, gecos, uid = real_user()
    envelope: dict[str, object] = {
        "sender": login,
        "recipients": recipients,
        "submitted_by": login,
        "uid": uid,
        "full_name": gecos,
        "queued_at": time.time(),
    }
    text = TEST_MESSAGE.format(to=", ".join(recipients), host=config.hostname)
    spool = Spool(config.spool)
    queue_id = spool.submit(envelope, text.encode("utf-8"))
    Flusher(config, logger).run()
    for location in ("queue", "new"):
        try:
            return queue_id, spool.read_entry(location, queue_id)
        except FileNotFoundError:
            continue
    return queue_id, None
