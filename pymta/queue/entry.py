"""The one typed record of a queued message: its envelope (`QueueEntry`) and its delivery state
(`MessageState`, the file state/ID). Every key of a state file is named here, and only here: the flush,
`pymta queue` and the listings read and write a state through `MessageState`, never as a raw dict.

A state file is JSON, written whole and atomically (`Spool.write_state`); its mtime is the next attempt.
Its keys (ARCHITECTURE.md, "On disk"):

    state          queued, deferred, held or failed
    attempts       how many delivery attempts were made
    last_attempt   when the last one was (absent: never)
    next_attempt   when the next one is due; null when none is planned (held, or nothing left to try)
    last_error     the reply or reason of the last recipient that did not succeed
    relay          the server of the last attempt, if one answered
    warned         the one delay notice has gone out
    bounce_due     a notice is owed to the sender: the next flush sends it
    held_from      hold: the state before it, restored by release
    held_at        hold: when
    held_seconds   seconds spent on hold, added up by release: not part of the message's lifetime
    failed_at      an admin's bounce: when the admin gave up on it (`failed_retention` counts from it)
    recipients     address -> {status, last_error, via, reported, expired}, in the order they were added

Keys this version does not know are kept as they are (`MessageState.unknown`). Every value is checked for
its type and range when it is read (a state file is the spool owner's to write: invariant 10); a wrong one
is a ValueError that costs that message, never the run.

`sendmail` imports this module (through `pymta.queue.spool`): it imports nothing at module level, not even
dataclasses (which loads re and inspect).
"""

from __future__ import annotations

from pymta.queue.commit import ENVELOPE_VERSION as ENVELOPE_VERSION

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

# An envelope line longer than this is not one we wrote: refuse it rather than read a huge file into memory.
MAX_ENVELOPE_LINE = 4 * 1024 * 1024
# A state file larger than this is not one we wrote (one of a message with the largest envelope and a long
# reply for each recipient stays below it): refused rather than read into memory.
MAX_STATE_SIZE = 64 * 1024 * 1024
# The latest time an envelope, a state or a privsep request may name: the last day of the year 9999 begins,
# so that datetime can still show it in any time zone.
MAX_TIME = 253402214400.0
# The next-attempt time of a message that no flush should pick (held, failed): the largest 32-bit time.
NEVER = float(2**31 - 1)
# The RFC 3463 status of a recipient whose `retry.lifetime` ran out ("delivery time expired").
EXPIRED_STATUS = "5.4.7"


class Expiry:
    """Why a recipient failed when `retry.lifetime` ran out: after how long (`within`, as "5d"), and the
    last reply a server gave it and which server (`relay`), when one answered. The bounce reports that
    reply; `reason` is the text the listings show."""

    __slots__ = ("within", "reply", "relay")

    def __init__(self, within: str, reply: str | None = None, relay: str | None = None) -> None:
        self.within = within
        self.reply = reply
        self.relay = relay

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expiry) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash((self.within, self.reply, self.relay))

    def __repr__(self) -> str:
        return f"Expiry({self.within!r}, {self.reply!r}, {self.relay!r})"

    @property
    def reason(self) -> str:
        text = f"{EXPIRED_STATUS} expired: not delivered within {self.within}"
        if self.reply and self.relay:
            return f"{text}; the last reply from {self.relay} was: {self.reply}"
        return text

    def to_json(self) -> dict[str, object]:
        return {"within": self.within, "reply": self.reply, "relay": self.relay}

    @classmethod
    def from_json(cls, data: object) -> Expiry:
        if not isinstance(data, dict):
            raise ValueError("state field 'expired' is not an object")
        within = _text(data, "within")
        if not within:
            raise ValueError("state field 'expired' names no lifetime")
        return cls(within, _optional_text(data, "reply"), _optional_text(data, "relay"))


_LEGACY_EXPIRY = f"{EXPIRED_STATUS} expired: not delivered within "


def _legacy_expiry(last_error: str | None) -> Expiry | None:
    """The expiry a state file written before `expired` existed records only in `last_error` (the text of
    `Expiry.reason`): read back once here so that a bounce still owed for such a message reports the
    server's last reply. Nothing else reads a reason's text."""
    if not last_error or not last_error.startswith(_LEGACY_EXPIRY):
        return None
    within, _, rest = last_error[len(_LEGACY_EXPIRY) :].partition("; the last reply from ")
    relay, found, reply = rest.partition(" was: ")
    if " " in within or not within or (rest and (not found or not relay or " " in relay)):
        return None
    return Expiry(within, reply or None, relay or None)


class RecipientStatus:
    """One recipient of a queued message and how its delivery stands.

    `status` is pending, delivered, deferred, failed, or expanded (an alias or the admin rule replaced it by
    other recipients, which follow with `via` naming it). `reported`: its failure was told to the sender.
    `expired`: it failed because its lifetime ran out (`Expiry`).
    """

    __slots__ = ("address", "status", "last_error", "via", "reported", "expired")

    def __init__(
        self,
        address: str,
        status: str = "pending",
        last_error: str | None = None,
        via: str | None = None,
        reported: bool = False,
        expired: Expiry | None = None,
    ) -> None:
        self.address = address
        self.status = status
        self.last_error = last_error
        self.via = via
        self.reported = reported
        self.expired = expired

    def copy(self) -> RecipientStatus:
        """A copy to change, as `copy.copy` makes it without its generic machinery (the flush makes one per
        recipient of every message)."""
        return RecipientStatus(
            self.address, self.status, self.last_error, self.via, self.reported, self.expired
        )

    def record(self) -> dict[str, object]:
        """The recipient as its message's state file stores it (what `from_record` reads back)."""
        record: dict[str, object] = {"status": self.status, "last_error": self.last_error}
        if self.via:
            record["via"] = self.via  # an alias target: not to be expanded again
        if self.reported:
            record["reported"] = True  # its failure was told to the sender: no second bounce
        if self.expired is not None:
            record["expired"] = self.expired.to_json()
        return record

    @classmethod
    def from_record(cls, address: str, record: object) -> RecipientStatus:
        known = record if isinstance(record, dict) else {}
        get = known.get  # each value looked up once: a listing reads this for 100,000 recipients
        status = get("status", "")
        if not isinstance(status, str):
            status = _text(known, "status")  # raises
        last_error, via, expired = get("last_error"), get("via"), get("expired")
        last_error = last_error if isinstance(last_error, str) else None
        if expired is not None:
            typed: Expiry | None = Expiry.from_json(expired)
        else:  # a state file written before `expired` existed
            typed = _legacy_expiry(last_error) if status == "failed" else None
        made = object.__new__(cls)
        made.address = address
        made.status = status or "pending"
        made.last_error = last_error
        made.via = via if isinstance(via, str) else None
        made.reported = get("reported") is True
        made.expired = typed
        return made


class MessageState:
    """state/ID, typed: the keys in the module docstring. `next_attempt` None: no attempt is planned."""

    __slots__ = (
        "state",
        "attempts",
        "next_attempt",
        "last_attempt",
        "last_error",
        "relay",
        "warned",
        "bounce_due",
        "held_from",
        "held_at",
        "held_seconds",
        "failed_at",
        "recipients",
        "unknown",
    )

    def __init__(
        self,
        *,
        state: str = "queued",
        attempts: int = 0,
        next_attempt: float | None = 0.0,
        last_attempt: float | None = None,
        last_error: str | None = None,
        relay: str | None = None,
        warned: bool = False,
        bounce_due: bool = False,
        held_from: str | None = None,
        held_at: float | None = None,
        held_seconds: float = 0.0,
        failed_at: float | None = None,
        recipients: dict[str, RecipientStatus] | None = None,
        unknown: dict[str, object] | None = None,
    ) -> None:
        self.state = state
        self.attempts = attempts
        self.next_attempt = next_attempt
        self.last_attempt = last_attempt
        self.last_error = last_error
        self.relay = relay
        self.warned = warned
        self.bounce_due = bounce_due
        self.held_from = held_from
        self.held_at = held_at
        self.held_seconds = held_seconds
        self.failed_at = failed_at
        self.recipients = {} if recipients is None else recipients
        self.unknown = {} if unknown is None else unknown  # keys of a later version, kept as they are

    def copy(self) -> MessageState:
        """A copy to change: its own recipient and unknown-key dicts (the recipients themselves shared)."""
        copied = MessageState(**{name: getattr(self, name) for name in _SCALARS})
        copied.recipients = dict(self.recipients)
        copied.unknown = dict(self.unknown)
        return copied

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"state": self.state, "attempts": self.attempts}
        if self.last_attempt is not None:
            data["last_attempt"] = self.last_attempt
        data.update(next_attempt=self.next_attempt, last_error=self.last_error, relay=self.relay)
        data["warned"] = self.warned
        if self.held_from is not None:
            data["held_from"] = self.held_from
        if self.held_at is not None:
            data["held_at"] = self.held_at
        if self.held_seconds:
            data["held_seconds"] = self.held_seconds
        if self.bounce_due:
            data["bounce_due"] = True
        if self.failed_at is not None:
            data["failed_at"] = self.failed_at
        data["recipients"] = {address: r.record() for address, r in self.recipients.items()}
        return {**self.unknown, **data}

    @classmethod
    def from_json(cls, data: object, queued_at: float = 0.0) -> MessageState:
        """A state file's object read back; ValueError naming the first field that is wrong. A state
        without `next_attempt` is due from `queued_at`."""
        if not isinstance(data, dict):
            raise ValueError("state file is not a JSON object")
        # The usual values are taken as they are; anything else goes through the checks that say what is
        # wrong (`_text`, `_number`, `_time`), in the same order. A listing reads 100,000 states.
        get = data.get
        state, attempts, next_attempt = get("state", ""), get("attempts", 0), get("next_attempt", queued_at)
        if not isinstance(state, str):
            state = _text(data, "state")  # raises
        if type(attempts) is not int or not 0 <= attempts <= MAX_TIME:
            attempts = int(_number(data, "attempts", 0))
        if next_attempt is not None and (
            type(next_attempt) is not float or not 0 <= next_attempt <= MAX_TIME
        ):
            next_attempt = _time(data, "next_attempt", queued_at)
        held_seconds = get("held_seconds", 0)
        if held_seconds != 0 or type(held_seconds) is not int:
            held_seconds = max(0.0, float(_number(data, "held_seconds", 0)))
        per_recipient = get("recipients")
        per_recipient = per_recipient if isinstance(per_recipient, dict) else {}
        last_error, relay, held_from = get("last_error"), get("relay"), get("held_from")
        last_attempt = get("last_attempt")
        if type(last_attempt) is not float or not 0 <= last_attempt <= MAX_TIME:
            last_attempt = _optional_time(data, "last_attempt")
        # Made without __init__'s keywords, each slot set once: a listing makes 100,000 of them.
        made = object.__new__(cls)
        made.state = state or "queued"
        made.attempts = attempts
        made.next_attempt = next_attempt
        made.last_attempt = last_attempt
        made.last_error = last_error if isinstance(last_error, str) else None
        made.relay = relay if isinstance(relay, str) else None
        made.warned = get("warned") is True
        made.bounce_due = get("bounce_due") is True
        made.held_from = held_from if isinstance(held_from, str) else None
        made.held_at = None if get("held_at") is None else _optional_time(data, "held_at")
        made.held_seconds = float(held_seconds)
        made.failed_at = None if get("failed_at") is None else _optional_time(data, "failed_at")
        from_record = RecipientStatus.from_record
        made.recipients = {
            str(address): from_record(str(address), record) for address, record in per_recipient.items()
        }
        made.unknown = {} if _STATE_KEYS.issuperset(data) else _unknown(data)
        return made


def _unknown(data: dict[str, object]) -> dict[str, object]:
    """The keys of a later version in a state, kept as they are (a set difference: a listing of 100,000
    states reads this for each)."""
    extra = data.keys() - _STATE_KEYS
    return {key: value for key, value in data.items() if key in extra} if extra else {}


_SCALARS = MessageState.__slots__[:-2]  # all but recipients and unknown
_STATE_KEYS = frozenset(
    ("state", "attempts", "next_attempt", "last_attempt", "last_error", "relay", "warned", "bounce_due")
    + ("held_from", "held_at", "held_seconds", "failed_at", "recipients")
)


def record_attempt(
    entry: QueueEntry,
    recipients: Iterable[RecipientStatus],
    *,
    state: str,
    attempts: int,
    now: float,
    next_attempt: float | None,
    last_error: str | None,
    relay: str | None,
    warned: bool,
    bounce_due: bool = False,
) -> MessageState:
    """The state the flush writes after an attempt at `entry` (or after a failure it parks the message
    with): what a hold left behind and keys of a later version are not kept, as before; the time spent on
    hold is."""
    return MessageState(
        state=state,
        attempts=attempts,
        next_attempt=next_attempt if next_attempt is None or next_attempt < NEVER else None,
        last_attempt=now,
        last_error=last_error,
        relay=relay,
        warned=warned,
        bounce_due=bounce_due,
        held_seconds=entry.held_seconds,
        recipients={r.address: r for r in recipients},
    )


class QueueEntry:
    """A queued message as the spool describes it: its envelope and its delivery state (`record`)."""

    __slots__ = (
        "location",
        "path",
        "id",
        "sender",
        "recipients",
        "submitted_by",
        "uid",
        "full_name",
        "queued_at",
        "dsn_notify",
        "dsn_ret",
        "dsn_envid",
        "body_type",
        "size",
        "owner_uid",
        "has_state",
        "dsn_of",
        "to_postmaster",
        "record",
    )

    def __init__(
        self,
        location: str,
        path: str,
        envelope: dict[str, object],
        state: MessageState | None,
        size: int,
        owner_uid: int,
    ) -> None:
        self.location = location
        self.path = path
        # The usual values are taken as they are; anything else goes through the checks that say what is
        # wrong, in the same order (a listing makes 100,000 entries).
        get = envelope.get
        ident, sender, submitted_by, full_name = (
            get("id", ""),
            get("sender", ""),
            get("submitted_by", ""),
            get("full_name", ""),
        )
        if not (
            isinstance(ident, str)
            and isinstance(sender, str)
            and isinstance(submitted_by, str)
            and isinstance(full_name, str)
        ):
            ident, sender = _text(envelope, "id"), _text(envelope, "sender")  # one of them raises
            submitted_by, full_name = _text(envelope, "submitted_by"), _text(envelope, "full_name")
        self.id, self.sender, self.submitted_by, self.full_name = ident, sender, submitted_by, full_name
        uid, queued_at = get("uid", -1), get("queued_at", 0)
        self.uid = (
            uid if type(uid) is int and -MAX_TIME <= uid <= MAX_TIME else int(_number(envelope, "uid", -1))
        )
        if type(queued_at) is not float or not 0 <= queued_at <= MAX_TIME:
            queued_at = _time(envelope, "queued_at", 0)
        self.queued_at = queued_at
        notify, ret, envid, body_type = get("notify"), get("ret"), get("envid"), get("body_type")
        self.dsn_notify = notify if isinstance(notify, str) else None
        self.dsn_ret = ret if isinstance(ret, str) else None
        self.dsn_envid = envid if isinstance(envid, str) else None
        self.body_type = body_type if isinstance(body_type, str) else None
        addresses = get("recipients")
        if not isinstance(addresses, list) or not (
            (len(addresses) == 1 and type(addresses[0]) is str) or all(isinstance(a, str) for a in addresses)
        ):
            raise ValueError("envelope has no recipient list")
        self.has_state = state is not None
        self.record = state if state is not None else MessageState(next_attempt=self.queued_at)
        known = self.record.recipients
        # The envelope's recipients, then those the flush added (alias targets), in the state's order.
        if len(known) == len(addresses) == 1 and addresses[0] in known:  # the usual message: one, tried
            self.recipients = [known[addresses[0]]]
        else:
            if len(known) > len(addresses) or not known.keys() <= set(addresses):
                addresses = [*addresses, *(address for address in known if address not in addresses)]
            self.recipients = [known.get(address) or RecipientStatus(address) for address in addresses]
        self.size = size
        self.owner_uid = owner_uid
        dsn_of = get("dsn_of")
        self.dsn_of = dsn_of if isinstance(dsn_of, str) else None  # this is a notice about that message
        # The last-resort notice to postmaster (`notices.bounce_recipient`): routed without the admin rule,
        # and a failure of it is told to no one.
        self.to_postmaster = get("to_postmaster") is True

    # The state's fields that every reader of an entry asks for.
    @property
    def state(self) -> str:
        return self.record.state

    @property
    def attempts(self) -> int:
        return self.record.attempts

    @property
    def next_attempt(self) -> float | None:
        """None when no attempt is planned: every recipient is done (failed) or the message is held."""
        return self.record.next_attempt

    @property
    def last_error(self) -> str | None:
        return self.record.last_error

    @property
    def warned(self) -> bool:
        """The one delay notice has gone out."""
        return self.record.warned

    @property
    def bounce_due(self) -> bool:
        """A notice is owed to the sender (`pymta queue bounce`, or one the spool could not take)."""
        return self.record.bounce_due

    @property
    def relay(self) -> str | None:
        """The server of the last attempt, if one answered."""
        return self.record.relay

    @property
    def held_seconds(self) -> float:
        """Seconds spent on hold, added up by `pymta queue release`: not part of the message's lifetime."""
        return self.record.held_seconds

    def current_state(self) -> MessageState:
        """The state to change and write back: the one read, with each recipient as the entry has it."""
        record = self.record.copy()
        record.recipients = {r.address: r for r in self.recipients}
        return record


_UID_HEAD = b'{"v":1,"uid":'


def uid_from_head(head: bytes) -> int | None:
    """The uid that a queue file written by `submit` or the pick-up starts with (`{"v":1,"uid":N,`)."""
    if not head.startswith(_UID_HEAD):
        return None
    rest = head[len(_UID_HEAD) :]
    sign = -1 if rest[:1] == b"-" else 1
    rest = rest[1:] if sign < 0 else rest
    end = len(rest) - len(rest.lstrip(b"0123456789"))
    if not end or rest[end : end + 1] != b",":
        return None
    return sign * int(rest[:end])


_raw_decode: Callable[[str], tuple[object, int]] | None = None


def _json_value(text: str) -> object:
    """`json.loads(text)`, without its two searches for white space around the value when there is none
    but a line end after it (what pymta writes): a listing of 100,000 messages reads 200,000 of them.
    Anything else goes to json.loads, which reads it or raises its own error."""
    global _raw_decode
    if _raw_decode is None:
        import json

        _raw_decode = json.JSONDecoder().raw_decode
    try:
        value, end = _raw_decode(text)
    except ValueError:  # no value at the start: white space first, or no JSON
        end = -1
    if end == len(text) or (end > 0 and not text[end:].strip(" \t\n\r")):
        return value
    import json

    return json.loads(text)


def parse_envelope(line: bytes) -> dict[str, object]:
    """The envelope line of a queue file as a dict; ValueError when it is not one of ours."""
    try:  # decoded first: json.loads of bytes guesses their encoding, a cost a listing pays per message
        envelope = _json_value(line.decode())
    except (ValueError, RecursionError):  # RecursionError: arrays nested 200,000 deep
        raise ValueError("the envelope line is not JSON: not a pymta queue file") from None
    if not isinstance(envelope, dict) or envelope.get("v") != ENVELOPE_VERSION:
        raise ValueError("unknown envelope format")
    return envelope


def parse_state(data: bytes, queued_at: float = 0.0) -> MessageState:
    """The bytes of a state file read back (`MessageState.from_json`)."""
    try:
        value = _json_value(data.decode())
    except RecursionError:
        raise ValueError("state file is nested too deeply") from None
    return MessageState.from_json(value, queued_at)


def _text(data: dict[str, object], key: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"envelope field {key!r} is not text")
    return value


def _optional_text(data: dict[str, object], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _number(data: dict[str, object], key: str, default: float) -> float:
    """A number of the envelope or state: finite, and no larger than a time can be (an integer of 400
    digits would overflow every float conversion that follows)."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"envelope field {key!r} is not a number")
    if not -MAX_TIME <= value <= MAX_TIME:  # also false for NaN
        raise ValueError(f"envelope field {key!r} is out of range")
    return value


def time_field(data: dict[str, object], key: str, default: float) -> float:
    """A time of the envelope or state (`_number`, and not before 1970)."""
    value = float(_number(data, key, default))
    if value < 0:
        raise ValueError(f"envelope field {key!r} is not a time")
    return value


_time = time_field


def _optional_time(data: dict[str, object], key: str) -> float | None:
    """A time the readers only show or compare (last_attempt, held_at, failed_at): None when it is not one."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_TIME:
        return None
    return float(value)
