"""Which messages a queue run is limited to: sendmail's `-qI`, `-qR` and `-qS`, `pymta flush --id`,
`--recipient` and `--sender`.

A limit is a substring, matched without regard to case, as sendmail(8) reads them: of the queue id, of a
recipient still waiting (one already delivered or failed no longer makes a message "for" its domain), or
of the envelope sender. Several limits of one kind add up (any of them may match); limits of different
kinds narrow (each kind given must match). A message that cannot be read is left to an unlimited run,
which sets it aside with the reason.
"""

from __future__ import annotations

from pymta.queue.entry import QueueEntry
from pymta.queue.spool import Names, Spool
from pymta.records import record

# A recipient in one of these states is done: a limit does not look at it.
DONE = ("delivered", "failed", "expanded")


@record(frozen=True)
class Selection:
    """The limits of one run; empty when nothing limits it."""

    ids: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ids or self.recipients or self.senders)

    def matches(self, entry: QueueEntry) -> bool:
        waiting = [recipient.address for recipient in entry.recipients if recipient.status not in DONE]
        return (
            _any_in(self.ids, [entry.id])
            and _any_in(self.recipients, waiting)
            and _any_in(self.senders, [entry.sender])
        )

    def among(self, spool: Spool, names: Names) -> Names:
        """The ids of queue/ in `names` (kept in their order) whose message this selection takes."""
        if not self:
            return names
        taken = []
        for name in names:
            if self.ids and not _any_in(self.ids, [name]):
                continue  # the id alone decides: no need to read the message
            try:
                entry = spool.read_entry("queue", name)
            except (OSError, ValueError):
                continue
            if self.matches(entry):
                taken.append(name)
        return Names(taken)


def _any_in(limits: tuple[str, ...], values: list[str]) -> bool:
    if not limits:
        return True
    folded = [value.casefold() for value in values]
    return any(limit.casefold() in value for limit in limits for value in folded)
