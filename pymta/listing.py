"""What is in the queue, for people (`mailq`, `pymta queue`) and for scripts (`pymta queue --json`).

The JSON field names are a contract (DESIGN.md, "pymta queue --json"): monitoring depends on them. The table
is for an admin at a terminal: one line per message, its last error indented below it, as Postfix's mailq.
This module does not import click, so `mailq` stays light.
"""

from __future__ import annotations

import os
import sys
import time

from .errors import EX_OK, PermissionDenied
from .spool import QueueEntry, Spool

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .queue_ops import Details


def iso_utc(timestamp: float) -> str:
    """ISO 8601 in UTC with a Z, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# A recipient replaced by its alias targets (or the admin) was handed on: to scripts, it is delivered;
# its targets follow it in the list with statuses of their own.
CONTRACT_STATUS = {"expanded": "delivered"}


def entry_to_json(entry: QueueEntry) -> dict[str, object]:
    """One message as the `pymta queue --json` contract describes it."""
    return {
        "id": entry.id,
        "state": entry.state,
        "sender": entry.sender,
        "recipients": [
            {
                "address": r.address,
                "status": CONTRACT_STATUS.get(r.status, r.status),
                "last_error": r.last_error,
            }
            for r in entry.recipients
        ],
        "size": entry.size,
        "submitted_by": entry.submitted_by,
        "queued_at": iso_utc(entry.queued_at),
        "next_attempt": None if entry.next_attempt is None else iso_utc(entry.next_attempt),
        "attempts": entry.attempts,
        "last_error": entry.last_error,
    }


def human_age(seconds: float) -> str:
    """An age as an admin reads it at a glance: 42s, 5m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def human_size(size: int) -> str:
    """A size in bytes, KiB or MiB with one decimal where it helps."""
    if size < 1024:
        return f"{size}B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f}K"
    return f"{size / (1024 * 1024):.1f}M"


def format_table(entries: list[QueueEntry], now: float | None = None) -> list[str]:
    """The queue as lines of text: a header, a line per message (and its last error), a total."""
    if not entries:
        return ["Mail queue is empty"]
    now = time.time() if now is None else now
    width = max(len(entry.id) for entry in entries)
    lines = [f"{'ID':<{width}}  {'AGE':>4}  {'SIZE':>6}  {'STATE':<8}  SENDER -> RECIPIENTS"]
    for entry in entries:
        sender = entry.sender or "<>"
        pending = [r.address for r in entry.recipients if r.status not in ("delivered", "expanded")]
        lines.append(
            f"{entry.id:<{width}}  {human_age(now - entry.queued_at):>4}  {human_size(entry.size):>6}  "
            f"{entry.state:<8}  {sender} -> {', '.join(pending) or '(all delivered)'}"
        )
        if entry.last_error:
            lines.append(f"{'':<{width}}  ({entry.last_error})")
    total = sum(entry.size for entry in entries)
    count = len(entries)
    lines.append(f"-- {count} message{'s' if count != 1 else ''}, {human_size(total)} in total")
    return lines


def _when(timestamp: object) -> str | None:
    return (
        iso_utc(timestamp) if isinstance(timestamp, int | float) and not isinstance(timestamp, bool) else None
    )


def details_to_json(details: Details) -> dict[str, object]:
    """`pymta queue show --json`: the `pymta queue --json` object of the message, and more about it."""
    entry, state = details.entry, details.state
    shown = {
        "argument": details.argument,
        "ok": True,
        **entry_to_json(entry),
        "location": entry.location,
        "last_attempt": _when(state.get("last_attempt")),
        "relay": state.get("relay") if isinstance(state.get("relay"), str) else None,
        "held_from": state.get("held_from") if entry.state == "held" else None,
        "bounce_due": state.get("bounce_due") is True,
        "headers": [{"name": name, "value": value} for name, value in details.headers],
    }
    if details.message is not None:
        shown["message"] = details.message.decode("utf-8", "replace")
    return shown


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters (an escape sequence in a header) shown as \\xNN."""
    return "".join(
        char
        if char == "\t" or (ord(char) >= 0x20 and not 0x7F <= ord(char) < 0xA0)
        else f"\\x{ord(char):02x}"
        for char in text
    )


def format_details(details: Details, now: float | None = None) -> list[str]:
    """`pymta queue show`: what an admin needs to know about one message, one fact per line."""
    now = time.time() if now is None else now
    entry, state = details.entry, details.state

    def when(timestamp: float) -> str:
        ago = now - timestamp
        return (
            f"{iso_utc(timestamp)} ({human_age(ago)} ago)"
            if ago >= 0
            else f"{iso_utc(timestamp)} (in {human_age(-ago)})"
        )

    lines = [f"id:            {entry.id}"]
    if entry.location == "new":
        lines.append("location:      new/ (committed, not yet picked up by a flush)")
    state_line = entry.state
    if entry.state == "held":
        state_line += f" (was {state.get('held_from', 'queued')}; `pymta queue release` lets it go)"
    lines.append(f"state:         {state_line}")
    lines.append(f"sender:        {printable(entry.sender) if entry.sender else '<> (the null sender)'}")
    who = f"{entry.submitted_by} (uid {entry.uid}" + (
        f", {printable(entry.full_name)})" if entry.full_name else ")"
    )
    lines.append(f"submitted by:  {who}")
    lines.append(f"queued at:     {when(entry.queued_at)}")
    lines.append(f"size:          {human_size(entry.size)} ({entry.size} bytes)")
    attempts = str(entry.attempts)
    last_attempt = state.get("last_attempt")
    if isinstance(last_attempt, int | float):
        attempts += f", the last at {when(last_attempt)}"
        relay = state.get("relay")
        if isinstance(relay, str) and relay != "none":
            attempts += f" via {printable(relay)}"
    lines.append(f"attempts:      {attempts}")
    if entry.next_attempt is None:
        nothing = {"held": "none while held", "failed": "none: every recipient is done"}
        lines.append(f"next attempt:  {nothing.get(entry.state, 'none')}")
    elif entry.next_attempt <= now:
        lines.append("next attempt:  due now (the next flush)")
    else:
        lines.append(f"next attempt:  {when(entry.next_attempt)}")
    if entry.last_error:
        lines.append(f"last error:    {printable(entry.last_error)}")
    if state.get("bounce_due") is True:
        lines.append("bounce:        owed to the sender; the next flush sends it")
    dsn = [
        f"{key}={value}"
        for key, value in (("notify", entry.dsn_notify), ("ret", entry.dsn_ret), ("envid", entry.dsn_envid))
        if value
    ]
    if dsn:
        lines.append(f"dsn:           {printable(', '.join(dsn))}")
    lines.append("recipients:")
    width = max(len(r.status) for r in entry.recipients) if entry.recipients else 0
    for recipient in entry.recipients:
        lines.append(f"  {recipient.status:<{width}}  {printable(recipient.address)}")
        if recipient.last_error:
            lines.append(f"  {'':<{width}}  {printable(recipient.last_error)}")
    if details.message is None:
        lines.append("headers:")
        lines.extend(f"  {printable(name)}: {printable(value)}" for name, value in details.headers)
    return lines


def load(spool_path: str) -> tuple[list[QueueEntry], list[str]]:
    """The entries of the spool (none when it does not exist yet) and a line per unreadable entry."""
    try:
        return Spool(spool_path).entries()
    except PermissionError:
        raise PermissionDenied(
            f"cannot read the queue in {spool_path}: permission denied; "
            "run this as root or as the spool's owner"
        ) from None


def print_queue(spool_path: str) -> int:
    """`mailq` and `sendmail -bp`: print the table; unreadable entries are reported on stderr."""
    entries, problems = load(spool_path)
    out = "\n".join(format_table(entries)) + "\n"
    for problem in problems:
        os.write(2, f"mailq: cannot read {problem}\n".encode("utf-8", "replace"))
    sys.stdout.write(out)
    sys.stdout.flush()
    return EX_OK
