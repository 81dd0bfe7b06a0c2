"""What an admin does to queued messages: show, hold, release, retry, delete, bounce; and the expiry of
failed messages. A library: no click, no printing; each operation returns one `Result` per id it was given
(ids and exit codes: `pymta.queue.ids`).

Locking (ARCHITECTURE.md invariants 3, 4). A message in queue/ is changed only under `Spool.lock_message`, the
flock the flush holds while it delivers the message; a command waits for it up to `wait` seconds
(`LOCK_WAIT`), then gives up with EX_TEMPFAIL. After taking the lock the command checks that the message is
still there and re-reads its state, so it never acts on what a delivery has just changed. A message still in
new/ (not yet picked up) is handled under the flush lock, so no pick-up runs meanwhile: `delete` unlinks it;
the other commands pick it up into queue/ first (as a flush would) and take its message lock before letting
go of the flush lock, so no flush can deliver it in between.

The state each command writes (`pymta.queue.entry.MessageState`): `hold` sets state "held" (never delivered,
never expired: `next_attempt` null and the state file's mtime NEVER, so `Spool.due` never returns it, not
even for `flush --now`), `held_from` and `held_at`; `release` restores `held_from` and adds the time on hold
to `held_seconds`, which the flush does not count toward retry.lifetime; `bounce` fails the pending
recipients and sets `bounce_due` and `failed_at` with the state file's mtime now, so the next flush finds
it due and owes the sender a DSN. Keys of a later version are kept as they are.

Users in system mode. A user other than root and the spool's owner cannot read the queue: `show` shows them
their own messages from the view the last delivery run published (`pymta.queue.views`), and every command that
changes messages refuses them as a whole (`require_admin`: PermissionDeniedError, EX_NOPERM).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable

from pymta import log
from pymta.config.identity import policy_of
from pymta.errors import EX_DATAERR, EX_NOPERM, EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_USAGE, PermissionDeniedError
from pymta.mail.message import header_fields
from pymta.queue import notices, views
from pymta.queue.directory import fsync_dir, unlink_quietly
from pymta.queue.entry import NEVER, MessageState, QueueEntry, RecipientStatus
from pymta.queue.ids import (
    FailureError,
    Result,
    ambiguous,
    denied,
    gone,
    resolve,
    unreadable,
    wanted_id,
)
from pymta.queue.listing import (
    SINCE,
    Details,
    Filter,
    clock,
    load,
    own_view,
    untold,
    view_notes,
    whole_queue_note,
)
from pymta.queue.spool import Spool, real_user

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.model import Config

# Seconds a command waits for a message that a flush is delivering before it says so (EX_TEMPFAIL).
LOCK_WAIT = 10.0
STATES = ("queued", "deferred", "held", "failed")
ADMIN_BOUNCE = "5.0.0 bounced by the administrator"
_PENDING = ("pending", "deferred")
_POLL = 0.05


def select(config: Config, states: tuple[str, ...], wanted: Filter | None = None) -> list[str]:
    """The ids of the messages in one of `states` (all of them when empty) that `wanted` takes (`--sender`,
    `--recipient`, `--older-than`), oldest first."""
    entries, _ = load(config.spool)
    return [
        entry.id
        for entry in entries
        if (not states or entry.state in states) and (wanted is None or wanted(entry))
    ]


def message_headers(message: bytes) -> list[tuple[str, str]]:
    """The header fields of a stored message as (name, value), unfolded, in order (`message.header_fields`
    reads the header block); undecodable bytes are replaced."""
    fields = []
    for name, raw in header_fields(message):
        value = raw[raw.index(b":") + 1 :].decode("utf-8", "replace")
        fields.append((name.rstrip(" \t"), " ".join(part.strip() for part in value.splitlines()).strip()))
    return fields


def show(config: Config, arguments: list[str], *, body: bool = False) -> list[Details | Result]:
    """What `pymta queue show` prints for each id: its details, or why there are none. Reads only.

    A user who sees only their own view of a system queue (`pymta.queue.views`) is shown what it holds of
    their
    own messages: no header fields (`note` says why) and, with `body`, nothing (EX_NOPERM).
    """
    if own_view_only(config.spool):
        return _show_own(config.spool, arguments, body)
    spool = Spool(config.spool)
    shown: list[Details | Result] = []
    for argument in arguments:
        name: str | None = None
        try:
            name, location = resolve(spool, argument)
            try:
                entry = spool.read_entry(location, name)
            except FileNotFoundError:
                # Picked up (new/ to queue/) or removed since we looked.
                if location == "new" and os.path.exists(os.path.join(spool.dir("queue"), name)):
                    location = "queue"
                    entry = spool.read_entry(location, name)
                else:
                    raise gone(name) from None
            message = spool.read_message(entry)
            shown.append(Details(argument, entry, message_headers(message), message if body else None))
        except FailureError as failure:
            shown.append(failure.to_result(argument))
        except FileNotFoundError:
            shown.append(gone(name or argument).to_result(argument))
        except PermissionError:
            shown.append(denied(name).to_result(argument))
        except (OSError, ValueError) as exc:
            shown.append(unreadable(name, exc).to_result(argument))
    return shown


def _show_own(spool_path: str, arguments: list[str], body: bool) -> list[Details | Result]:
    visible = own_view(spool_path)
    notes = view_notes(visible)
    as_of = (
        "as of the last delivery run" if visible.published is None else f"as of {clock(visible.published)}"
    )
    whole = whole_queue_note(visible.owner)
    shown: list[Details | Result] = []
    for argument in arguments:
        try:
            wanted = wanted_id(argument)
            found = [
                entry
                for entry in visible.entries
                if isinstance(entry, QueueEntry) and entry.id.startswith(wanted)
            ]
            if len(found) > 1:
                raise ambiguous(sorted(entry.id for entry in found))
            if not found:
                raise FailureError(
                    "no such message", f"no such message among yours {as_of}{SINCE}; {whole}", EX_NOUSER
                )
            entry = found[0]
            if body:
                raise FailureError(
                    "not allowed",
                    f"only root and {visible.owner} may read a queued message; without --body you see "
                    "what the last delivery run published of it",
                    EX_NOPERM,
                    name=entry.id,
                )
            shown.append(Details(argument, entry, [], None, note=notes[0]))
        except FailureError as failure:
            shown.append(failure.to_result(argument))
    return shown


def own_view_only(spool_path: str) -> bool:
    """Whether this user sees only their own view of the queue (`pymta.queue.views.own_view_only`)."""
    return views.own_view_only(spool_path)


def require_admin(config: Config, verb: str) -> None:
    """Raise PermissionDeniedError (EX_NOPERM) for a user who sees only their own view of a system queue:
    changing queued messages is for root and the spool's owner."""
    if own_view_only(config.spool):
        owner = views.spool_owner_name(config.spool)
        raise PermissionDeniedError(
            f"{verb}: only root and {owner} (the spool's owner) may change queued messages; "
            f"ask an administrator to run 'pymta queue {verb}'"
        )


# --- changing messages ---


class _Operations:
    """One command's run over its ids: the spool, the clock, how long to wait for a lock, the log."""

    def __init__(self, config: Config, wait: float, now: float | None, logger: logging.Logger | None) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.wait = wait
        self.now = time.time() if now is None else now
        self.log = logger or logging.getLogger(log.LOGGER_NAME)
        self.admin = real_user()[0]

    def run(self, arguments: list[str], verb: str) -> list[Result]:
        require_admin(self.config, verb)
        results = []
        for argument in arguments:
            name: str | None = None
            try:
                name, location = resolve(self.spool, argument, set_aside=verb == "delete")
                result = self._one(name, location, verb)
                result.argument = argument
            except FailureError as failure:
                failure.name = failure.name or name
                result = failure.to_result(argument)
            except PermissionError:
                result = denied(name).to_result(argument)
            if result.ok and result.result in _LOGGED:
                self.log.info(f"id={result.id} {result.result} by the administrator ({self.admin})")
            results.append(result)
        return results

    def _one(self, name: str, location: str, verb: str) -> Result:
        if location == "corrupt":  # only `delete` gets here: what was set aside is the admin's to remove
            try:
                os.unlink(os.path.join(self.spool.dir("corrupt"), name))
            except FileNotFoundError:
                raise gone(name) from None
            fsync_dir(self.spool.dir("corrupt"))
            return Result(
                name,
                name,
                True,
                "deleted",
                "deleted from corrupt/, where it was set aside; no bounce is sent",
            )
        if location == "new":
            lock = self._take_from_new(name, deleting=verb == "delete")
            if lock is None:
                return Result(
                    name, name, True, "deleted", "deleted before it was picked up; no bounce is sent"
                )
        else:
            lock = self._lock(name, self.wait)
        try:
            try:
                entry = self.spool.read_entry("queue", name)
            except FileNotFoundError:
                raise gone(name) from None
            except (OSError, ValueError) as exc:
                raise unreadable(name, exc) from None
            result: Result = getattr(self, f"_{verb}")(entry)
            return result
        finally:
            self.spool.unlock_message(lock)

    def _lock(self, name: str, wait: float) -> int:
        """The message lock of queue/NAME, waiting up to `wait` seconds for a delivery to end."""
        try:
            fd = self.spool.lock_message(name, max(0.0, wait))
        except FileNotFoundError:
            raise gone(name) from None
        if fd is None:
            raise FailureError(
                "busy", "is being delivered right now; try again in a moment", EX_TEMPFAIL, name=name
            )
        held = os.fstat(fd)
        try:
            current = os.stat(os.path.join(self.spool.dir("queue"), name))
        except FileNotFoundError:
            current = None
        if current is None or (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
            self.spool.unlock_message(fd)  # delivered (or deleted) while we waited
            raise gone(name, meanwhile=True)
        return fd

    def _take_from_new(self, name: str, deleting: bool) -> int | None:
        """For a message in new/: under the flush lock, unlink it (delete: returns None), or pick it up and
        return its message lock, taken before the flush lock is let go."""
        deadline = time.monotonic() + self.wait
        queued = os.path.join(self.spool.dir("queue"), name)
        while True:
            if os.path.exists(queued):  # a running flush picked it up
                return self._lock(name, deadline - time.monotonic())
            flush_lock = self.spool.lock_flush()
            if flush_lock is not None:
                try:
                    return self._under_flush_lock(name, deleting, deadline)
                finally:
                    requested = self.spool.take_flush_request()
                    self.spool.release_flush(flush_lock)
                    if requested:
                        self._restart_flush()
            if time.monotonic() >= deadline:
                raise FailureError(
                    "busy",
                    "is being picked up by a running flush; try again in a moment",
                    EX_TEMPFAIL,
                    name=name,
                )
            time.sleep(_POLL)

    def _under_flush_lock(self, name: str, deleting: bool, deadline: float) -> int | None:
        queued = os.path.join(self.spool.dir("queue"), name)
        if not os.path.exists(queued):
            if deleting:
                try:
                    os.unlink(os.path.join(self.spool.dir("new"), name))
                except FileNotFoundError:
                    raise gone(name) from None
                fsync_dir(self.spool.dir("new"))
                return None
            reports: list[str] = []
            self.spool.pick_up(
                self.config.max_message_size, reports.append, sender_policy=policy_of(self.config)
            )
            for report in reports:
                self.log.warning(report)
            if not os.path.exists(queued):
                mine = [report for report in reports if name in report]
                if mine:
                    raise FailureError("refused", mine[0], EX_DATAERR, name=name)
                raise gone(name)
        return self._lock(name, deadline - time.monotonic())

    def _restart_flush(self) -> None:
        """A flush that started while we held the flush lock asked us to look again and went away: start
        one as sendmail would (user mode, `deliver: immediate`), or leave the request for the timer's."""
        self.spool.request_flush()
        try:
            if self.config.deliver == "queue" or os.stat(self.spool.dir("new")).st_uid != os.geteuid():
                return
            argv = [sys.executable, "-I", "-m", "pymta", "flush", "--background"]  # as sendmail's: isolated
            if self.config.source:
                argv += ["-C", self.config.source]
            actions = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
            os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions, setsid=True)
        except OSError as exc:
            self.log.warning(f"could not start a flush ({exc.strerror}); the timer will deliver the queue")

    def _write(self, entry: QueueEntry, state: MessageState, mtime: float) -> None:
        self.spool.write_state(entry.id, state, mtime)

    def _hold(self, entry: QueueEntry) -> Result:
        if entry.state == "held":
            return _done(entry, "already held", "already held; `pymta queue release` lets it go", "held")
        new = entry.current_state()
        new.state, new.held_from, new.held_at, new.next_attempt = "held", entry.state, self.now, None
        self._write(entry, new, NEVER)
        return _done(entry, "held", "held: it is not delivered, and does not expire, until released", "held")

    def _release(self, entry: QueueEntry) -> Result:
        if entry.state != "held":
            return _done(entry, "not held", "not held; nothing to do", entry.state)
        new = entry.current_state()
        previous, held_at = new.held_from, new.held_at
        new.held_from = new.held_at = None
        if held_at is not None:
            # Time on hold is not time spent trying: the flush gives the lifetime back (DESIGN: a held
            # message never expires, so it must not expire at once when released either).
            new.held_seconds = entry.held_seconds + max(0.0, self.now - held_at)
        if not any(r.status in _PENDING for r in entry.recipients):
            new.state, new.next_attempt = "failed", None
            self._write(entry, new, self.now if new.bounce_due else NEVER)
            return _done(entry, "released", "released: it stays failed; nothing is left to deliver", "failed")
        if previous not in ("queued", "deferred"):
            previous = "deferred" if entry.attempts else "queued"
        new.state, new.next_attempt = previous, self.now
        self._write(entry, new, self.now)
        return _done(
            entry,
            "released",
            "released: due now; the next flush delivers it (its time on hold does not count toward "
            "retry.lifetime)",
            str(previous),
        )

    def _retry(self, entry: QueueEntry) -> Result:
        if entry.state == "held":
            raise FailureError(
                "held",
                f"held: not retried; `pymta queue release {entry.id}` makes it due now",
                EX_USAGE,
                name=entry.id,
            )
        if not any(r.status in _PENDING for r in entry.recipients):
            raise FailureError(
                "failed",
                "failed: no recipient is left to try; `pymta queue delete` removes it",
                EX_USAGE,
                name=entry.id,
            )
        if entry.has_state:  # never tried: no state file, due already
            new = entry.current_state()
            new.next_attempt = self.now
            self._write(entry, new, self.now)
        return _done(
            entry, "due now", "due now: the next flush tries it (`pymta flush` to try at once)", entry.state
        )

    def _delete(self, entry: QueueEntry) -> Result:
        # The queue file goes first: that is the decision. A crash before the state file goes too leaves only
        # a state file without a message, which nothing delivers.
        os.unlink(os.path.join(self.spool.dir("queue"), entry.id))
        unlink_quietly(os.path.join(self.spool.dir("state"), entry.id))
        fsync_dir(self.spool.dir("queue"))
        return _done(entry, "deleted", "deleted; no bounce is sent", None)

    def _bounce(self, entry: QueueEntry) -> Result:
        pending = [r for r in entry.recipients if r.status in _PENDING]
        if not pending:
            return _done(entry, "already failed", "already failed; nothing is left to bounce", entry.state)
        new = entry.current_state()
        new.held_from = new.held_at = None
        for r in pending:
            # Only the outcome changes: `via` is what tells a notice to the admin (no bounce of it) apart.
            new.recipients[r.address] = RecipientStatus(r.address, "failed", ADMIN_BOUNCE, r.via, r.reported)
        new.state, new.next_attempt, new.last_error = "failed", None, ADMIN_BOUNCE
        new.bounce_due, new.failed_at = True, self.now
        self._write(entry, new, self.now)  # due: the next flush sends the bounce
        count = f"{len(pending)} recipient{'s' if len(pending) != 1 else ''}"
        return _done(
            entry,
            "bounced",
            f"bounced: {count} failed; {self._told(entry, [r.address for r in pending])}",
            "failed",
        )

    def _told(self, entry: QueueEntry, failing: list[str]) -> str:
        """Who the flush will tell of an administrator's bounce, by the same decisions the flush makes
        (`notices.wants`, `notices.bounce_recipient`)."""
        if not notices.wants(entry, "failed"):
            return f"no notice is sent: the sender asked for none (sendmail -N {entry.dsn_notify})"
        if entry.sender:
            return "will be returned to the sender by the next flush"
        to = notices.bounce_recipient(entry, self.config.admin, failing)
        if to is None:
            return (
                "the sender is <> (a bounce itself) and it was the notice to postmaster, so no one is left "
                "to tell: it stays failed here until deleted"
            )
        if to == notices.POSTMASTER:
            why = "no admin is configured" if not self.config.admin else "it was for the admin"
            return f"the sender is <> (a bounce itself) and {why}, so the next flush reports it to postmaster"
        return "the sender is <> (a bounce itself), so the next flush reports it to the admin"


# Results worth a line in the mail log: every change an admin made.
_LOGGED = ("held", "released", "due now", "deleted", "bounced")


def _done(entry: QueueEntry, result: str, detail: str, state: str | None) -> Result:
    return Result(entry.id, entry.id, True, result, detail, EX_OK, state)


def hold(
    config: Config,
    arguments: list[str],
    *,
    wait: float = LOCK_WAIT,
    now: float | None = None,
    logger: logging.Logger | None = None,
) -> list[Result]:
    """Hold each message: never delivered, never expired, until released."""
    return _Operations(config, wait, now, logger).run(arguments, "hold")


def release(
    config: Config,
    arguments: list[str],
    *,
    wait: float = LOCK_WAIT,
    now: float | None = None,
    logger: logging.Logger | None = None,
) -> list[Result]:
    """Let held messages go: back to the state they were held in, due now."""
    return _Operations(config, wait, now, logger).run(arguments, "release")


def retry(
    config: Config,
    arguments: list[str],
    *,
    wait: float = LOCK_WAIT,
    now: float | None = None,
    logger: logging.Logger | None = None,
) -> list[Result]:
    """Make each (queued or deferred) message due now."""
    return _Operations(config, wait, now, logger).run(arguments, "retry")


def delete(
    config: Config,
    arguments: list[str],
    *,
    wait: float = LOCK_WAIT,
    now: float | None = None,
    logger: logging.Logger | None = None,
) -> list[Result]:
    """Remove each message from the queue, without a bounce."""
    return _Operations(config, wait, now, logger).run(arguments, "delete")


def bounce(
    config: Config,
    arguments: list[str],
    *,
    wait: float = LOCK_WAIT,
    now: float | None = None,
    logger: logging.Logger | None = None,
) -> list[Result]:
    """Give up on each message now: its pending recipients fail, and the next flush owes the sender a DSN."""
    return _Operations(config, wait, now, logger).run(arguments, "bounce")


# --- expiry of failed messages ---


def failed_since(entry: QueueEntry) -> float:
    """When a failed message failed: its last attempt or the administrator's bounce, else its queueing."""
    times = [time for time in (entry.record.last_attempt, entry.record.failed_at) if time is not None]
    return max(times) if times else entry.queued_at


def expire_failed(
    spool: Spool,
    config: Config,
    now: float,
    logger: logging.Logger | None = None,
    parked: Iterable[str] | None = None,
) -> list[str]:
    """Remove the failed messages whose failure is older than `config.failed_retention`; their ids.

    For the flush. Only messages whose state file has the mtime NEVER are read (a failed message, its
    bounce sent, or a held one), so this costs a stat per state file. Held messages, messages whose bounce
    is still owed (`bounce_due`), messages no one was told about (`listing.untold`: they stay until an
    admin deletes them) and messages a queue command or delivery holds are left alone.

    `parked`: those ids, when the caller has them from `Spool.schedule` (the flush: one stat pass for
    both); else they are found here the same way.
    """
    logger = logger or logging.getLogger(log.LOGGER_NAME)
    removed = []
    for name in spool.schedule(now)[1] if parked is None else parked:
        try:
            lock = spool.lock_message(name)
        except OSError:
            continue  # gone, or no message (a link): the delivery of the queue sets that aside
        if lock is None:
            continue
        try:
            entry = spool.read_entry("queue", name)
            if entry.state != "failed" or entry.bounce_due or untold(entry):
                continue
            age = now - failed_since(entry)
            if age <= config.failed_retention:
                continue
            os.unlink(entry.path)
            unlink_quietly(os.path.join(spool.dir("state"), name))
            removed.append(name)
            logger.info(f"id={name} removed: failed {age / 86400:.1f} days ago, past failed_retention")
        except (OSError, ValueError):
            continue
        finally:
            spool.unlock_message(lock)
    if removed:
        fsync_dir(spool.dir("queue"))
    return removed
