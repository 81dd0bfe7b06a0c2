"""The delivery loop: which message is due, where it goes, what the answer means, when to try again.

One flush runs at a time (an flock on the spool; a second one asks the first to look again and exits at
once). A run picks up new submissions, then takes the due messages oldest first. Each recipient is routed
(`routing.Router`: aliases, the admin address, a local mailbox, or a smarthost); local ones are written to
their mailbox as the recipient, the rest go to the first smarthost of the message's route that answers,
over one SMTP connection per smarthost for the whole run. After each message the outcome of every
recipient is written to its state, under the message's lock, before the text of the next message is sent,
so a recipient that was delivered is never sent again (DESIGN.md invariant 3). Only the next message's
commands (RSET, MAIL, RCPT, DATA) may go out earlier: with PIPELINING they ride behind the current text,
so a message costs one round trip (`SmtpSession.start`); the next message is started, still locked,
before the current one is finished and recorded. While the answer to the current text is awaited, the
message after next is locked and read, and nothing more (`Flusher._prefetch`): that wait overlaps our own
work, and nothing of that message is sent, delivered or recorded before the current one is recorded.

What an answer means (DESIGN.md, "Temporary vs permanent"): 2xx delivers a recipient; 4xx, a network,
timeout, TLS or AUTH problem, or a password source that fails defers it; only a 5xx answer to MAIL, RCPT or
DATA (or a local user that does not exist) fails it. Deferred recipients are tried again after the next
interval of `retry.schedule` (with a little jitter, so that many messages deferred together do not all
come back in the same second, and never later than the end of the lifetime); past `retry.lifetime` they
fail as expired, keeping the server's last reply for the bounce. Time a message spent on hold
(`held_seconds` in its state, which `pymta queue release` adds up) does not count toward its lifetime.
Failed recipients are reported to the sender in one delivery status notification (`bounce.py`), queued like
any mail; a delay notice goes out once after `retry.warn_after`, and a success notice after a delivery when
`-N success` asked for one. A message whose recipients are all delivered leaves the queue; one with
failures stays `failed`, visible to the admin, until `failed_retention` has passed (invariant 2).

A notice that our own spool cannot take (a full disk, a quota, a file size limit) never stops the outcomes
of the attempt from being recorded, or delivered recipients would be sent again (invariant 3): it is
logged, a bounce stays owed (`bounce_due`, and the message comes due again on the retry schedule), a delay
notice is tried again at the next attempt, and a success notice is lost.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fnmatch
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pymta import log
from pymta.config.identity import policy_of
from pymta.config.model import Config, Rewrite, Smarthost
from pymta.config.routing import Plan, Router
from pymta.delivery.smtp.outcome import RecipientOutcome, SessionError, Status
from pymta.delivery.smtp.session import SmtpSession, Transaction
from pymta.errors import ConfigError, SpoolError
from pymta.mail.message import complete, rewrite_from
from pymta.queue.entry import NEVER, QueueEntry, RecipientStatus
from pymta.queue.spool import Spool

# Deferred messages come back within +-10% of their interval, so a burst does not retry as a burst.
RETRY_JITTER = 0.1
# What the spool reports, by the status a recipient can have.
PENDING = ("pending", "deferred")
# At most this many recipients per message, aliases included: a runaway alias file must not fan out forever.
MAX_RECIPIENTS = 1000
# A recipient's status as the log line says it, in Postfix's words.
LOGGED_STATUS = {"delivered": "sent", "deferred": "deferred", "failed": "bounced"}
if TYPE_CHECKING:
    from pymta.config.model import Local
    from pymta.delivery.local import LocalOutcome
    from pymta.mail.dsn import Action, ReportedRecipient

    class LocalDelivery(Protocol):
        """Writes one local recipient's mailbox (`local.deliver_as_recipient`'s signature)."""

        def __call__(
            self, user: str, message: bytes, *, sender: str, local: Local, now: float
        ) -> LocalOutcome: ...


NO_SMARTHOST = "no smarthost configured; see pymta(1): add one under 'smarthosts:' in the config"
# A smarthost whose sessions break this many times in a row in one run (no answer within a limit, the
# connection lost in the middle of a message), with no message answered in between, is not tried again in
# that run: each break costs a reconnect, and a server that takes every message and then hangs would
# otherwise cost a data_timeout (10 minutes) per message, holding the queue for hours.
MAX_BROKEN_SESSIONS = 2
# What `Flusher._bounce` did about the failed recipients it was given (see there).
BounceResult = Literal["reported", "kept", "owed"]
# A notice by its action, as the log names it, and what becomes of it when the spool cannot take it; any
# other action is a success notice.
_NOTICES: dict[str, tuple[str, str]] = {
    "failed": ("bounce", "it stays owed, and a later run queues it"),
    "delayed": ("delay notice", "the next attempt tries again"),
}
_SUCCESS_NOTICE = ("success notice", "the notice is lost")


@dataclass
class FlushReport:
    """What one run did, for the command's summary and for tests."""

    busy: bool = False
    housekeeping_done: bool = False  # stale tmp/ files and expired failures were dealt with in this run
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

    _in_flight: InFlight | None = None  # the message started on a session and not yet finished
    _upcoming: str | None = None  # the due message after the one being delivered: the one to prefetch
    _prefetched: Prefetched | None = None  # that message, locked and read while a reply was awaited
    _attempted: Attempt | None = None  # the attempt being recorded, for `_park` when that fails

    def __init__(
        self,
        config: Config,
        logger: logging.Logger | None = None,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        local_delivery: LocalDelivery | None = None,
    ) -> None:
        """`local_delivery` writes a local recipient's mailbox: `local.deliver_as_recipient` unless a split
        flush (`privsep`) asks its root process to do it."""
        self.config = config
        self.spool = Spool(config.spool)
        self.log = logger or logging.getLogger(log.LOGGER_NAME)
        self.clock = clock
        self.jitter = jitter
        self.sessions = Sessions(config, self.log)
        # User mode: a spool of our own, no root. A split flush (`privsep`, which passes its own local
        # delivery) and a flush of a system spool keep every mailbox its owner's; without root, mail for
        # other users' mailboxes then waits for a flush as root.
        user_mode = local_delivery is None and os.geteuid() != 0 and not self.spool.is_shared()
        self.router = Router(config, user_mode=user_mode)
        if local_delivery is None:
            from pymta.delivery.local import deliver_as_recipient

            local_delivery = deliver_as_recipient
        self.local_delivery: LocalDelivery = local_delivery

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
        from pymta.queue.ops import expire_failed

        picked = self.spool.pick_up(
            self.config.max_message_size,
            self.log.warning,
            sender_policy=policy_of(self.config),
            max_queued_per_user=self.config.max_queued_per_user,
        )
        report.picked_up += len(picked)
        if not report.housekeeping_done:  # once a run: another pass (for a bounce just queued) needs none
            self.spool.remove_stale_tmp(self.clock())
            expire_failed(self.spool, self.config, self.clock(), self.log)
            report.housekeeping_done = True
        due = self.due(force)
        if due:
            unwritable = self.spool.state_problem()
            if unwritable is not None:
                raise unwritable
        try:
            for done, name in enumerate(due, 1):
                self._upcoming = due[done] if done < len(due) else None
                self._deliver(name, report)
                if progress is not None:
                    progress(done, len(due))
            self._upcoming = None
            self._finish_in_flight(report)
        finally:
            self._upcoming = None
            self._abandon_in_flight()

    def _deliver(self, name: str, report: FlushReport) -> None:
        prefetched, self._prefetched = self._prefetched, None
        self._attempted = None
        if prefetched is not None and prefetched.name != name:  # not expected: `_upcoming` names the next
            self.spool.unlock_message(prefetched.lock)
            prefetched = None
        loaded = None
        if prefetched is not None:
            lock: int | None = prefetched.lock
            loaded = (prefetched.entry, prefetched.message)
        else:
            try:
                lock = self.spool.lock_message(name)
            except FileNotFoundError:
                return  # deleted by an admin while we worked
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise  # the spool or the system fails (see below)
                self.log.error(f"id={name} is a symbolic link, not a queued message; moved to corrupt/")
                self.spool.set_aside_queued(name)  # it costs only itself (invariant 11)
                return
        if lock is None:
            self.log.info(f"id={name} is being changed by a queue command; it waits for the next run")
            return
        keeps_lock = False
        try:
            keeps_lock = self._deliver_locked(name, lock, report, loaded)
        except (SpoolError, OSError):
            raise  # the spool or the system fails: recording nothing more, the run ends (invariant 3)
        except Exception as error:  # invariant 11: it costs this message, recorded on it, not the run
            self._park(name, error, done=self._attempted)
        finally:
            if not keeps_lock:
                self.spool.unlock_message(lock)

    def _deliver_locked(
        self, name: str, lock: int, report: FlushReport, loaded: tuple[QueueEntry, bytes] | None = None
    ) -> bool:
        """Attempt one message (`loaded`: its entry and text when `_prefetch` read them already, under this
        lock). True when its lock is taken care of: the message is in flight (its remote recipients are
        started, and `_finish_in_flight` finishes and records it once the next message is started), or it
        was removed and its lock went with it (`Spool.remove`)."""
        if loaded is not None:
            entry, message = loaded
        else:
            try:
                entry, message = self.spool.load(name, lock)  # through the lock's descriptor: no second open
            except FileNotFoundError:
                return False  # deleted by an admin while we worked
            except (OSError, ValueError) as exc:
                self.log.error(f"id={name} cannot read the queued message ({exc}); moved to corrupt/")
                self.spool.set_aside_queued(name)
                return False
        if entry.state == "held":
            return False  # held by the admin: never delivered, never expired
        pending = [r for r in entry.recipients if r.status in PENDING]
        if not pending and not entry.bounce_due:
            return False
        report.attempted += 1
        now = self.clock()
        attempt = Attempt()
        attempt.held = entry.held_seconds
        if pending and now >= self._expires_at(entry, attempt.held):
            from pymta.config.model import format_duration
            from pymta.queue.notices import expiry_reason

            within = format_duration(self.config.retry.lifetime)
            for recipient in pending:
                reason = expiry_reason(within, recipient.last_error, entry.relay)
                attempt.set(recipient.address, "failed", reason, "none")
        elif pending:
            try:
                self._attempt(entry, message, pending, attempt)
            except (SpoolError, OSError):
                raise
            except Exception as error:  # invariant 11: what it delivered is kept, the rest deferred
                reason = self._unexpected(entry.id, error)
                attempt.remote = None
                for recipient in pending:
                    if recipient.address not in attempt.results:
                        attempt.set(recipient.address, "deferred", reason, "none")
        # The message before this one is finished now, before anything of this one is recorded: with
        # PIPELINING its text goes out with this one's commands behind it (one round trip per message), and
        # its outcome is written before this one's text is sent (invariant 3).
        self._finish_in_flight(report)
        if attempt.remote is not None:
            self._in_flight = InFlight(entry, message, attempt, lock)
            return True
        self._attempted = attempt  # what a failure while it is recorded must not forget (`_park`)
        return self._record(entry, message, attempt, report, lock)

    def _finish_in_flight(self, report: FlushReport) -> None:
        """Finish the started message, if there is one: read its outcomes, record them, unlock it."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        handed_over = False
        try:
            assert flight.attempt.remote is not None
            flight.attempt.remote()
            handed_over = self._record(flight.entry, flight.message, flight.attempt, report, flight.lock)
        except (SpoolError, OSError):
            raise
        except Exception as error:  # invariant 11; its text may have gone out: the reason says so
            self._park(flight.entry.id, error, sent=True, done=flight.attempt)
        finally:
            if not handed_over:
                self.spool.unlock_message(flight.lock)

    def _unexpected(self, name: str, error: Exception, sent: bool = False) -> str:
        """Log what went wrong with message `name` (the traceback under --verbose) and give the reason its
        recipients are deferred with. Every SMTP session is closed: after a failure in the middle of one,
        its state is not trusted (a message started on one is started again on a new connection)."""
        self.sessions.close()
        maybe = "; the smarthost may have it already" if sent else ""
        # The error's text may hold what a message or a user wrote: one printable line of it.
        text = log.one_line(str(error)[:200])
        reason = (
            f"4.3.0 pymta failed on this message ({type(error).__name__}: {text}){maybe}; "
            "it is tried again later"
        )
        self.log.error(f"id={name} {reason}", exc_info=self.log.isEnabledFor(logging.DEBUG))
        return reason

    def _park(self, name: str, error: Exception, sent: bool = False, done: Attempt | None = None) -> None:
        """After an unexpected failure with queue/NAME (locked by the caller): defer its pending recipients
        with the reason, on the retry schedule, and go on with the next message (DESIGN.md invariant 11).
        `done`: the attempt whose outcomes were being recorded; who it delivered stays delivered (invariant
        3). With nothing left to deliver, the message stays failed and owes its notice, so a later run
        tries that again. One that cannot even be read, or that has failed so past its lifetime, goes to
        corrupt/ for the admin, with a log line: it would fail again on every run."""
        reason = self._unexpected(name, error, sent)
        now = self.clock()
        try:
            entry = self.spool.read_entry("queue", name)
            expired = now >= self._expires_at(entry, entry.held_seconds)
        except FileNotFoundError:
            return
        except Exception as unreadable:  # noqa: BLE001 - whatever it is, the message is set aside
            entry, expired = None, True
            self.log.error(f"id={name} cannot be read back: {unreadable}")
        if entry is None or expired:
            self.spool.set_aside_queued(name)
            self.log.error(f"id={name} moved to corrupt/ for the admin: it cannot be delivered or bounced")
            return
        recipients = {r.address: r.record() for r in entry.recipients}
        added = done.added if done is not None else {}
        for address, (status, _, _, _) in (done.results if done is not None else {}).items():
            if status in ("delivered", "expanded"):
                empty = RecipientStatus(address, via=added.get(address)).record()
                recipients.setdefault(address, empty).update(status=status, last_error=None)
        if all(record["status"] in ("delivered", "expanded") for record in recipients.values()):
            self.spool.remove(entry)  # every recipient has it: what failed was a notice about it
            return
        pending = False
        for record in recipients.values():
            if record["status"] in PENDING:
                record.update(status="deferred", last_error=reason)
                pending = True
        attempts = entry.attempts + 1
        next_attempt = max(
            now, min(self._retry_at(attempts, now), self._expires_at(entry, entry.held_seconds))
        )
        self.spool.write_state(
            name,
            {
                "state": "deferred" if pending else "failed",
                "attempts": attempts,
                "last_attempt": now,
                "next_attempt": next_attempt,
                "last_error": reason,
                "relay": entry.relay,
                "warned": entry.warned,
                **({"held_seconds": entry.held_seconds} if entry.held_seconds else {}),
                **({"bounce_due": True} if entry.bounce_due or not pending else {}),
                "recipients": recipients,
            },
            next_attempt,
        )

    def _abandon_in_flight(self) -> None:
        """After a failure of the run: unlock a started message, unrecorded, and a prefetched one. Nothing of
        either was delivered: the started one's text never went out, and the session is closed without QUIT
        (`SmtpSession.close`); of the prefetched one nothing left this process."""
        flight, self._in_flight = self._in_flight, None
        prefetched, self._prefetched = self._prefetched, None
        try:
            if flight is not None:
                self.spool.unlock_message(flight.lock)
        finally:
            if prefetched is not None:
                self.spool.unlock_message(prefetched.lock)

    def _prefetch(self) -> None:
        """Lock and read the message after next while the server's answer to the one in flight is awaited
        (`SmtpSession.finish`'s `while_waiting`): that wait then overlaps our own work. Only local reading:
        nothing of it is sent, delivered or recorded until the message in flight is recorded (invariant 3).
        Anything unusual (locked by a queue command, deleted, unreadable) is undone and left to `_deliver`,
        which meets it at its turn exactly as without the prefetch. Never raises."""
        name, self._upcoming = self._upcoming, None
        if name is None or self._prefetched is not None:
            return
        try:
            lock = self.spool.lock_message(name)
        except Exception:
            return
        if lock is None:
            return
        try:
            entry, message = self.spool.load(name, lock)
        except Exception:
            self.spool.unlock_message(lock)
            return
        self._prefetched = Prefetched(name, lock, entry, message)

    def _expires_at(self, entry: QueueEntry, held: float) -> float:
        """When `entry`'s pending recipients fail as expired: `retry.lifetime` after it was queued, not
        counting the `held` seconds it spent on hold."""
        return entry.queued_at + held + self.config.retry.lifetime

    def _as_sent(self, entry: QueueEntry, message: bytes) -> bytes:
        """The message as delivery sends it (`message.complete`: Date, Message-ID, From added): what a
        notice returns, so the sender sees the headers that went out."""
        return complete(
            message,
            queued_at=entry.queued_at,
            message_id=entry.id,
            sender=entry.sender,
            submitted_by=entry.submitted_by,
            full_name=entry.full_name,
            domain=self.config.domain,
            hostname=self.config.hostname,
        )

    def _attempt(
        self, entry: QueueEntry, message: bytes, pending: list[RecipientStatus], attempt: Attempt
    ) -> None:
        """Route every pending recipient (aliases, admin, local or smarthost) and deliver it."""
        router = self.router
        known = {r.address.lower() for r in entry.recipients}
        work = [(r.address, r.via is not None) for r in pending]
        remote: list[str] = []
        local: list[tuple[str, str]] = []
        use_admin = not entry.to_postmaster  # that notice is sent because the admin could not be told
        while work:
            address, expanded = work.pop(0)
            try:
                plan = router.plan(address, expanded=expanded, use_admin=use_admin)
            except ConfigError as unusable:  # the aliases file: only local names wait for its fix
                attempt.set(address, "deferred", f"4.3.5 {unusable}", "local")
                continue
            if plan is None:
                remote.append(address)
                continue
            for warning in plan.warnings:
                self.log.warning(f"id={entry.id} {warning}")
            targets, sent_on = list(plan.targets), list(plan.targets)
            if plan.unhonoured and entry.dsn_of is not None:  # a notice is not copied again: no loop
                self.log.warning(f"id={entry.id} to=<{address}> {_listed(plan.unhonoured)} not honoured")
                if plan.user is None and not targets:
                    targets.append("\\root")  # the mailbox of last resort
                    sent_on = targets
            elif plan.unhonoured:
                copy_to = self._copy_unhonoured(entry, message, address, plan)
                if copy_to is None:
                    attempt.set(address, "deferred", "4.3.0 cannot queue the copy for the admin", "local")
                    continue
                sent_on.append(copy_to)
            if plan.user is not None:
                local.append((address, plan.user))
            elif sent_on:
                attempt.set(address, "expanded", f"sent on to {', '.join(sent_on)}", "local")
            else:
                attempt.set(address, "failed", "5.1.1 the aliases lead to no deliverable address", "local")
            for target in targets:
                if target.lower() not in known and len(known) < MAX_RECIPIENTS:
                    known.add(target.lower())
                    attempt.added[target] = address
                    work.append((target, True))
        if not (local or remote):
            return
        completed = self._as_sent(entry, message)
        # One copy per mailbox: `root root@localhost` is one, and so are `root` and `Root@localhost`.
        delivered_to: dict[str, tuple[str, str]] = {}
        for address, user in local:
            mailbox = _account(user)
            if mailbox not in delivered_to:
                outcome = self.local_delivery(
                    user,
                    completed,
                    sender=router.wire_address(entry.sender),
                    local=self.config.local,
                    now=self.clock(),
                )
                delivered_to[mailbox] = (outcome.status, outcome.reason)
            status, reason = delivered_to[mailbox]
            attempt.set(address, status, reason, "local")
        if remote:
            self._send_remote(entry, completed, remote, attempt)

    def _copy_unhonoured(self, entry: QueueEntry, message: bytes, address: str, plan: Plan) -> str | None:
        """Queue a copy of the message for the admin (postmaster when there is none) in place of the
        `|program` and `/file` targets that `address` led to, each named in an X-Pymta-Unhonoured header
        (pymta.yaml(5)); what to say it was sent on to. None when our spool cannot take it: the caller
        defers `address`."""
        from pymta.config.expansion import unhonoured_header
        from pymta.mail import dsn as bounce

        items = _listed(plan.unhonoured)
        to = self.config.admin or "postmaster"
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
        copied = unhonoured_header(plan.unhonoured) + self._as_sent(entry, message)
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

    def _send_remote(self, entry: QueueEntry, message: bytes, remote: list[str], attempt: Attempt) -> None:
        sender = self.router.wire_address(entry.sender)
        hosts, route_rewrite = route(self.config, sender)
        if not hosts:
            for address in remote:
                attempt.set(address, "deferred", NO_SMARTHOST, "none")
            return
        local_sender = self.router.sender_is_local(entry.sender)

        def as_sent_through(host: Smarthost) -> tuple[str, bytes]:
            """The envelope sender and message for `host`: rewritten for a local sender (or our own notice)
            when its provider takes only the account's address (web.de, GMX, Gmail: 554 otherwise)."""
            rewrite = route_rewrite or host.rewrite or self.config.rewrite
            if rewrite is None or not local_sender:
                return sender, message
            return (
                rewrite.from_address if rewrite.envelope else sender,
                rewrite_from(message, rewrite.from_address, rewrite.original) if rewrite.header else message,
            )

        # Bare local parts go out qualified; `root` and `root@domain` are one recipient on the wire.
        on_wire = {address: self.router.wire_address(address) for address in remote}
        expanded: frozenset[str] = frozenset()
        if _asks_success(entry):  # alias targets are not asked for success (RFC 3461 5.2.7.3)
            targets = _alias_targets(entry, attempt)
            named = {on_wire[a] for a in remote if a not in targets}
            expanded = frozenset(on_wire[a] for a in remote if a in targets) - named
        wire = list(dict.fromkeys(on_wire.values()))
        delivery = self.sessions.start(hosts, entry, wire, as_sent_through, expanded)

        def finish() -> None:
            results, relay = self.sessions.finish(delivery, while_waiting=self._prefetch)
            if delivery.untried is not None:
                self.log.info(f"id={entry.id} not tried: {delivery.untried}; it waits for the next run")
                return
            if _asks_success(entry):  # only then does it matter (and it costs a look per message)
                attempt.relay_reports = _offers_dsn(delivery.session)
            for address in remote:
                outcome = results[on_wire[address]]
                attempt.set(address, outcome.status, outcome.reply, relay, wire=outcome.recipient)

        if delivery.result is not None:
            finish()  # known already: no smarthost works, or it cannot go over SMTP
        else:
            attempt.remote = finish

    def _record(
        self, entry: QueueEntry, message: bytes, attempt: Attempt, report: FlushReport, lock: int
    ) -> bool:
        """Write the outcome of one attempt to the message's state, send the bounce or delay notice it calls
        for, and remove the message when every recipient is done and nothing is owed. True when it was
        removed: its `lock` went with it (`Spool.remove` closes it), and must not be unlocked again."""
        if not attempt.results and not entry.bounce_due:
            report.attempted -= 1  # not tried after all (`Sessions`: its smarthost was given up): unchanged
            return False
        now = self.clock()
        attempts = entry.attempts + (1 if attempt.results else 0)
        recipients: dict[str, dict[str, object]] = {}
        last_error = entry.last_error
        for recipient in [*entry.recipients, *(RecipientStatus(a, via=v) for a, v in attempt.added.items())]:
            record = recipient.record()
            result = attempt.results.get(recipient.address)
            if result is not None:
                status, reply, relay, wire = result
                record["status"] = status
                record["last_error"] = None if status in ("delivered", "expanded") else reply
                if status not in ("delivered", "expanded"):
                    last_error = reply
                if status != "expanded":
                    report.count(status)
                    self.log.info(
                        log.delivery_line(
                            entry.id,
                            wire,
                            relay,
                            now - entry.queued_at,
                            attempts,
                            LOGGED_STATUS[status],
                            reply,
                        )
                    )
            recipients[recipient.address] = record
        state_info: dict[str, object] = {"warned": entry.warned}
        if attempt.held:
            state_info["held_seconds"] = attempt.held
        owed = [a for a, r in recipients.items() if r["status"] == "failed" and not r.get("reported")]
        bounce_owed = False
        if owed and (attempt.results or entry.bounce_due):
            told = self._bounce(entry, message, recipients, owed, attempt, now)
            if told == "reported":
                for address in owed:
                    recipients[address]["reported"] = True
            elif told == "owed":  # our spool could not take it: a later run queues it
                bounce_owed = True
                state_info["bounce_due"] = True
        self._notify_success(entry, message, attempt, now)
        statuses = {str(r["status"]) for r in recipients.values()}
        if statuses <= {"delivered", "expanded"}:
            self.spool.remove(entry, lock)
            return True
        if statuses & set(PENDING):
            state = "deferred"
            # Never past the end of the lifetime: the bounce for an expired message comes on time, not at
            # the next retry after it (up to the last interval of the schedule later).
            next_attempt = max(now, min(self._retry_at(attempts, now), self._expires_at(entry, attempt.held)))
            if not entry.warned and self._warn(entry, message, recipients, attempt, now):
                state_info["warned"] = True
        else:
            state = "failed"
            # Nothing left to deliver; only a bounce still owed brings it back.
            next_attempt = self._retry_at(attempts, now) if bounce_owed else NEVER
        self.spool.write_state(
            entry.id,
            {
                "state": state,
                "attempts": attempts,
                "last_attempt": now,
                "next_attempt": next_attempt if next_attempt < NEVER else None,
                "last_error": last_error,
                "relay": attempt.relay or entry.relay,
                **state_info,
                "recipients": recipients,
            },
            next_attempt,
        )
        return False

    def _retry_at(self, attempts: int, now: float) -> float:
        """When to come back after `attempts` attempts: the next interval of `retry.schedule`, jittered."""
        delay = self.config.retry.delay_after(attempts)
        return now + delay * (1 + RETRY_JITTER * (2 * self.jitter() - 1))

    def _bounce(
        self,
        entry: QueueEntry,
        message: bytes,
        recipients: dict[str, dict[str, object]],
        owed: list[str],
        attempt: Attempt,
        now: float,
    ) -> BounceResult:
        """Queue the failure notice for the `owed` recipients. "reported" when it is queued or none is
        wanted, so they count as reported; "kept" (the message stays failed, for the admin) when nobody can
        get it; "owed" when our spool could not take it, so it is still owed to a later run."""
        from pymta.queue import notices as bounce

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
        message: bytes,
        recipients: dict[str, dict[str, object]],
        attempt: Attempt,
        now: float,
    ) -> bool:
        """Queue the one "still trying" notice when `retry.warn_after` has passed; True when it was queued."""
        from pymta.queue import notices as bounce

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
        retry_until = self._expires_at(entry, attempt.held)
        queue_id = self._queue_notice(view, message, reported, "delayed", to, now, retry_until)
        if queue_id is None:
            return False  # still owed: the next attempt tries again
        self.log.info(f"id={entry.id} still waiting; delay notice {queue_id} to <{to}>")
        return True

    def _queue_notice(
        self,
        entry: QueueEntry,
        message: bytes,
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
        from pymta.mail import dsn as bounce
        from pymta.queue import notices

        dsn = bounce.build_dsn(
            entry,
            self._as_sent(entry, message),
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

    def _notify_success(self, entry: QueueEntry, message: bytes, attempt: Attempt, now: float) -> None:
        """Queue the success notice `-N success` asked for (RFC 3461 4.2, 5.2), one for the recipients this
        attempt delivered: "delivered" for a local mailbox, "relayed" for a smarthost that does not offer
        DSN. A smarthost that does was given NOTIFY=SUCCESS and reports itself; so no notice from us."""
        if not _asks_success(entry):
            return  # nearly every message: no import, no look at its recipients
        from pymta.mail import dsn as bounce
        from pymta.queue import notices

        if not notices.wants(entry, "delivered"):
            return
        # Alias targets are the recipient's business, not the sender's (RFC 3461 5.2.7.3): an expansion is
        # reported as "expanded" for the address the sender used, once (in the attempt that expanded it),
        # and no target is named.
        targets = _alias_targets(entry, attempt)
        reported: list[bounce.ReportedRecipient] = []
        for address, (status, reply, relay, _) in attempt.results.items():
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


class Attempt:
    """The outcome of one attempt at one message, recipient by recipient, and the recipients it added."""

    def __init__(self) -> None:
        # address -> (status, reply or reason, relay, the address as sent)
        self.results: dict[str, tuple[str, str, str, str]] = {}
        self.added: dict[str, str] = {}  # alias targets added in this attempt -> the recipient they came from
        self.relay: str | None = None  # the smarthost that answered, if one did
        self.relay_reports = False  # that smarthost offers DSN: it got NOTIFY and reports delivery itself
        self.held = 0.0  # seconds the message spent on hold (`pymta queue hold`): not part of its lifetime
        # Set while the remote recipients are started on a session: reads their outcomes into `results`.
        self.remote: Callable[[], None] | None = None

    def set(self, address: str, status: str, reply: str, relay: str, wire: str | None = None) -> None:
        self.results[address] = (status, reply, relay, wire or address)
        if relay not in ("none", "local"):
            self.relay = relay


@dataclass
class Prefetched:
    """The due message after next, locked and read (`Flusher._prefetch`) and not yet attempted."""

    name: str
    lock: int
    entry: QueueEntry
    message: bytes


@dataclass
class InFlight:
    """A message whose remote recipients are started and not finished; it keeps its lock until then."""

    entry: QueueEntry
    message: bytes
    attempt: Attempt
    lock: int


def _listed(items: Iterable[object]) -> str:
    return ", ".join(map(str, items))


def _with_statuses(entry: QueueEntry, recipients: dict[str, dict[str, object]]) -> QueueEntry:
    """`entry` as it stands after this attempt (for the bounce builder, which reads recipient statuses)."""
    view = copy.copy(entry)
    view.recipients = []
    for address, record in recipients.items():
        error = record.get("last_error")
        via = record.get("via")
        view.recipients.append(
            RecipientStatus(
                address,
                str(record["status"]),
                error if isinstance(error, str) else None,
                via if isinstance(via, str) else None,
            )
        )
    return view


def _account(user: str) -> str:
    """The account whose mailbox mail for the local name `user` goes to (`privileges.lookup_user`, which
    also tries the name in lower case), or the name itself when there is none."""
    from pymta.privileges import lookup_user

    found = lookup_user(user)
    return user if found is None else found.pw_name


def _asks_success(entry: QueueEntry) -> bool:
    """A cheap first look: whether `entry` was sent with `-N` naming success (`bounce.wants` decides)."""
    return entry.dsn_notify is not None and "success" in entry.dsn_notify.lower()


def _alias_targets(entry: QueueEntry, attempt: Attempt) -> set[str]:
    """The recipients of `entry` that an alias brought in (in earlier attempts, or in `attempt`)."""
    return {r.address for r in entry.recipients if r.via} | set(attempt.added)


def _offers_dsn(session: SmtpSession | None) -> bool:
    """Whether the smarthost of `session` offers the DSN extension (RFC 3461), so it reports delivery."""
    return session is not None and any(
        extension.split(" ")[0].upper() == "DSN" for extension in session.info.extensions
    )


def route(config: Config, sender: str) -> tuple[tuple[Smarthost, ...], Rewrite | None]:
    """The smarthosts to try for a message from `sender`, in order, and the route's own rewrite: the first
    route whose pattern matches (fnmatch, case-insensitive), else every configured smarthost and None."""
    for rule in config.routes:
        if fnmatch.fnmatchcase(sender.lower(), rule.sender.lower()):
            return tuple(host for host in config.smarthosts if host.label == rule.smarthost), rule.rewrite
    return config.smarthosts, None


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
        prepare: Callable[[Smarthost], tuple[str, bytes]],
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
        prepare: Callable[[Smarthost], tuple[str, bytes]],
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
        prepare: Callable[[Smarthost], tuple[str, bytes]],
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
        for host in delivery.hosts:
            if host in delivery.failed_on:
                continue
            if host in self.given_up:
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
        self.breaks.pop(host, None)  # it answers: a later break starts the count again
        return {outcome.recipient: outcome for outcome in outcomes}, session.relay

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
        """`host` cannot be reached: it is not tried again in this run."""
        self.log.warning(f"smarthost {host.label}: {reason}")
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
        self.log.warning(f"smarthost {host.label}: {reason}")
        breaks = self.breaks.get(host, 0) + 1
        self.breaks[host] = breaks
        if breaks >= MAX_BROKEN_SESSIONS:
            self.given_up[host] = f"smarthost {host.label} broke off {breaks} sessions in a row in this run"
            self.log.warning(
                f"smarthost {host.label}: {breaks} sessions in a row broke off mid-message; not tried again "
                "in this run: the messages left for it wait, untried, for the next run"
            )

    def close(self) -> None:
        """QUIT every open session (a session with a message half sent is only closed)."""
        for session in self.open.values():
            session.close()
        self.open.clear()
        self.waiting.clear()


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


TEST_MESSAGE = (
    "Subject: pymta test message\r\n"
    "To: {to}\r\n"
    "Auto-Submitted: auto-generated\r\n"
    "\r\n"
    "This is a test message from pymta on {host}, sent with `pymta test --to`.\r\n"
    "If you read it, delivery through the smarthost works.\r\n"
)


def send_test_message(
    config: Config,
    to: str,
    run_flush: Callable[[Config, logging.Logger], object],
    logger: logging.Logger | None = None,
) -> tuple[str, QueueEntry | None]:
    """Queue a test message for `to` as the user running this, and run a flush with `run_flush`
    (`privsep.run_flush`, which imports this module: passed in, so the two do not import each other).

    Returns the queue id and, when the message is still waiting (deferred, failed, or left to a flush that
    was already running), its entry; None when it was delivered.
    """
    from pymta.mail.address import recipients_from_args
    from pymta.queue.spool import real_user

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
    run_flush(config, logger or logging.getLogger(log.LOGGER_NAME))
    for location in ("queue", "new"):
        try:
            return queue_id, spool.read_entry(location, queue_id)
        except FileNotFoundError:
            continue
    return queue_id, None
