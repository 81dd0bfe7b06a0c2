"""The `pymta queue --json` contract: one queued message as scripts read it (`entry_to_json`), and such an
object read back (`entry_from_json`, for a user's own view, which the root flush publishes in this form).

The field names are a contract (pymta(1) QUEUE JSON): monitoring depends on them. They change only by adding.
"""

from __future__ import annotations

import time

from pymta.queue.entry import MessageState, QueueEntry


def iso_utc(timestamp: float) -> str:
    """ISO 8601 in UTC with a Z, to the second. The texts of recent seconds are kept: the messages of a
    large queue were mostly queued, and are due, in the same few seconds."""
    if not timestamp >= 0:  # gmtime floors a time before 1970, int() does not; and NaN
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    second = int(timestamp)  # what gmtime takes of it
    text = _ISO_SECONDS.get(second)
    if text is None:
        if len(_ISO_SECONDS) >= 4096:
            _ISO_SECONDS.clear()
        text = _ISO_SECONDS[second] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    return text


_ISO_SECONDS: dict[int, str] = {}


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


def time_of_iso(text: object) -> float:
    """The Unix time of an `iso_utc` text. Raises ValueError when it is not one."""
    import calendar

    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an ISO 8601 time")
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def entry_from_json(data: dict[str, object], uid: int = -1) -> QueueEntry:
    """An `entry_to_json` object read back as a QueueEntry of `uid` (a user's view): what the table and
    `pymta queue show` print of it. Raises ValueError when it is not such an object."""
    recipients = data.get("recipients")
    if not isinstance(recipients, list) or not all(
        isinstance(r, dict) and isinstance(r.get("address"), str) for r in recipients
    ):
        raise ValueError("its recipients are not a list of {address, status, last_error}")
    size = data.get("size")
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError("its size is not a number")
    next_attempt = data.get("next_attempt")
    envelope: dict[str, object] = {
        "id": data.get("id"),
        "sender": data.get("sender"),
        "recipients": [r["address"] for r in recipients],
        "submitted_by": data.get("submitted_by"),
        "uid": uid,
        "queued_at": time_of_iso(data.get("queued_at")),
    }
    state: dict[str, object] = {
        "state": data.get("state"),
        "attempts": data.get("attempts", 0),
        "next_attempt": None if next_attempt is None else time_of_iso(next_attempt),
        "last_error": data.get("last_error"),
        # A user's view does not say what was reported; untold messages are the admin's to find.
        "recipients": {
            r["address"]: {"status": r.get("status"), "last_error": r.get("last_error"), "reported": True}
            for r in recipients
        },
    }
    return QueueEntry("queue", "", envelope, MessageState.from_json(state), size, uid)
