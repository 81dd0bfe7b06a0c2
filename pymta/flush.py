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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import log
from .address import qualify
from .config import Config, Smarthost
from .message import complete
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


class RecipientResult:
    """How one recipient fared in one attempt: delivered, deferred or failed, with the reply or reason."""

    __slots__ = ("status", "reply")

    def __init__(self, status: str, reply: str) -> None:
        self.status = status
        self.reply = reply


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
        try:
            while True:
                self.spool.take_flush_request()
                self._one_pass(report, force, progress)
                if not self.spool.take_flush_request():
                    break
        finally:
            self.sessions.close()
            self.spool.release_flush(lock)
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
            entry = self.spool.read_entry("queue", name)
            message = self.spool.read_message(entry)
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
            results = {address: RecipientResult("failed", reason) for address in pending}
            self._record(entry, results, "queue", report)
            return
        hosts = route(self.config, entry.sender)
        if not hosts:
            self._record(
                entry, {a: RecipientResult("deferred", NO_SMARTHOST) for a in pending}, "none", report
            )
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
        sender = qualify(entry.sender, domain)
        addresses = {qualify(address, domain): address for address in pending}
        results, relay = self.sessions.send(hosts, entry, sender, list(addresses), wire)
        self._record(entry, {addresses[a]: result for a, result in results.items()}, relay, report)

    def _record(
        self, entry: QueueEntry, results: dict[str, RecipientResult], relay: str, report: FlushReport
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
                        recipient.address,
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
            self.spool.remove(entry.id)
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
    for pattern, hosts in getattr(config, "routes", ()):
        if fnmatch.fnmatchcase(sender.lower(), pattern.lower()):
            return tuple(hosts)
    return config.smarthosts


class Sessions:
    """The open SMTP connections of one run, one per smarthost, opened on first use and reused."""

    def __init__(self, config: Config, logger: logging.Logger) -> None:
        self.config = config
        self.log = logger
        self.open: dict[Smarthost, object] = {}
        self.broken: dict[Smarthost, str] = {}  # smarthosts that failed this run, and why

    def send(
        self,
        hosts: tuple[Smarthost, ...],
        entry: QueueEntry,
        sender: str,
        recipients: list[str],
        message: bytes,
    ) -> tuple[dict[str, RecipientResult], str]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[object]:
        return iter(self.open.values())
