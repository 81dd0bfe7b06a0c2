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


def iso_utc(timestamp: float) -> str:
    """ISO 8601 in UTC with a Z, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def entry_to_json(entry: QueueEntry) -> dict[str, object]:
    """One message as the `pymta queue --json` contract describes it."""
    return {
        "id": entry.id,
        "state": entry.state,
        "sender": entry.sender,
        "recipients": [
            {"address": r.address, "status": r.status, "last_error": r.last_error} for r in entry.recipients
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
        pending = [r.address for r in entry.recipients if r.status not in ("delivered",)]
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
