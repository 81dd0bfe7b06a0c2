"""Finding queued messages by id, and what a `pymta queue` command reports for each id it was given.

Ids. A full id, or a unique prefix of at least `MIN_PREFIX` hexadecimal digits. An ambiguous prefix is refused
with its candidates. A full id that is not in the queue may have been delivered, deleted or expired, or never
existed: the queue keeps no record of finished messages, so only the mail log can tell.

Exit codes (one per id; a command exits with the code of the first id that failed):
0 done (or nothing to do: already held, not held), 64 EX_USAGE (a prefix too short or ambiguous, or a
command that does not apply to the message's state), 65 EX_DATAERR (the entry cannot be read), 67
EX_NOUSER (no such message, or no longer in the queue), 75 EX_TEMPFAIL (being delivered right now), 77
EX_NOPERM (this user may not change the spool).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pymta.errors import EX_DATAERR, EX_NOPERM, EX_NOUSER, EX_OK, EX_USAGE
from pymta.log import SYSLOG_SOCKET

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.queue.spool import Spool

# The shortest id prefix accepted: 4 hex digits of the time prefix still tell most messages apart.
MIN_PREFIX = 4
# An id is 8 hex digits of time and 16 random ones (`pymta.queue.directory.new_id`).
ID_LENGTH = 24
# How many candidates an ambiguous prefix names.
MAX_CANDIDATES = 10
_HEX = frozenset("0123456789abcdef")


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


class FailureError(Exception):
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


def listed_names(spool: Spool, location: str) -> list[str]:
    try:
        with os.scandir(spool.dir(location)) as listing:
            return [item.name for item in listing if not item.name.startswith(".")]
    except (FileNotFoundError, PermissionError):
        return []  # system mode: new/ cannot be listed by everyone; full ids are still found


def gone(name: str, *, meanwhile: bool = False) -> FailureError:
    """An id not in the queue. `meanwhile`: it was there when we looked, and went while we waited for it."""
    if meanwhile:
        detail = "no longer in the queue: it was delivered or deleted while this command waited"
    else:
        detail = "not in the queue (it may have been delivered, deleted or expired)"
    return FailureError("gone", detail + _log_hint(name), EX_NOUSER, name=name)


def _log_hint(name: str) -> str:
    """Where to look for what became of a message: the mail log, when there is one (syslog)."""
    return f"; look for id={name} in the mail log" if os.path.exists(SYSLOG_SOCKET) else ""


def wanted_id(argument: str) -> str:
    """`argument` as an id or id prefix to look for; FailureError when it cannot be one."""
    wanted = argument.strip().lower()
    if not wanted or not set(wanted) <= _HEX or len(wanted) > ID_LENGTH:
        raise FailureError(
            "not an id",
            f"not a queue id: ids are {ID_LENGTH} hexadecimal digits, as `pymta queue` lists them",
            EX_USAGE,
        )
    if len(wanted) < MIN_PREFIX:
        raise FailureError(
            "too short", f"too short: give at least {MIN_PREFIX} characters of the id", EX_USAGE
        )
    return wanted


def ambiguous(candidates: list[str]) -> FailureError:
    shown = ", ".join(candidates[:MAX_CANDIDATES])
    more = f" and {len(candidates) - MAX_CANDIDATES} more" if len(candidates) > MAX_CANDIDATES else ""
    return FailureError(
        "ambiguous",
        f"ambiguous: matches {len(candidates)} messages ({shown}{more}); give more of the id",
        EX_USAGE,
        candidates,
    )


def resolve(spool: Spool, argument: str, *, set_aside: bool = False) -> tuple[str, str]:
    """The id that `argument` (a full id or a unique prefix) names, and where it is: "new" or "queue"; with
    `set_aside`, also "corrupt" for a full id that the pick-up or the flush moved there."""
    wanted = wanted_id(argument)
    found: dict[str, str] = {}
    # new/ before queue/: a message picked up between the two listings is seen in queue/ then, not missed.
    for location in ("new", "queue"):
        for name in listed_names(spool, location):
            if name.startswith(wanted):
                found[name] = location
        if len(wanted) == ID_LENGTH and os.path.exists(os.path.join(spool.dir(location), wanted)):
            found[wanted] = location
    if len(found) == 1:
        return next(iter(found.items()))
    if len(found) > 1:
        raise ambiguous(sorted(found))
    if len(wanted) == ID_LENGTH:
        if os.path.lexists(os.path.join(spool.dir("corrupt"), wanted)):
            if set_aside:
                return wanted, "corrupt"
            raise FailureError(
                "unreadable",
                f"unreadable: set aside in {spool.dir('corrupt')}/ for the admin; look at it there",
                EX_DATAERR,
                name=wanted,
            )
        raise gone(wanted)
    raise FailureError("no such message", "no such message in the queue", EX_NOUSER)


def denied(name: str | None) -> FailureError:
    return FailureError(
        "not allowed", "permission denied: run this as root or as the spool's owner", EX_NOPERM, name=name
    )


def unreadable(name: str | None, exc: Exception) -> FailureError:
    return FailureError("unreadable", f"unreadable: {exc}", EX_DATAERR, name=name)
