"""The delivery loop: which message is due, where it goes, what the answer means, when to try again.

One flush runs at a time (an flock on the spool; a second one asks the first to look again and exits at once).
A run picks up new submissions, then takes the due messages oldest first. Each recipient is routed
(`routing.Router`: aliases, the admin address, a local mailbox, or a smarthost); local ones are written to
their mailbox as the recipient, the rest go to the first smarthost of their route that answers, or to the MX
hosts of their domain (direct delivery, `direct.py`), over one SMTP connection per smarthost or MX address for
the whole run (`sessions.Sessions`). After each message the outcome of
every recipient is written to its state, under the message's lock, before the text of the next message is
sent, so a recipient that was delivered is never sent again (ARCHITECTURE.md invariant 3). Only the next
message's commands (RSET, MAIL, RCPT, DATA) may go out earlier: with PIPELINING they ride behind the current
text, so a message costs one round trip (`SmtpSession.start`); the next message is started, still locked,
before the current one is finished and recorded. While the answer to the current text is awaited, the message
after next is locked, read and its header completed, and nothing more (`Flusher._prefetch`): that wait
overlaps our own work, and
nothing of that message is sent, delivered or recorded before the current one is recorded.

What an answer means (DESIGN.md, "Temporary vs permanent"): 2xx delivers a recipient; 4xx, a network, timeout,
TLS or AUTH problem, or a password source that fails defers it; only a 5xx answer to MAIL, RCPT or DATA (or a
local user that does not exist) fails it. Deferred recipients are tried again after the next interval of
`retry.schedule` (with a little jitter, so that many messages deferred together do not all come back in the
same second, and never later than the end of the lifetime); past `retry.lifetime` they fail as expired,
keeping the server's last reply for the bounce. Time a message spent on hold (`held_seconds` in its state,
which `pymta queue release` adds up) does not count toward its lifetime. Failed recipients are reported to the
sender in one delivery status notification (`mail/dsn.py`, queued by `record.Recorder`) like any mail; a delay
notice goes out once after `retry.warn_after`, and a success notice after a delivery when `-N success` asked
for one. A message whose recipients are all delivered leaves the queue; one with failures stays `failed`,
visible to the admin, until `failed_retention` has passed (invariant 2).

What an attempt leaves behind (state, notices, the next attempt) is written by `record.Recorder`; what
happens when our own spool cannot take a notice is said there.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import random
import time
from collections.abc import Callable

from pymta import log
from pymta.config.identity import policy_of
from pymta.config.model import Config, Rewrite, Smarthost, format_duration
from pymta.config.routing import Router
from pymta.delivery.direct import DirectRoutes, recipient_domain
from pymta.delivery.record import PENDING, Attempt, Recorder, alias_targets, asks_success, listed
from pymta.delivery.sessions import Delivery, Sessions, route
from pymta.errors import ConfigError, SpoolError
from pymta.mail.message import rewrite_from
from pymta.mail.text import Text
from pymta.privileges import lookup_user
from pymta.queue.entry import NEVER, QueueEntry, RecipientStatus
from pymta.queue.selection import Selection
from pymta.queue.spool import Names, Spool
from pymta.records import record

# At most this many recipients per message, aliases included: a runaway alias file must not fan out forever.
MAX_RECIPIENTS = 1000
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from pymta.config.model import Local
    from pymta.delivery.local import LocalOutcome
    from pymta.delivery.smtp.outcome import Result
    from pymta.delivery.smtp.session import SmtpSession

    class LocalDelivery(Protocol):
        """Writes one local recipient's mailbox (`local.deliver_as_recipient`'s signature)."""

        def __call__(
            self, user: str, message: bytes | Text, *, sender: str, local: Local, now: float
        ) -> LocalOutcome: ...


NO_SMARTHOST = "no smarthost configured; see pymta(1): add one under 'smarthosts:' in the config"


@record
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
    _completed: Text | None = None  # the message being delivered as it is sent, when `_prefetch` made it
    _parked = Names()  # the parked ids `due` found
    _attempted: Attempt | None = None  # the attempt being recorded, for `_park` when that fails
    selection = Selection()  # the limits of this run (`sendmail -qR...`, `pymta flush --recipient`): none

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
        self.direct = DirectRoutes(config, logger=self.log)  # MX and MTA-STS lookups, once per domain per run
        self.recorder = Recorder(config, self.spool, self.log, clock, jitter)
        # User mode: a spool of our own, no root. A split flush (`privsep`, which passes its own local
        # delivery) and a flush of a system spool keep every mailbox its owner's; without root, mail for
        # other users' mailboxes then waits for a flush as root.
        user_mode = local_delivery is None and os.geteuid() != 0 and not self.spool.is_shared()
        self.router = Router(config, user_mode=user_mode)
        self._local_delivery = local_delivery  # None: `local.deliver_as_recipient`, imported at first use

    def _local(self) -> LocalDelivery:
        """What writes a local mailbox: the split flush's agent, or `local.deliver_as_recipient`, whose
        module a run that delivers nothing locally does not import."""
        if self._local_delivery is None:
            from pymta.delivery.local import deliver_as_recipient  # lazy: only a run with local mail

            self._local_delivery = deliver_as_recipient
        return self._local_delivery

    def run(
        self,
        *,
        force: bool = False,
        progress: Callable[[int, int], None] | None = None,
        selection: Selection | None = None,
    ) -> FlushReport:
        """Deliver what is due (with `force`, everything waiting); report what happened.

        `progress(done, total)` is called after each message, for a progress display. A `selection` limits
        the run to the messages it takes; pick-up and housekeeping still cover the whole spool.
        """
        if selection is not None:
            self.selection = selection
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

    def due(self, force: bool) -> Names:
        """What this pass delivers; the messages parked with no attempt planned go to `_parked`, for
        `expire_failed`: one stat per queued message finds both (`Spool.schedule`)."""
        due, self._parked = self.spool.schedule(NEVER - 1 if force else self.clock())
        return self.selection.among(self.spool, due)

    def _one_pass(
        self, report: FlushReport, force: bool, progress: Callable[[int, int], None] | None
    ) -> None:
        picked = self.spool.pick_up(
            self.config.max_message_size,
            self.log.warning,
            sender_policy=policy_of(self.config),
            max_queued_per_user=self.config.max_queued_per_user,
        )
        report.picked_up += len(picked)
        due = self.due(force)  # before expiring, which removes only parked messages, never a due one
        if not report.housekeeping_done:  # once a run: another pass (for a bounce just queued) needs none
            self.spool.remove_stale_tmp(self.clock())
            if self._parked:
                from pymta.queue.ops import expire_failed  # lazy: notices and listing, for parked mail only

                expire_failed(self.spool, self.config, self.clock(), self.log, parked=self._parked)
            report.housekeeping_done = True
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
        self._completed = None
        if prefetched is not None:
            lock: int | None = prefetched.lock
            loaded = (prefetched.entry, prefetched.message)
            self._completed = prefetched.completed
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
        self, name: str, lock: int, report: FlushReport, loaded: tuple[QueueEntry, Text] | None = None
    ) -> bool:
        """Attempt one message (`loaded`: its entry and text when `_prefetch` read them already, under this
        lock). True when its lock is taken care of: the message is in flight (its remote recipients are
        started, and `_finish_in_flight` finishes and records it once the next message is started), or it
        was removed and its lock went with it (`Spool.remove`)."""
        if loaded is not None:
            entry, message = loaded
        else:
            try:
                entry, message = self.spool.load_text(name, lock)  # through the lock: no second open
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
        if pending and now >= self.recorder.expires_at(entry, attempt.held):
            from pymta.queue.notices import expiry  # lazy: the notices module, for an expired message only

            within = format_duration(self.config.retry.lifetime)
            for recipient in pending:
                expired = expiry(within, recipient.last_error, entry.relay)
                attempt.set(recipient.address, "failed", expired.reason, "none", expired=expired)
        elif pending:
            if self._in_flight is not None and self._waits_for_dns(pending):
                # The message in flight is finished first: its server has said 354 and waits for its text,
                # which would go out only once this one is started, after DNS (and MTA-STS) answered.
                self._finish_in_flight(report)
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

    def _waits_for_dns(self, pending: list[RecipientStatus]) -> bool:
        """Whether starting `pending` may wait for DNS first: mail may go to MX hosts, and a recipient's
        domain was not looked up yet in this run (a local one counts too: that costs only the overlap)."""
        return self.config.sends_direct and any(
            "@" in recipient.address and not self.direct.known(recipient_domain(recipient.address))
            for recipient in pending
        )

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
        """After an unexpected failure with queue/NAME (locked by the caller): log it, defer its pending
        recipients (`Recorder.park`), and go on with the next message (ARCHITECTURE.md invariant 11)."""
        self.recorder.park(name, self._unexpected(name, error, sent), done)

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
        """Lock and read the message after next, and complete its header (`Recorder.as_sent`, which depends
        on nothing else), while the server's answer to the one in flight is awaited (`SmtpSession.finish`'s
        `while_waiting`): that wait then overlaps our own work. Only local reading and computing:
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
            entry, message = self.spool.load_text(name, lock)
        except Exception:
            self.spool.unlock_message(lock)
            return
        try:  # made here too: the headers it gets depend on nothing but the message and the config
            completed: Text | None = self.recorder.as_sent(entry, message)
        except Exception:
            completed = None  # `_attempt` makes it, and meets what fails, at its turn
        self._prefetched = Prefetched(name, lock, entry, message, completed)

    def _attempt(
        self, entry: QueueEntry, message: Text, pending: list[RecipientStatus], attempt: Attempt
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
                self.log.warning(f"id={entry.id} to=<{address}> {listed(plan.unhonoured)} not honoured")
                if plan.user is None and not targets:
                    targets.append("\\root")  # the mailbox of last resort
                    sent_on = targets
            elif plan.unhonoured:
                copy_to = self.recorder.copy_unhonoured(entry, message, address, plan)
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
        completed, self._completed = self._completed or self.recorder.as_sent(entry, message), None
        # One copy per mailbox: `root root@localhost` is one, and so are `root` and `Root@localhost`.
        delivered_to: dict[str, LocalOutcome] = {}
        for address, user in local:
            mailbox = _account(user)
            if mailbox not in delivered_to:
                delivered_to[mailbox] = self._local()(
                    user,
                    completed,
                    sender=router.wire_address(entry.sender),
                    local=self.config.local,
                    now=self.clock(),
                )
            outcome = delivered_to[mailbox]  # local.py's shape, made a RecipientOutcome here
            attempt.set(address, outcome.status, outcome.reason, "local")
        if remote:
            self._send_remote(entry, completed, remote, attempt)

    def _send_remote(self, entry: QueueEntry, message: Text, remote: list[str], attempt: Attempt) -> None:
        """Start each remote recipient where it goes (`sessions.route`): those of one smarthost route
        together, those for the MX hosts (`direct`) by domain, so a message may become several deliveries;
        their outcomes are read once the next message is started (`attempt.remote`)."""
        sender = self.router.wire_address(entry.sender)
        # Bare local parts go out qualified; `root` and `root@domain` are one recipient on the wire.
        on_wire = {address: self.router.wire_address(address) for address in remote}
        expanded: frozenset[str] = frozenset()
        if asks_success(entry):  # alias targets are not asked for success (RFC 3461 5.2.7.3)
            targets = alias_targets(entry, attempt)
            named = {on_wire[a] for a in remote if a not in targets}
            expanded = frozenset(on_wire[a] for a in remote if a in targets) - named
        groups: dict[tuple[tuple[Smarthost, ...] | str, Rewrite | None], list[str]] = {}
        for address in remote:
            hosts, route_rewrite = route(self.config, sender, on_wire[address])
            where = recipient_domain(on_wire[address]) if hosts is None else hosts
            groups.setdefault((where, route_rewrite), []).append(address)
        # Every lookup before anything is started: a slow DNS server must not hold a started session.
        planned = []
        for (where, route_rewrite), addresses in groups.items():
            if isinstance(where, str):
                hosts = self._mx_relays(where, addresses, on_wire, attempt)
                prepare: Callable[[Smarthost], tuple[str, Text]] = lambda _: (sender, message)  # noqa: E731
            else:
                hosts, prepare = where, self._as_sent_through(entry, message, sender, route_rewrite)
            if hosts is None:
                continue  # the domain's lookup decided
            if not hosts:
                for address in addresses:
                    attempt.set(address, "deferred", NO_SMARTHOST, "none")
                continue
            planned.append((hosts, prepare, addresses))
        finishes = []
        for hosts, prepare, addresses in planned:
            wire = list(dict.fromkeys(on_wire[address] for address in addresses))
            delivery = self.sessions.start(hosts, entry, wire, prepare, expanded)
            finish = functools.partial(self._finish_remote, delivery, addresses, on_wire, attempt)
            if delivery.result is not None:
                finish()  # known already: no smarthost works, or it cannot go over SMTP
            else:
                finishes.append(finish)
        if finishes:

            def finish_all() -> None:
                for finish in finishes:  # in the order started: a session finishes its messages in order
                    finish()

            attempt.remote = finish_all

    def _as_sent_through(
        self, entry: QueueEntry, message: Text, sender: str, route_rewrite: Rewrite | None
    ) -> Callable[[Smarthost], tuple[str, Text]]:
        local_sender = self.router.sender_is_local(entry.sender)

        def as_sent_through(host: Smarthost) -> tuple[str, Text]:
            """The envelope sender and message for `host`: rewritten for a local sender (or our own notice)
            when its provider takes only the account's address (web.de, GMX, Gmail: 554 otherwise)."""
            rewrite = route_rewrite or host.rewrite or self.config.rewrite
            if rewrite is None or not local_sender:
                return sender, message
            return (
                rewrite.from_address if rewrite.envelope else sender,
                message.with_head(rewrite_from(message.head, rewrite.from_address, rewrite.original))
                if rewrite.header
                else message,
            )

        return as_sent_through

    def _mx_relays(
        self, domain: str, remote: list[str], on_wire: dict[str, str], attempt: Attempt
    ) -> tuple[Smarthost, ...] | None:
        """The MX relays of `domain` (`direct.DirectRoutes`); None when its lookup decided for `remote`: a
        null MX, a domain that does not exist or a loop fails them, a DNS server that fails defers them."""
        from pymta.delivery.mx import MxLookupError  # lazy: dnspython, for direct delivery only

        try:
            return self.direct.relays(domain)
        except MxLookupError as error:
            for address in remote:
                status: Result = "failed" if error.permanent else "deferred"
                attempt.set(address, status, error.reply, "none", wire=on_wire[address])
            return None

    def _finish_remote(
        self, delivery: Delivery, remote: list[str], on_wire: dict[str, str], attempt: Attempt
    ) -> None:
        """Read the outcomes of a started delivery into `attempt` (an MX host's carry their relay and TLS)."""
        results, relay = self.sessions.finish(delivery, while_waiting=self._prefetch)
        if delivery.untried is not None:
            self.log.info(f"id={delivery.entry.id} not tried: {delivery.untried}; it waits for the next run")
            return
        if asks_success(delivery.entry):  # only then does it matter (and it costs a look per message)
            attempt.relay_reports = _offers_dsn(delivery.session)
        for address in remote:
            outcome = results[on_wire[address]]
            attempt.set(
                address,
                outcome.status,
                outcome.reply,
                outcome.relay or relay,
                outcome.recipient,
                tls=outcome.tls,
                sts=outcome.sts,
            )

    def _record(
        self, entry: QueueEntry, message: Text, attempt: Attempt, report: FlushReport, lock: int
    ) -> bool:
        """Record one attempt (`Recorder.record`); True when the message was removed, its lock with it."""
        if not attempt.results and not entry.bounce_due:
            report.attempted -= 1  # not tried after all (`Sessions`: its smarthost was given up): unchanged
            return False
        return self.recorder.record(entry, message, attempt, lock, report.count)


@record
class Prefetched:
    """The due message after next, locked and read (`Flusher._prefetch`) and not yet attempted."""

    name: str
    lock: int
    entry: QueueEntry
    message: Text  # read through `lock` as it is sent
    completed: Text | None = None  # as it is sent (`Recorder.as_sent`), made while a reply was awaited


@record
class InFlight:
    """A message whose remote recipients are started and not finished; it keeps its lock until then."""

    entry: QueueEntry
    message: Text  # read through `lock` as it is sent
    attempt: Attempt
    lock: int


def _account(user: str) -> str:
    """The account whose mailbox mail for the local name `user` goes to (`privileges.lookup_user`, which
    also tries the name in lower case), or the name itself when there is none."""
    found = lookup_user(user)
    return user if found is None else found.pw_name


def _offers_dsn(session: SmtpSession | None) -> bool:
    """Whether the smarthost of `session` offers the DSN extension (RFC 3461), so it reports delivery."""
    return session is not None and any(
        extension.split(" ")[0].upper() == "DSN" for extension in session.info.extensions
    )
