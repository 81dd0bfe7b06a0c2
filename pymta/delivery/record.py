"""What one attempt at a message leaves behind: its state, the notices it calls for, when to try again.

`Attempt` holds one `RecipientOutcome` per recipient (the same shape an SMTP session returns, with the relay
that gave it). `Recorder.record` writes them to the message's state under its lock, before the text of the
next message is sent (ARCHITECTURE.md invariant 3), queues the bounce, delay or success notice they call for
(`queue.notices` decides, `mail.dsn` builds), and removes a message every recipient has. A notice that our own
spool cannot take never stops the outcomes from being recorded: a bounce stays owed (`bounce_due`), a delay
notice is tried again at the next attempt, and a success notice is lost. `Recorder.park` records an unexpected
failure.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable

from pymta import log
from pymta.config.model import Config
from pymta.config.routing import Plan
from pymta.delivery.smtp.outcome import RecipientOutcome
from pymta.errors import SpoolError
from pymta.mail.address import POSTMASTER
from pymta.mail.message import complete_head
from pymta.mail.text import Text
from pymta.queue.entry import NEVER, Expiry, QueueEntry, RecipientStatus, record_attempt
from pymta.queue.spool import Spool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    from pymta.delivery.smtp.outcome import Result
    from pymta.mail.dsn import Action, ReportedRecipient

    # What `Recorder._bounce` did about the failed recipients it was given (see there).
    BounceResult = Literal["reported", "kept", "owed"]

# Deferred messages come back within +-10% of their interval, so a burst does not retry as a burst.
RETRY_JITTER = 0.1
# What the spool reports, by the status a recipient can have.
PENDING = ("pending", "deferred")
# A recipient's status as the log line says it, in Postfix's words.
LOGGED_STATUS = {"delivered": "sent", "deferred": "deferred", "failed": "bounced"}
# A notice by its action, as the log names it, and what becomes of it when the spool cannot take it; any
# other action is a success notice.
_NOTICES: dict[str, tuple[str, str]] = {
    "failed": ("bounce", "it stays owed, and a later run queues it"),
    "delayed": ("delay notice", "the next attempt tries again"),
}
_SUCCESS_NOTICE = ("success notice", "the notice is lost")


class Attempt:
    """The outcome of one attempt at one message, recipient by recipient, and the recipients it added."""

    def __init__(self) -> None:
        # address (as queued) -> its outcome: the address as sent, status, reply or reason, relay
        self.results: dict[str, RecipientOutcome] = {}
        self.expired: dict[str, Expiry] = {}  # the recipients that failed because their lifetime ran out
        self.added: dict[str, str] = {}  # alias targets added in this attempt -> the recipient they came from
        self.relay: str | None = None  # the smarthost that answered, if one did
        self.relay_reports = False  # that smarthost offers DSN: it got NOTIFY and reports delivery itself
        self.held = 0.0  # seconds the message spent on hold (`pymta queue hold`): not part of its lifetime
        # Set while the remote recipients are started on a session: reads their outcomes into `results`.
        self.remote: Callable[[], None] | None = None

    def set(
        self,
        address: str,
        status: Result,
        reply: str,
        relay: str,
        wire: str | None = None,
        expired: Expiry | None = None,
        tls: str = "",
        sts: str = "",
    ) -> None:
        self.results[address] = RecipientOutcome(wire or address, status, reply, relay, tls, sts)
        if expired is not None:
            self.expired[address] = expired
        if relay not in ("none", "local"):
            self.relay = relay


class Recorder:
    """Records the attempts of one flush run. `clock` and `jitter` are the run's (tests move time)."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        logger: logging.Logger,
        clock: Callable[[], float],
        jitter: Callable[[], float],
    ) -> None:
        self.config = config
        self.spool = spool
        self.log = logger
        self.clock = clock
        self.jitter = jitter
        # The config's domain and hostname, asked at the first message (the hostname may wait for a lookup
        # of this machine's name, which a run that sends nothing never needs) and then kept: the config of a
        # run does not change, and every message's header needs both.
        self._names: tuple[str, str] | None = None

    def park(self, name: str, reason: str, done: Attempt | None = None) -> None:
        """After an unexpected failure with queue/NAME (locked by the caller): defer its pending recipients
        with `reason`, on the retry schedule (ARCHITECTURE.md invariant 11).
        `done`: the attempt whose outcomes were being recorded; who it delivered stays delivered (invariant
        3). With nothing left to deliver, the message stays failed and owes its notice, so a later run
        tries that again. One that cannot even be read, or that has failed so past its lifetime, goes to
        corrupt/ for the admin, with a log line: it would fail again on every run."""
        now = self.clock()
        try:
            entry = self.spool.read_entry("queue", name)
            expired = now >= self.expires_at(entry, entry.held_seconds)
        except FileNotFoundError:
            return
        except Exception as unreadable:  # noqa: BLE001 - whatever it is, the message is set aside
            entry, expired = None, True
            self.log.error(f"id={name} cannot be read back: {unreadable}")
        if entry is None or expired:
            self.spool.set_aside_queued(name)
            self.log.error(f"id={name} moved to corrupt/ for the admin: it cannot be delivered or bounced")
            return
        recipients = {r.address: r.copy() for r in entry.recipients}
        added = done.added if done is not None else {}
        for address, outcome in (done.results if done is not None else {}).items():
            if outcome.status in ("delivered", "expanded"):
                recipient = recipients.setdefault(address, RecipientStatus(address, via=added.get(address)))
                recipient.status, recipient.last_error = outcome.status, None
        if all(r.status in ("delivered", "expanded") for r in recipients.values()):
            self.spool.remove(entry)  # every recipient has it: what failed was a notice about it
            return
        pending = False
        for recipient in recipients.values():
            if recipient.status in PENDING:
                recipient.status, recipient.last_error = "deferred", reason
                pending = True
        attempts = entry.attempts + 1
        next_attempt = max(now, min(self.retry_at(attempts, now), self.expires_at(entry, entry.held_seconds)))
        state = record_attempt(
            entry,
            recipients.values(),
            state="deferred" if pending else "failed",
            attempts=attempts,
            now=now,
            next_attempt=next_attempt,
            last_error=reason,
            relay=entry.relay,
            warned=entry.warned,
            bounce_due=entry.bounce_due or not pending,
        )
        self.spool.write_state(name, state, next_attempt)

    def expires_at(self, entry: QueueEntry, held: float) -> float:
        """When `entry`'s pending recipients fail as expired: `retry.lifetime` after it was queued, not
        counting the `held` seconds it spent on hold."""
        return entry.queued_at + held + self.config.retry.lifetime

    def as_sent(self, entry: QueueEntry, message: Text) -> Text:
        """The message as delivery sends it (`message.complete_head`: Date, Message-ID, From added): what a
        notice returns, so the sender sees the headers that went out. Only its head is made anew; a large
        body stays in the spool file, read as it is sent (`Text`)."""
        if self._names is None:
            self._names = (self.config.domain, self.config.hostname)
        domain, hostname = self._names
        head, end = complete_head(
            message.head,
            queued_at=entry.queued_at,
            message_id=entry.id,
            sender=entry.sender,
            submitted_by=entry.submitted_by,
            full_name=entry.full_name,
            domain=domain,
            hostname=hostname,
        )
        return message.with_head(b"".join((head, memoryview(message.head)[end:])))

    def copy_unhonoured(self, entry: QueueEntry, message: Text, address: str, plan: Plan) -> str | None:
        """Queue a copy of the message for the admin (postmaster when there is none) in place of the
        `|program` and `/file` targets that `address` led to, each named in an X-Pymta-Unhonoured header
        (pymta.yaml(5)); what to say it was sent on to. None when our spool cannot take it: the caller
        defers `address`."""
        from pymta.config.expansion import unhonoured_header  # lazy: only for an alias to a |program or /file
        from pymta.mail import dsn as bounce  # lazy: the DSN module, for a message that may owe a notice

        items = listed(plan.unhonoured)
        to = self.config.admin or POSTMASTER
        envelope: dict[str, object] = {
            "sender": "",
            "recipients": [to],
            "submitted_by": bounce.MAILER_DAEMON,
            "uid": -1,
            "full_name": bounce.MAIL_DELIVERY_SYSTEM,
            "queued_at": self.clock(),
            "notify": None,
            "ret": None,
            "envid": None,
            "body_type": entry.body_type,  # the original's body, 8-bit or not
            "dsn_of": entry.id,  # ours: should it fail, it is kept for the admin, never bounced again
        }
        copied = unhonoured_header(plan.unhonoured) + self.as_sent(entry, message).whole()
        try:
            queue_id = self.spool.submit(envelope, copied)
        except SpoolError as exc:
            self.log.error(f"id={entry.id} cannot queue the copy for <{to}> of mail to <{address}>: {exc}")
            return None
        with contextlib.suppress(OSError):  # it is queued: the next run delivers it
            self.spool.request_flush()
        self.log.warning(
            f"id={entry.id} to=<{address}> status=unhonoured ({items}: pymta never runs programs or writes"
            f" files from aliases); copy {queue_id} to <{to}>"
        )
        return f"<{to}> (copy {queue_id}: {items} not honoured)"

    def record(
        self, entry: QueueEntry, message: Text, attempt: Attempt, lock: int, count: Callable[[str], None]
    ) -> bool:
        """Write the outcome of one attempt to the message's state, send the bounce or delay notice it calls
        for, and remove the message when every recipient is done and nothing is owed. True when it was
        removed: its `lock` went with it (`Spool.remove` closes it), and must not be unlocked again."""
        now = self.clock()
        attempts = entry.attempts + (1 if attempt.results else 0)
        recipients: dict[str, RecipientStatus] = {}
        last_error = entry.last_error
        for known in [*entry.recipients, *(RecipientStatus(a, via=v) for a, v in attempt.added.items())]:
            recipient = known.copy()
            outcome = attempt.results.get(recipient.address)
            if outcome is not None:
                status, reply = outcome.status, outcome.reply
                recipient.status = status
                recipient.last_error = None if status in ("delivered", "expanded") else reply
                recipient.expired = attempt.expired.get(recipient.address) if status == "failed" else None
                if status not in ("delivered", "expanded"):
                    last_error = reply
                if status != "expanded":
                    count(outcome.status)
                if status != "expanded" and self.log.isEnabledFor(logging.INFO):  # made only to be written
                    log.info(
                        self.log,
                        log.delivery_line(
                            entry.id,
                            outcome.recipient,
                            outcome.relay,
                            now - entry.queued_at,
                            attempts,
                            LOGGED_STATUS[status],
                            reply,
                            outcome.tls,
                            outcome.sts,
                        ),
                    )
            recipients[recipient.address] = recipient
        warned = entry.warned
        owed = [a for a, r in recipients.items() if r.status == "failed" and not r.reported]
        bounce_owed = False
        if owed and (attempt.results or entry.bounce_due):
            told = self._bounce(entry, message, recipients, owed, attempt, now)
            if told == "reported":
                for address in owed:
                    recipients[address].reported = True
            elif told == "owed":  # our spool could not take it: a later run queues it
                bounce_owed = True
        self._notify_success(entry, message, attempt, now)
        statuses = {r.status for r in recipients.values()}
        if statuses <= {"delivered", "expanded"}:
            self.spool.remove(entry, lock)
            return True
        if statuses & set(PENDING):
            state = "deferred"
            # Never past the end of the lifetime: the bounce for an expired message comes on time, not at
            # the next retry after it (up to the last interval of the schedule later).
            next_attempt = max(now, min(self.retry_at(attempts, now), self.expires_at(entry, attempt.held)))
            if not entry.warned and self._warn(entry, message, recipients, attempt, now):
                warned = True
        else:
            state = "failed"
            # Nothing left to deliver; only a bounce still owed brings it back.
            next_attempt = self.retry_at(attempts, now) if bounce_owed else NEVER
        recorded = record_attempt(
            entry,
            recipients.values(),
            state=state,
            attempts=attempts,
            now=now,
            next_attempt=next_attempt,
            last_error=last_error,
            relay=attempt.relay or entry.relay,
            warned=warned,
            bounce_due=bounce_owed,
        )
        self.spool.write_state(entry.id, recorded, next_attempt)
        return False

    def retry_at(self, attempts: int, now: float) -> float:
        """When to come back after `attempts` attempts: the next interval of `retry.schedule`, jittered."""
        delay = self.config.retry.delay_after(attempts)
        return now + delay * (1 + RETRY_JITTER * (2 * self.jitter() - 1))

    def _bounce(
        self,
        entry: QueueEntry,
        message: Text,
        recipients: dict[str, RecipientStatus],
        owed: list[str],
        attempt: Attempt,
        now: float,
    ) -> BounceResult:
        """Queue the failure notice for the `owed` recipients. "reported" when it is queued or none is
        wanted, so they count as reported; "kept" (the message stays failed, for the admin) when nobody can
        get it; "owed" when our spool could not take it, so it is still owed to a later run."""
        from pymta.queue import notices as bounce  # lazy: the notices module, for a message that may owe one

        if not bounce.wants(entry, "failed"):
            return "reported"
        view = _with_statuses(entry, recipients)
        to = bounce.bounce_recipient(view, self.config.admin, owed)
        if to is None:
            self.log.warning(
                f"id={entry.id} failed and nobody can be told (the notice to postmaster failed too); kept in"
                " the queue until deleted: see pymta queue"
            )
            return "kept"
        reported = [
            r
            for r in bounce.reported_recipients(view, "failed", remote_mta=attempt.relay, last_attempt=now)
            if r.address in owed
        ]
        queue_id = self._queue_notice(view, message, reported, "failed", to, now)
        if queue_id is None:
            return "owed"
        self.log.info(f"id={entry.id} failed for {', '.join(owed)}; bounce {queue_id} to <{to}>")
        return "reported"

    def _warn(
        self,
        entry: QueueEntry,
        message: Text,
        recipients: dict[str, RecipientStatus],
        attempt: Attempt,
        now: float,
    ) -> bool:
        """Queue the one "still trying" notice when `retry.warn_after` has passed; True when it was queued."""
        from pymta.queue import notices as bounce  # lazy: the notices module, for a message that may owe one

        view = _with_statuses(entry, recipients)
        retry = self.config.retry
        if not bounce.delay_warning_due(
            view, now=now, warn_after=retry.warn_after, lifetime=retry.lifetime, held=attempt.held
        ):
            return False
        to = bounce.bounce_recipient(view, self.config.admin)
        if to is None:
            return False
        reported = bounce.reported_recipients(view, "delayed", remote_mta=attempt.relay, last_attempt=now)
        retry_until = self.expires_at(entry, attempt.held)
        queue_id = self._queue_notice(view, message, reported, "delayed", to, now, retry_until)
        if queue_id is None:
            return False  # still owed: the next attempt tries again
        self.log.info(f"id={entry.id} still waiting; delay notice {queue_id} to <{to}>")
        return True

    def _queue_notice(
        self,
        entry: QueueEntry,
        message: Text,
        reported: list[ReportedRecipient],
        action: Action,
        to: str,
        now: float,
        retry_until: float | None = None,
    ) -> str | None:
        """Queue the delivery status notification of `action` about `entry` to `to` (returning `message` as
        it was sent) and ask for it to go out in this run; its queue id. None, with an error logged, when
        our own spool cannot take it (full disk, quota, file size limit): what is still owed is the caller's
        to keep. Never raises for the spool, so the attempt's outcomes are always recorded (invariant 3)."""
        from pymta.mail import dsn as bounce  # lazy: the DSN module, for a message that may owe a notice
        from pymta.queue import notices  # lazy: as above

        dsn = bounce.build_dsn(
            entry,
            self.as_sent(entry, message).whole(),
            reported,
            action=action,
            to=to,
            hostname=self.config.hostname,
            now=now,
            retry_until=retry_until,
        )
        try:
            queue_id = self.spool.submit(notices.dsn_envelope(entry, to, action=action, now=now), dsn)
        except SpoolError as exc:
            name, then = _NOTICES.get(action, _SUCCESS_NOTICE)
            self.log.error(f"id={entry.id} cannot queue the {name} to <{to}>: {exc}; {then}")
            return None
        try:
            self.spool.request_flush()  # deliver it in this run
        except OSError:
            pass  # it is queued: the next run delivers it
        return queue_id

    def _notify_success(self, entry: QueueEntry, message: Text, attempt: Attempt, now: float) -> None:
        """Queue the success notice `-N success` asked for (RFC 3461 4.2, 5.2), one for the recipients this
        attempt delivered: "delivered" for a local mailbox, "relayed" for a smarthost that does not offer
        DSN. A smarthost that does was given NOTIFY=SUCCESS and reports itself; so no notice from us."""
        if not asks_success(entry):
            return  # nearly every message: no import, no look at its recipients
        from pymta.mail import dsn as bounce  # lazy: the DSN module, for a message that may owe a notice
        from pymta.queue import notices  # lazy: as above

        if not notices.wants(entry, "delivered"):
            return
        # Alias targets are the recipient's business, not the sender's (RFC 3461 5.2.7.3): an expansion is
        # reported as "expanded" for the address the sender used, once (in the attempt that expanded it),
        # and no target is named.
        targets = alias_targets(entry, attempt)
        reported: list[bounce.ReportedRecipient] = []
        for address, outcome in attempt.results.items():
            status, reply, relay = outcome.status, outcome.reply, outcome.relay
            each: bounce.Action
            if address in targets:
                continue
            if status == "expanded":
                each = "expanded"
            elif status == "delivered" and relay == "local":
                each = "delivered"
            elif status == "delivered" and not attempt.relay_reports:
                each = "relayed"
            else:
                continue
            # Only a smarthost gave a reply to report, and is the remote MTA.
            reply_of, mta = (reply, relay) if each == "relayed" else (None, None)
            code = bounce.status_code(reply_of, each)
            reported.append(bounce.ReportedRecipient(address, code, reply_of, mta, now, action=each))
        if not reported:
            return
        action: bounce.Action = "relayed" if all(r.action == "relayed" for r in reported) else "delivered"
        queue_id = self._queue_notice(entry, message, reported, action, entry.sender, now)
        if queue_id is None:
            return  # lost, and logged: a success notice is not worth delivering anything again for
        addresses = ", ".join(r.address for r in reported)
        self.log.info(f"id={entry.id} {action} to {addresses}; success notice {queue_id} to <{entry.sender}>")


def listed(items: Iterable[object]) -> str:
    return ", ".join(map(str, items))


def _with_statuses(entry: QueueEntry, recipients: dict[str, RecipientStatus]) -> QueueEntry:
    """`entry` as it stands after this attempt (for the bounce builder, which reads recipient statuses)."""
    view = copy.copy(entry)
    view.recipients = list(recipients.values())
    return view


def asks_success(entry: QueueEntry) -> bool:
    """A cheap first look: whether `entry` was sent with `-N` naming success (`bounce.wants` decides)."""
    return entry.dsn_notify is not None and "success" in entry.dsn_notify.lower()


def alias_targets(entry: QueueEntry, attempt: Attempt) -> set[str]:
    """The recipients of `entry` that an alias brought in (in earlier attempts, or in `attempt`)."""
    return {r.address for r in entry.recipients if r.via} | set(attempt.added)
