"""What is done to a message: normalised and stripped of Bcc at submission, completed at delivery.

Messages are bytes in any charset, possibly 8-bit, with NUL bytes and lines of any length. Submission changes
only what it must: line endings become CRLF (bare LF and lone CR too, against SMTP smuggling), a leading mbox
`From ` line goes, the fields `_FIELD_RULES` marks `dropped` are removed, and an empty line is inserted
where a header block ends without one. Delivery adds Date, Message-ID and From when missing and qualifies bare
addresses in place. Main invariant: every other byte, and the whole body, stays exactly as it came.

`sendmail` imports this module on every cron job: it imports nothing heavy at module level. Only `complete()`,
which runs at delivery, imports `email.utils` and `email.header`, inside the function.
"""

from pymta.errors import AddressError, MessageError
from pymta.mail.address import (
    excerpt,
    is_control,
    is_local_part_only,
    parse_list,
    qualify,
    recipient_addrs,
    unique_addresses,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CRLF = b"\r\n"
# A leading line in mbox format that is no header field (Postfix, nullmailer and dma drop it too).
_MBOX_SEPARATORS = (b"From ", b">From ")
_FOLD_STARTS = (ord(" "), ord("\t"))
_FIELD_NAME_BYTES = bytes(range(33, 127))  # printable ASCII: what a field name is made of (':' ends it)
# RFC 5322 specials: a display name holding one of these must be quoted.
_DISPLAY_SPECIALS = frozenset('()<>[]:;@\\,."')


class _FieldRule:
    """What pymta does with one header field: its `-t` recipient set, removal at submission, qualification."""

    __slots__ = ("recipients", "dropped", "qualified")

    def __init__(self, recipients: str = "", *, dropped: bool = False, qualified: bool = False) -> None:
        self.recipients = recipients  # "original" or "resent": which -t recipient set it feeds; "" for none
        self.dropped = dropped  # removed from the stored copy at submission
        self.qualified = qualified  # bare local parts get @domain at delivery


# Header fields pymta acts on, by lower-case name. Dropped fields follow Postfix's message_drop_headers: Bcc
# must reach neither the other recipients nor the disk; Return-Path is written by the final delivery; a
# Content-Length from the caller is wrong once line endings change. When any Resent- field is present, `-t`
# reads only the Resent- recipients (Postfix rule: the message is being re-sent).
_FIELD_RULES: dict[str, _FieldRule] = {
    "to": _FieldRule("original", qualified=True),
    "cc": _FieldRule("original", qualified=True),
    "bcc": _FieldRule("original", dropped=True),
    "resent-to": _FieldRule("resent", qualified=True),
    "resent-cc": _FieldRule("resent", qualified=True),
    "resent-bcc": _FieldRule("resent", dropped=True),
    "from": _FieldRule(qualified=True),
    "sender": _FieldRule(qualified=True),
    "reply-to": _FieldRule(qualified=True),
    "resent-from": _FieldRule(qualified=True),
    "resent-sender": _FieldRule(qualified=True),
    "resent-reply-to": _FieldRule(qualified=True),
    "return-path": _FieldRule(dropped=True),
    "content-length": _FieldRule(dropped=True),
}
_NO_RULE = _FieldRule()


class _HeaderBlock:
    """The header fields at the start of a message and where they end.

    `end` is the offset just after the last field: the empty line, the body, or the end of the message; 0
    when the message has no header block. `separator_missing` is true when the block ended at a line that is
    neither a field nor empty, so an empty line must be inserted before it.
    """

    __slots__ = ("fields", "end", "separator_missing")

    def __init__(self, fields: list[tuple[str, bytes]], end: int, separator_missing: bool) -> None:
        self.fields = fields
        self.end = end
        self.separator_missing = separator_missing


def normalise_line_endings(data: bytes) -> bytes:
    """`data` with every line ending (CRLF, bare LF, lone CR) as CRLF; an unterminated end gets one."""
    if not data:
        return data
    endings = LineEndings()
    return endings.feed(data) + endings.end()


class LineEndings:
    """`normalise_line_endings` for a body that comes in blocks, after a head of whole lines (sendmail
    streams a large message): `feed` each block, then `end`. A CR ending a block waits for the next."""

    __slots__ = ("held", "ends_line")

    def __init__(self) -> None:
        self.held = b""
        self.ends_line = True  # the head before the first block ends with a line ending

    def feed(self, block: bytes) -> bytes:
        data = self.held + block if self.held else block
        self.held = b"\r" if data.endswith(b"\r") else b""
        if self.held:
            data = data[:-1]
        out = data.replace(CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", CRLF)
        self.ends_line = out.endswith(CRLF) if out else self.ends_line
        return out

    def end(self) -> bytes:
        return CRLF if self.held or not self.ends_line else b""


def header_read(data: bytes) -> int:
    """How many bytes of `data`, the start of a message as submitted with more to come, are whole lines
    holding all of its header block, so that the rest is body (`prepare_submission` of those, then
    `LineEndings` over the rest, store the whole); 0 while the line that ends the block has not come."""
    cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1  # a last CR: an LF may follow
    message = _drop_mbox_separator(normalise_line_endings(data[:cut]))
    return cut if header_block(message).end < len(message) else 0


def _field_name(message: bytes, start: int, end: int) -> str | None:
    """The name of the header field on the line message[start:end], or None when the line is not a field.

    A field is `name:` with a name of printable ASCII (33-126) except ':'; whitespace before the colon is
    tolerated as RFC 5322 obsolete syntax allows (Postfix does too).
    """
    colon = message.find(b":", start, end)
    if colon < 0:
        return None
    name = message[start:colon].rstrip(b" \t")
    if not name or name.translate(None, _FIELD_NAME_BYTES):  # a byte outside 33-126 is left over
        return None
    return name.decode("ascii")


def header_block(message: bytes) -> _HeaderBlock:
    """Find the header fields at the start of `message` (lines end in LF or CRLF).

    The block ends at the first empty line. When the first line is not a field there is no header block at all
    (zed and careless scripts send bare text; no body line may be taken for a header). A later line that is
    neither a field, a continuation nor empty ends the block too: the lines from there on are body.
    """
    fields: list[tuple[str, bytes]] = []
    name = ""
    field_start = 0
    position = 0
    length = len(message)
    separator_missing = False
    while position < length:
        newline = message.find(b"\n", position)
        line_end = length if newline < 0 else newline + 1
        if message[position] in _FOLD_STARTS:
            if not name:
                break  # a first line that starts with blanks is no field: all of it is body
            position = line_end
            continue
        line_name = _field_name(message, position, line_end)
        if line_name is None:
            separator_missing = bool(name) and message[position:line_end] not in (CRLF, b"\n")
            break
        if name:
            fields.append((name, message[field_start:position]))
        name = line_name
        field_start = position
        position = line_end
    if name:
        fields.append((name, message[field_start:position]))
    return _HeaderBlock(fields, position if name else 0, separator_missing)


def header_fields(message: bytes) -> list[tuple[str, bytes]]:
    """The header fields of `message`: (name as written, raw bytes with continuation lines and CRLF)."""
    return header_block(message).fields


def _raw_value(field: bytes) -> bytes:
    """The bytes after the colon of a raw field, without its final line ending (folds kept)."""
    value = field[field.index(b":") + 1 :]
    if value.endswith(CRLF):
        return value[:-2]
    return value[:-1] if value.endswith(b"\n") else value


def _encoded(text: str) -> bytes:
    """`text` as UTF-8, a byte carried as surrogateescape (U+DC80-U+DCFF) written as that byte. Another
    unpaired surrogate stands for no byte at all (argv and the queue never carry one, a library caller
    may): it is written as U+FFFD, so a header pymta generates never stops the delivery of its message."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "".join(
            "\ufffd" if "\ud800" <= char <= "\udfff" and not "\udc80" <= char <= "\udcff" else char
            for char in text
        ).encode("utf-8", "surrogateescape")


def _unfolded(field: bytes) -> str:
    """The value of a raw field, unfolded and stripped, decoded as UTF-8 (other bytes kept as surrogates)."""
    value = _raw_value(field).replace(b"\r\n", b"").replace(b"\n", b"").strip(b" \t")
    return value.decode("utf-8", "surrogateescape")


def get_header(message: bytes, name: str) -> str | None:
    """The unfolded value of the first field called `name` (any case), or None when there is none."""
    wanted = name.lower()
    for field_name, field in header_block(message).fields:
        if field_name.lower() == wanted:
            return _unfolded(field)
    return None


def prepend_field(message: bytes, field: bytes) -> bytes:
    """`message` with the raw header `field` (ending in CRLF) added before its first field.

    A message without a header block (bare text, or a first line starting with blanks) gets an empty line
    after the new field, so that none of its text is taken for a header, nor for a continuation of `field`.
    """
    if message and not message.startswith((CRLF, b"\n")) and not header_block(message).fields:
        return field + CRLF + message
    return field + message


def _drop_mbox_separator(message: bytes) -> bytes:
    """`message` without a leading mbox `From ` / `>From ` line."""
    if message.startswith(_MBOX_SEPARATORS):
        return message[message.index(CRLF) + 2 :]
    return message


def prepare_submission(
    data: bytes, *, extract_recipients: bool, unreadable: list[str] | None = None
) -> tuple[bytes, list[str]]:
    """The copy of a submitted message to store, and with `extract_recipients` (-t) its header recipients.

    Line endings become CRLF, a leading mbox `From ` line and the fields marked `dropped` in `_FIELD_RULES`
    (Bcc, Resent-Bcc, Return-Path, Content-Length) are removed, a missing empty line after the header block is
    inserted; nothing else changes. Raises MessageError when a recipient field cannot be read; with an
    `unreadable` list, the addresses of such a field that can be read are kept, and a line for each one that
    cannot is added to the list instead (the caller decides whether the rest is enough).
    """
    if not data:
        return b"", []
    message = _drop_mbox_separator(normalise_line_endings(data))
    block = header_block(message)
    kept: list[bytes] = []
    recipient_fields: dict[str, list[tuple[str, bytes]]] = {"original": [], "resent": []}
    resent = False
    for name, field in block.fields:
        lower_name = name.lower()
        resent = resent or lower_name.startswith("resent-")
        rule = _FIELD_RULES.get(lower_name, _NO_RULE)
        if rule.recipients:
            recipient_fields[rule.recipients].append((name, field))
        if not rule.dropped:
            kept.append(field)
    recipients: list[str] = []
    if extract_recipients:
        recipients = _recipients(recipient_fields["resent" if resent else "original"], unreadable)
    if len(kept) == len(block.fields) and not block.separator_missing:
        return message, recipients
    separator = CRLF if block.separator_missing else b""
    return b"".join(kept) + separator + message[block.end :], recipients


def _recipients(fields: list[tuple[str, bytes]], unreadable: list[str] | None = None) -> list[str]:
    """The addr-specs in the given recipient fields, in order, without repeats. A field that cannot be
    read raises MessageError, or, with an `unreadable` list, keeps the members that can be read (split at
    its top-level commas) and adds a line for each that cannot."""
    addrs: list[str] = []
    for name, field in fields:
        value = _raw_value(field).decode("utf-8", "surrogateescape")
        try:
            addrs.extend(recipient_addrs(parse_list(value), value))
        except AddressError as error:
            shown = excerpt(f"{name}: {_unfolded(field)}")
            if unreadable is None:
                raise MessageError(f"cannot read the recipients in {shown}: {error}") from None
            for member in _members(value):
                try:
                    addrs.extend(recipient_addrs(parse_list(member), member))
                except AddressError as member_error:
                    unreadable.append(
                        f"cannot read {excerpt(' '.join(member.split()))} in {shown}: {member_error}"
                    )
    return unique_addresses(addrs)


def _members(value: str) -> list[str]:
    """An address list cut at its top-level commas: not inside quotes, <angle brackets> or (comments)."""
    members, start, quoted, angle, comment, escaped = [], 0, False, 0, 0, False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quoted:
            quoted = char != '"'
        elif char == '"':
            quoted = True
        elif char == "(":
            comment += 1
        elif char == ")" and comment:
            comment -= 1
        elif char == "<" and not comment:
            angle += 1
        elif char == ">" and angle:
            angle -= 1
        elif char == "," and not (angle or comment):
            members.append(value[start:index])
            start = index + 1
    members.append(value[start:])
    return [member for member in members if member.strip()]


def _qualified_field(field: bytes, domain: str) -> bytes:
    """`field` with `@domain` inserted after each bare local part; every other byte as it was.

    A field that cannot be parsed is returned untouched: delivery must not fail on a header.
    """
    colon = field.index(b":") + 1
    value = _raw_value(field)
    text = value.decode("utf-8", "surrogateescape")
    if _plainly_qualified(text):
        return field
    try:
        mailboxes = parse_list(text)
    except AddressError:
        return field
    bare = [mailbox for mailbox in mailboxes if is_local_part_only(mailbox.addr)]
    if not bare:
        return field
    for mailbox in reversed(bare):  # from the end, so earlier spans stay valid
        text = f"{text[: mailbox.end]}@{domain}{text[mailbox.end :]}"
    return field[:colon] + _encoded(text) + field[colon + len(value) :]


# What makes an address field less than plain (`_plainly_qualified`): quotes, comments, escapes, groups.
_NOT_PLAIN = frozenset('"(\\:;')


def _plainly_qualified(text: str) -> bool:
    """True when every address of a simple field already has a domain: no quotes, comments, groups or
    escapes, and each comma-separated member has an @ (inside its <> when it has one). A fast path for the
    common `Name <a@example.org>`; anything less plain goes through the parser."""
    if not _NOT_PLAIN.isdisjoint(text):
        return False
    for member in text.split(","):
        angle = member.find("<")
        if "@" not in (member[angle:] if angle >= 0 else member):
            return False
    return True


def _display_name(full_name: str) -> str:
    """`full_name` for a From field: controls removed, quoted if it holds specials, RFC 2047 if not ASCII."""
    name = "".join(" " if is_control(char) else char for char in full_name).strip()
    # GECOS bytes that are not UTF-8 arrive as surrogates; they cannot be encoded, so they become U+FFFD.
    name = _encoded(name).decode("utf-8", "replace")
    if not name.isascii():
        from email.header import Header

        return Header(name, "utf-8", header_name="From").encode(linesep="\r\n")
    if any(char in _DISPLAY_SPECIALS for char in name):
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return name


def _from_value(full_name: str, addr: str) -> str:
    """The value of a generated From field."""
    display = _display_name(full_name)
    return f"{display} <{addr}>" if display else addr


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_date(moment: float) -> str:
    """`moment` as an RFC 5322 date in the local time zone, English names whatever the locale: the one date
    writer (email.utils.formatdate gives the same text, but importing `email` would cost sendmail)."""
    import time

    whole = int(moment)
    if round((moment - whole) * 1e6) >= 1_000_000:
        whole += 1  # as datetime (and so formatdate) rounds to the microsecond: 1.9999995 is 00:00:02
    local = time.localtime(whole)
    offset = local.tm_gmtoff // 60
    zone = f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"
    return (
        f"{_DAYS[local.tm_wday]}, {local.tm_mday:02d} {_MONTHS[local.tm_mon - 1]} {local.tm_year} "
        f"{local.tm_hour:02d}:{local.tm_min:02d}:{local.tm_sec:02d} {zone}"
    )


def complete(message: bytes, **fields: "Any") -> bytes:
    """The copy of a prepared message to deliver (`complete_head`, same keywords): the completed header
    block, then the rest of `message` byte for byte."""
    head, end = complete_head(message, **fields)
    return b"".join((head, memoryview(message)[end:]))  # the body is copied once, into the result


def header_known(head: bytes) -> bool:
    """Whether `head`, the start of a message, holds its whole header block and the line that ends it, so
    that `complete_head` and `rewrite_from` give the same for it as for the whole message."""
    complete_lines = head[: head.rfind(b"\n") + 1]
    return header_block(complete_lines).end < len(complete_lines)


def complete_head(
    message: bytes,
    *,
    queued_at: float,
    message_id: str,
    sender: str,
    submitted_by: str,
    full_name: str,
    domain: str,
    hostname: str,
) -> tuple[bytes, int]:
    """A prepared message's header block as delivery sends it, and where in `message` the rest (the empty
    line and the body, untouched) begins: Date, Message-ID and From added when missing, bare addresses
    qualified. `message` may be only the start of it, when that holds the whole header (`header_known`).

    The result depends only on the arguments, so every delivery attempt of one queued message carries the same
    Message-ID. New fields go after the existing ones; a message without a header block gets them followed by
    an empty line.
    """
    block = header_block(message)
    parts: list[bytes] = []
    present: set[str] = set()
    for name, field in block.fields:
        lower = name.lower()
        present.add(lower)
        if domain and _FIELD_RULES.get(lower, _NO_RULE).qualified:
            field = _qualified_field(field, domain)
        parts.append(field if field.endswith(b"\n") else field + CRLF)
    generated = []  # in this order, each when missing
    if "date" not in present:
        generated.append(f"Date: {format_date(queued_at)}\r\n")
    if "message-id" not in present:
        generated.append(f"Message-ID: <{message_id}@{hostname}>\r\n")
    if "from" not in present:
        generated.append(f"From: {_from_value(full_name, qualify(sender or submitted_by, domain))}\r\n")
    parts.extend(_encoded(line) for line in generated)
    if not block.fields or block.separator_missing:
        parts.append(CRLF)
    return b"".join(parts), block.end


def rewrite_from(message: bytes, address: str, original: str = "x-original-from") -> bytes:
    """The message with the address of its From: header replaced by `address` (a smarthost account that
    accepts no other sender), keeping the display name; without one, the old address becomes the display
    name, so a reader still sees who wrote. The old From: value is kept in an `X-Original-From:` header, or
    becomes `Reply-To:` (only when the message has none), or is dropped, as `original` says.

    A message without a From: header, or with one that cannot be parsed, gets `From: <address>`.
    """
    block = header_block(message)
    header: list[bytes] = []
    old_value: str | None = None
    has_reply_to = False
    for name, field in block.fields:
        lower = name.lower()
        has_reply_to = has_reply_to or lower == "reply-to"
        if lower == "from" and old_value is None:
            old_value = _unfolded(field).strip()
            continue
        header.append(field if field.endswith(b"\n") else field + CRLF)
    display = ""
    old_address = ""
    if old_value:
        try:
            mailboxes = parse_list(old_value)
        except AddressError:
            mailboxes = []
        if mailboxes:
            old_address = mailboxes[0].addr
            display = mailboxes[0].display.strip().strip('"').strip()
    if not display and old_value and old_value.endswith(")") and "(" in old_value:
        display = old_value[
            old_value.rindex("(") + 1 : -1
        ].strip()  # root (Cron Daemon): the comment names it
    name = display or old_address
    new = [f"From: {_from_value(name, address)}\r\n"]
    if old_value and original == "x-original-from":
        new.append(f"X-Original-From: {old_value}\r\n")
    elif old_address and original == "reply-to" and not has_reply_to:
        new.append(f"Reply-To: {old_value}\r\n")
    header.extend(_encoded(line) for line in new)
    if not block.fields or block.separator_missing:
        header.append(CRLF)
    return b"".join(header) + message[block.end :]


# RFC 5321 4.5.3.1.6 and RFC 5322 2.1.1: at most 998 octets on a line, CRLF not counted. Servers that defend
# against SMTP smuggling, and aiosmtpd, refuse longer ones ("500 Line too long"); cron output has them.
MAX_LINE = 998
