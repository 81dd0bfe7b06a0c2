"""What is in the queue, for people (`mailq`, `pymta queue`, `pymta queue show`); for scripts the same
entries go out as `pymta.queue.contract` says (`pymta queue --json`). The table is for an admin at a
terminal: one line per message, its last error indented below it, as Postfix's mailq.
This module does not import click, so `mailq` stays light.

In system mode a user who is neither root nor the spool's owner cannot read the queue; `load_visible` then
gives their own messages from the view the last delivery run published for them (`pymta.queue.views`), and
`view_notes` the line that says so. Their JSON is the same array, holding only their messages.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator

from pymta.errors import EX_OK, PermissionDeniedError
from pymta.mail.idn import display_address
from pymta.queue import views
from pymta.queue.contract import entry_from_json, entry_to_json, iso_utc
from pymta.queue.entry import QueueEntry
from pymta.queue.spool import Spool


class Details:
    """One message as `pymta queue show` describes it (`pymta.queue.ops.show`): its entry, its header fields,
    the whole stored message when asked for, and from a user's own view a `note` (as of when, and that it
    has no header fields)."""

    __slots__ = ("argument", "entry", "headers", "message", "note")

    def __init__(
        self,
        argument: str,
        entry: QueueEntry,
        headers: list[tuple[str, str]],
        message: bytes | None,
        note: str | None = None,
    ) -> None:
        self.argument = argument
        self.entry = entry
        self.headers = headers
        self.message = message
        self.note = note


def untold(entry: QueueEntry) -> bool:
    """Whether `entry` failed and no human was told: a failed recipient was never reported (its bounce had
    nobody to go to: `notices.bounce_recipient`) and none is owed. `failed_retention` never removes it."""
    return (
        entry.state == "failed"
        and not entry.bounce_due
        and any(r.status == "failed" and not r.reported for r in entry.recipients)
    )


# What the listing says below such a message; what to do about them (after `untold_summary`).
UNTOLD_NOTE = "no one was told it failed: kept until you delete it (pymta queue delete ID)"
UNTOLD_FIX = "read each with pymta queue show ID, then remove it with pymta queue delete ID"


def untold_summary(count: int) -> str | None:
    """The line that points at the `count` messages no one was told about (for `pymta queue` and
    `pymta setup --check`), or None when there are none."""
    if not count:
        return None
    return f"{count} failed message{'s' if count != 1 else ''} no one was told about: see pymta queue"


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


# The width of the ID column: what `new_id` makes (a longer id, from a hand-made drop, widens its own line).
ID_WIDTH = 24


def table_header() -> str:
    return f"{'ID':<{ID_WIDTH}}  {'AGE':>4}  {'SIZE':>6}  {'STATE':<8}  SENDER -> RECIPIENTS"


def pending(entry: QueueEntry) -> list[str]:
    """The recipients still to be delivered (or that failed): what the listing shows and filters match."""
    return [r.address for r in entry.recipients if r.status not in ("delivered", "expanded")]


def _shown(address: str) -> str:
    """An address with its domain as people write it (`display_address`): as it is without an A-label
    (which has "--" in it: the cheap test first, a listing asks 100,000 times)."""
    return display_address(address) if "--" in address and "xn--" in address.lower() else address


def table_row(entry: QueueEntry, now: float) -> str:
    """A message's line in the table: id, age, size, state, sender and the recipients left."""
    sender = _shown(entry.sender) if entry.sender else "<>"
    recipients = ", ".join(map(_shown, pending(entry))) or "(all delivered)"
    return (
        f"{entry.id:<{ID_WIDTH}}  {human_age(now - entry.queued_at):>4}  {human_size(entry.size):>6}  "
        f"{entry.record.state:<8}  {sender} -> {recipients}"
    )


class Totals:
    """What the last line of a listing says: how many messages, their size, how many no one was told of."""

    __slots__ = ("count", "size", "untold")

    def __init__(self) -> None:
        self.count = self.size = self.untold = 0

    def add(self, entry: QueueEntry, is_untold: bool | None = None) -> None:
        """Count `entry`; `is_untold`: `untold(entry)`, when the caller has it already."""
        self.count += 1
        self.size += entry.size
        self.untold += untold(entry) if is_untold is None else is_untold

    def lines(self) -> list[str]:
        lines = [f"-- {self.count} message{'s' if self.count != 1 else ''}, {human_size(self.size)} in total"]
        summary = untold_summary(self.untold)
        if summary is not None:
            lines.append(f"-- {summary} ({UNTOLD_FIX})")
        return lines


def table_lines(entries: Iterable[QueueEntry], now: float | None = None) -> Iterator[str]:
    """`mailq`: a header, a line per message with its last error below it, a total; each line as soon as
    its message is read (a listing of 100,000 messages starts at once and holds one message)."""
    now = time.time() if now is None else now
    totals = Totals()
    for entry in entries:
        if not totals.count:
            yield table_header()
        totals.add(entry)
        yield table_row(entry, now)
        if entry.last_error:
            yield f"{'':<{ID_WIDTH}}  ({entry.last_error})"
        if untold(entry):
            yield f"{'':<{ID_WIDTH}}  ({UNTOLD_NOTE})"
    if not totals.count:
        yield "Mail queue is empty"
        return
    yield from totals.lines()


def reason(entry: QueueEntry) -> str:
    """Why a message waits, as `pymta queue` groups them: its state and its last error (held: held)."""
    if entry.state == "held":
        return "held"
    if entry.state == "queued" and not entry.last_error:
        return "queued: not tried yet"
    return f"{entry.state}: {printable(entry.last_error)}" if entry.last_error else entry.state


def grouped_text(entries: Iterable[QueueEntry], now: float | None = None) -> Iterator[str]:
    """`pymta queue`: the messages grouped by why they wait (`reason`), the largest group first, each
    under one line that gives its count and reason once, oldest first within it; then the total. The text
    comes in blocks of whole lines, each ending with a newline. Only the text of the rows is held until
    the end, not the messages: in blocks of `_BLOCK` rows, compressed (100,000 rows: about 1 MiB rather
    than 9)."""
    now = time.time() if now is None else now
    totals = Totals()
    groups: dict[str, _Group] = {}
    # The group of each (state, last error): the messages of a large queue share a few of them.
    known: dict[tuple[str, str | None], _Group] = {}
    for entry in entries:
        is_untold = untold(entry)
        totals.add(entry, is_untold)
        record = entry.record
        group = known.get((record.state, record.last_error))
        if group is None:
            why = reason(entry)
            group = groups.get(why)
            if group is None:
                group = groups[why] = _Group()
            if len(known) < 4096:
                known[record.state, record.last_error] = group
        group.add(table_row(entry, now))
        if is_untold:
            group.rows.append(f"{'':<{ID_WIDTH}}  ({UNTOLD_NOTE})")
    if not totals.count:
        yield "Mail queue is empty\n"
        return
    yield table_header() + "\n"
    for why in sorted(groups, key=lambda why: -groups[why].count):  # stable: equal groups by their oldest
        group = groups.pop(why)
        yield f"\n{group.count} {why}\n"
        yield from group.text()
    yield "\n" + "".join(line + "\n" for line in totals.lines())


# How many rows of a group `grouped_text` joins into one block: the per-block cost of 100,000 rows is
# then paid 100,000 / _BLOCK times.
_BLOCK = 512


class _Group:
    """The rows of one group of `grouped_text`: the latest as strings, the earlier joined in blocks and
    compressed with zlib's fastest level (rows of one group differ in little but their id: a tenth of
    the size, for about a second's hundredth per 100,000 rows)."""

    __slots__ = ("count", "rows", "blocks")

    def __init__(self) -> None:
        self.count = 0
        self.rows: list[str] = []
        self.blocks: list[bytes] = []

    def add(self, row: str) -> None:
        self.count += 1
        self.rows.append(row)
        if len(self.rows) >= _BLOCK:
            text = ("\n".join(self.rows) + "\n").encode("utf-8", "surrogatepass")
            self.blocks.append(zlib.compress(text, 1))
            self.rows.clear()

    def text(self) -> Iterator[str]:
        """The rows, in blocks of whole lines; each block is let go of as it is given out."""
        blocks, self.blocks = self.blocks, []
        blocks.reverse()
        while blocks:
            yield zlib.decompress(blocks.pop()).decode("utf-8", "surrogatepass")
        if self.rows:
            yield "\n".join(self.rows) + "\n"


# Age columns of `pymta queue --summary` (after Postfix's qshape, in fewer and rounder steps): a message
# counts in the first whose bound its age is under; the last column takes the rest.
AGE_BUCKETS: tuple[tuple[str, float], ...] = (("<5m", 300), ("<1h", 3600), ("<4h", 4 * 3600), ("<1d", 86400))
AGE_BUCKETS += (("<2d", 2 * 86400), ("<7d", 7 * 86400), (">=7d", float("inf")))


def domain_of(address: str) -> str:
    """The domain an address goes to, lower-case ("" for an address without one)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


class Summary:
    """`pymta queue --summary`: the messages counted by state, by age and, per destination domain of the
    recipients still to be delivered, by age (a message to two domains counts in each)."""

    __slots__ = ("totals", "states", "ages", "domains")

    def __init__(self) -> None:
        self.totals = Totals()
        self.states: dict[str, int] = dict.fromkeys(("queued", "deferred", "held", "failed"), 0)
        self.ages = [0] * len(AGE_BUCKETS)
        self.domains: dict[str, list[int]] = {}

    def add(self, entry: QueueEntry, now: float) -> None:
        self.totals.add(entry)
        self.states[entry.state] = self.states.get(entry.state, 0) + 1
        age = now - entry.queued_at
        bucket = next(number for number, (_, bound) in enumerate(AGE_BUCKETS) if age < bound)
        self.ages[bucket] += 1
        for domain in sorted({domain_of(address) for address in pending(entry)}):
            self.domains.setdefault(domain, [0] * len(AGE_BUCKETS))[bucket] += 1

    def by_domain(self) -> list[tuple[str, list[int]]]:
        """The domains, those with the most messages first (then by name)."""
        return sorted(self.domains.items(), key=lambda item: (-sum(item[1]), item[0]))

    def lines(self) -> list[str]:
        if not self.totals.count:
            return ["Mail queue is empty"]
        lines = ["STATE        MESSAGES"]
        lines += [f"{state:<10}  {count:>9}" for state, count in self.states.items()]
        rows = [("TOTAL", self.ages), *self.by_domain()]
        width = max(len("DOMAIN"), *(len(name or "(none)") for name, _ in rows))
        ages = "".join(f"  {label:>6}" for label, _ in AGE_BUCKETS)
        lines += ["", f"{'DOMAIN':<{width}}  {'TOTAL':>7}{ages}"]
        for name, counts in rows:
            cells = "".join(f"  {count:>6}" for count in counts)
            lines.append(f"{printable(name or '(none)'):<{width}}  {sum(counts):>7}{cells}")
        return [*lines, "", *self.totals.lines()]

    def to_json(self) -> dict[str, object]:
        labels = [label for label, _ in AGE_BUCKETS]
        return {
            "messages": self.totals.count,
            "size": self.totals.size,
            "by_state": self.states,
            "by_age": dict(zip(labels, self.ages, strict=True)),
            "by_domain": [
                {"domain": name, "messages": sum(counts), "by_age": dict(zip(labels, counts, strict=True))}
                for name, counts in self.by_domain()
            ],
        }


def summarize(entries: Iterable[QueueEntry], now: float | None = None) -> Summary:
    now = time.time() if now is None else now
    summary = Summary()
    for entry in entries:
        summary.add(entry, now)
    return summary


class Filter:
    """Which messages a listing or a queue command takes: `--state`, `--sender`, `--recipient` and
    `--older-than`, all of them (each repeatable option: any of its values). An address matches itself
    (case aside), `@domain` every address at that domain, and `<>` the null sender."""

    __slots__ = ("states", "senders", "recipients", "older_than", "now")

    def __init__(
        self,
        states: Iterable[str] = (),
        senders: Iterable[str] = (),
        recipients: Iterable[str] = (),
        older_than: float | None = None,
        now: float | None = None,
    ) -> None:
        self.states = frozenset(states)
        self.senders = tuple(sender.strip().lower() for sender in senders)
        self.recipients = tuple(recipient.strip().lower() for recipient in recipients)
        self.older_than = older_than
        self.now = time.time() if now is None else now

    def __bool__(self) -> bool:
        """Whether it narrows anything down."""
        return bool(self.states or self.senders or self.recipients or self.older_than is not None)

    def __call__(self, entry: QueueEntry) -> bool:
        if self.states and entry.state not in self.states:
            return False
        if self.senders and not any(_matches(entry.sender, wanted) for wanted in self.senders):
            return False
        if self.recipients and not any(
            _matches(address, wanted) for address in pending(entry) for wanted in self.recipients
        ):
            return False
        return self.older_than is None or self.now - entry.queued_at > self.older_than

    def apply(self, entries: Iterable[QueueEntry]) -> Iterator[QueueEntry]:
        return (entry for entry in entries if self(entry)) if self else iter(entries)


def _matches(address: str, wanted: str) -> bool:
    if wanted == "<>":
        return address == ""
    if wanted.startswith("@"):
        return domain_of(address) == wanted[1:]
    return address.lower() == wanted


def write_json(entries: Iterable[QueueEntry], write: Callable[[str], object]) -> None:
    """`pymta queue --json`: the array of `entry_to_json` objects, one a line, each written as soon as its
    message is read (`[` first, `]` last), so that a reader of a large queue gets the first at once."""
    import json

    encode = json.JSONEncoder().encode
    write("[")
    separator = "\n"
    for entry in entries:
        write(separator + encode(entry_to_json(entry)))
        separator = ",\n"
    write("\n]\n" if separator != "\n" else "]\n")


def details_to_json(details: Details) -> dict[str, object]:
    """`pymta queue show --json`: the `pymta queue --json` object of the message, and more about it."""
    entry, state = details.entry, details.entry.record
    shown = {
        "argument": details.argument,
        "ok": True,
        **entry_to_json(entry),
        "location": entry.location,
        "last_attempt": None if state.last_attempt is None else iso_utc(state.last_attempt),
        "relay": state.relay,
        "held_from": state.held_from if entry.state == "held" else None,
        "bounce_due": state.bounce_due,
        "untold": untold(entry),
        "headers": [{"name": name, "value": value} for name, value in details.headers],
    }
    if details.message is not None:
        shown["message"] = details.message.decode("utf-8", "replace")
    return shown


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters (an escape sequence in a header) shown as \\xNN."""
    if (
        text.isascii() and text.isprintable()
    ):  # the usual text: nothing to change (a listing asks 100,000 times)
        return text
    return "".join(
        char
        if char == "\t" or (ord(char) >= 0x20 and not 0x7F <= ord(char) < 0xA0)
        else f"\\x{ord(char):02x}"
        for char in text
    )


def format_details(details: Details, now: float | None = None) -> list[str]:
    """`pymta queue show`: what an admin needs to know about one message, one fact per line."""
    now = time.time() if now is None else now
    entry, state = details.entry, details.entry.record

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
        state_line += f" (was {state.held_from or 'queued'}; `pymta queue release` lets it go)"
    lines.append(f"state:         {state_line}")
    lines.append(f"sender:        {printable(entry.sender) if entry.sender else '<> (the null sender)'}")
    who = f"{entry.submitted_by} (uid {entry.uid}" + (
        f", {printable(entry.full_name)})" if entry.full_name else ")"
    )
    lines.append(f"submitted by:  {who}")
    lines.append(f"queued at:     {when(entry.queued_at)}")
    lines.append(f"size:          {human_size(entry.size)} ({entry.size} bytes)")
    attempts = str(entry.attempts)
    if state.last_attempt is not None:
        attempts += f", the last at {when(state.last_attempt)}"
        if state.relay is not None and state.relay != "none":
            attempts += f" via {printable(state.relay)}"
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
    if state.bounce_due:
        lines.append("bounce:        owed to the sender; the next flush sends it")
    elif untold(entry):
        lines.append(f"bounce:        {UNTOLD_NOTE}")
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
    if details.note is not None:  # a user's own view holds no header fields
        lines.append(f"view:          {details.note}")
    elif details.message is None:
        lines.append("headers:")
        lines.extend(f"  {printable(name)}: {printable(value)}" for name, value in details.headers)
    return lines


def load(spool_path: str) -> tuple[list[QueueEntry], list[str]]:
    """The entries of the spool (none when it does not exist yet) and a line per unreadable entry."""
    try:
        return Spool(spool_path).entries()
    except PermissionError:
        raise PermissionDeniedError(
            f"cannot read the queue in {spool_path}: permission denied; "
            "run this as root or as the spool's owner"
        ) from None


class Visible:
    """What this user may see of the queue: the entries (read as they are iterated, oldest first) and the
    lines for unreadable ones, given to `report` as they are met; for a user who sees only their own view
    (`own_view`), when the last delivery run published it (None: it found no message of theirs), the limit
    it counted against, and who else sees the whole queue (`owner`)."""

    __slots__ = ("entries", "problems", "own_view", "published", "limit", "owner")

    def __init__(
        self,
        entries: Iterable[QueueEntry | str],
        problems: list[str],
        own_view: bool = False,
        published: float | None = None,
        limit: int | None = None,
        owner: str = "",
    ) -> None:
        self.entries = entries
        self.problems = problems
        self.own_view = own_view
        self.published = published
        self.limit = limit
        self.owner = owner

    def reported(self, report: Callable[[str], object]) -> Iterator[QueueEntry]:
        """The entries, each problem given to `report` where it is met (a user's own: first)."""
        for problem in self.problems:
            report(problem)
        for item in self.entries:
            if isinstance(item, str):
                report(item)
            else:
                yield item


def load_visible(spool_path: str) -> Visible:
    """The whole queue when this user may read it (`Spool.scan`: read while iterated, the problems among
    the entries as str); else, in system mode, their own view."""
    try:
        return Visible(Spool(spool_path).scan(), [])
    except PermissionError:
        if not views.own_view_only(spool_path):
            return Visible(*load(spool_path))  # raises PermissionDeniedError
    return own_view(spool_path)


def own_view(spool_path: str) -> Visible:
    """This user's messages as the last delivery run saw them (`pymta.queue.views`): never anyone else's."""
    uid = os.geteuid()
    owner = views.spool_owner_name(spool_path)
    path = views.view_path(spool_path, uid)
    try:
        view = views.read_view(spool_path, uid)
    except ValueError as exc:
        return Visible([], [f"{path}: {exc}; the next delivery run rewrites it"], True, None, None, owner)
    except OSError as exc:
        raise PermissionDeniedError(
            f"cannot read your queue view {path}: {exc.strerror or exc}; "
            "only root and the spool's owner read the queue itself (pymta setup --check)"
        ) from None
    if view is None:
        return Visible([], [], True, None, None, owner)
    entries, problems = [], []
    for number, message in enumerate(view.messages, 2):
        try:
            entries.append(entry_from_json(message, uid))
        except ValueError as exc:
            problems.append(f"{path}: line {number}: {exc}")
    return Visible(entries, problems, True, view.published, view.limit, owner)


def clock(timestamp: float, now: float | None = None) -> str:
    """A local time as a user reads it: HH:MM today, else the date too."""
    now = time.time() if now is None else now
    when = time.localtime(timestamp)
    if when[:3] == time.localtime(now)[:3]:
        return time.strftime("%H:%M", when)
    return time.strftime("%Y-%m-%d %H:%M", when)


# Mail a user sent after the last delivery run is in no view yet: said wherever a view is shown.
SINCE = "; mail sent since then shows after the next one"


def whole_queue_note(owner: str) -> str:
    """Who may see the whole queue: root, and the spool's owner (when that is not root itself)."""
    return (
        "only root sees the whole queue" if owner == "root" else f"only root and {owner} see the whole queue"
    )


def view_notes(visible: Visible, now: float | None = None) -> list[str]:
    """The lines that tell a user they see only their own messages, and as of when (none for an admin)."""
    if not visible.own_view:
        return []
    whole = whole_queue_note(visible.owner)
    if visible.published is None or not visible.entries:
        when = "" if visible.published is None else f"{clock(visible.published, now)}; "
        since = SINCE.removeprefix("; ")
        return [f"you have no messages in the queue as of the last delivery run ({when}{since}); {whole}"]
    notes = [f"your messages as of {clock(visible.published, now)} (the last delivery run{SINCE}); {whole}"]
    count = len(visible.entries) if isinstance(visible.entries, list) else 0  # a view: a list
    if visible.limit is not None and count >= visible.limit:
        notes.append(
            f"you have reached max_queued_per_user ({visible.limit}): sendmail takes no new message from "
            "you until some of these are delivered"
        )
    return notes


def print_queue(spool_path: str) -> int:
    """`mailq` and `sendmail -bp`: print the table (a user's own view: the note, then the table of their
    messages), as its messages are read; unreadable entries are reported on stderr."""
    visible = load_visible(spool_path)
    write = sys.stdout.write
    block: list[str] = []  # lines written in blocks: 100,000 messages make 200,000 of them

    def write_block() -> None:
        if block:
            write("\n".join(block) + "\n")
            block.clear()

    def report(problem: str) -> None:
        write_block()  # the lines before it first, as on a terminal
        sys.stdout.flush()
        os.write(2, f"mailq: cannot read {problem}\n".encode("utf-8", "replace"))

    for note in view_notes(visible):
        write(note + "\n")
    if visible.entries or not visible.own_view:
        for line in table_lines(visible.reported(report)):
            block.append(line)
            if len(block) >= 512:
                write_block()
        write_block()
    sys.stdout.flush()
    return EX_OK
