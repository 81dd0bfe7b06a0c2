"""What an admin does to queued messages: show, hold, release, retry, delete, bounce; and the expiry of
failed messages. A library: no click, no printing; each operation returns one `Result` per id it was given.

Ids. A full id, or a unique prefix of at least `MIN_PREFIX` hexadecimal digits. An ambiguous prefix is refused
with its candidates. A full id that is not in the queue may have been delivered, deleted or expired, or never
existed: the queue keeps no record of finished messages, so only the mail log can tell.

Locking (DESIGN.md invariants 3 and 4). A message in queue/ is changed only under `Spool.lock_message`, the
flock the flush holds while it delivers the message; a command waits for it up to `wait` seconds
(`LOCK_WAIT`), then gives up with EX_TEMPFAIL. After taking the lock the command checks that the message is
still there and re-reads its state, so it never acts on what a delivery has just changed. A message still in
new/ (not yet picked up) is handled under the flush lock, so no pick-up runs meanwhile: `delete` unlinks it;
the other commands pick it up into queue/ first (as a flush would) and take its message lock before letting
go of the flush lock, so no flush can deliver it in between.

State fields this module writes, beside those of the flush (`state`, `attempts`, `last_attempt`,
`next_attempt`, `last_error`, `relay`, `recipients`); unknown keys are kept as they are:

    state "held"        hold: never delivered, never expired. `next_attempt` is null and the state file's
                        mtime is NEVER, so `Spool.due` never returns it, not even for `flush --now`.
    held_from           hold: the state before it (queued, deferred or failed), restored by release.
    held_at             hold: when.
    held_seconds        release: the seconds spent on hold so far, added up over every hold. The flush
                        does not count them toward retry.lifetime (missing: 0, as in older state files).
    bounce_due true     bounce: the flush owes the sender a DSN. The message is `failed` and its state
                        file's mtime is the time of the bounce, so the next flush finds it due.
    failed_at           bounce: when the administrator gave up on it (`expire_failed` counts from it).

Exit codes (one per id; a command exits with the code of the first id that failed):
0 done (or nothing to do: already held, not held), 64 EX_USAGE (a prefix too short or ambiguous, or a
command that does not apply to the message's state), 65 EX_DATAERR (the entry cannot be read), 67
EX_NOUSER (no such message, or no longer in the queue), 75 EX_TEMPFAIL (being delivered right now), 77
EX_NOPERM (this user may not change the spool).

Users in system mode. A user other than root and the spool's owner cannot read the queue: `show` shows them
their own messages from the view the last delivery run published (`pymta.queue.views`), and every command that
changes messages refuses them as a whole (`require_admin`: PermissionDeniedError, EX_NOPERM).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from pymta import log
from pymta.config.identity import policy_of
from pymta.errors import EX_DATAERR, EX_NOPERM, EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_USAGE, PermissionDeniedError
from pymta.queue.directory import fsync_dir, unlink_quietly
from pymta.queue.entry import NEVER, QueueEntry
from pymta.queue.spool import Spool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.load import Config

# Seconds a command waits for a message that a flush is delivering before it says so (EX_TEMPFAIL).
LOCK_WAIT = 10.0
# The shortest id prefix accepted: 4 hex digits of the time prefix still tell most messages apart.
MIN_PREFIX = 4
# An id is 8 hex digits of time and 16 random ones (spool.new_id).
ID_LENGTH = 24
STATES = ("queued", "deferred", "held", "failed")
ADMIN_BOUNCE = "5.0.0 bounced by the administrator"
# How many candidates an ambiguous prefix names.
MAX_CANDIDATES = 10
_HEX = frozenset("0123456789abcdef")
_PENDING = ("pending", "deferred")
_POLL = 0.05

State = dict[str, object]


@dataclass
class Result:
    """What one command did to one id. `detail` is the line for people; it starts with `result`."""

    argument: str
    id: str | None
    ok: bool
    result: str
    detail: str
    exit_code: int = EX_OK
    state: str | None = None  # the message's state afterwards, when it is still queued
    candidates: list[str] = field(default_factory=list)

    @property
    def line(self) -> str:
        """`ID: detail`, with the full id once it is known."""
        return f"{self.id or self.argument}: {self.detail}"

    def to_json(self) -> dict[str, object]:
        return {
            "argument": self.argument,
            "id": self.id,
            "ok": self.ok,
            "result": self.result,
            "detail": self.detail,
            "exit_code": self.exit_code,
            "state": self.state,
            "candidates": self.candidates,
        }


@dataclass
class Details:
    """One message as `pymta queue show` describes it."""

    argument: str
    entry: QueueEntry
    state: State  # the raw state file ({} when there is none)
    headers: list[tuple[str, str]]
    message: bytes | None  # the whole stored message, when asked for
    note: str | None = None  # from a user's own view: as of when, and that it has no header fields


class _FailureError(Exception):
    def __init__(
        self,
        result: str,
        detail: str,
        code: int,
        candidates: list[str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.result, self.detail, self.code = result, detail, code
        self.candidates = candidates or []
        self.name = name

    def to_result(self, argument: str) -> Result:
        return Result(argument, self.name, False, self.result, self.detail, self.code, None, self.candidates)


def exit_code(results: list[Result]) -> int:
    """The command's exit status: 0 when every id succeeded, else the code of the first that failed."""
    return next((r.exit_code for r in results if not r.ok), EX_OK)


# --- finding messages ---


def _names(spool: Spool, location: str) -> list[str]:
    try:
        with os.scandir(spool.dir(location)) as listing:
            return [item.name for item in listing if not item.name.startswith(".")]
    except (FileNotFoundError, PermissionError):
        return []  # system mode: new/ cannot be listed by everyone; full ids are still found


def _gone(name: str, *, meanwhile: bool = False) -> _FailureError:
    """An id not in the queue. `meanwhile`: it was there when we looked, and went while we waited for it."""
    if meanwhile:
        detail = "no longer in the queue: it was delivered or deleted while this command waited"
    else:
        detail = "not in the queue (it may have been delivered, deleted or expired)"
    return _FailureError("gone", detail + _log_hint(name), EX_NOUSER, name=name)


def _log_hint(name: str) -> str:
    """Where to look for what became of a message: the mail log, when there is one (syslog)."""
    from pymta.log import SYSLOG_SOCKET

    return f"; look for id={name} in the mail log" if os.path.exists(SYSLOG_SOCKET) else ""


def _wanted(argument: str) -> str:
    """`argument` as an id or id prefix to look for; _FailureError when it cannot be one."""
    wanted = argument.strip().lower()
    if not wanted or not set(wanted) <= _HEX or len(wanted) > ID_LENGTH:
        raise _FailureError(
            "not an id",
            f"not a queue id: ids are {ID_LENGTH} hexadecimal digits, as `pymta queue` lists them",
            EX_USAGE,
        )
    if len(wanted) < MIN_PREFIX:
        raise _FailureError(
            "too short", f"too short: give at least {MIN_PREFIX} characters of the id", EX_USAGE
        )
    return wanted


def _ambiguous(candidates: list[str]) -> _FailureError:
    shown = ", ".join(candidates[:MAX_CANDIDATES])
    more = f" and {len(candidates) - MAX_CANDIDATES} more" if len(candidates) > MAX_CANDIDATES else ""
    return _FailureError(
        "ambiguous",
        f"ambiguous: matches {len(candidates)} messages ({shown}{more}); give more of the id",
        EX_USAGE,
        candidates,
    )


def resolve(spool: Spool, argument: str, *, set_aside: bool = False) -> tuple[str, str]:
    """The id that `argument` (a full id or a unique prefix) names, and where it is: "new" or "queue"; with
    `set_aside`, also "corrupt" for a full id that the pick-up or the flush moved there."""
    wanted = _wanted(argument)
    found: dict[str, str] = {}
    # new/ before queue/: a message picked up between the two listings is seen in queue/ then, not missed.
    for location in ("new", "queue"):
        for name in _names(spool, location):
            if name.startswith(wanted):
                found[name] = location
        if len(wanted) == ID_LENGTH and os.path.exists(os.path.join(spool.dir(location), wanted)):
            found[wanted] = location
    if len(found) == 1:
        return next(iter(found.items()))
    if len(found) > 1:
        raise _ambiguous(sorted(found))
    if len(wanted) == ID_LENGTH:
        if os.path.lexists(os.path.join(spool.dir("corrupt"), wanted)):
            if set_aside:
                return wanted, "corrupt"
            raise _FailureError(
                "unreadable",
                f"unreadable: set aside in {spool.dir('corrupt')}/ for the admin; look at it there",
                EX_DATAERR,
                name=wanted,
            )
        raise _gone(wanted)
    raise _FailureError("no such message", "no such message in the queue", EX_NOUSER)


def _read_state(spool: Spool, name: str) -> State:
    try:
        with open(os.path.join(spool.dir("state"), name), "rb") as handle:
            state = json.load(handle)
    except FileNotFoundError:
        return {}
    if not isinstance(state, dict):
        raise ValueError("state file is not a JSON object")
    return state


def select(config: Config, states: tuple[str, ...]) -> list[str]:
    """The ids of the messages in one of `states` (all of them when empty), oldest first."""
    from pymta.queue.listing import load

    entries, _ = load(config.spool)
    return [entry.id for entry in entries if not states or entry.state in states]


def message_headers(message: bytes) -> list[tuple[str, str]]:
    """The header fields of a stored message as (name, value), unfolded, in order; undecodable bytes are
    replaced. The header block ends at the first empty line or at the first line that is not a header."""
    fields: list[tuple[str, str]] = []
    for raw in message.split(b"\n"):
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line:
            break
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")  # obsolete syntax allows blanks before the colon
        if not colon or not name or any(char in name for char in " \t"):
            break
        fields.append((name, value.strip()))
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
                    raise _gone(name) from None
            state = _read_state(spool, name) if location == "queue" else {}
            message = spool.read_message(entry)
            shown.append(Details(argument, entry, state, message_headers(message), message if body else None))
        except _FailureError as failure:
            shown.append(failure.to_result(argument))
        except FileNotFoundError:
            shown.append(_gone(name or argument).to_result(argument))
        except PermissionError:
            shown.append(_denied(name).to_result(argument))
        except (OSError, ValueError) as exc:
            shown.append(_unreadable(name, exc).to_result(argument))
    return shown


def _show_own(spool_path: str, arguments: list[str], body: bool) -> list[Details | Result]:
    from pymta.queue.listing import SINCE, clock, own_view, view_notes, whole_queue_note

    visible = own_view(spool_path)
    notes = view_notes(visible)
    as_of = (
        "as of the last delivery run" if visible.published is None else f"as of {clock(visible.published)}"
    )
    whole = whole_queue_note(visible.owner)
    shown: list[Details | Result] = []
    for argument in arguments:
        try:
            wanted = _wanted(argument)
            found = [entry for entry in visible.entries if entry.id.startswith(wanted)]
            if len(found) > 1:
                raise _ambiguous(sorted(entry.id for entry in found))
            if not found:
                raise _FailureError(
                    "no such message", f"no such message among yours {as_of}{SINCE}; {whole}", EX_NOUSER
                )
            entry = found[0]
            if body:
                raise _FailureError(
                    "not allowed",
                    f"only root and {visible.owner} may read a queued message; without --body you see "
                    "what the last delivery run published of it",
                    EX_NOPERM,
                    name=entry.id,
                )
            shown.append(Details(argument, entry, {}, [], None, note=notes[0]))
        except _FailureError as failure:
            shown.append(failure.to_result(argument))
    return shown


def own_view_only(spool_path: str) -> bool:
    """Whether this user sees only their own view of the queue (`pymta.queue.views.own_view_only`)."""
    from pymta.queue.views import own_view_only as only_own

    return only_own(spool_path)


def require_admin(config: Config, verb: str) -> None:
    """Raise PermissionDeniedError (EX_NOPERM) for a user who sees only their own view of a system queue:
    changing queued messages is for root and the spool's owner."""
    if own_view_only(config.spool):
        from pymta.queue.views import spool_owner_name

        owner = spool_owner_name(config.spool)
        raise PermissionDeniedError(
            f"{verb}: only root and {owner} (the spool's owner) may change queued messages; "
            f"ask an administrator to run 'pymta queue {verb}'"
        )


def _denied(name: str | None) -> _FailureError:
    return _FailureError(
        "not allowed", "permission denied: run this as root or as the spool's owner", EX_NOPERM, name=name
    )


def _unreadable(name: str | None, exc: Exception) -> _FailureError:
    return _FailureError("unreadable", f"unreadable: {exc}", EX_DATAERR, name=name)


# --- changing messages ---


class _Operations:
    """One command's run over its ids: the spool, the clock, how long to wait for a lock, the log."""

    def __init__(self, config: Config, wait: float, now: float | None, logger: logging.Logger | None) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.wait = wait
        self.now = time.time() if now is None else now
        self.log = logger or logging.getLogger(log.LOGGER_NAME)
        self.admin = _login()

    def run(self, arguments: list[str], verb: str) -> list[Result]:
        require_admin(self.config, verb)
        results = []
        for argument in arguments:
            name: str | None = None
            try:
                name, location = resolve(self.spool, argument, set_aside=verb == "delete")
                result = self._one(name, location, verb)
                result.argument = argument
            except _FailureError as failure:
                failure.name = failure.name or name
                result = failure.to_result(argument)
            except PermissionError:
                result = _denied(name).to_result(argument)
            if result.ok and result.result in _LOGGED:
                self.log.info(f"id={result.id} {result.result} by the administrator ({self.admin})")
            results.append(result)
        return results

    def _one(self, name: str, location: str, verb: str) -> Result:
        if location == "corrupt":  # only `delete` gets here: what was set aside is the admin's to remove
            try:
                os.unlink(os.path.join(self.spool.dir("corrupt"), name))
            except FileNotFoundError:
                raise _gone(name) from None
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
                state = _read_state(self.spool, name)
            except FileNotFoundError:
                raise _gone(name) from None
            except (OSError, ValueError) as exc:
                raise _unreadable(name, exc) from None
            result: Result = getattr(self, f"_{verb}")(entry, state)
            return result
        finally:
            self.spool.unlock_message(lock)

    def _lock(self, name: str, wait: float) -> int:
        """The message lock of queue/NAME, waiting up to `wait` seconds for a delivery to end."""
        try:
            fd = self.spool.lock_message(name, max(0.0, wait))
        except FileNotFoundError:
            raise _gone(name) from None
        if fd is None:
            raise _FailureError(
                "busy", "is being delivered right now; try again in a moment", EX_TEMPFAIL, name=name
            )
        held = os.fstat(fd)
        try:
            current = os.stat(os.path.join(self.spool.dir("queue"), name))
        except FileNotFoundError:
            current = None
        if current is None or (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
            self.spool.unlock_message(fd)  # delivered (or deleted) while we waited
            raise _gone(name, meanwhile=True)
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
                raise _FailureError(
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
                    raise _gone(name) from None
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
                    raise _FailureError("refused", mine[0], EX_DATAERR, name=name)
                raise _gone(name)
        return self._lock(name, deadline - time.monotonic())

    def _restart_flush(self) -> None:
        """A flush that started while we held the flush lock asked us to look again and went away: start
        one as sendmail would (user mode, `deliver: immediate`), or leave the request for the timer's."""
        import sys

        self.spool.request_flush()
        try:
            if self.config.deliver == "queue" or os.stat(self.spool.dir("new")).st_uid != os.geteuid():
                return
            argv = [sys.executable, "-m", "pymta", "flush", "--background"]
            if self.config.source:
                argv += ["-C", self.config.source]
            actions = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
            os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions, setsid=True)
        except OSError as exc:
            self.log.warning(f"could not start a flush ({exc.strerror}); the timer will deliver the queue")

    def _write(self, entry: QueueEntry, state: State, mtime: float) -> None:
        self.spool.write_state(entry.id, state, mtime)

    def _hold(self, entry: QueueEntry, state: State) -> Result:
        if entry.state == "held":
            return _done(entry, "already held", "already held; `pymta queue release` lets it go", "held")
        new = _complete(entry, state)
        new.update(state="held", held_from=entry.state, held_at=self.now, next_attempt=None)
        self._write(entry, new, NEVER)
        return _done(entry, "held", "held: it is not delivered, and does not expire, until released", "held")

    def _release(self, entry: QueueEntry, state: State) -> Result:
        if entry.state != "held":
            return _done(entry, "not held", "not held; nothing to do", entry.state)
        new = _complete(entry, state)
        previous = new.pop("held_from", None)
        held_at = new.pop("held_at", None)
        if isinstance(held_at, int | float):
            # Time on hold is not time spent trying: the flush gives the lifetime back (DESIGN: a held
            # message never expires, so it must not expire at once when released either).
            new["held_seconds"] = entry.held_seconds + max(0.0, self.now - held_at)
        if not any(r.status in _PENDING for r in entry.recipients):
            new.update(state="failed", next_attempt=None)
            self._write(entry, new, self.now if new.get("bounce_due") else NEVER)
            return _done(entry, "released", "released: it stays failed; nothing is left to deliver", "failed")
        if previous not in ("queued", "deferred"):
            previous = "deferred" if entry.attempts else "queued"
        new.update(state=previous, next_attempt=self.now)
        self._write(entry, new, self.now)
        return _done(
            entry,
            "released",
            "released: due now; the next flush delivers it (its time on hold does not count toward "
            "retry.lifetime)",
            str(previous),
        )

    def _retry(self, entry: QueueEntry, state: State) -> Result:
        if entry.state == "held":
            raise _FailureError(
                "held",
                f"held: not retried; `pymta queue release {entry.id}` makes it due now",
                EX_USAGE,
                name=entry.id,
            )
        if not any(r.status in _PENDING for r in entry.recipients):
            raise _FailureError(
                "failed",
                "failed: no recipient is left to try; `pymta queue delete` removes it",
                EX_USAGE,
                name=entry.id,
            )
        if state:  # never tried: no state file, due already
            new = _complete(entry, state)
            new["next_attempt"] = self.now
            self._write(entry, new, self.now)
        return _done(
            entry, "due now", "due now: the next flush tries it (`pymta flush` to try at once)", entry.state
        )

    def _delete(self, entry: QueueEntry, state: State) -> Result:
        # The queue file goes first: that is the decision. A crash before the state file goes too leaves only
        # a state file without a message, which nothing delivers.
        os.unlink(os.path.join(self.spool.dir("queue"), entry.id))
        unlink_quietly(os.path.join(self.spool.dir("state"), entry.id))
        fsync_dir(self.spool.dir("queue"))
        return _done(entry, "deleted", "deleted; no bounce is sent", None)

    def _bounce(self, entry: QueueEntry, state: State) -> Result:
        pending = [r.address for r in entry.recipients if r.status in _PENDING]
        if not pending:
            return _done(entry, "already failed", "already failed; nothing is left to bounce", entry.state)
        new = _complete(entry, state)
        new.pop("held_from", None)
        new.pop("held_at", None)
        recipients = new["recipients"]
        assert isinstance(recipients, dict)
        for address in pending:
            # Only the outcome changes: `via` is what tells a notice to the admin (no bounce of it) apart.
            record = recipients[address]
            assert isinstance(record, dict)
            record.update(status="failed", last_error=ADMIN_BOUNCE)
        new.update(
            state="failed", next_attempt=None, last_error=ADMIN_BOUNCE, bounce_due=True, failed_at=self.now
        )
        self._write(entry, new, self.now)  # due: the next flush sends the bounce
        count = f"{len(pending)} recipient{'s' if len(pending) != 1 else ''}"
        return _done(entry, "bounced", f"bounced: {count} failed; {self._told(entry, pending)}", "failed")

    def _told(self, entry: QueueEntry, failing: list[str]) -> str:
        """Who the flush will tell of an administrator's bounce, by the same decisions the flush makes
        (`bounce.wants`, `bounce.bounce_recipient`)."""
        from pymta.mail import dsn as bounce

        if not bounce.wants(entry, "failed"):
            return f"no notice is sent: the sender asked for none (sendmail -N {entry.dsn_notify})"
        if entry.sender:
            return "will be returned to the sender by the next flush"
        to = bounce.bounce_recipient(entry, self.config.admin, failing)
        if to is None:
            return (
                "the sender is <> (a bounce itself) and it was the notice to postmaster, so no one is left "
                "to tell: it stays failed here until deleted"
            )
        if to == bounce.POSTMASTER:
            why = "no admin is configured" if not self.config.admin else "it was for the admin"
            return f"the sender is <> (a bounce itself) and {why}, so the next flush reports it to postmaster"
        return "the sender is <> (a bounce itself), so the next flush reports it to the admin"


# Results worth a line in the mail log: every change an admin made.
_LOGGED = ("held", "released", "due now", "deleted", "bounced")


def _done(entry: QueueEntry, result: str, detail: str, state: str | None) -> Result:
    return Result(entry.id, entry.id, True, result, detail, EX_OK, state)


def _complete(entry: QueueEntry, state: State) -> State:
    """The state to write: the old one with every field the flush reads filled in (a message never tried has
    no state file) and each recipient's status as the entry reads it."""
    new = dict(state)
    new.setdefault("state", entry.state)
    new.setdefault("attempts", entry.attempts)
    new.setdefault("last_error", entry.last_error)
    new["recipients"] = {r.address: r.record() for r in entry.recipients}
    return new


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


def failed_since(entry: QueueEntry, state: State) -> float:
    """When a failed message failed: its last attempt or the administrator's bounce, else its queueing."""
    times = [
        value for key in ("last_attempt", "failed_at") if isinstance(value := state.get(key), int | float)
    ]
    return float(max(times)) if times else entry.queued_at


def expire_failed(
    spool: Spool, config: Config, now: float, logger: logging.Logger | None = None
) -> list[str]:
    """Remove the failed messages whose failure is older than `config.failed_retention`; their ids.

    For the flush. Only messages whose state file has the mtime NEVER are read (a failed message, its
    bounce sent, or a held one), so this costs a stat per state file. Held messages, messages whose bounce
    is still owed (`bounce_due`), messages no one was told about (`listing.untold`: they stay until an
    admin deletes them) and messages a queue command or delivery holds are left alone.
    """
    from pymta.queue.listing import untold

    logger = logger or logging.getLogger(log.LOGGER_NAME)
    removed = []
    for name in sorted(_names(spool, "state")):
        try:
            if os.stat(os.path.join(spool.dir("state"), name)).st_mtime < NEVER:
                continue
            lock = spool.lock_message(name)
        except OSError:
            continue  # gone, or no message (a link): the delivery of the queue sets that aside
        if lock is None:
            continue
        try:
            entry = spool.read_entry("queue", name)
            state = _read_state(spool, name)
            if entry.state != "failed" or state.get("bounce_due") or untold(entry):
                continue
            age = now - failed_since(entry, state)
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


# --- helpers ---


def _login() -> str:
    from pymta.queue.spool import real_user

    return real_user()[0]
